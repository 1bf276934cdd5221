"""``python scripts/upsampling_ablation.py [training overrides]``: FCN's upsampling claim, measured.

For every decoder of ``ablation.variants`` (``model.upsampling``: learned, frozen, intermediate,
random, interpolate) and every seed of ``ablation.seeds``, one training run composed exactly as
``python scripts/train.py <ablation.train_overrides> [overrides] model.upsampling=<v> seed=<s>``
would be: everything but the decoder is equal within a seed (same encoder initialisation, same
batches in the same order). Then the run's ``best.pt`` is scored on the validation split:

- ``miou``: val mIoU (what training selected ``best.pt`` by);
- ``boundary_miou``: val mIoU counted only within ``ablation.boundary_px`` pixels of a true class
  boundary (:func:`fcn.metrics.boundary_confusion`), where the upsampling decides the labels;
- ``drift_2x`` / ``drift_final``: how far the kernels moved from bilinear, ``||W - W_bil|| /
  ||W_bil||`` (:meth:`fcn.models.BilinearUpsample.drift`), the mean over the 2x layers and the
  final layer (empty for ``interpolate``, which has no kernels);
- ``minutes``: wall time of the training run.

Writes ``runs.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (mean and sample
standard deviation over seeds per variant, and each variant's difference from the first one,
paired by seed) to the run directory, updated after every run, and ``ablation.png`` (a bar plot)
when matplotlib is installed.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fcn.checkpoint import load_model
from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_settings
from fcn.data.build import build_dataset
from fcn.data.loader import make_loader
from fcn.device import device_name
from fcn.engine import Settings, evaluate
from fcn.inference import inference_fn
from fcn.metrics import boundary_confusion, scores
from fcn.models import BilinearUpsample
from fcn.train import train

log = logging.getLogger(__name__)

# Keys each run sets itself; the same keys given on the command line are left out.
RUN_KEYS = ("model.upsampling", "seed")
# The scores summarised per variant, in the order of the table's columns.
SCORES = ("miou", "boundary_miou", "drift_2x", "drift_final", "minutes")


def run_overrides(train_overrides: list[str], task_overrides: list[str], upsampling: str, seed: int) -> list[str]:
    """The training overrides of one run: the ablation's schedule, the command line's, then the run's own."""
    keep = [
        o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in RUN_KEYS and not o.startswith("ablation.")
    ]
    return [*train_overrides, *keep, f"model.upsampling={upsampling}", f"seed={seed}"]


def score_checkpoint(path: Path, cfg: DictConfig, boundary_px: int) -> dict:
    """Val mIoU, boundary mIoU and kernel drift of the checkpoint at ``path`` (on the CPU, eval mode),
    inferred as the run validated (``cfg.eval``: e.g. half resolution with the logits resized back)."""
    data = cfg.data
    model, _ = load_model(path)
    val_set = build_dataset(data, data.val_split, None)
    loader = make_loader(val_set, batch_size=cfg.trainer.batch_size, num_workers=0, ignore_index=data.ignore_index)
    settings = Settings(torch.device("cpu"), tuple(data.mean), tuple(data.std), data.num_classes, data.ignore_index)
    boundary = torch.zeros(data.num_classes, data.num_classes, dtype=torch.int64)

    def count_boundary(images, masks, preds):
        nonlocal boundary
        boundary += boundary_confusion(preds, masks, data.num_classes, data.ignore_index, boundary_px)

    with torch.no_grad():
        infer = inference_fn(cfg.eval, data.num_classes)
        result = evaluate(model, loader, settings, infer=infer, on_batch=count_boundary, desc=None)
    drift = {n: m.drift() for n, m in model.named_modules() if isinstance(m, BilinearUpsample)}
    two_x = [d for n, d in drift.items() if n != "up_final"]
    return {
        "miou": scores(result.confusion)["miou"],
        "boundary_miou": scores(boundary)["miou"],
        "drift_2x": statistics.fmean(two_x) if two_x else math.nan,
        "drift_final": drift.get("up_final", math.nan),
    }


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: mean and sample std over seeds of every score, and the difference in mIoU and
    boundary mIoU from ``variants[0]`` paired by seed (mean and std of the per-seed differences)."""
    by = {v: [r for r in rows if r["upsampling"] == v] for v in variants}
    base = {r["seed"]: r for r in by[variants[0]]}
    summary = []
    for variant in variants:
        runs = by[variant]
        if not runs:
            continue
        row: dict = {"upsampling": variant, "seeds": len(runs)}
        for key in SCORES:
            values = [r[key] for r in runs if not math.isnan(r[key])]
            row[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        for key in ("miou", "boundary_miou"):
            diffs = [r[key] - base[r["seed"]][key] for r in runs if r["seed"] in base]
            row[f"{key}_diff_mean"] = statistics.fmean(diffs) if diffs else math.nan
            row[f"{key}_diff_std"] = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        summary.append(row)
    return summary


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_markdown(summary: list[dict], boundary_px: int) -> str:
    """The summary as docs/upsampling-ablation.md shows it."""
    first = summary[0]["upsampling"] if summary else ""
    lines = [
        f"| `model.upsampling` | seeds | val mIoU | boundary mIoU ({boundary_px} px) | mIoU - {first} (paired) | "
        f"boundary - {first} (paired) | kernel drift, 2x layers | kernel drift, final layer | minutes per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| `{r['upsampling']}` | {r['seeds']} | {_pm(r['miou_mean'], r['miou_std'])} | "
            f"{_pm(r['boundary_miou_mean'], r['boundary_miou_std'])} | "
            f"{_pm(r['miou_diff_mean'], r['miou_diff_std'])} | "
            f"{_pm(r['boundary_miou_diff_mean'], r['boundary_miou_diff_std'])} | "
            f"{_pm(r['drift_2x_mean'], r['drift_2x_std'], 2)} | "
            f"{_pm(r['drift_final_mean'], r['drift_final_std'], 2)} | "
            f"{_pm(r['minutes_mean'], r['minutes_std'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(summary: list[dict], path: Path, boundary_px: int) -> bool:
    """Bars of val mIoU and boundary mIoU per variant, with the seed std as error bars; False
    (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["upsampling"] for r in summary]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    x = range(len(names))
    for offset, key, label in ((-0.2, "miou", "val mIoU"), (0.2, "boundary_miou", f"boundary mIoU ({boundary_px} px)")):
        means = [r[f"{key}_mean"] for r in summary]
        stds = [0.0 if math.isnan(r[f"{key}_std"]) else r[f"{key}_std"] for r in summary]
        ax.bar([i + offset for i in x], means, 0.4, yerr=stds, capsize=3, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_ablation(cfg: DictConfig, out_dir: str | Path, task_overrides: list[str]) -> list[dict]:
    """Train and score every variant x seed of ``cfg.ablation``; write the tables to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ablation = cfg.ablation
    variants = list(ablation.variants)
    train_overrides = list(ablation.train_overrides)
    rows: list[dict] = []
    for seed in ablation.seeds:  # seed-major: an interrupted ablation has every variant for the first seeds
        for upsampling in variants:
            name = f"{upsampling}-seed{seed}"
            run_cfg = compose(
                config_name="train", overrides=run_overrides(train_overrides, task_overrides, upsampling, seed)
            )
            log.info("%s: training", name)
            start = time.perf_counter()
            train(run_cfg, out_dir / name)
            minutes = (time.perf_counter() - start) / 60
            scored = score_checkpoint(out_dir / name / "checkpoints" / "best.pt", run_cfg, ablation.boundary_px)
            rows.append({"upsampling": upsampling, "seed": int(seed), **scored, "minutes": minutes})
            log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if isinstance(v, float)))
            summary = summarise(rows, variants)
            _write_csv(out_dir / "runs.csv", rows)
            _write_csv(out_dir / "summary.csv", summary)
            machine = (
                f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}"
            )
            command = "python scripts/upsampling_ablation.py " + " ".join(task_overrides)
            header = f"Command: `{command.strip()}`; each run: `{' '.join(train_overrides)}`.\nMachine: {machine}.\n\n"
            (out_dir / "summary.md").write_text(header + format_markdown(summary, ablation.boundary_px))
    if plot(summary, out_dir / "ablation.png", ablation.boundary_px):
        log.info("bar plot: %s", out_dir / "ablation.png")
    print(format_markdown(summary, ablation.boundary_px))
    log.info("tables: %s (runs.csv, summary.csv, summary.md)", out_dir.resolve())
    return rows


@suggest_keys("upsampling_ablation")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="upsampling_ablation")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_settings(cfg)  # fcn/config.py: each value checked before anything runs
    log.info("ablation: %s", OmegaConf.to_container(cfg.ablation))
    run_ablation(cfg, HydraConfig.get().runtime.output_dir, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    from fcn.process import launch

    launch("upsampling_ablation")  # python -m: as scripts/upsampling_ablation.py
