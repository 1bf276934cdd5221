"""``fcn-evaluate`` / ``python scripts/evaluate.py checkpoint=PATH``: score a checkpoint on a dataset.

The model, class names, palette and the dataset it was trained on all come from the checkpoint.
``data=...`` picks another dataset config; ``data.KEY=VALUE`` changes one setting of whichever
dataset is used (for example ``data.split=train`` or ``data.root=/elsewhere``). ``eval=...``
chooses sliding windows or test-time augmentation (configs/eval/).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fcn.checkpoint import load_model
from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_classes, validate_eval_config
from fcn.data.build import build_dataset, prepare_data_root, scan_data
from fcn.data.labels import label_reading_changes, trained_label_reading
from fcn.data.loader import make_loader
from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.device import resolve_device, resolve_precision
from fcn.engine import Settings, evaluate
from fcn.errors import UserError
from fcn.inference import eval_config, inference_fn
from fcn.loggers import TensorBoardLogger
from fcn.metrics import METRICS, format_table, scores
from fcn.models.fold import fold_batch_norm
from fcn.report import PredictionWriter, WorstImages, write_metrics
from fcn.run_logging import EVAL_GROUP, EVAL_PER_CLASS_GROUP
from fcn.visualize import comparison_grid

log = logging.getLogger(__name__)


def data_config(checkpoint_config: dict, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The dataset to score: the checkpoint's own unless ``data=...`` was given, then ``data.*`` overrides."""
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        return cfg.data
    data = OmegaConf.create(checkpoint_config["data"])
    # the values as Hydra read them (a YAML re-reading of "data.label_map={1:1}" gives {"1:1": None})
    for key in (o.lstrip("+").split("=", 1)[0] for o in overrides if o.lstrip("+").startswith("data.")):
        OmegaConf.update(data, key.removeprefix("data."), OmegaConf.select(cfg, key), force_add=True)
    return data


def run_evaluation(cfg: DictConfig, out_dir: str | Path, overrides: list[str]) -> dict:
    """Score ``cfg.checkpoint`` on the chosen split; write the reports to ``out_dir`` and return the metrics."""
    validate_eval_config(cfg)  # values checked before any checkpoint or image is read
    if cfg.checkpoint is None:
        raise UserError("no checkpoint given: pass checkpoint=PATH (e.g. outputs/train/<run>/checkpoints/best.pt)")
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, device, cfg.channels_last)
    model = fold_batch_norm(model)  # the same outputs (to float rounding), one pass fewer per batch norm
    data = data_config(ckpt["config"], cfg, overrides)
    set_max_image_pixels(data.get("max_image_pixels", PILLOW_DEFAULT))  # before any image is opened
    if data.num_classes != ckpt["num_classes"]:
        raise UserError(
            f"checkpoint {cfg.checkpoint} predicts {ckpt['num_classes']} classes but data {data.name} "
            f"has {data.num_classes}; evaluate on the dataset it was trained for"
        )
    class_names, palette = ckpt["class_names"], ckpt["palette"]
    eval_cfg = eval_config(ckpt["config"], cfg, overrides)
    infer = inference_fn(eval_cfg, data.num_classes)  # the run's settings with the command line's, checked

    check_classes(data.num_classes, list(data.class_names), data.get("palette"), data.ignore_index)
    prepare_data_root(data)
    dataset = build_dataset(data, data.split, None)
    trained = ckpt["config"]["data"]
    if (changed := label_reading_changes(trained, data)) is not None:
        log.warning(
            "masks are read differently from training (%s): the scores are not of the labels it learnt", changed
        )
    try:
        reports = scan_data(data, [data.split])
    except UserError as exc:  # a label fix offered here would score labels read unlike those of training
        raise UserError(
            f"{exc}\nThe checkpoint was trained reading masks with {trained_label_reading(trained)}; a fix that "
            "changes these scores it on labels read differently from training (say so with the scores), or "
            "evaluate masks encoded as its training masks were"
        ) from exc
    # Images of different sizes are scored one at a time: no padding reaches the model.
    batch_size = cfg.batch_size if not reports or reports[0].uniform_size else 1
    loader = make_loader(dataset, batch_size=batch_size, num_workers=cfg.num_workers, ignore_index=data.ignore_index)
    log.info("evaluating %s on %s/%s (%d images) on %s", cfg.checkpoint, data.name, data.split, len(dataset), device)
    worst = WorstImages(eval_cfg.worst_images if cfg.tensorboard else 0, data.num_classes, data.ignore_index)
    writer = None
    if eval_cfg.save_predictions:
        writer = PredictionWriter(out_dir / "predictions", [p for p, _ in dataset.pairs], palette)

    def on_batch(images, masks, preds):
        worst.add(images, masks, preds)
        if writer is not None:
            writer(images, masks, preds)

    result = evaluate(
        model,
        loader,
        Settings(
            num_classes=data.num_classes,
            ignore_index=data.ignore_index,
            device=device,
            mean=ckpt["mean"],
            std=ckpt["std"],
            channels_last=cfg.channels_last,
            amp_dtype=resolve_precision(cfg.precision, device),
        ),
        infer=infer,
        on_batch=on_batch,
        desc=data.split,
    )
    metrics = scores(result.confusion, class_names)
    report = metrics | {
        "checkpoint": str(cfg.checkpoint),
        "dataset": data.name,
        "split": data.split,
        "images": result.images,
        "eval": OmegaConf.to_container(eval_cfg),
    }
    picture = write_metrics(out_dir, report, result.confusion, class_names)
    if cfg.tensorboard:
        _log_tensorboard(out_dir, ckpt["step"], metrics, picture, worst, palette, data.ignore_index)
    print(f"\n{cfg.checkpoint} on {data.name} {data.split} ({result.images} images):")
    print(format_table(report))
    if metrics["absent_classes"]:
        print(f"absent from ground truth and prediction: {', '.join(metrics['absent_classes'])}")
    print(f"reports: {out_dir} (metrics.json, per_class.csv, confusion_matrix.csv/.png)")
    return report


def _log_tensorboard(
    out_dir: Path,
    step: int,
    metrics: dict,
    confusion_picture: Image.Image,
    worst: WorstImages,
    palette,
    ignore_index: int,
) -> None:
    # One point per score, at the checkpoint's step, in groups that sort after a training run's
    # curves (fcn/run_logging.py): with ``tensorboard --logdir outputs`` the curves open first.
    logger = TensorBoardLogger()
    logger.open(out_dir)
    try:
        for key, metric in METRICS.items():  # the tags of a training run's val/* scores
            logger.log_scalar(f"{EVAL_GROUP}/{metric.tag}", metrics[key], step)
        for name, iou in metrics["per_class_iou"].items():
            if iou is not None:
                logger.log_scalar(f"{EVAL_PER_CLASS_GROUP}/IoU/{name}", iou, step)
        confusion = np.asarray(confusion_picture.convert("RGB"))
        logger.log_image(f"{EVAL_PER_CLASS_GROUP}/confusion_matrix", confusion, step)
        ranked = worst.worst()
        if ranked:
            # crop to a common size so images of different sizes fit one grid
            height = min(image.shape[-2] for _, image, _, _ in ranked)
            width = min(image.shape[-1] for _, image, _, _ in ranked)
            images = torch.stack([i[:, :height, :width] for _, i, _, _ in ranked])
            masks = torch.stack([m[:height, :width] for _, _, m, _ in ranked])
            preds = torch.stack([p[:height, :width] for _, _, _, p in ranked])
            grid = comparison_grid(images, masks, preds, palette, ignore_index)
            logger.log_image(f"{EVAL_GROUP}/worst_images", grid, step)
            scores = ", ".join(f"{100 * m:.1f}" for m, *_ in ranked)
            logger.log_text(f"{EVAL_GROUP}/worst_images", f"mIoU (%) of each: {scores}", step)
    finally:
        logger.close()


@suggest_keys("evaluate")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mIoU (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    return run_evaluation(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))["miou"]


if __name__ == "__main__":
    main()
