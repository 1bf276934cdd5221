"""Evaluation outputs written next to each other in a run directory: the metrics as JSON and CSV,
the confusion matrix as counts and as a picture, and predicted masks."""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fcn.atomic import atomic_path, write_text
from fcn.errors import UserError
from fcn.metrics import PER_CLASS, confusion_matrix, scores
from fcn.visualize import confusion_image, index_png, overlay


def to_json(obj: Any) -> str:
    """Indented JSON where NaN (a score with nothing to score) becomes ``null``: valid JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"


def write_metrics(out_dir: Path, metrics: dict, confusion: torch.Tensor, class_names: Sequence[str]) -> Image.Image:
    """``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv`` (counts) and
    ``confusion_matrix.png`` (row-normalised, also returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", to_json(metrics))  # each file appears only when complete (fcn/atomic.py)
    with atomic_path(out_dir / "per_class.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *(key.removeprefix("per_class_") for key in PER_CLASS), "pixels"])
        pixels = confusion.sum(1).tolist()
        for k, name in enumerate(class_names):
            row = [metrics[key][name] for key in PER_CLASS]
            writer.writerow([name, *("" if v is None else f"{v:.6f}" for v in row), pixels[k]])
    with atomic_path(out_dir / "confusion_matrix.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ground_truth \\ predicted", *class_names])
        for name, row in zip(class_names, confusion.tolist()):
            writer.writerow([name, *row])
    picture = confusion_image(confusion, class_names)
    with atomic_path(out_dir / "confusion_matrix.png") as tmp:
        picture.save(tmp)
    return picture


class WorstImages:
    """Keeps the ``k`` images of lowest mean IoU seen so far (image, ground truth, prediction)."""

    def __init__(self, k: int, num_classes: int, ignore_index: int) -> None:
        self.k, self.num_classes, self.ignore_index = k, num_classes, ignore_index
        self._heap: list[tuple[float, int, tuple]] = []
        self._seen = 0

    def add(self, images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor) -> None:
        if self.k <= 0:
            return
        for image, mask, pred in zip(images, masks, preds):
            self._seen += 1
            miou = scores(confusion_matrix(pred, mask, self.num_classes, self.ignore_index))["miou"]
            if np.isnan(miou):
                continue
            item = (-miou, self._seen, (image, mask, pred))  # max-heap on badness
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:
                heapq.heapreplace(self._heap, item)

    def worst(self) -> list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(miou, image, mask, prediction)``, worst first."""
        return [(-neg, *tensors) for neg, _, tensors in sorted(self._heap, reverse=True)]


def output_names(paths: Sequence[Path]) -> list[str]:
    """The name each input's outputs get: its path below the folder all ``paths`` share, without the
    extension (``cam1/0001`` for ``images/cam1/0001.png`` next to ``images/cam2/0001.png``; the plain
    stem when all sit in one folder), so predictions mirror the inputs' subfolders and never overwrite
    each other.

    Raises:
        UserError: two inputs differ only in their extension (``a.png`` and ``a.jpg`` in one folder).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    base = Path(os.path.commonpath([str(p.parent.absolute()) for p in paths]))
    names = [p.absolute().relative_to(base).with_suffix("").as_posix() for p in paths]
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise UserError(
                f"{seen[name]} and {path} would both be written as {name}.png; rename one or move it to another folder"
            )
        seen[name] = path
    return names


class PredictionWriter:
    """Writes ``<name>.png`` (index mask with the palette) and ``<name>_overlay.jpg`` per image,
    cropped to each image's own size, for a loader that yields ``paths`` in order; ``<name>`` is
    the image's path below the folder all ``paths`` share (see :func:`output_names`)."""

    def __init__(self, out_dir: Path, paths: Sequence[Path], palette: Sequence[Sequence[int]]) -> None:
        self.out_dir, self.paths, self.palette = out_dir, list(paths), palette
        self.names = output_names(self.paths)
        self._next = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor) -> None:
        del masks
        for image, pred in zip(images, preds):
            path, name = self.paths[self._next], self.names[self._next]
            self._next += 1
            with Image.open(path) as original:
                width, height = original.size
            pred = pred[:height, :width]
            save_prediction(self.out_dir, name, image[:, :height, :width], pred, self.palette)


def save_prediction(out_dir: Path, stem: str, image: torch.Tensor, pred: torch.Tensor, palette) -> None:
    """One image's ``<stem>.png`` (mode "P"; 16-bit greyscale beyond 256 classes) and
    ``<stem>_overlay.jpg``; ``stem`` may hold subfolders
    (``cam1/0001``), which are made."""
    (out_dir / stem).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{stem}.png") as tmp:  # never a half-written file under the final name
        index_png(pred.numpy(), palette).save(tmp)
    painted = overlay(image, pred, palette).permute(1, 2, 0).numpy()
    with atomic_path(out_dir / f"{stem}_overlay.jpg") as tmp:
        Image.fromarray(painted).save(tmp, quality=90)
