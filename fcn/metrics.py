"""Segmentation metrics from a confusion matrix: the four FCN scores and per-class IoU.

The confusion matrix is built on the device with one ``torch.bincount`` per batch (rows are
ground truth, columns are predictions); everything else is a few lines on that matrix, using
the formulas of the original FCN ``score.py``. :func:`boundary_confusion` restricts the matrix
to a band around the true class boundaries (the "trimap" score), where upsampling matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts; pixels whose target is ``ignore_index`` are left out.

    Targets outside ``[0, num_classes)`` that are not ``ignore_index`` are a data error: they raise
    instead of being dropped silently.
    """
    # Ignored pixels go to an extra row that is dropped at the end: cheaper than selecting the
    # valid pixels with a boolean mask (4x faster on a CPU), and still one bincount per batch.
    target = target.flatten()
    if target.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=target.device)
    target = torch.where(target == ignore_index, num_classes, target)
    low, high = torch.aminmax(target)
    if int(low) < 0 or int(high) > num_classes:
        bad = target[(target < 0) | (target > num_classes)].unique().tolist()
        raise ValueError(f"mask values {bad} are outside [0, {num_classes}) and not the ignore index {ignore_index}")
    counts = torch.bincount(target * num_classes + pred.flatten(), minlength=(num_classes + 1) * num_classes)
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def boundary_band(target: torch.Tensor, width: int, ignore_index: int) -> torch.Tensor:
    """Pixels within ``width`` pixels of a true class boundary: ``N x H x W`` bool for an
    ``N x H x W`` integer ``target``.

    A pixel is in the band when its ``(2 * width + 1)``-pixel square window (Chebyshev distance
    ``<= width``) holds two different labelled classes, so the band covers both sides of every
    boundary and is ``2 * width`` pixels wide (``width`` >= 1). ``ignore_index`` pixels (and the
    image border) are no class: next to them is not a boundary, and they are never in the band.
    A max-pool and a min-pool of the label map, so it costs two poolings per batch.
    """
    if width < 1:
        raise ValueError(f"boundary band width must be >= 1 pixel, got {width}")
    labels = target.float().unsqueeze(1)
    valid = target.unsqueeze(1) != ignore_index
    size = 2 * width + 1
    # ignore pixels take the neutral value of each pooling: -inf for the max, +inf for the min
    high = F.max_pool2d(labels.masked_fill(~valid, -math.inf), size, stride=1, padding=width)
    low = -F.max_pool2d((-labels).masked_fill(~valid, -math.inf), size, stride=1, padding=width)
    return ((high != low) & valid & high.isfinite() & low.isfinite()).squeeze(1)


def boundary_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int, width: int = 3
) -> torch.Tensor:
    """:func:`confusion_matrix` over the pixels of :func:`boundary_band` only.

    ``scores(boundary_confusion(...))["miou"]`` is the boundary (trimap) mIoU: the mean over
    classes of ``TP / (TP + FP + FN)`` counted only on pixels within ``width`` pixels of a true
    class boundary, as in Kohli, Ladicky and Torr, "Robust Higher Order Potentials for Enforcing
    Label Consistency" (IJCV 2009), and the trimap experiments of Chen et al., "DeepLab" (TPAMI
    2018, Fig. 5). Unlike Boundary IoU (Cheng et al., CVPR 2021) only the true boundaries define
    the band, so a prediction is not rewarded for staying away from them. ``pred`` and ``target``
    are ``N x H x W``; the result is ``num_classes x num_classes`` int64.
    """
    band = boundary_band(target, width, ignore_index)
    return confusion_matrix(pred, torch.where(band, target, ignore_index), num_classes, ignore_index)


def scores(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """The scores of a confusion matrix, as plain Python floats in [0, 1].

    Returns the four FCN scores (``pixel_acc``, ``mean_acc``, ``miou``, ``fwiou``, with the
    formulas of FCN's ``score.py``), ``mean_dice``, and per class (class name -> value)
    ``per_class_iou``, ``per_class_dice``, ``per_class_precision``, ``per_class_recall``.
    A score whose denominator is zero is ``None`` (n/a) and is left out of the means, as
    ``nanmean`` does in ``score.py``: a class absent from both ground truth and prediction has no
    IoU or Dice, one never predicted has no precision, one absent from the ground truth no recall.
    ``absent_classes`` lists the classes absent from both.
    """
    hist = confusion.double().cpu()
    num_classes = hist.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    total = hist.sum()
    tp = hist.diag()
    gt = hist.sum(1)
    predicted = hist.sum(0)
    union = gt + predicted - tp
    # 0/0 gives nan: exactly the "not defined" cases described above
    iou = tp / union
    dice = 2 * tp / (gt + predicted)
    recall = tp / gt
    precision = tp / predicted
    freq = gt / total if total > 0 else gt
    seen = freq > 0

    def per_class(values: torch.Tensor) -> dict[str, float | None]:
        return {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, values.tolist())}

    return {
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_acc": float(recall.nanmean()),
        "miou": float(iou.nanmean()),
        "fwiou": float((freq[seen] * iou[seen]).sum()),
        "mean_dice": float(dice.nanmean()),
        "per_class_iou": per_class(iou),
        "per_class_dice": per_class(dice),
        "per_class_precision": per_class(precision),
        "per_class_recall": per_class(recall),
        "absent_classes": [name for name, u in zip(names, union.tolist()) if u == 0],
    }


def format_table(metrics: dict) -> str:
    """A plain-text table of the per-class scores present in ``metrics`` and the summary scores.

    Scores are printed in percent and labelled so (``IoU (%)``); ``metrics`` holds fractions 0-1,
    as ``metrics.json`` and TensorBoard do.
    """
    columns = [
        (k, f"{label} (%)")
        for k, label in (
            ("per_class_iou", "IoU"),
            ("per_class_dice", "Dice"),
            ("per_class_precision", "Prec"),
            ("per_class_recall", "Recall"),
        )
        if k in metrics
    ]
    names = list(metrics["per_class_iou"])
    width = max(16, *(len(n) + 1 for n in names))
    column = max(len(label) for _, label in columns) + 2

    def cell(value: float | None) -> str:
        return f"{'n/a' if value is None else f'{100 * value:.1f}':>{column}}"

    header = f"{'class':<{width}}" + "".join(f"{label:>{column}}" for _, label in columns)
    rule = "-" * len(header)
    lines = [header, rule]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(cell(metrics[key][name]) for key, _ in columns))
    lines.append(rule)
    summary = (
        ("miou", "mean IoU (%)"),
        ("mean_dice", "mean Dice (%)"),
        ("pixel_acc", "pixel acc (%)"),
        ("mean_acc", "mean acc (%)"),
        ("fwiou", "fw IoU (%)"),
    )
    for key, label in summary:
        if key in metrics:
            lines.append(f"{label:<{width}}{cell(metrics[key])}")
    if any(v is None for v in metrics["per_class_iou"].values()):
        lines.append("n/a: class absent from ground truth and prediction; left out of the means")
    return "\n".join(lines)
