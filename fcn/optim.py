"""Parameter groups for the optimiser: no weight decay on biases and normalisation weights, and
an optional learning-rate multiplier for the decoder (score layers and upsampling)."""

from __future__ import annotations

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


def build_optimizer(factory: Callable, model: nn.Module, decoder_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """Call an optimiser ``factory`` (a ``functools.partial`` from the config, holding ``lr`` and
    ``weight_decay``) on the parameter groups of ``model``."""
    weight_decay = factory.keywords.get("weight_decay", 0.0)
    optimizer = factory(param_groups(model, weight_decay, decoder_lr_mult))
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group["lr_mult"]
    return optimizer
