"""Sliding windows and test-time augmentation give what they promise."""

import pytest
import torch
from torch import nn

from fcn.inference import logit_bands, predict_labels, predict_logits, sliding_window_logits
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


def _bands(model, x, **settings) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The full-width bands' rows, and their logits put together."""
    spans, parts = [], []
    for top, bottom, left, right, logits in logit_bands(model, x, num_classes=4, **settings):
        assert (left, right) == (0, x.shape[-1])
        spans.append((top, bottom))
        parts.append(logits)
    return spans, torch.cat(parts, dim=2)


def _tiles(model, x, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles' logits put in place, and how many tiles covered each pixel."""
    n, _, height, width = x.shape
    out, covered = torch.full((n, 4, height, width), float("nan")), torch.zeros(height, width, dtype=torch.long)
    for top, bottom, left, right, logits in logit_bands(model, x, num_classes=4, tiles=True, **settings):
        out[..., top:bottom, left:right] = logits
        covered[top:bottom, left:right] += 1
    return out, covered


@torch.no_grad()
@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("window", "stride"),
    [((32, 32), (24, 20)), ((32, 32), (32, 32)), ((20, 200), (7, 13)), ((200, 24), (50, 17)), ((45, 93), None)],
    ids=["overlap", "no-overlap", "wider-than-image", "taller-than-image", "default-stride"],
)
def test_banded_sliding_windows_are_bitwise_the_whole_image_accumulation(hflip, channels_last, window, stride):
    model = _trained_like_fcn()
    x = torch.randn(2, 3, 70, 93)  # neither side a multiple of a stride
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    whole = predict_logits(model, x, num_classes=4, window=window, stride=stride, hflip=hflip)
    spans, banded = _bands(model, x, window=window, stride=stride, hflip=hflip)
    assert spans[0][0] == 0 and spans[-1][1] == 70 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert torch.equal(banded, whole)
    tiled, covered = _tiles(model, x, window=window, stride=stride, hflip=hflip)
    assert torch.equal(tiled, whole) and (covered == 1).all()
    labels = predict_labels(model, x, num_classes=4, window=window, stride=stride, hflip=hflip)
    assert torch.equal(labels, whole.argmax(1))


@torch.no_grad()
@pytest.mark.parametrize("settings", [{}, {"scales": [0.5, 1.0], "window": [32, 32]}, {"hflip": True}])
def test_settings_without_sliding_windows_at_scale_one_are_one_band_of_the_same_logits(settings):
    model = _trained_like_fcn()
    x = torch.randn(1, 3, 41, 53)
    spans, banded = _bands(model, x, **settings)
    assert spans == [(0, 41)] and torch.equal(banded, predict_logits(model, x, num_classes=4, **settings))
    assert torch.equal(_tiles(model, x, **settings)[0], banded)


@torch.no_grad()
def test_banded_windows_hold_one_row_of_windows_and_yield_rows_as_soon_as_they_are_finished(monkeypatch):
    import fcn.inference

    model = _trained_like_fcn()
    x = torch.randn(1, 3, 200, 40)
    held = []  # rows of every class-score sum allocated
    real_zeros = torch.zeros

    def zeros(*shape, **kwargs):
        if len(shape) == 4 and shape[1] == 4:
            held.append(shape[2])
        return real_zeros(*shape, **kwargs)

    monkeypatch.setattr(fcn.inference.torch, "zeros", zeros)
    calls = []
    counting = lambda crop: calls.append(crop.shape) or model(crop)  # noqa: E731
    bands = logit_bands(counting, x, num_classes=4, window=(32, 32), stride=(24, 24))
    top, bottom, _, _, logits = next(bands)
    windows_total = len(range(0, 200 - 32, 24)) + 1  # rows of windows (one column: the image is 40 wide)
    assert (top, bottom) == (0, 24) and logits.shape == (1, 4, 24, 40)
    assert len(calls) == 2 < 2 * windows_total  # after the first row of windows (two columns), not the last
    list(bands)
    assert sum(held) == 200 and max(held) <= 32  # every row once, never more than a window's height at a time


@torch.no_grad()
def test_tiles_hold_full_width_only_the_rows_the_next_row_of_windows_shares(monkeypatch):
    import fcn.inference

    model = _trained_like_fcn()
    x = torch.randn(1, 3, 100, 300)
    live, peak = [0], [0]  # class-score pixels held at once
    real_zeros = torch.zeros

    def zeros(*shape, **kwargs):
        if len(shape) == 4 and shape[1] == 4:
            live[0] += shape[2] * shape[3]
            peak[0] = max(peak[0], live[0])
        return real_zeros(*shape, **kwargs)

    monkeypatch.setattr(fcn.inference.torch, "zeros", zeros)
    for _, _, _, _, logits in logit_bands(model, x, num_classes=4, window=(32, 32), stride=(24, 24), tiles=True):
        live[0] -= logits.shape[2] * logits.shape[3]
    assert live[0] == 0  # every tile allocated was yielded
    # the 8 rows two rows of windows share, at full width, plus about two windows: not a window's rows at full width
    assert peak[0] <= 8 * 300 + 2 * 32 * 32 < 32 * 300
