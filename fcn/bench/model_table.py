"""``python scripts/model_table.py [training overrides]``: docs/results.md's table of every backbone x variant.

For every model option x variant of ``table`` (configs/model_table.yaml), composed exactly as
``python scripts/train.py model=<option> model.variant=<variant> [overrides]`` would be, with
``model.pretrained=false`` (every row trains from scratch, so the rows compare architectures):

- ``parameters`` and ``gflops`` (forward, one image at ``table.flops_size``, counted by
  ``torch.utils.flop_counter`` on the meta device, so even VGG16 at 512 x 512 costs nothing);
- ``train_img_s``: full training steps on batches already in memory, at the training crop and
  batch size (:func:`fcn.bench.probes.training_rates`, the functions training uses), the best of
  ``table.repeats`` repeats of at least ``table.min_seconds`` each (``train_img_s_median`` too);
- ``miou``: the best val mIoU of a training run with the given overrides, the same budget for
  every row (``table.train=false`` skips it).

Prints a Markdown table; ``model_table.json`` and ``model_table.md`` in the run directory are
rewritten after every row, so an interrupted table keeps the rows it finished.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from itertools import islice
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from fcn.bench import probes
from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_settings
from fcn.data.build import build_dataset, build_loss, loaders, prepare_data_root
from fcn.device import device_name, resolve_channels_last, resolve_device, resolve_precision
from fcn.errors import UserError
from fcn.optim import build_optimizer
from fcn.summary import model_summary
from fcn.train import build_model, train

log = logging.getLogger(__name__)

# Keys every row sets itself; the same keys given on the command line are left out.
ROW_KEYS = ("model", "model.variant", "model.pretrained")


def row_overrides(task_overrides: list[str], model: str, variant: str) -> list[str]:
    """The training overrides of one row: the command line's, then the row's model and variant."""
    keep = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in ROW_KEYS and not o.startswith("table.")]
    return [*keep, f"model={model}", f"model.variant={variant}", "model.pretrained=false"]


def measure_row(cfg: DictConfig, loss_fn, batches: list, flops_size: tuple[int, int], timing: dict) -> dict:
    """Parameters, forward GFLOPs at ``flops_size`` and training images/s of the model ``cfg`` describes."""
    device = resolve_device(cfg.trainer.device, cfg.trainer.threads)
    trainer, data = cfg.trainer, cfg.data
    channels_last = resolve_channels_last(trainer.channels_last, cfg.model.backbone, device)
    model = build_model(cfg.model, device, channels_last)
    optimizer = build_optimizer(instantiate(cfg.optim), model, trainer.decoder_lr_mult)
    common = {
        "batch_size": trainer.batch_size,
        "device": device,
        "mean": data.mean,
        "std": data.std,
        "channels_last": channels_last,
        "amp_dtype": resolve_precision(trainer.precision, device),
    }
    # Models differ ~100x in speed: a first rough rate (after warm-up) sets the steps per repeat so
    # that each repeat lasts about ``min_seconds`` (a few steps of a fast model are mostly noise).
    rough = probes.training_rates(
        model, optimizer, loss_fn, {"memory": batches}, steps=1, warmup=timing["warmup"], repeats=1, **common
    )["memory"]
    steps = max(timing["steps"], math.ceil(timing["min_seconds"] * rough / trainer.batch_size))
    batches = [batches[i % len(batches)] for i in range(steps)]
    # The best repeat, not the median: on a shared machine other jobs only ever slow a repeat down.
    rates = [
        probes.training_rates(
            model, optimizer, loss_fn, {"memory": batches}, steps=steps, warmup=0, repeats=1, **common
        )["memory"]
        for _ in range(timing["repeats"])
    ]
    # FLOPs do not depend on the weights: count them on the meta device, where nothing is computed.
    summary = model_summary(model.to("meta"), flops_size, torch.device("meta"))
    return {
        "parameters": summary["parameters"],
        "gflops": round(summary["forward_gflops_per_image"], 4),
        "train_img_s": round(max(rates), 2),
        "train_img_s_median": round(statistics.median(rates), 2),
    }


def format_markdown(rows: list[dict], crop: list[int], flops_size: list[int]) -> str:
    """The table as the README shows it."""
    lines = [
        f"| model | backbone | variant | parameters | GFLOPs at {flops_size[0]}x{flops_size[1]} | "
        f"train img/s at {crop[0]}x{crop[1]} | val mIoU (0-1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        miou = f"{r['miou']:.3f}" if isinstance(r.get("miou"), float) else (r.get("miou") or "not measured")
        lines.append(
            f"| `{r['model']}` | {r['backbone']} | {r['variant']} | {r['parameters'] / 1e6:.2f}M | "
            f"{r['gflops']:.1f} | {r['train_img_s']:.1f} | {miou} |"
        )
    return "\n".join(lines) + "\n"


def run_table(cfg: DictConfig, out_dir: str | Path, task_overrides: list[str]) -> list[dict]:
    """Measure every row of ``cfg.table``; write ``model_table.json`` / ``.md`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, data, trainer = cfg.table, cfg.data, cfg.trainer
    flops_size = (int(table.flops_size[0]), int(table.flops_size[1]))
    timing = {"warmup": table.warmup, "steps": table.steps, "repeats": table.repeats, "min_seconds": table.min_seconds}
    # A few real training batches (uint8, as the loader yields them), shared by every row's timing.
    prepare_data_root(data)
    train_set = build_dataset(data, data.train_split, instantiate(cfg.aug))
    loader, _ = loaders(train_set, None, trainer, ignore_index=data.ignore_index, seed=cfg.seed)
    held = list(islice(iter(loader), 2))
    batches = [held[i % len(held)] for i in range(max(table.warmup, 1))]
    crop = list(held[0][0].shape[-2:])
    loss_fn = build_loss(cfg.loss, data)  # every row trains with the same loss (class_weights: auto resolved)
    rows: list[dict] = []
    for model_option in table.models:
        for variant in table.variants:
            row_cfg = compose(config_name="train", overrides=row_overrides(task_overrides, model_option, variant))
            name = f"{model_option}-{variant}"
            log.info("%s: parameters, FLOPs and training throughput", name)
            row = {
                "model": model_option,
                "backbone": row_cfg.model.backbone,
                "variant": variant,
                **measure_row(row_cfg, loss_fn, batches, flops_size, timing),
            }
            if table.train:
                log.info("%s: training for the mIoU column", name)
                try:
                    row["miou"] = train(row_cfg, out_dir / name)["miou"]
                except UserError as exc:  # a diverged run is a result too: say so in the table
                    log.warning("%s: %s", name, exc)
                    row["miou"] = f"failed: {str(exc).split(';')[0]}"
            rows.append(row)
            meta = {
                "crop": crop,
                "batch_size": trainer.batch_size,
                "flops_size": list(flops_size),
                "overrides": task_overrides,
                "device": device_name(torch.device("cpu")),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
            (out_dir / "model_table.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
            (out_dir / "model_table.md").write_text(format_markdown(rows, crop, list(flops_size)))
    print(format_markdown(rows, crop, list(flops_size)))
    return rows


@suggest_keys("model_table")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="model_table")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_settings(cfg)  # fcn/config.py: each value checked before anything runs
    run_table(cfg, HydraConfig.get().runtime.output_dir, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    from fcn.process import launch

    launch("model_table")  # python -m: as scripts/model_table.py
