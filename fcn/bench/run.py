"""``python scripts/benchmark.py [overrides]``: how fast training, loading and evaluation run here.

Prints one JSON object (also written to ``<run dir>/benchmark.json``):

- ``train_img_s_compute``: training steps on batches already in memory;
- ``train_img_s``: training with the real data loader from disk;
- with ``bench.bare=true``: ``train_img_s_bare``, the same steps as a bare PyTorch loop on the same
  model and batches in memory (timed in turn), and ``bare_ratio`` = compute / bare; for evaluation
  ``eval_img_s_in_memory`` (``evaluate`` on validation batches in memory), ``eval_img_s_bare`` (a
  bare loop on the same batches, in turns) and ``eval_bare_ratio``;
- ``loader_img_s``: the data loader alone (decode, augment, collate);
- ``eval_img_s``: evaluation at full resolution, confusion matrix included;
- ``flops_per_img`` (forward + backward), ``achieved_flop_s``, ``peak_flop_s`` and their ratio
  ``mfu``. The peak is the best of a large matmul (``peak_flop_s_matmul``) and forward passes of
  the model's own ``bench.peak_convs`` most expensive convolution shapes (``peak_flop_s_conv``), in
  the same precision and memory format, each timed in turn with the training repeats so that both
  sides of the ratio see the same load; ``mfu_matmul`` is the ratio against the matmul alone (the
  figure reported before, which overstates the use of a CPU whose convolutions beat its matmul);
- ``peak_mem_mb``, ``checkpoint_save_s``, ``resume_load_s`` (digest verified; ``resume_load_s_unverified``
  without), and what was measured on;
- ``scan``: seconds of the pre-training data scan, cold and warm (``bench.scan_only=true``: only this).
"""

from __future__ import annotations

import json
import logging
import os
from itertools import cycle, islice
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcn.bench import probes as bench_probes
from fcn.checkpoint import offline_model_settings
from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_settings
from fcn.data.build import build_dataset, build_loss, data_layout, loaders, mask_decoder, pair, prepare_data_root
from fcn.data.transforms import normalize
from fcn.device import (
    device_name,
    maybe_compile,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    set_deterministic,
)
from fcn.inference import inference_fn
from fcn.optim import build_optimizer
from fcn.rng import seed_everything
from fcn.train import build_model

log = logging.getLogger(__name__)


def run_benchmark(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Measure the configured training setup; write ``benchmark.json`` to ``out_dir`` and return it."""
    # Set up exactly as training does (fcn/cli/train.py), so a speed-up measured here is one of training.
    seed_everything(cfg.seed)
    set_deterministic(cfg.trainer.deterministic)
    device = resolve_device(cfg.trainer.device, cfg.trainer.threads)
    data, trainer, bench = cfg.data, cfg.trainer, cfg.bench
    trainer.channels_last = resolve_channels_last(trainer.channels_last, cfg.model.backbone, device)
    prepare_data_root(data)
    log.info("timing the dataset scan, cold and warm")
    splits = list(dict.fromkeys([data.train_split, data.val_split]))
    scan = bench_probes.scan_times(data.root, splits, data_layout(data), mask_decoder(data), bench.scan_repeats)
    if bench.scan_only:
        return _write({"data": data.name, "scan": scan, "cpus": os.cpu_count(), "device": "cpu"}, out_dir)
    train_set = build_dataset(data, data.train_split, instantiate(cfg.aug))
    val_set = build_dataset(data, data.val_split, None)
    train_loader, val_loader = loaders(train_set, val_set, trainer, ignore_index=data.ignore_index, seed=cfg.seed)
    model = build_model(cfg.model, device, trainer.channels_last)
    amp_dtype = resolve_precision(trainer.precision, device)
    net = maybe_compile(model, trainer.compile, trainer.batch_size, pair(data.crop_size), trainer.channels_last)
    optimizer = build_optimizer(instantiate(cfg.optim), model, trainer.decoder_lr_mult)
    loss_fn = build_loss(cfg.loss, data)  # class_weights: auto as training computes them
    common = {
        "device": device,
        "mean": data.mean,
        "std": data.std,
        "channels_last": trainer.channels_last,
        "amp_dtype": amp_dtype,
    }
    timing = {"warmup": bench.warmup, "repeats": bench.repeats}

    # A few real batches kept in memory (uint8, as the loader yields them) for the compute-only rate.
    held = list(islice(iter(train_loader), 4))
    in_memory = list(islice(cycle(held), bench.steps + bench.warmup))
    # The peak for mfu: the best of a large matmul and the model's own dominant convolutions, in the
    # same precision and memory format, timed in turns with the training steps (same moments, same load).
    precision = amp_dtype or torch.float32
    example = held[0][0].to(device).float()
    if trainer.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    convs = bench_probes.dominant_convolutions(model, example, top=bench.peak_convs)
    probes = {"peak_matmul": bench_probes.matmul_probe(device, precision)}
    probes |= {
        f"peak_conv{i}": bench_probes.conv_probe(c, device, amp_dtype, trainer.channels_last)
        for i, c in enumerate(convs)
    }
    if bench.bare:  # the same steps as a bare PyTorch loop, for train_one_epoch's overhead
        probes["bare"] = bench_probes.bare_training_probe(net, optimizer, loss_fn, held, steps=bench.steps, **common)
    log.info("timing training steps on batches in memory, with the data loader, and the peak probes, in turns")
    rates = bench_probes.training_rates(
        net,
        optimizer,
        loss_fn,
        {"compute": in_memory, "loader": train_loader},
        steps=bench.steps,
        batch_size=trainer.batch_size,
        probes=probes,
        **timing,
        **common,
    )
    compute, real = rates["compute"], rates["loader"]
    conv_peaks = [rates[f"peak_conv{i}"] for i in range(len(convs))]
    log.info("timing the data loader alone")
    loader = bench_probes.loader_rate(train_loader, batches=bench.steps, **timing)
    log.info("timing evaluation")
    evaluation = bench_probes.evaluation_rate(
        net,
        val_loader,
        batches=bench.eval_batches,
        repeats=bench.repeats,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        **common,
    )
    tta = inference_fn(
        OmegaConf.create({"window": None, "stride": None, "scales": list(bench.tta_scales), "hflip": True}),
        data.num_classes,
    )
    evaluation_tta = bench_probes.evaluation_rate(
        net,
        val_loader,
        batches=bench.eval_batches,
        repeats=bench.repeats,
        infer=tta,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        **common,
    )
    eval_bare = {}
    if bench.bare:  # evaluate() against a bare evaluation loop on the same validation batches in memory
        held_val = list(islice(iter(val_loader), bench.eval_batches))
        ours, bare_eval = bench_probes.evaluation_rates_against_bare(
            net, held_val, repeats=bench.repeats, num_classes=data.num_classes, ignore_index=data.ignore_index, **common
        )
        eval_bare = {
            "eval_img_s_in_memory": round(ours, 2),
            "eval_img_s_bare": round(bare_eval, 2),
            "eval_bare_ratio": round(ours / bare_eval, 3),
        }
    val_images, val_masks = next(iter(val_loader))
    with torch.no_grad():
        val_preds = net(normalize(val_images.to(device), data.mean, data.std)).argmax(1)
    metric_s = bench_probes.confusion_seconds_per_image(
        val_preds, val_masks.to(device), data.num_classes, data.ignore_index, bench.repeats
    )
    model_kwargs = offline_model_settings(OmegaConf.to_container(cfg.model, resolve=True))
    log.info("sliding-window inference on a %s image in a fresh process", list(bench.large_image))
    sliding = bench_probes.sliding_window_peak(model_kwargs, bench.large_image, bench.window, bench.stride)
    images, masks = held[0]
    images = images.to(device)
    if trainer.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    flops = bench_probes.flops_per_image(model, images, masks.to(device), loss_fn, data.mean, data.std, amp_dtype)
    matmul_peak = rates["peak_matmul"]
    peak = max([matmul_peak, *conv_peaks])
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": {}}
    save_s, load_s, load_unverified_s = bench_probes.checkpoint_times(state, model, optimizer, bench.checkpoint_repeats)
    bare = {}
    if bench.bare:
        bare = {"train_img_s_bare": round(rates["bare"], 2), "bare_ratio": round(compute / rates["bare"], 3)}
    result = {
        "model": f"{cfg.model.backbone}-fcn{cfg.model.variant}",
        "width": cfg.model.width,
        "data": data.name,
        "crop": list(images.shape[-2:]),
        "batch_size": trainer.batch_size,
        "num_workers": trainer.num_workers,
        "channels_last": trainer.channels_last,
        "optimizer": type(optimizer).__name__
        + ("/fused" if optimizer.defaults.get("fused") else "/foreach" if optimizer.defaults.get("foreach") else ""),
        "compile": net is not model,
        "train_img_s_compute": round(compute, 2),
        "train_img_s": round(real, 2),
        **bare,
        "loader_img_s": round(loader, 2),
        "loader_ratio": round(real / compute, 3),
        "eval_img_s": round(evaluation, 2),
        "eval_img_s_tta": round(evaluation_tta, 2),
        **eval_bare,
        "tta": {"scales": list(bench.tta_scales), "hflip": True},
        "eval_metric_overhead": round(metric_s * evaluation, 4),
        "sliding_window": sliding,
        "flops_per_img": flops,
        "achieved_flop_s": flops * compute,
        "peak_flop_s": peak,
        "peak_source": "matmul" if peak == matmul_peak else "conv",
        "peak_flop_s_matmul": matmul_peak,
        "peak_flop_s_conv": [
            {"flop_s": rate, **{k: c[k] for k in ("input", "out_channels", "kernel_size", "stride")}}
            for rate, c in zip(conv_peaks, convs, strict=True)
        ],
        "mfu": round(flops * compute / peak, 4),
        "mfu_matmul": round(flops * compute / matmul_peak, 4),
        "peak_mem_mb": round(bench_probes.peak_memory_mb(device), 1),
        "checkpoint_save_s": round(save_s, 4),
        "scan": scan,
        "resume_load_s": round(load_s, 4),
        "resume_load_s_unverified": round(load_unverified_s, 4),  # the digest check's cost: the difference
        "device": device_name(device),
        "device_type": device.type,
        "precision": str(precision).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return _write(result, out_dir)


def _write(result: dict, out_dir: str | Path) -> dict:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


@suggest_keys("benchmark")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="benchmark")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_settings(cfg)  # fcn/config.py: each value checked before anything runs
    run_benchmark(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    from fcn.process import launch

    launch("benchmark")  # python -m: as scripts/benchmark.py
