"""The FCN model: an encoder, 1x1 score layers, and a learned bilinear-initialised decoder.

FCN-32s upsamples the stride-32 scores straight to the image. FCN-16s first upsamples them 2x
and adds scores from pool4; FCN-8s then does the same again with pool3 before the final 8x
upsampling (Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation", 2015).
"""

from __future__ import annotations

import torch
from torch import nn

from fcn.errors import UserError
from fcn.models.backbones import BACKBONES
from fcn.models.upsample import BilinearUpsample

VARIANTS = ("32s", "16s", "8s")


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


class FCN(nn.Module):
    """Fully convolutional network for semantic segmentation.

    Args:
        num_classes: number of output classes.
        backbone: encoder name, a key of ``fcn.models.backbones.BACKBONES`` ("tiny", "vgg16").
        variant: "32s", "16s" or "8s": which pooling stages are fused before the last upsampling.
        width: channel width of the encoder (only "tiny" lets it vary).
        learnable_upsampling: learn the transposed convolutions (True) or keep them bilinear.
        pretrained: load the backbone's ImageNet weights through torchvision.
        backbone_weights: path of a local state dict for the backbone.

    The output is ``N x num_classes x H x W`` for any input ``N x 3 x H x W``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tiny",
        variant: str = "8s",
        width: int = 16,
        learnable_upsampling: bool = True,
        pretrained: bool = False,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown FCN variant {variant!r} (model.variant): choose one of {VARIANTS}")
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r} (model.backbone): choose one of {sorted(BACKBONES)}")
        self.num_classes = num_classes
        self.variant = variant
        self.encoder = BACKBONES[backbone](width=width, pretrained=pretrained, weights_path=backbone_weights)
        channels = self.encoder.channels
        self.score_out = _score(channels["out"], num_classes)
        if variant in ("16s", "8s"):
            self.score_pool4 = _score(channels["pool4"], num_classes)
            self.up_out = BilinearUpsample(num_classes, 2, learnable_upsampling)
        if variant == "8s":
            self.score_pool3 = _score(channels["pool3"], num_classes)
            self.up_pool4 = BilinearUpsample(num_classes, 2, learnable_upsampling)
        final_stride = {"32s": 32, "16s": 16, "8s": 8}[variant]
        self.up_final = BilinearUpsample(num_classes, final_stride, learnable_upsampling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        features = self.encoder(x)
        score = self.score_out(features["out"])
        if self.variant in ("16s", "8s"):
            skip = self.score_pool4(features["pool4"])
            score = _crop_to(self.up_out(score), *skip.shape[-2:]) + skip
        if self.variant == "8s":
            skip = self.score_pool3(features["pool3"])
            score = _crop_to(self.up_pool4(score), *skip.shape[-2:]) + skip
        return _crop_to(self.up_final(score), height, width)
