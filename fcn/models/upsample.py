"""Learnable upsampling: a transposed convolution initialised to bilinear interpolation.

FCN does not resize its coarse scores with a fixed interpolation: it upsamples them with a
transposed convolution whose kernel starts as bilinear interpolation and is then learned.
This module owns that layer and the kernel it starts from; in training it computes the
transposed convolution as its equivalent sub-pixel convolution (same outputs and gradients;
faster on the CPU). :class:`InterpolateUpsample` is the fixed alternative the ablation compares
against (``F.interpolate``, no weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        learnable: when False the kernel stays at its initialisation; it is frozen through
            ``requires_grad`` so it is visible as frozen in any parameter count, not left out of
            the optimizer.
        init: ``"bilinear"`` (the default, FCN's) or ``"random"``: ``ConvTranspose2d``'s own
            initialisation (Kaiming-uniform over all channel pairs), the ablation's control for
            the bilinear start. The padding and crop are the same either way.

    Attributes:
        subpixel_training: True (the default) computes training passes (training mode, gradients
            enabled) as the equivalent sub-pixel convolution (:meth:`forward`); False keeps
            ``ConvTranspose2d`` there too (``scripts/measure_fast_paths.py`` compares the two).
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True, init: str = "bilinear") -> None:
        super().__init__()
        if factor < 2:
            raise ValueError(f"BilinearUpsample needs factor >= 2, got {factor}")
        if init not in ("bilinear", "random"):
            raise ValueError(f"BilinearUpsample init must be 'bilinear' or 'random', got {init!r}")
        self.factor = factor
        kernel = bilinear_kernel(factor)
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size=kernel.shape[-1], stride=factor, bias=False)
        if init == "bilinear":
            self.reset_parameters()
        self.deconv.weight.requires_grad_(learnable)
        self.subpixel_training = True
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
        """Relative L2 distance of the kernel from bilinear interpolation,
        ``||W - W_bilinear||_2 / ||W_bilinear||_2`` over the whole weight tensor (0 at a bilinear
        start; about 1 or more for a random start)."""
        start = self.bilinear_weight()
        return float((self.deconv.weight.detach() - start).norm() / start.norm())

    def subpixel_weight(self) -> torch.Tensor:
        """The transposed convolution's kernel as the weight of its equivalent sub-pixel convolution.

        A stride-``f`` transposed convolution with a ``2f x 2f`` kernel ``w`` (a shorter kernel is
        zero-padded to ``2f``, which changes nothing) computes output ``y[f*q + r] = x[q] w[r] +
        x[q-1] w[r+f]`` in each dimension: for each of the ``f x f`` output phases ``(r_h, r_w)``
        a 2 x 2 convolution over the input. Stacking the phases as output channels gives one
        ordinary convolution followed by ``pixel_shuffle(f)`` (Shi et al., "Real-Time Single Image
        and Video Super-Resolution Using an Efficient Sub-Pixel CNN", CVPR 2016; the equivalence:
        Aitken et al., "Checkerboard artifact free sub-pixel convolution", arXiv:1707.02937).

        Returns:
            ``(C * f * f) x C x 2 x 2``: output channel ``c * f * f + r_h * f + r_w``, input channel
            ``c_in``, tap ``(a, b)`` holds ``w[c_in, c, r_h + f * (1 - a), r_w + f * (1 - b)]``.
            Built from the parameter on every call, so gradients reach ``deconv.weight``.
        """
        f = self.factor
        w = self.deconv.weight  # C_in x C_out x K x K, K = 2f - f % 2
        cin, cout, k = w.shape[0], w.shape[1], w.shape[-1]
        w = F.pad(w, (0, 2 * f - k, 0, 2 * f - k)).view(cin, cout, 2, f, 2, f)
        # -> C_out x r_h x r_w x C_in x (1 - a) x (1 - b), then flip to taps (a, b).
        return w.permute(1, 3, 5, 0, 2, 4).flip(-1, -2).reshape(cout * f * f, cin, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``N x C x H x W`` scores to ``N x C x (factor * H) x (factor * W)``.

        Computes ``deconv(replicate_pad1(x))`` cropped to ``[_offset, _offset + factor * H)``
        (and the same for W). In training mode with gradients enabled (and ``x`` or the kernel
        requiring them) it is computed as the equivalent sub-pixel convolution
        (:meth:`subpixel_weight`): a 2 x 2 convolution of the padded input, ``pixel_shuffle``,
        and the crop (the valid convolution gives rows ``[f, (H + 2) * f)`` of the transposed
        convolution, and ``f <= _offset <= 2f``). Outputs and gradients are equal to float
        rounding. On the CPU (oneDNN, torch 2.14) the backward of ``ConvTranspose2d`` with a
        large kernel on a few channels is slow; the sub-pixel form made a training step of the
        tiny FCN-8s 1.06-1.16x faster at 128 px and FCN-32s 1.54x (docs/performance.md, "The upsampling").
        In eval mode (evaluation, prediction, tracing and ONNX export) or without gradients it
        runs the transposed convolution, as fast or faster there.
        """
        f = self.factor
        h, w = x.shape[-2:]
        backward_follows = torch.is_grad_enabled() and (x.requires_grad or self.deconv.weight.requires_grad)
        if self.training and self.subpixel_training and backward_follows:
            y = F.pixel_shuffle(F.conv2d(replicate_pad1(x), self.subpixel_weight()), f)
            o = self._offset - f
        else:
            y = self.deconv(replicate_pad1(x))
            o = self._offset
        return y[..., o : o + h * f, o : o + w * f]


class InterpolateUpsample(nn.Module):
    """``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)``: a fixed
    upsampling with no weights, ``N x C x H x W`` -> ``N x C x (factor * H) x (factor * W)``.

    It computes what a frozen :class:`BilinearUpsample` computes (the same values up to float
    rounding, tested), without the transposed convolution.

    Args:
        factor: integer upsampling factor (>= 2).
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        if factor < 2:
            raise ValueError(f"InterpolateUpsample needs factor >= 2, got {factor}")
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
