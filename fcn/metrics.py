"""Segmentation metrics from a confusion matrix: the four FCN scores, mean Dice and per-class scores.

The confusion matrix is built on the device with one ``torch.bincount`` per batch (rows are
ground truth, columns are predictions); everything else is a few lines on that matrix, using
the formulas of the original FCN ``score.py``. :func:`boundary_confusion` restricts the matrix
to a band around the true class boundaries (the "trimap" score), where upsampling matters.

:data:`METRICS` (one score per run) and :data:`PER_CLASS` (one score per class) are the one table
of scores: :func:`scores`, the printed tables, a training run's validation log (TensorBoard
``val/<tag>``), its ``metrics.json`` and best checkpoint's record (:data:`fcn.resume.METRIC_KEYS`),
and evaluate's report all read them. A new confusion-matrix metric is one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# Each function takes the confusion matrix as float64 counts (rows: ground truth, columns:
# predictions). 0/0 gives nan: a score with nothing to score (left out of the means, as ``nanmean``
# does in FCN's ``score.py``).


def _iou(hist: torch.Tensor) -> torch.Tensor:
    tp = hist.diag()
    return tp / (hist.sum(1) + hist.sum(0) - tp)


def _dice(hist: torch.Tensor) -> torch.Tensor:
    return 2 * hist.diag() / (hist.sum(1) + hist.sum(0))


def _recall(hist: torch.Tensor) -> torch.Tensor:
    return hist.diag() / hist.sum(1)


def _precision(hist: torch.Tensor) -> torch.Tensor:
    return hist.diag() / hist.sum(0)


def _pixel_acc(hist: torch.Tensor) -> float:
    total = hist.sum()
    return float(hist.diag().sum() / total) if total > 0 else math.nan


def _fwiou(hist: torch.Tensor) -> float:
    total, gt = hist.sum(), hist.sum(1)
    freq = gt / total if total > 0 else gt
    seen = freq > 0
    return float((freq[seen] * _iou(hist)[seen]).sum())


@dataclass(frozen=True)
class Metric:
    """One score of a confusion matrix: ``fn(hist) -> float`` in [0, 1] (nan: nothing to score),
    its TensorBoard tag (``val/<tag>`` in training, ``z_eval/<tag>`` in evaluate) and its label
    in the printed tables (shown in percent)."""

    tag: str
    label: str
    fn: Callable[[torch.Tensor], float]


#: The scores of a run, in the order the tables print them; key -> :class:`Metric`.
METRICS: dict[str, Metric] = {
    "miou": Metric("mIoU", "mean IoU", lambda hist: float(_iou(hist).nanmean())),
    "mean_dice": Metric("mean_dice", "mean Dice", lambda hist: float(_dice(hist).nanmean())),
    "pixel_acc": Metric("pixel_acc", "pixel acc", _pixel_acc),
    "mean_acc": Metric("mean_acc", "mean acc", lambda hist: float(_recall(hist).nanmean())),
    "fwiou": Metric("weighted_IoU", "fw IoU", _fwiou),  # frequency-weighted: its tag sorts after mIoU
}

#: The scores of each class: key -> (column label, ``fn(hist)`` -> one value per class).
PER_CLASS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "per_class_iou": ("IoU", _iou),
    "per_class_dice": ("Dice", _dice),
    "per_class_precision": ("Prec", _precision),
    "per_class_recall": ("Recall", _recall),
}


def scores(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """The scores of a confusion matrix, as plain Python floats in [0, 1].

    Returns every score of :data:`METRICS` (``miou``, ``mean_dice``, ``pixel_acc``, ``mean_acc``,
    ``fwiou``: the four FCN scores with the formulas of FCN's ``score.py``, and mean Dice), and per
    class (class name -> value) every score of :data:`PER_CLASS` (``per_class_iou``,
    ``per_class_dice``, ``per_class_precision``, ``per_class_recall``).
    A score whose denominator is zero is ``None`` (n/a) and is left out of the means, as
    ``nanmean`` does in ``score.py``: a class absent from both ground truth and prediction has no
    IoU or Dice, one never predicted has no precision, one absent from the ground truth no recall.
    ``absent_classes`` lists the classes absent from both.
    """
    hist = confusion.double().cpu()
    names = list(class_names) if class_names is not None else [str(i) for i in range(hist.shape[0])]
    out: dict = {key: metric.fn(hist) for key, metric in METRICS.items()}
    for key, (_, fn) in PER_CLASS.items():
        out[key] = {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, fn(hist).tolist())}
    union = hist.sum(1) + hist.sum(0) - hist.diag()
    out["absent_classes"] = [name for name, u in zip(names, union.tolist()) if u == 0]
    return out


def format_table(metrics: dict) -> str:
    """A plain-text table of the per-class scores present in ``metrics`` and the summary scores.

    Scores are printed in percent and labelled so (``IoU (%)``); ``metrics`` holds fractions 0-1,
    as ``metrics.json`` and TensorBoard do.
    """
    columns = [(k, f"{label} (%)") for k, (label, _) in PER_CLASS.items() if k in metrics]
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
    for key, metric in METRICS.items():
        if key in metrics:
            lines.append(f"{metric.label + ' (%)':<{width}}{cell(metrics[key])}")
    if any(v is None for v in metrics["per_class_iou"].values()):
        lines.append("n/a: class absent from ground truth and prediction; left out of the means")
    return "\n".join(lines)
