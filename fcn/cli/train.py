"""``fcn-train`` / ``python scripts/train.py``: train an FCN, then report its best checkpoint.

Reads top to bottom: data, model, optimiser, the epoch loop (train, validate, checkpoint),
then ``metrics.json`` and a table of the best checkpoint's validation scores.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcn.checkpoint import save_checkpoint
from fcn.cli.common import CONFIG_DIR, build_dataset, exit_on_user_error, prepare_data_root, resolve_device
from fcn.data.loader import make_loader, pad_collate
from fcn.data.transforms import normalize
from fcn.engine import evaluate, train_one_epoch
from fcn.metrics import format_table, scores
from fcn.visualize import comparison_grid, default_palette

log = logging.getLogger(__name__)

METRIC_KEYS = ("miou", "pixel_acc", "mean_acc", "fwiou", "per_class_iou")


def train(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Train as ``cfg`` says, writing checkpoints, TensorBoard events and ``metrics.json`` to ``out_dir``.

    Returns the best checkpoint's validation metrics.
    """
    out_dir = Path(out_dir)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    data, trainer = cfg.data, cfg.trainer
    class_names = list(data.class_names)
    palette = [list(c) for c in data.palette] if data.palette else default_palette(data.num_classes)

    # Data: files on disk through albumentations; uint8 until normalised on the device.
    prepare_data_root(data)
    train_set = build_dataset(data, data.train_split, instantiate(cfg.aug))
    val_set = build_dataset(data, data.val_split, None)
    log.info(
        "data %s: %d train / %d val images from %s", data.name, len(train_set), len(val_set), Path(data.root).resolve()
    )
    train_loader = make_loader(
        train_set,
        batch_size=trainer.batch_size,
        shuffle=True,
        num_workers=trainer.num_workers,
        ignore_index=data.ignore_index,
        drop_last=len(train_set) > trainer.batch_size,  # BatchNorm dislikes a last batch of one
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_loader = make_loader(
        val_set,
        batch_size=trainer.batch_size,
        shuffle=False,
        num_workers=trainer.num_workers,
        ignore_index=data.ignore_index,
    )

    model = instantiate(cfg.model).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "model %s: %.2fM parameters (%.2fM trainable), device %s",
        cfg.model.backbone + "-fcn" + cfg.model.variant,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in trainable) / 1e6,
        device,
    )
    optimizer = instantiate(cfg.optim)(trainable)
    steps_per_epoch = (
        len(train_loader)
        if trainer.limit_train_batches is None
        else min(len(train_loader), trainer.limit_train_batches)
    )
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=trainer.epochs * steps_per_epoch)
    loss_fn = instantiate(cfg.loss)
    writer = _make_writer(cfg.logger, out_dir)
    log_every = cfg.logger.log_every_n_steps

    def on_step(step: int, loss: float, lr: float) -> None:
        if writer is not None and step % log_every == 0:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)

    run_info = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": class_names,
        "palette": palette,
        "num_classes": data.num_classes,
        "ignore_index": data.ignore_index,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    ckpt_dir = out_dir / "checkpoints"
    sample_indices = np.linspace(0, len(val_set) - 1, min(cfg.logger.num_images, len(val_set))).round().astype(int)
    best: dict | None = None
    step = 0
    for epoch in range(1, trainer.epochs + 1):
        result = train_one_epoch(
            model, train_loader, optimizer, scheduler, loss_fn,
            device=device, mean=data.mean, std=data.std, step=step, epoch=epoch,
            max_steps=trainer.limit_train_batches, on_step=on_step,
        )  # fmt: skip
        step = result.step
        if epoch % trainer.val_every != 0 and epoch != trainer.epochs:
            log.info("epoch %d/%d: train loss %.4f", epoch, trainer.epochs, result.loss)
            continue
        evaluation = evaluate(
            model, val_loader,
            num_classes=data.num_classes, ignore_index=data.ignore_index, device=device,
            mean=data.mean, std=data.std, loss_fn=loss_fn, max_batches=trainer.limit_val_batches, desc="val",
        )  # fmt: skip
        metrics = scores(evaluation.confusion, class_names)
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val mIoU %.4f, pixel acc %.4f",
            epoch, trainer.epochs, result.loss, evaluation.loss, metrics["miou"], metrics["pixel_acc"],
        )  # fmt: skip
        if writer is not None:
            _log_validation(writer, step, evaluation.loss, metrics)
            _log_samples(writer, step, model, val_set, sample_indices, data, device, palette)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "metrics": {k: metrics[k] for k in METRIC_KEYS} | {"val_loss": evaluation.loss},
            **run_info,
        }
        if best is None or metrics["miou"] > best["miou"]:
            best = metrics | {"epoch": epoch, "step": step}
            save_checkpoint(state, ckpt_dir / "best.pt")
        save_checkpoint(state, ckpt_dir / "last.pt")
    if writer is not None:
        writer.close()

    # The best checkpoint's validation scores were computed with exactly its weights when it was
    # chosen (evaluation is deterministic), so they are reported as they are, not recomputed.
    report = {k: best[k] for k in METRIC_KEYS} | {
        "checkpoint": str(ckpt_dir / "best.pt"),
        "epoch": best["epoch"],
        "step": best["step"],
        "split": data.val_split,
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nbest checkpoint {ckpt_dir / 'best.pt'} (epoch {best['epoch']}), {data.name} {data.val_split}:")
    print(format_table(report))
    print(f"metrics: {out_dir / 'metrics.json'}\nTensorBoard: tensorboard --logdir {out_dir}")
    return report


def _make_writer(logger_cfg: DictConfig, out_dir: Path):
    if not logger_cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _log_validation(writer, step: int, loss: float, metrics: dict) -> None:
    writer.add_scalar("val/loss", loss, step)
    writer.add_scalar("val/mIoU", metrics["miou"], step)
    writer.add_scalar("val/pixel_acc", metrics["pixel_acc"], step)
    writer.add_scalar("val/mean_acc", metrics["mean_acc"], step)
    writer.add_scalar("val/fwIoU", metrics["fwiou"], step)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            writer.add_scalar(f"val/IoU/{name}", iou, step)


@torch.no_grad()
def _log_samples(writer, step, model, dataset, indices, data, device, palette) -> None:
    """The same few validation images at every validation: input, ground truth, prediction."""
    images, masks = pad_collate([dataset[int(i)] for i in indices], data.ignore_index)
    model.eval()
    preds = model(normalize(images.to(device), data.mean, data.std)).argmax(1)
    writer.add_image("val/samples", comparison_grid(images, masks, preds, palette, data.ignore_index), step)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best val mIoU (for sweepers)."""
    return train(cfg, HydraConfig.get().runtime.output_dir)["miou"]


if __name__ == "__main__":
    main()
