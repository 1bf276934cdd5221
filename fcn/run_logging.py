"""What a training run logs besides the step scalars: the TensorBoard layout and config at the
start, the scores, confusion picture and decoder diagnostics of every validation, and a grid of
the same few validation images (input, ground truth, prediction)."""

from __future__ import annotations

import numpy as np
import torch

from fcn.data.loader import pad_collate
from fcn.metrics import METRICS
from fcn.summary import decoder_drift, decoder_kernels
from fcn.visualize import comparison_grid, confusion_image

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
