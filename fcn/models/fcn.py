"""The FCN model: an encoder, 1x1 score layers, and a learned bilinear-initialised decoder.

FCN-32s upsamples the stride-32 scores straight to the image. FCN-16s first upsamples them 2x
and adds scores from pool4; FCN-8s then does the same again with pool3 before the final 8x
upsampling (Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation", 2015). FCN-4s continues the same pattern with the stride-4 features.
"""

from __future__ import annotations

import torch
from torch import nn

from fcn.errors import UserError
from fcn.models.backbones import BACKBONES
from fcn.models.upsample import BilinearUpsample, InterpolateUpsample

VARIANTS = ("32s", "16s", "8s", "4s")
# The taps each variant fuses, coarsest first, and the stride of its final upsampling.
SKIPS = {"32s": (), "16s": ("pool4",), "8s": ("pool4", "pool3"), "4s": ("pool4", "pool3", "pool2")}
FINAL_STRIDE = {"32s": 32, "16s": 16, "8s": 8, "4s": 4}
# FCN-8s "at-once" (the paper's all-at-once training) scales pool4 by 0.01 and pool3 by 0.0001
# before scoring, so the finer skips start small next to the stride-32 stream and the net first
# learns what staged training learns first; pool2 (4s only) continues the pattern.
AT_ONCE_SKIP_SCALE = {"pool4": 1e-2, "pool3": 1e-4, "pool2": 1e-6}
# How the decoder upsamples (the ablation in docs/upsampling-ablation.md compares them):
# learned: every transposed convolution starts bilinear and learns (FCN's idea, the default);
# frozen: they stay bilinear; intermediate: the 2x ones learn, the final one stays bilinear (the
# paper's FCN-8s); random: they learn from ConvTranspose2d's default (random) initialisation;
# interpolate: F.interpolate(mode="bilinear"), no transposed convolution and no weights.
UPSAMPLING = ("learned", "frozen", "intermediate", "random", "interpolate")
# The values of the old setting model.learnable_upsampling (checkpoints written before
# model.upsampling existed carry it) and what they mean now.
LEGACY_UPSAMPLING = {
    True: "learned",
    False: "frozen",
    "all": "learned",
    "none": "frozen",
    "intermediate": "intermediate",
}


def _score(in_channels: int, num_classes: int) -> nn.Conv2d:
    # FCN zero-initialises its score layers: the net starts by predicting nothing in particular
    # and the skips start as no-ops, so adding a skip never disturbs what is already learned.
    conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Features at every stride are aligned at the top-left corner (ceil-mode pooling), so the
    # extra rows and columns an upsampling produces are at the bottom and right.
    return x[..., :height, :width]


def _upsampling_mode(upsampling: str, learnable_upsampling: bool | str | None) -> str:
    if learnable_upsampling is not None:  # a checkpoint's config from before model.upsampling
        if learnable_upsampling not in LEGACY_UPSAMPLING:
            raise UserError(
                f"model.learnable_upsampling={learnable_upsampling!r}: the setting is now model.upsampling, "
                f"one of {', '.join(UPSAMPLING)}"
            )
        return LEGACY_UPSAMPLING[learnable_upsampling]
    if upsampling not in UPSAMPLING:
        raise UserError(f"model.upsampling={upsampling!r}: choose one of {', '.join(UPSAMPLING)}")
    return upsampling


def _upsample(num_classes: int, factor: int, mode: str, final: bool) -> nn.Module:
    """The upsampling layer ``mode`` asks for, by ``factor`` (``final``: the last one, to the image)."""
    if mode == "interpolate":
        return InterpolateUpsample(factor)
    learnable = mode in ("learned", "random") or (mode == "intermediate" and not final)
    return BilinearUpsample(num_classes, factor, learnable, init="random" if mode == "random" else "bilinear")


class FCN(nn.Module):
    """Fully convolutional network for semantic segmentation.

    Args:
        num_classes: number of output classes.
        backbone: encoder name, a key of ``fcn.models.backbones.BACKBONES``.
        variant: "32s", "16s", "8s" or "4s": which pooling stages are fused before the last
            upsampling.
        width: channel width of the encoder; None for the backbone's own (only "tiny" lets it vary).
        upsampling: how the decoder upsamples: ``"learned"`` (transposed convolutions that
            start bilinear and learn, the default), ``"frozen"`` (they stay bilinear),
            ``"intermediate"`` (the 2x layers learn and the final one stays bilinear, as in the
            paper), ``"random"`` (they learn from ``ConvTranspose2d``'s random initialisation) or
            ``"interpolate"`` (``F.interpolate``, bilinear, no weights). Frozen layers keep their
            kernel through ``requires_grad``.
        learnable_upsampling: the setting ``upsampling`` replaced, still read from old
            checkpoints' configs: True = "learned", False = "frozen", "intermediate"; None
            (the default) leaves ``upsampling`` in charge.
        pretrained: load the backbone's ImageNet weights from torchvision's cache (downloaded there if missing).
        backbone_weights: path of a local state dict for the backbone (wins over ``pretrained``).
        scaled_skips: multiply pool4 / pool3 / pool2 features by 1e-2 / 1e-4 / 1e-6 before
            scoring, the paper's "at-once" FCN-8s.

    The output is ``N x num_classes x H x W`` for any input ``N x 3 x H x W``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tiny",
        variant: str = "8s",
        width: int | None = None,
        upsampling: str = "learned",
        pretrained: bool = False,
        backbone_weights: str | None = None,
        scaled_skips: bool = False,
        learnable_upsampling: bool | str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown FCN variant {variant!r} (model.variant): choose one of {VARIANTS}")
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r} (model.backbone): choose one of {sorted(BACKBONES)}")
        mode = _upsampling_mode(upsampling, learnable_upsampling)
        self.upsampling = mode
        self.num_classes = num_classes
        self.variant = variant
        self.encoder = BACKBONES[backbone](width=width, pretrained=pretrained, weights_path=backbone_weights)
        channels = self.encoder.channels
        self.skips = SKIPS[variant]
        if "pool2" in self.skips and "pool2" not in channels:
            raise UserError(f"backbone {backbone!r} has no stride-4 features for model.variant=4s")
        self.skip_scale = {tap: AT_ONCE_SKIP_SCALE[tap] if scaled_skips else 1.0 for tap in self.skips}
        self.score_out = _score(channels["out"], num_classes)
        # Each skip: upsample the running scores of the coarser tap 2x (``up_<coarser>``), add the
        # scores of this tap (``score_<tap>``). Names match the original FCN-16s/8s layers.
        coarser = "out"
        for tap in self.skips:
            setattr(self, f"score_{tap}", _score(channels[tap], num_classes))
            setattr(self, f"up_{coarser}", _upsample(num_classes, 2, mode, final=False))
            coarser = tap
        self.up_final = _upsample(num_classes, FINAL_STRIDE[variant], mode, final=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        features = self.encoder(x)
        score = self.score_out(features["out"])
        coarser = "out"
        for tap in self.skips:
            feature = features[tap]
            if self.skip_scale[tap] != 1.0:
                feature = feature * self.skip_scale[tap]
            skip = getattr(self, f"score_{tap}")(feature)
            score = _crop_to(getattr(self, f"up_{coarser}")(score), *skip.shape[-2:]) + skip
            coarser = tap
        return _crop_to(self.up_final(score), height, width)
