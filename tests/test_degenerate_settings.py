"""Batches and settings that cannot train: caught up front or handled, never mistaken for divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fcn.engine import evaluate, train_one_epoch
from fcn.losses import CrossEntropy, DiceLoss, TopKCrossEntropy, WeightedSum

IGNORE = 255

LOSSES = {
    "cross_entropy": lambda: CrossEntropy(ignore_index=IGNORE),
    "cross_entropy_class_weights": lambda: CrossEntropy(ignore_index=IGNORE, class_weights=[0.5, 2.0, 1.0]),
    "cross_entropy_label_smoothing": lambda: CrossEntropy(ignore_index=IGNORE, label_smoothing=0.1),
    "cross_entropy_weights_and_smoothing": lambda: CrossEntropy(
        ignore_index=IGNORE, class_weights=[0.5, 2.0, 1.0], label_smoothing=0.1
    ),
    "dice": lambda: DiceLoss(ignore_index=IGNORE),
    "ohem": lambda: TopKCrossEntropy(top_k=0.25, ignore_index=IGNORE),
    "ohem_class_weights": lambda: TopKCrossEntropy(ignore_index=IGNORE, class_weights=[0.5, 2.0, 1.0]),
    "ce_plus_dice": lambda: WeightedSum([CrossEntropy(ignore_index=IGNORE), DiceLoss(ignore_index=IGNORE)], [1, 0.5]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_without_labelled_pixel_gives_zero_loss_and_zero_gradient(name):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE, dtype=torch.long)
    loss = LOSSES[name]()(logits, target)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_with_labels_still_gives_a_positive_loss(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0] = IGNORE  # one image void, the other labelled
    assert LOSSES[name]()(logits, target).item() > 0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def _batches(void_first: bool):
    torch.manual_seed(0)
    images = torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8)
    labelled = torch.randint(0, 3, (1, 8, 8))
    void = torch.full((1, 8, 8), IGNORE, dtype=torch.long)
    return [(images, void), (images, labelled)] if void_first else [(images, labelled), (images, void)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_training_step_on_void_batch_is_not_counted_as_non_finite(name):
    model = _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    result = train_one_epoch(model, _batches(void_first=True), optimizer, scheduler, LOSSES[name](),
                             device=torch.device("cpu"), mean=[0.5] * 3, std=[0.5] * 3, step=0, epoch=0,
                             skip_nonfinite=0, progress=False)  # fmt: skip
    assert result.step == 2 and math.isfinite(result.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_val_loss_averages_over_batches_with_labels_only():
    model = _Tiny()
    loss_fn = CrossEntropy(ignore_index=IGNORE)
    common = dict(num_classes=3, ignore_index=IGNORE, device=torch.device("cpu"), mean=[0.5] * 3, std=[0.5] * 3,
                  loss_fn=loss_fn, progress=False)  # fmt: skip
    with_void = evaluate(model, _batches(void_first=False), **common)
    labelled_only = evaluate(model, _batches(void_first=False)[:1], **common)
    assert math.isfinite(with_void.loss)
    assert with_void.loss == pytest.approx(labelled_only.loss)
    assert with_void.loss_batches == 1
    all_void = evaluate(model, _batches(void_first=False)[1:], **common)
    assert math.isnan(all_void.loss) and all_void.loss_batches == 0
