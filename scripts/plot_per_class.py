"""Per-class IoU of several runs as grouped bars, for the docs:
``python scripts/plot_per_class.py OUT.png LABEL=RUN_DIR/metrics.json [LABEL=c1:iou,c2:iou,...] ...``.

Each source is a training or evaluation run's ``metrics.json`` (its ``per_class_iou`` and ``miou``)
or, for a run whose files are gone, the per-class IoU written out (``Sky:92.0,Road:94.2,...``, in
percent, as the results tables give them). Needs matplotlib (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_source(text: str) -> tuple[str, dict[str, float]]:
    """``LABEL=PATH`` or ``LABEL=class:iou,...`` -> (label, {class: IoU in percent})."""
    label, _, source = text.partition("=")
    if not source:
        sys.exit(f"error: {text!r}: write LABEL=RUN_DIR/metrics.json or LABEL=class:iou,...")
    if source.endswith(".json"):
        path = Path(source)
        if not path.is_file():
            sys.exit(f"error: {path}: no such metrics file")
        metrics = json.loads(path.read_text())
        return label, {k: 100 * v for k, v in metrics["per_class_iou"].items() if v is not None}
    return label, {name: float(iou) for name, iou in (item.split(":") for item in source.split(","))}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, sources = Path(argv[0]), [read_source(a) for a in argv[1:]]
    classes = list(sources[0][1])
    width = 0.8 / len(sources)
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100)
    for i, (label, ious) in enumerate(sources):
        mean = sum(ious.values()) / len(ious)
        xs = [c + (i - (len(sources) - 1) / 2) * width for c in range(len(classes))]
        ax.bar(xs, [ious.get(name, 0.0) for name in classes], width, label=f"{label} (mIoU {mean:.1f})")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_ylabel("val IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
