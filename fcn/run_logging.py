"""What a training run logs besides the step scalars: the TensorBoard layout and config at the
start, the scores, confusion picture and decoder diagnostics of every validation, and a grid of
the same few validation images (input, ground truth, prediction)."""

from __future__ import annotations

import numpy as np
import torch

from fcn.data.loader import pad_collate
from fcn.summary import decoder_drift, decoder_kernels
from fcn.visualize import comparison_grid, confusion_image

# TensorBoard's Custom Scalars tab: the curves a user looks at first, side by side. (On the Time
# Series page tag groups sort by name and the first two open expanded: ``train`` and ``val``; the
# diagnostics are in ``val_class_IoU`` and ``weights``, which sort after them.)
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
    logger.log_scalar("val/mIoU", metrics["miou"], step)
    logger.log_scalar("val/pixel_acc", metrics["pixel_acc"], step)
    logger.log_scalar("val/mean_acc", metrics["mean_acc"], step)
    logger.log_scalar("val/fwIoU", metrics["fwiou"], step)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            logger.log_scalar(f"val_class_IoU/{name}", iou, step)
    logger.log_image("val/confusion_matrix", np.asarray(confusion_image(confusion, class_names).convert("RGB")), step)
    # How far each learned upsampling has moved from bilinear interpolation, and what it became.
    for name, drift in decoder_drift(model).items():
        logger.log_scalar(f"weights/decoder_drift/{name}", drift, step)
    for name, kernel in decoder_kernels(model).items():
        logger.log_image(f"weights/decoder_kernel/{name}", kernel, step)
    weight_norm = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    logger.log_scalar("weights/norm", weight_norm, step)


@torch.no_grad()
def sample_grid(net, dataset, indices, palette, ignore_index: int, to_input, amp_dtype) -> torch.Tensor:
    """The same few validation images at every validation: input, ground truth, prediction."""
    images, masks = pad_collate([dataset[int(i)] for i in indices], ignore_index)
    net.eval()
    x = to_input(images)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        preds = net(x).argmax(1)
    return comparison_grid(images, masks, preds, palette, ignore_index)
