"""Sliding windows and test-time augmentation give what they promise."""

import pytest
import torch
from torch import nn

from fcn.inference import predict_logits, sliding_window_logits
from fcn.models import FCN


def _pointwise_model(num_classes: int = 4) -> nn.Module:
    # A 1x1 convolution is translation- and flip-equivariant and sees no context: exact oracle.
    torch.manual_seed(0)
    return nn.Conv2d(3, num_classes, 1).eval()


def _trained_like_fcn() -> FCN:
    torch.manual_seed(0)
    model = FCN(num_classes=4, width=4).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.abs().sum() == 0:
            nn.init.normal_(m.weight, std=0.3)
    return model


@torch.no_grad()
def test_a_window_at_least_the_image_size_equals_whole_image_inference():
    model = _trained_like_fcn()
    x = torch.randn(2, 3, 45, 70)
    whole = model(x)
    assert torch.equal(sliding_window_logits(model, x, window=(64, 96), stride=(32, 32), num_classes=4), whole)
    assert torch.equal(predict_logits(model, x, num_classes=4, window=[45, 70]), whole)


@torch.no_grad()
def test_overlapping_windows_cover_every_pixel_and_average_logits():
    model = _pointwise_model()
    x = torch.randn(1, 3, 50, 77)
    out = sliding_window_logits(model, x, window=(16, 20), stride=(10, 13), num_classes=4)
    assert torch.allclose(out, model(x), atol=1e-6)  # a pointwise model: averaging identical logits


@torch.no_grad()
def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    model = _pointwise_model()
    x = torch.randn(2, 3, 31, 40)
    assert torch.allclose(predict_logits(model, x, num_classes=4, hflip=True), model(x), atol=1e-6)


@torch.no_grad()
def test_single_scale_one_without_flip_is_the_plain_forward_pass():
    model = _trained_like_fcn()
    x = torch.randn(1, 3, 40, 36)
    assert torch.equal(predict_logits(model, x, num_classes=4, scales=[1.0]), model(x))


@torch.no_grad()
@pytest.mark.parametrize("scales", [[0.75, 1.0, 1.25], [0.5]])
def test_multi_scale_logits_come_back_at_full_resolution(scales):
    model = _trained_like_fcn()
    x = torch.randn(1, 3, 41, 53)
    out = predict_logits(model, x, num_classes=4, scales=scales, hflip=True, window=[32, 32])
    assert out.shape == (1, 4, 41, 53) and torch.isfinite(out).all()
