"""Segmentation losses beyond plain cross-entropy: Dice, top-k (OHEM) cross-entropy, weighted sums.

Every loss takes logits ``N x C x H x W`` and targets ``N x H x W`` and skips ``ignore_index``.
A batch without a single labelled pixel (every target ``ignore_index``, e.g. a crop that fell
entirely on void) gives every loss here exactly 0 with all-zero gradients, never the NaN of a
mean over nothing: it must not be mistaken for divergence (see :func:`no_labelled_pixel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` whose class ``weight`` may be a plain list (as YAML gives it).

    Args:
        ignore_index: target value whose pixels count nowhere.
        class_weights: optional per-class weights, one per class (the entry points turn
            ``auto`` into median-frequency weights of the train split first).
        label_smoothing: as in ``CrossEntropyLoss``.
    """

    def __init__(
        self, ignore_index: int = 255, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0
    ) -> None:
        tensor = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        super().__init__(weight=tensor, ignore_index=ignore_index, label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # torch's mean over zero labelled pixels (or zero total class weight) is 0 / 0 = NaN
        if no_labelled_pixel(target, self.ignore_index):
            return _zero_loss(logits)
        return super().forward(logits, target)


def no_labelled_pixel(target: torch.Tensor, ignore_index: int) -> bool:
    """True when every pixel of ``target`` (any shape) is ``ignore_index``: a batch with nothing to learn.

    One host-device synchronisation (the training loop synchronises on the loss value anyway).
    """
    return not bool((target != ignore_index).any())


def _zero_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss of exactly 0 that is still part of the graph, so ``backward`` works and gives zero gradients."""
    return logits.float().sum() * 0.0


class DiceLoss(nn.Module):
    """``1 - mean over classes of 2|P∩G| / (|P| + |G|)`` on softmax probabilities (soft Dice).

    Args:
        ignore_index: target value whose pixels count nowhere.
        smooth: added to numerator and denominator, so a class absent from both scores 1.
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1)
        probs = logits.float().softmax(1) * valid
        onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2) * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        total = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (total + self.smooth)
        return 1 - dice.mean()


class TopKCrossEntropy(nn.Module):
    """Online hard example mining: cross-entropy averaged over the hardest ``top_k`` fraction of
    the valid pixels of the batch (at least ``min_pixels``).

    Args:
        top_k: fraction of valid pixels kept, by highest loss.
        ignore_index: target value whose pixels are never kept.
        class_weights: optional per-class weights, as in ``CrossEntropyLoss``.
        min_pixels: keep at least this many pixels (or all, if fewer are valid).
    """

    def __init__(
        self,
        top_k: float = 0.25,
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
        min_pixels: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            raise ValueError(f"top_k must be in (0, 1], got {top_k}")
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.min_pixels = min_pixels
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(
            logits.float(), target, weight=self.weight, ignore_index=self.ignore_index, reduction="none"
        ).flatten()
        valid = losses[(target != self.ignore_index).flatten()]
        if valid.numel() == 0:
            return _zero_loss(logits)  # no valid pixel: zero loss that still has a graph
        k = min(valid.numel(), max(self.min_pixels, int(self.top_k * valid.numel())))
        return valid.topk(k).values.mean()


class WeightedSum(nn.Module):
    """``sum(w_i * loss_i)``: combine losses from config, e.g. cross-entropy + 0.5 Dice.

    Args:
        losses: the losses, each called on (logits, target).
        weights: one weight per loss.
    """

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        if len(losses) != len(weights):
            raise ValueError(f"{len(losses)} losses but {len(weights)} weights")
        self.losses = nn.ModuleList(losses)
        self.weights = list(weights)

    @property
    def ignore_index(self) -> int:
        return self.losses[0].ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses))
