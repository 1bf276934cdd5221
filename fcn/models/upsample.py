"""Learnable upsampling: a transposed convolution initialised to bilinear interpolation.

FCN does not resize its coarse scores with a fixed interpolation: it upsamples them with a
transposed convolution whose kernel starts as bilinear interpolation and is then learned.
This module owns that layer and the kernel it starts from.
"""

from __future__ import annotations

import torch
from torch import nn


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The 2-D bilinear interpolation kernel of a stride-``factor`` transposed convolution.

    Same construction as FCN's ``surgery.upsample_filt``: size ``2 * factor - factor % 2``,
    weights falling off linearly from the centre.
    """
    size = 2 * factor - factor % 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    return (taps[:, None] * taps[None, :]).float()


def replicate_pad1(x: torch.Tensor) -> torch.Tensor:
    """``F.pad(x, (1, 1, 1, 1), mode="replicate")`` for ``N x C x H x W``, built from slices and
    concatenation: the same values and gradients, and it compiles. ``torch.compile`` (torch 2.14)
    fails on the backward of ``replication_pad2d`` for channels-last inputs (its meta kernel
    predicts other strides than the CPU kernel returns: "expected ... stride", issue 17)."""
    x = torch.cat([x[..., :1, :], x, x[..., -1:, :]], dim=-2)
    return torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)


class BilinearUpsample(nn.Module):
    """Upsample ``channels`` score maps by an integer ``factor`` with a learnable kernel.

    At initialisation the output equals
    ``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)`` at every
    output pixel, borders included. Plain zero padding would darken the borders, so the input is
    replicate-padded by one cell and the transposed convolution's output is cropped back to
    ``factor * size`` (the crop offset puts each output pixel at the input coordinate
    ``(o + 0.5) / factor - 0.5``, which is what ``align_corners=False`` means).

    Args:
        channels: number of input (and output) channels, usually the number of classes.
        factor: integer upsampling factor (>= 2).
        learnable: when False the kernel stays bilinear; it is frozen through ``requires_grad``
            so it is visible as frozen in any parameter count, not left out of the optimizer.
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        super().__init__()
        if factor < 2:
            raise ValueError(f"BilinearUpsample needs factor >= 2, got {factor}")
        self.factor = factor
        kernel = bilinear_kernel(factor)
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size=kernel.shape[-1], stride=factor, bias=False)
        self.reset_parameters()
        self.deconv.weight.requires_grad_(learnable)
        # Offset of output pixel 0 inside the transposed convolution of the padded input.
        self._offset = (3 * factor) // 2

    @property
    def learnable(self) -> bool:
        return self.deconv.weight.requires_grad

    def bilinear_weight(self) -> torch.Tensor:
        """The initial weight: bilinear interpolation, channel c feeding only output channel c."""
        weight = torch.zeros_like(self.deconv.weight)
        kernel = bilinear_kernel(self.factor).to(weight)
        for c in range(weight.shape[0]):
            weight[c, c] = kernel
        return weight

    def reset_parameters(self) -> None:
        """Set the kernel to bilinear interpolation."""
        with torch.no_grad():
            self.deconv.weight.copy_(self.bilinear_weight())

    def drift(self) -> float:
        """Relative L2 distance of the kernel from its bilinear initialisation (0 at the start)."""
        start = self.bilinear_weight()
        return float((self.deconv.weight.detach() - start).norm() / start.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.deconv(replicate_pad1(x))
        o = self._offset
        return y[..., o : o + h * self.factor, o : o + w * self.factor]
