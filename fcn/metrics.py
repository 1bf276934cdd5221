"""Segmentation metrics from a confusion matrix: the four FCN scores and per-class IoU.

The confusion matrix is built on the device with one ``torch.bincount`` per batch (rows are
ground truth, columns are predictions); everything else is a few lines on that matrix, using
the formulas of the original FCN ``score.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts; pixels whose target is ``ignore_index`` are left out.

    Targets outside ``[0, num_classes)`` that are not ``ignore_index`` are a data error: they raise
    instead of being dropped silently.
    """
    keep = target != ignore_index
    target = target[keep]
    pred = pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = sorted(set(target[(target < 0) | (target >= num_classes)].unique().tolist()))
        raise ValueError(f"mask values {bad} are outside [0, {num_classes}) and not the ignore index {ignore_index}")
    index = target * num_classes + pred
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """The FCN scores of a confusion matrix, as plain Python floats in [0, 1].

    Returns ``pixel_acc``, ``mean_acc``, ``miou``, ``fwiou`` and ``per_class_iou`` (class name ->
    IoU). A class absent from both ground truth and prediction has no IoU: it is reported as
    ``None`` and left out of the means, as ``nanmean`` does in FCN's ``score.py``.
    """
    hist = confusion.double().cpu()
    num_classes = hist.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    total = hist.sum()
    diag = hist.diag()
    gt = hist.sum(1)
    union = gt + hist.sum(0) - diag
    acc = diag / gt  # nan for classes absent from the ground truth
    iou = diag / union  # nan for classes absent from ground truth and prediction
    freq = gt / total if total > 0 else gt
    seen = freq > 0
    return {
        "pixel_acc": float(diag.sum() / total) if total > 0 else math.nan,
        "mean_acc": float(acc.nanmean()),
        "miou": float(iou.nanmean()),
        "fwiou": float((freq[seen] * iou[seen]).sum()),
        "per_class_iou": {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, iou.tolist())},
    }


def format_table(metrics: dict) -> str:
    """A plain-text table of per-class IoU and the four summary scores, for the console."""
    names = list(metrics["per_class_iou"])
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  IoU", "-" * (width + 8)]
    for name, value in metrics["per_class_iou"].items():
        lines.append(f"{name:<{width}}  {'n/a' if value is None else f'{100 * value:5.1f}'}")
    lines.append("-" * (width + 8))
    for key, label in (("miou", "mean IoU"), ("pixel_acc", "pixel acc"), ("mean_acc", "mean acc"), ("fwiou", "fw IoU")):
        lines.append(f"{label:<{width}}  {100 * metrics[key]:5.1f}")
    if any(v is None for v in metrics["per_class_iou"].values()):
        lines.append("n/a: class absent from ground truth and prediction; left out of the means")
    return "\n".join(lines)
