"""Parameter groups for the optimiser: no weight decay on biases and normalisation weights, and
an optional learning-rate multiplier for the decoder (score layers and upsampling)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

DECODER_PREFIXES = ("score_", "up_")


def param_groups(model: nn.Module, weight_decay: float, decoder_lr_mult: float = 1.0) -> list[dict]:
    """Split trainable parameters into groups for ``torch.optim`` constructors.

    Weight decay pulls weights towards zero; on biases and normalisation scales that only costs
    accuracy, so they get none (the usual practice since "Bag of Tricks", He et al. 2019). With
    ``decoder_lr_mult`` the score layers and upsampling layers learn that many times faster than
    the encoder (useful with a pretrained encoder). Each group carries ``lr_mult`` so a scheduler
    or a reader can tell them apart; the optimiser's base lr is multiplied by it.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1  # biases, batch-norm weights and biases
        decoder = name.startswith(DECODER_PREFIXES)
        groups.setdefault((no_decay, decoder), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_mult": decoder_lr_mult if decoder else 1.0,
        }
        for (no_decay, decoder), params in sorted(groups.items())
    ]


def implementation(factory: Callable, model: nn.Module) -> dict[str, bool]:
    """The fastest update implementation torch offers for this optimiser on the model's device:
    ``{"fused": True}`` (one kernel over all tensors) where the optimiser class takes ``fused`` and
    torch has fused kernels for the device, else ``{"foreach": True}`` (multi-tensor ops) where it
    takes ``foreach``, else ``{}`` (torch's choice).

    An empty dict too when the config already sets ``fused`` or ``foreach`` (e.g.
    ``+optim.fused=false``): the user's choice wins. All three compute the same update; fused and
    foreach only batch the per-parameter work (an AdamW step of the tiny model and of VGG16-FCN on
    the 2-core CPU: docs/performance.md).
    """
    if "fused" in factory.keywords or "foreach" in factory.keywords:
        return {}
    accepts = inspect.signature(factory.func).parameters
    params = [p for p in model.parameters() if p.requires_grad]
    device_types = {p.device.type for p in params}
    floating = all(p.is_floating_point() for p in params)
    if "fused" in accepts and floating and device_types <= set(_fused_devices()):
        return {"fused": True}
    if "foreach" in accepts:
        return {"foreach": True}
    return {}


def _fused_devices() -> list[str]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return _get_fused_kernels_supported_devices()
    except ImportError:  # a torch without the helper: CUDA has had fused Adam/AdamW/SGD for long
        return ["cuda"]


def build_optimizer(factory: Callable, model: nn.Module, decoder_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """Call an optimiser ``factory`` (a ``functools.partial`` from the config, holding ``lr`` and
    ``weight_decay``) on the parameter groups of ``model``, with the fused or foreach
    implementation where torch has one (:func:`implementation`)."""
    weight_decay = factory.keywords.get("weight_decay", 0.0)
    optimizer = factory(param_groups(model, weight_decay, decoder_lr_mult), **implementation(factory, model))
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group["lr_mult"]
    return optimizer
