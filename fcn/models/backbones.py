"""Encoders that shrink the image and expose the features FCN fuses.

Every backbone returns its features at the same taps, named after VGG's pooling stages as in the
FCN paper: ``pool2`` (stride 4), ``pool3`` (stride 8), ``pool4`` (stride 16) and ``out``
(stride 32, after the fc6/fc7-style head where the backbone has one). One mechanism,
:class:`Encoder`, taps them for every backbone: the network is cut into three consecutive parts
ending at pool3, pool4 and out, and the stride-4 tap is a child index inside the first part.

Alignment: at every tap a ``H x W`` input gives ``ceil(H/s) x ceil(W/s)`` cells, so the decoder
can crop upsampled maps at the top-left. VGG-style encoders get this from ``ceil_mode`` pooling
(cell ``j`` covers pixels ``[j*s, (j+1)*s)`` exactly). ResNet and MobileNet downsample with
padded stride-2 convolutions, which also give ``ceil(H/s)`` cells, but their cell ``j`` is
centred near pixel ``j*s`` rather than ``(j+0.5)*s``: a shift of under half a cell that the
learned upsampling can absorb.

Adding a backbone is one function here that returns an :class:`Encoder`, one entry in
:data:`BACKBONES` and one YAML file in ``configs/model/``: the settings check (:mod:`fcn.config`)
reads the names from :data:`BACKBONES`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fcn.errors import UserError
from fcn.state_dict import load_into

TAPS = ("pool2", "pool3", "pool4", "out")
STRIDES = {"pool2": 4, "pool3": 8, "pool4": 16, "out": 32}

log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """Runs three consecutive parts of a network and returns the tapped features by name.

    Args:
        stem_to_pool3, pool3_to_pool4, pool4_to_out: consecutive parts of the network, ending at
            stride 8, 16 and 32.
        channels: number of channels at each tap, keyed like the returned dict.
        pool2_after: index of the child of ``stem_to_pool3`` (an ``nn.Sequential``) whose output
            is the stride-4 ``pool2`` tap; None when the backbone has none.
    """

    def __init__(
        self,
        stem_to_pool3: nn.Sequential,
        pool3_to_pool4: nn.Module,
        pool4_to_out: nn.Module,
        channels: dict[str, int],
        pool2_after: int | None = None,
    ) -> None:
        super().__init__()
        self.stem_to_pool3 = stem_to_pool3
        self.pool3_to_pool4 = pool3_to_pool4
        self.pool4_to_out = pool4_to_out
        self.channels = channels
        self.pool2_after = pool2_after

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        for i, layer in enumerate(self.stem_to_pool3):
            x = layer(x)
            if i == self.pool2_after:
                features["pool2"] = x
        features["pool3"] = x
        features["pool4"] = self.pool3_to_pool4(x)
        features["out"] = self.pool4_to_out(features["pool4"])
        return features


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


def tiny(width: int | None = None, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """A small VGG-style encoder with batch norm, for CPUs: five conv+pool stages.

    Channels are ``width * (1, 2, 4, 8, 8)`` per stage (``width`` 16 by default), then a 3x3
    "fc6" and a 1x1 "fc7" at stride 32 (the classic FCN head, shrunk). It has no pretrained
    weights; ``weights_path`` loads a state dict saved from this encoder.
    """
    if pretrained and not weights_path:
        raise UserError(
            "backbone 'tiny' has no pretrained weights: set model.pretrained=false "
            "(or model.backbone_weights=PATH for a state dict of this encoder)"
        )
    w = 16 if width is None else width  # 0 is refused by the settings check, never read as "unset"
    head = 16 * w
    encoder = Encoder(
        nn.Sequential(_vgg_stage(3, w, 1), _vgg_stage(w, 2 * w, 1), _vgg_stage(2 * w, 4 * w, 2)),
        _vgg_stage(4 * w, 8 * w, 2),
        nn.Sequential(
            _vgg_stage(8 * w, 8 * w, 2),
            *_conv_bn_relu(8 * w, head),
            *_conv_bn_relu(head, head, kernel_size=1),
        ),
        channels={"pool2": 2 * w, "pool3": 4 * w, "pool4": 8 * w, "out": head},
        pool2_after=1,
    )
    if weights_path:
        _load_state_dict(encoder, weights_path)
    return encoder


def _torchvision_net(name: str, pretrained: bool, weights_path: str | None) -> nn.Module:
    """torchvision's ``name`` network: random, from a local state dict, or with ImageNet weights.

    A local file wins over ``pretrained``, so a config that asks for pretrained weights also
    works offline once ``model.backbone_weights`` is given. ImageNet weights come from
    torchvision's cache (see :func:`_imagenet_weights_file`), downloaded there first only when
    the file is missing.
    """
    import torchvision.models

    builder = getattr(torchvision.models, name)
    net = builder(weights=None)
    if weights_path:
        _load_state_dict(net, weights_path)
    elif pretrained:
        file = _imagenet_weights_file(name)
        state = torch.load(file, map_location="cpu", weights_only=True)
        load_into(net, state, f"ImageNet weights {file}", fix=f"delete {file} and fetch it again")
    return net


def _imagenet_weights_url(name: str) -> str:
    """The URL of torchvision's default ImageNet weights for ``name`` (its file name ends in
    ``-<first hex digits of the file's sha256>.pth``)."""
    import torchvision.models

    return torchvision.models.get_model_weights(name).DEFAULT.url


# A download that cannot reach the server gives up after this many seconds of silence instead
# of hanging (urllib has no timeout of its own).
DOWNLOAD_TIMEOUT_S = 30


def _imagenet_weights_file(name: str) -> Path:
    """The checked path of ``name``'s ImageNet weights in torchvision's cache.

    The file is ``torch.hub.get_dir()/checkpoints/<file name of the URL>``, i.e.
    ``$TORCH_HOME/hub/checkpoints/`` (``~/.cache/torch/hub/checkpoints/`` by default), where
    torchvision itself caches downloads, so a file copied there by hand loads with no network
    call. A missing file is downloaded there (with a timeout); its sha256 must start with the
    hex digits between the last ``-`` and ``.pth`` of the name, as torch.hub checks.

    Raises:
        UserError: the file is missing and cannot be downloaded, or its hash is wrong; the
            message names the URL to fetch and the exact path to put it at.
    """
    import socket

    url = _imagenet_weights_url(name)
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    fetch = (
        f"fetch {url} on a machine with network access and copy it to {file} "
        "(or pass model.backbone_weights=PATH, or set model.pretrained=false)"
    )
    if not file.is_file():
        log.info("downloading %s ImageNet weights %s to %s", name, url, file)
        file.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(url, str(file), hash_prefix=_hash_prefix(file), progress=False)
        except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, ssl, hash: all mean "no weights"
            raise UserError(
                f"model.pretrained=true but the {name} ImageNet weights are not in {file.parent} and could "
                f"not be downloaded ({exc.__class__.__name__}: {exc}): {fetch}"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
    digest = _sha256(file)
    expected = _hash_prefix(file)
    if expected and not digest.startswith(expected):
        raise UserError(
            f"{file} is not torchvision's {name} ImageNet weights: its sha256 starts {digest[: len(expected)]}, "
            f"the file name says {expected} (a partial or other file); delete it and {fetch}"
        )
    log.info("%s ImageNet weights: %s (sha256 %s)", name, file, digest)
    return file


def _hash_prefix(file: Path) -> str | None:
    """The hex digits after the last ``-`` of ``file``'s stem (``resnet18-f37072fd`` ->
    ``f37072fd``), torch.hub's convention for the start of the file's sha256; None when absent."""
    match = re.search(r"-([0-9a-f]{6,})$", file.stem)
    return match.group(1) if match else None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_width(name: str, width: int | None, fixed: int) -> None:
    if width is not None and width != fixed:
        raise UserError(
            f"backbone {name!r} has a fixed width of {fixed}, got model.width={width}: "
            f"use model={name}_fcn8s (or set model.width={fixed})"
        )


def _vgg(name: str, width: int | None, pretrained: bool, weights_path: str | None) -> Encoder:
    """VGG16 (with or without batch norm) as the classic FCN backbone, fc6/fc7 as convolutions.

    fc6 and fc7 become a 7x7 and a 1x1 convolution (4096 channels, with dropout) that take the
    classifier's Linear weights, FCN's "surgery": with ImageNet weights the converted network
    computes exactly what the classifier computed, at every 7x7 window of pool5.
    """
    _check_width(name, width, 64)
    net = _torchvision_net(name, pretrained, weights_path)
    features = net.features
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    for i in pools:
        features[i].ceil_mode = True
    fc6 = nn.Conv2d(512, 4096, kernel_size=7, padding=3)
    fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
    with torch.no_grad():
        fc6.weight.copy_(net.classifier[0].weight.view(4096, 512, 7, 7))
        fc6.bias.copy_(net.classifier[0].bias)
        fc7.weight.copy_(net.classifier[3].weight.view(4096, 4096, 1, 1))
        fc7.bias.copy_(net.classifier[3].bias)
    pool2, pool3, pool4 = pools[1], pools[2], pools[3]
    return Encoder(
        features[: pool3 + 1],
        features[pool3 + 1 : pool4 + 1],
        nn.Sequential(
            features[pool4 + 1 :],
            fc6,
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            fc7,
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        ),
        channels={"pool2": 128, "pool3": 256, "pool4": 512, "out": 4096},
        pool2_after=pool2,
    )


def vgg16(width: int | None = None, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """torchvision's VGG16 with fc6/fc7 as convolutions, the backbone of the FCN paper.

    ``pretrained`` uses torchvision's weights API (downloads once, then caches); without
    network access pass a saved torchvision VGG16 state dict as ``weights_path`` instead.
    ``width`` is fixed by the architecture (64).
    """
    return _vgg("vgg16", width, pretrained, weights_path)


def vgg16_bn(width: int | None = None, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """torchvision's VGG16 with batch norm, fc6/fc7 as convolutions: trains from scratch far more
    easily than plain VGG16."""
    return _vgg("vgg16_bn", width, pretrained, weights_path)


def _resnet(name: str, width: int | None, pretrained: bool, weights_path: str | None) -> Encoder:
    """A torchvision ResNet cut at layer1..layer4 (strides 4, 8, 16, 32); its pooling and
    classifier are dropped. Parameter names inside the parts are torchvision's (``conv1``,
    ``layer1.0.conv1``, ...)."""
    _check_width(name, width, 64)
    net = _torchvision_net(name, pretrained, weights_path)
    stem = nn.Sequential(
        OrderedDict(
            conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool, layer1=net.layer1, layer2=net.layer2
        )
    )
    expansion = net.layer1[0].expansion  # 1 for basic blocks (resnet18/34), 4 for bottlenecks
    return Encoder(
        stem,
        net.layer3,
        net.layer4,
        channels={"pool2": 64 * expansion, "pool3": 128 * expansion, "pool4": 256 * expansion, "out": 512 * expansion},
        pool2_after=4,
    )


def resnet18(width: int | None = None, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """torchvision's ResNet-18: a light residual encoder (11M parameters) with batch norm."""
    return _resnet("resnet18", width, pretrained, weights_path)


def resnet50(width: int | None = None, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """torchvision's ResNet-50: bottleneck blocks, 2048 channels at stride 32."""
    return _resnet("resnet50", width, pretrained, weights_path)


def mobilenet_v3_large(width: int | None = None, pretrained: bool = False, weights_path: str | None = None) -> Encoder:
    """torchvision's MobileNetV3-Large: depthwise-separable blocks, the cheapest encoder in FLOPs.

    ``features`` is cut after blocks 3, 6, 12 and 16 (strides 4, 8, 16, 32); ``width`` is fixed
    at 16, the channels of its first convolution.
    """
    _check_width("mobilenet_v3_large", width, 16)
    features = _torchvision_net("mobilenet_v3_large", pretrained, weights_path).features
    return Encoder(
        features[:7],
        features[7:13],
        features[13:],
        channels={"pool2": 24, "pool3": 40, "pool4": 112, "out": 960},
        pool2_after=3,
    )


def _load_state_dict(module: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"backbone weights not found: {file.resolve()} (check model.backbone_weights)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"could not read backbone weights {file}: {exc}") from exc
    # wrapped ({"state_dict": ...}) or prefixed (module., _orig_mod.) files load too; else counts and keys
    fix = "give the state dict of this backbone (torchvision's own, or one saved from this encoder)"
    load_into(module, state, f"backbone weights {file} (model.backbone_weights)", fix=fix)


BACKBONES: dict[str, Callable[..., Encoder]] = {
    "tiny": tiny,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v3_large": mobilenet_v3_large,
}
