"""What a run is: parameter counts and FLOPs at the start, and how the decoder is learning."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn.models.upsample import BilinearUpsample


def model_summary(model: nn.Module, crop: tuple[int, int], device: torch.device) -> dict:
    """Parameters (trainable / frozen) and forward FLOPs of one image at ``crop``.

    Counted in eval mode without gradients, so batch-norm statistics are left as they are.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *crop, device=device))
    model.train(was_training)
    return {
        "parameters": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "forward_gflops_per_image": counter.get_total_flops() / 1e9,
        "crop": list(crop),
    }


def decoder_drift(model: nn.Module) -> dict[str, float]:
    """For each upsampling layer, how far its kernel has moved from bilinear (relative L2)."""
    return {name: m.drift() for name, m in model.named_modules() if isinstance(m, BilinearUpsample)}


def decoder_kernels(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned kernel of channel 0 of each upsampling layer, scaled to [0, 1] for display."""
    kernels = {}
    for name, m in model.named_modules():
        if isinstance(m, BilinearUpsample):
            k = m.deconv.weight.detach()[0, 0].float().cpu()
            kernels[name] = ((k - k.min()) / (k.max() - k.min()).clamp(min=1e-12)).unsqueeze(0)
    return kernels
