"""Each loss against a value computed by hand."""

import math

import pytest
import torch

from fcn.losses import CrossEntropy, DiceLoss, TopKCrossEntropy, WeightedSum

# Two pixels, two classes. Pixel 0: logits (0, 0), target 0. Pixel 1: logits (0, ln 3), target 0.
LOGITS = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3)]]]])  # 1 x 2 x 1 x 2
TARGET = torch.tensor([[[0, 0]]])
CE = (math.log(2), math.log(4))  # -log softmax: -log(1/2), -log(1/4)


def test_cross_entropy_with_class_weights_from_a_list_and_label_smoothing():
    assert CrossEntropy()(LOGITS, TARGET).item() == pytest.approx(sum(CE) / 2)
    weighted = CrossEntropy(class_weights=[2.0, 1.0])(LOGITS, TARGET)
    assert weighted.item() == pytest.approx((2 * CE[0] + 2 * CE[1]) / 4)  # weight-normalised mean
    smooth = CrossEntropy(label_smoothing=0.2)(LOGITS, TARGET)
    # (1 - 0.2) * CE + 0.2 * mean over classes of -log p
    uniform = ((math.log(2) + math.log(2)) / 2 + (math.log(4) + math.log(4 / 3)) / 2) / 2
    assert smooth.item() == pytest.approx(0.8 * sum(CE) / 2 + 0.2 * uniform)


def test_top_k_cross_entropy_keeps_the_hardest_pixels():
    assert TopKCrossEntropy(top_k=0.5)(LOGITS, TARGET).item() == pytest.approx(CE[1])
    assert TopKCrossEntropy(top_k=1.0)(LOGITS, TARGET).item() == pytest.approx(sum(CE) / 2)
    ignored = torch.tensor([[[0, 255]]])
    assert TopKCrossEntropy(top_k=0.5)(LOGITS, ignored).item() == pytest.approx(CE[0])


def test_dice_loss_by_hand():
    # class 0: p = (1/2, 1/4), g = (1, 1): 2 * 0.75 / (0.75 + 2); class 1: p = (1/2, 3/4), g = 0
    smooth = 0.0
    d0 = 2 * 0.75 / (0.75 + 2)
    d1 = 0.0
    loss = DiceLoss(smooth=1e-12 + smooth)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)


def test_dice_loss_ignores_pixels_and_is_zero_for_a_perfect_prediction():
    perfect = torch.tensor([[[[50.0, -50.0]], [[-50.0, 50.0]]]])
    target = torch.tensor([[[0, 1]]])
    assert DiceLoss(smooth=0.0)(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert DiceLoss(smooth=0.0)(perfect, torch.tensor([[[0, 255]]])).item() == pytest.approx(0.5, abs=1e-6)


def test_weighted_sum_adds_weighted_losses():
    combined = WeightedSum([CrossEntropy(), DiceLoss()], [1.0, 0.5])
    expected = CrossEntropy()(LOGITS, TARGET) + 0.5 * DiceLoss()(LOGITS, TARGET)
    assert combined(LOGITS, TARGET).item() == pytest.approx(expected.item())
    assert combined.ignore_index == 255
