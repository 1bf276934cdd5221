"""Encoders that shrink the image with convolutions and max-pooling.

Every backbone returns its features at three taps, the outputs of the pooling stages FCN fuses:
``pool3`` (stride 8), ``pool4`` (stride 16) and ``out`` (stride 32, after the fc6/fc7-style head).
Pooling uses ``ceil_mode=True`` so a feature cell ``j`` at stride ``s`` covers input pixels
``[j*s, (j+1)*s)`` for any input size; the decoder relies on this to crop top-left.

Adding a backbone is one function here that returns an :class:`Encoder`, plus one entry in
:data:`BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fcn.errors import UserError

TAPS = ("pool3", "pool4", "out")


class Encoder(nn.Module):
    """Runs ``stages`` in order and returns the tapped features by name.

    Args:
        stem_to_pool3, pool3_to_pool4, pool4_to_out: consecutive parts of the network.
        channels: number of channels at each tap, keyed like the returned dict.
    """

    def __init__(
        self,
        stem_to_pool3: nn.Module,
        pool3_to_pool4: nn.Module,
        pool4_to_out: nn.Module,
        channels: dict[str, int],
    ) -> None:
        super().__init__()
        self.stem_to_pool3 = stem_to_pool3
        self.pool3_to_pool4 = pool3_to_pool4
        self.pool4_to_out = pool4_to_out
        self.channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pool3 = self.stem_to_pool3(x)
        pool4 = self.pool3_to_pool4(pool3)
        return {"pool3": pool3, "pool4": pool4, "out": self.pool4_to_out(pool4)}


def _conv_bn_relu(cin: int, cout: int, kernel_size: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def _vgg_stage(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += _conv_bn_relu(cin if i == 0 else cout, cout)
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


def tiny(width: int = 16, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """A small VGG-style encoder with batch norm, for CPUs: five conv+pool stages.

    Channels are ``width * (1, 2, 4, 8, 8)`` per stage, then a 3x3 "fc6" and a 1x1 "fc7" at
    stride 32 (the classic FCN head, shrunk). It has no pretrained weights; ``weights_path``
    loads a state dict saved from this encoder.
    """
    if pretrained:
        raise UserError(
            "backbone 'tiny' has no pretrained weights: set model.pretrained=false "
            "(or model.backbone_weights=PATH for a state dict of this encoder)"
        )
    w = width
    head = 16 * w
    encoder = Encoder(
        nn.Sequential(_vgg_stage(3, w, 1), _vgg_stage(w, 2 * w, 1), _vgg_stage(2 * w, 4 * w, 2)),
        _vgg_stage(4 * w, 8 * w, 2),
        nn.Sequential(
            _vgg_stage(8 * w, 8 * w, 2),
            *_conv_bn_relu(8 * w, head),
            *_conv_bn_relu(head, head, kernel_size=1),
        ),
        channels={"pool3": 4 * w, "pool4": 8 * w, "out": head},
    )
    if weights_path:
        _load_state_dict(encoder, weights_path)
    return encoder


def vgg16(width: int = 64, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """torchvision's VGG16 as the classic FCN backbone.

    fc6 and fc7 become a 7x7 and a 1x1 convolution (4096 channels, with dropout), and when
    ``pretrained`` the classifier's Linear weights are transplanted into them, FCN's "surgery".
    ``pretrained`` uses torchvision's weights API (downloads once, then caches); without
    network access pass a saved torchvision VGG16 state dict as ``weights_path`` instead.
    ``width`` is fixed by the architecture and must be 64.
    """
    from torchvision.models import VGG16_Weights
    from torchvision.models import vgg16 as tv_vgg16

    if width != 64:
        raise UserError(f"backbone 'vgg16' has a fixed width of 64, got model.width={width}")
    if pretrained:
        try:
            net = tv_vgg16(weights=VGG16_Weights.IMAGENET1K_V1)
        except Exception as exc:  # noqa: BLE001 - urllib, ssl, hash errors all mean "no weights"
            raise UserError(
                f"could not download the VGG16 ImageNet weights ({exc.__class__.__name__}: {exc}); "
                "offline, save torchvision's vgg16 state dict elsewhere and pass "
                "model.backbone_weights=PATH with model.pretrained=false"
            ) from exc
    else:
        net = tv_vgg16(weights=None)
        if weights_path:
            _load_state_dict(net, weights_path)
    features = net.features
    for layer in features:
        if isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True
    fc6 = nn.Conv2d(512, 4096, kernel_size=7, padding=3)
    fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
    with torch.no_grad():
        fc6.weight.copy_(net.classifier[0].weight.view(4096, 512, 7, 7))
        fc6.bias.copy_(net.classifier[0].bias)
        fc7.weight.copy_(net.classifier[3].weight.view(4096, 4096, 1, 1))
        fc7.bias.copy_(net.classifier[3].bias)
    # torchvision's VGG16 features: pool3 ends at index 16, pool4 at 23, pool5 at 30.
    return Encoder(
        features[:17],
        features[17:24],
        nn.Sequential(
            features[24:],
            fc6,
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            fc7,
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        ),
        channels={"pool3": 256, "pool4": 512, "out": 4096},
    )


def _load_state_dict(module: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"backbone weights not found: {file.resolve()} (check model.backbone_weights)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"could not read backbone weights {file}: {exc}") from exc
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"backbone weights {file} do not fit this backbone: {first}") from exc


BACKBONES: dict[str, Callable[..., Encoder]] = {"tiny": tiny, "vgg16": vgg16}
