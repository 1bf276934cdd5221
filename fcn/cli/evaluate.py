"""``fcn-evaluate`` / ``python scripts/evaluate.py checkpoint=PATH``: score a checkpoint on a dataset.

The model, class names, palette and the dataset it was trained on all come from the checkpoint.
``data=...`` picks another dataset config; ``data.KEY=VALUE`` changes one setting of whichever
dataset is used (for example ``data.split=train`` or ``data.root=/elsewhere``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fcn.checkpoint import load_checkpoint
from fcn.cli.common import (
    CONFIG_DIR,
    build_dataset,
    build_model,
    exit_on_user_error,
    prepare_data_root,
    resolve_device,
    resolve_precision,
)
from fcn.data.loader import make_loader
from fcn.engine import evaluate
from fcn.errors import UserError
from fcn.metrics import format_table, scores

log = logging.getLogger(__name__)


def data_config(checkpoint_config: dict, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The dataset to score: the checkpoint's own unless ``data=...`` was given, then ``data.*`` overrides."""
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        return cfg.data
    data = OmegaConf.create(checkpoint_config["data"])
    dotlist = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith("data.")]
    return OmegaConf.merge(data, OmegaConf.from_dotlist([o.removeprefix("data.") for o in dotlist]))


def run_evaluation(cfg: DictConfig, out_dir: str | Path, overrides: list[str]) -> dict:
    """Score ``cfg.checkpoint`` on the chosen split; write ``metrics.json`` to ``out_dir`` and return it."""
    if cfg.checkpoint is None:
        raise UserError("no checkpoint given: pass checkpoint=PATH (e.g. outputs/train/<run>/checkpoints/best.pt)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    data = data_config(ckpt["config"], cfg, overrides)
    if data.num_classes != ckpt["num_classes"]:
        raise UserError(
            f"checkpoint {cfg.checkpoint} predicts {ckpt['num_classes']} classes but data {data.name} "
            f"has {data.num_classes}; evaluate on the dataset it was trained for"
        )
    class_names = ckpt["class_names"]

    # Rebuild the network exactly as trained; its weights come from the checkpoint, not a download.
    model_cfg = OmegaConf.create(ckpt["config"]["model"])
    model_cfg.pretrained, model_cfg.backbone_weights = False, None
    model = build_model(model_cfg, device, cfg.channels_last)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(
            f"checkpoint {cfg.checkpoint} does not fit its own model config: {str(exc).splitlines()[0]}"
        ) from exc

    prepare_data_root(data)
    dataset = build_dataset(data, data.split, None)
    loader = make_loader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, ignore_index=data.ignore_index
    )
    log.info("evaluating %s on %s/%s (%d images) on %s", cfg.checkpoint, data.name, data.split, len(dataset), device)
    result = evaluate(
        model, loader, num_classes=data.num_classes, ignore_index=data.ignore_index, device=device,
        mean=ckpt["mean"], std=ckpt["std"], channels_last=cfg.channels_last,
        amp_dtype=resolve_precision(cfg.precision, device), desc=data.split,
    )  # fmt: skip
    metrics = scores(result.confusion, class_names)
    report = metrics | {
        "checkpoint": str(cfg.checkpoint),
        "dataset": data.name,
        "split": data.split,
        "images": len(dataset),
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(out_dir / "tensorboard")) as writer:
            for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
                writer.add_scalar(f"eval/{key}", metrics[key], ckpt["step"])
            for name, iou in metrics["per_class_iou"].items():
                if iou is not None:
                    writer.add_scalar(f"eval/IoU/{name}", iou, ckpt["step"])
    print(f"\n{cfg.checkpoint} on {data.name} {data.split} ({len(dataset)} images):")
    print(format_table(report))
    print(f"metrics: {out_dir / 'metrics.json'}")
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mIoU (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    return run_evaluation(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))["miou"]


if __name__ == "__main__":
    main()
