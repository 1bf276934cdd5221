"""What a training run logs besides the step scalars: its configuration at the start (the command
line's overrides and every value they changed, where the full config was written), the
TensorBoard layout and config, the scores, confusion picture and decoder diagnostics of every
validation, a grid of the same few validation images (input, ground truth, prediction), and the
run's name and swept keys for tables of several runs (TensorBoard's HPARAMS tab).

The command line's overrides are read from Hydra's job config when there is one (a run started by
``scripts/train.py``); a config composed elsewhere (tests, notebooks) has none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fcn.data.loader import pad_collate
from fcn.metrics import METRICS
from fcn.summary import decoder_drift, decoder_kernels
from fcn.visualize import comparison_grid, confusion_image

log = logging.getLogger(__name__)

MAX_CHANGES = 25  # more than this (an experiment overlay, a dataset switch) is summarised

# The tags' layout. TensorBoard opens on its Time Series page, which puts the cards of all runs
# under the logdir (sub-runs and evaluate runs included) in groups named by the tag's first part,
# sorts the groups and the cards in them by tag ("/" and digits first, then by character code:
# "val" < "val_best" < "weights"), and opens the first two groups. So the curves are "train" and
# "val"; everything else is in a group that sorts after them: the run's best scores (one point,
# the HPARAMS tab's columns), per-class scores, diagnostics, evaluate's one-point scores
# (fcn/cli/evaluate.py). In "val" the loss and mIoU are the first two cards ("loss" < "mIoU" <
# "mean_acc" < "mean_dice" < "pixel_acc" < "samples" < "weighted_IoU", the frequency-weighted IoU;
# the score tags are fcn.metrics.METRICS').
BEST_GROUP = "val_best"  # the HPARAMS tab's columns: their tags sort val mIoU first
PER_CLASS_GROUP = "val_per_class"
EVAL_GROUP = "z_eval"  # "z_": an evaluation is one point per checkpoint; it sorts after the curves
EVAL_PER_CLASS_GROUP = "z_eval_per_class"

# TensorBoard's Custom Scalars tab: the curves a user looks at first, side by side.
OVERVIEW_LAYOUT = {
    "overview": {
        "loss (train, val)": ["Multiline", ["train/loss", "val/loss"]],
        "val mIoU": ["Multiline", ["val/mIoU"]],
        "val pixel accuracy": ["Multiline", ["val/pixel_acc"]],
        "learning rate": ["Multiline", ["train/lr"]],
    }
}


def log_run_start(logger, summary: dict, config_yaml: str) -> None:
    """What a new run logs once: the overview layout, the model summary and the resolved config
    (TensorBoard's Text tab, as a YAML code block)."""
    logger.log_layout(OVERVIEW_LAYOUT)
    logger.log_text("model/summary", "  \n".join(f"{k}: {v}" for k, v in summary.items()), 0)
    logger.log_text("config", f"```yaml\n{config_yaml}```", 0)


def log_validation(logger, step: int, metrics: dict, confusion: torch.Tensor, class_names, model) -> None:
    if not logger.enabled:
        return  # nobody looks: skip drawing the confusion picture and kernels
    logger.log_scalar("val/loss", metrics["val_loss"], step)
    for key, metric in METRICS.items():  # val/mIoU, val/mean_dice, val/pixel_acc, ...
        logger.log_scalar(f"val/{metric.tag}", metrics[key], step)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            logger.log_scalar(f"{PER_CLASS_GROUP}/IoU/{name}", iou, step)
    picture = np.asarray(confusion_image(confusion, class_names).convert("RGB"))
    logger.log_image(f"{PER_CLASS_GROUP}/confusion_matrix", picture, step)
    # How far each learned upsampling has moved from bilinear interpolation, and what it became.
    for name, drift in decoder_drift(model).items():
        logger.log_scalar(f"weights/decoder_drift/{name}", drift, step)
    for name, kernel in decoder_kernels(model).items():
        logger.log_image(f"weights/decoder_kernel/{name}", kernel, step)
    weight_norm = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    logger.log_scalar("weights/norm", weight_norm, step)


def best_scores(best: dict) -> dict[str, float]:
    """The HPARAMS tab's columns of scores, from a run's best validation (``state.best``): the
    tab shows them sorted by tag, so val mIoU is the first."""
    return {f"{BEST_GROUP}/mIoU": best["miou"], f"{BEST_GROUP}/pixel_acc": best["pixel_acc"]}


@torch.no_grad()
def sample_grid(net, dataset, indices, palette, ignore_index: int, to_input, amp_dtype) -> torch.Tensor:
    """The same few validation images at every validation: input, ground truth, prediction."""
    images, masks = pad_collate([dataset[int(i)] for i in indices], ignore_index)
    net.eval()
    x = to_input(images)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        preds = net(x).argmax(1)
    return comparison_grid(images, masks, preds, palette, ignore_index)


def command_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (``hydra.*`` ones left out); ``[]`` when
    the config was not composed by Hydra's command line (tests, notebooks)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra.")]


def run_name() -> str:
    """This run's name among others: its overrides, comma-separated (``""`` for the defaults)."""
    return ",".join(command_overrides())


def config_changes(cfg: DictConfig, defaults: DictConfig) -> list[str]:
    """One ``key: default -> value`` line per value of ``cfg`` that differs from ``defaults``
    (``key: (absent) -> value`` and ``key: value -> (removed)`` for keys only in one), sorted by key."""
    now, before = _flat(cfg), _flat(defaults)
    lines = []
    for key in sorted(now.keys() | before.keys()):
        if key not in before:
            lines.append(f"{key}: (absent) -> {now[key]}")
        elif key not in now:
            lines.append(f"{key}: {before[key]} -> (removed)")
        elif now[key] != before[key]:
            lines.append(f"{key}: {before[key]} -> {now[key]}")
    return lines


def log_config_changes(cfg: DictConfig) -> None:
    """Log the overrides, what they changed from the defaults and the path of the full resolved
    config (``.hydra/config.yaml``). Nothing outside a Hydra command line run."""
    if not HydraConfig.initialized():
        return
    from hydra import compose

    hydra_cfg = HydraConfig.get()
    overrides = command_overrides()
    if hydra_cfg.output_subdir is not None:
        where = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / "config.yaml"
        log.info("full config: %s", where)
    if not overrides:
        log.info("config: the defaults of %s.yaml (no overrides)", hydra_cfg.job.config_name)
        return
    changes = config_changes(cfg, compose(hydra_cfg.job.config_name, overrides=[]))
    log.info("config: overrides %s change %d value(s) from the defaults:", " ".join(overrides), len(changes))
    for line in changes[:MAX_CHANGES]:
        log.info("  %s", line)
    if len(changes) > MAX_CHANGES:
        log.info("  ... and %d more (see the full config)", len(changes) - MAX_CHANGES)


def _flat(cfg: DictConfig) -> dict[str, object]:
    """Every leaf of ``cfg`` by dotted key, interpolations resolved where they can be."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation to a missing value: compare as written
        container = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    container.pop("hydra", None)  # Hydra's own settings say where and how, not what: not compared
    walk(container, "")
    return out


def override_hparams() -> dict[str, Any]:
    """The current Hydra job's command-line overrides as HPARAMS columns (``{"optim.lr": 0.01,
    ...}`` plus ``overrides``: all of them in one string, which tells sweep rows apart); ``{}``
    outside Hydra. Values are numbers where they parse as one, else strings."""
    if not HydraConfig.initialized():
        return {}
    task = list(HydraConfig.get().overrides.task)
    columns: dict[str, Any] = {"overrides": " ".join(o for o in task if not o.startswith(("data.root", "hydra.")))}
    for override in task:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key in ("data.root", "data.generate"):
            continue
        try:
            columns[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            columns[key] = value
    return columns
