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
from fcn.models.upsample import BilinearUpsample

VARIANTS = ("32s", "16s", "8s", "4s")
# The taps each variant fuses, coarsest first, and the stride of its final upsampling.
SKIPS = {"32s": (), "16s": ("pool4",), "8s": ("pool4", "pool3"), "4s": ("pool4", "pool3", "pool2")}
FINAL_STRIDE = {"32s": 32, "16s": 16, "8s": 8, "4s": 4}
# FCN-8s "at-once" (the paper's all-at-once training) scales pool4 by 0.01 and pool3 by 0.0001
# before scoring, so the finer skips start small next to the stride-32 stream and the net first
# learns what staged training learns first; pool2 (4s only) continues the pattern.
AT_ONCE_SKIP_SCALE = {"pool4": 1e-2, "pool3": 1e-4, "pool2": 1e-6}
UPSAMPLING_CHOICES = ("all", "intermediate", "none")


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


def _upsampling_mode(learnable_upsampling: bool | str) -> str:
    if learnable_upsampling is True:
        return "all"
    if learnable_upsampling is False:
        return "none"
    if learnable_upsampling not in UPSAMPLING_CHOICES:
        raise UserError(
            f"model.learnable_upsampling={learnable_upsampling!r}: choose true (all), false (none) or intermediate"
        )
    return learnable_upsampling


class FCN(nn.Module):
    """Fully convolutional network for semantic segmentation.

    Args:
        num_classes: number of output classes.
        backbone: encoder name, a key of ``fcn.models.backbones.BACKBONES``.
        variant: "32s", "16s", "8s" or "4s": which pooling stages are fused before the last
            upsampling.
        width: channel width of the encoder; None for the backbone's own (only "tiny" lets it vary).
        learnable_upsampling: which transposed convolutions learn: True / "all", "intermediate"
            (the 2x layers learn and the final one stays bilinear, as in the paper) or
            False / "none". Frozen layers keep their bilinear kernel through ``requires_grad``.
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
        learnable_upsampling: bool | str = True,
        pretrained: bool = False,
        backbone_weights: str | None = None,
        scaled_skips: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown FCN variant {variant!r} (model.variant): choose one of {VARIANTS}")
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r} (model.backbone): choose one of {sorted(BACKBONES)}")
        mode = _upsampling_mode(learnable_upsampling)
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
            setattr(self, f"up_{coarser}", BilinearUpsample(num_classes, 2, mode != "none"))
            coarser = tap
        self.up_final = BilinearUpsample(num_classes, FINAL_STRIDE[variant], mode == "all")

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
