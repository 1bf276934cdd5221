"""Batch norm folded into the convolution before it, for inference (evaluation, prediction, ONNX).

In eval mode a batch norm is a fixed per-channel scale and shift, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a shifted bias: the network does the same arithmetic minus a
memory-bound pass over every activation. Training keeps the batch norms (their statistics move).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) in which every ``BatchNorm2d`` that directly follows a
    ``Conv2d`` is folded into it and replaced by ``nn.Identity``; ``model`` is left unchanged.

    Pairs are found in two forms, which cover the built-in backbones: neighbours in an
    ``nn.Sequential`` (tiny, VGG16-BN, MobileNetV3, ResNet's downsample), and sibling attributes
    ``convK`` / ``bnK`` of one module (torchvision's ResNet blocks and stem). A batch norm that
    follows anything else stays as it is. The folded model's state dict differs (no batch-norm
    entries, conv biases added): use it for inference, save the original.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (_, first), (name, second) in zip(children, children[1:]):
                if _foldable(first, second):
                    _fold_into(module, first, name, second)
        for name, child in list(module._modules.items()):
            if name.startswith("bn") and isinstance(child, nn.BatchNorm2d):
                conv = module._modules.get("conv" + name[2:])
                if _foldable(conv, child):
                    _fold_into(module, conv, name, child)
    return folded


def _foldable(conv: nn.Module | None, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


def _fold_into(parent: nn.Module, conv: nn.Conv2d, bn_name: str, bn: nn.BatchNorm2d) -> None:
    fused = fuse_conv_bn_eval(conv, bn)
    conv.weight, conv.bias = fused.weight, fused.bias  # in place: the parent still calls `conv`
    parent._modules[bn_name] = nn.Identity()
