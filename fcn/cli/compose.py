"""Config -> constructor arguments: what the entry points share to turn Hydra config values into
the plain arguments of datasets, the data scan, losses, models, loaders and inference settings.
Nothing here trains or runs; only ``fcn/cli`` reads the config."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from fcn.data.download import download
from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.data.labels import MaskDecoder
from fcn.data.scan import SplitReport, format_errors, median_frequency_weights, scan_split, split_overlap_problem
from fcn.data.shapes import ensure_shapes
from fcn.errors import UserError
from fcn.inference import predict_logits
from fcn.overrides import override

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def prepare_data_root(data: DictConfig) -> None:
    """Generate the built-in dataset on first use (data configs with a ``generate`` section), or
    download a public one when asked (``data.download=true``)."""
    if data.get("generate"):
        ensure_shapes(data.root, **data.generate)
    elif data.get("download"):
        download(data.name, data.root)


def data_layout(data: DictConfig) -> dict:
    """The file-layout keywords of :func:`fcn.data.folder.list_split` from a data config."""
    return {
        "image_dir": data.image_dir,
        "mask_dir": data.mask_dir,
        "split_file": data.split_file,
        "mask_suffix": data.mask_suffix,
        "image_glob": data.get("image_glob"),
        "image_suffix": data.get("image_suffix"),
        "recursive": bool(data.get("recursive", False)),
    }


def mask_decoder(data: DictConfig) -> MaskDecoder:
    """How this dataset's mask pixels become class indices (label map, palette, zero label)."""
    label_map = data.get("label_map")
    return MaskDecoder(
        data.num_classes,
        data.ignore_index,
        label_map=OmegaConf.to_container(label_map) if isinstance(label_map, DictConfig) else label_map,
        reduce_zero_label=bool(data.get("reduce_zero_label", False)),
        palette=OmegaConf.to_container(data.palette) if data.get("palette") else None,
        ignore_colors=OmegaConf.to_container(data.ignore_colors) if data.get("ignore_colors") else None,
    )


def build_dataset(data: DictConfig, split: str, transform: Callable | None) -> SegmentationFolder:
    """The dataset of one split, laid out as ``data`` says."""
    pairs = find_pairs(data.root, split, **data_layout(data))
    return SegmentationFolder(
        pairs, transform, num_classes=data.num_classes, ignore_index=data.ignore_index, decoder=mask_decoder(data)
    )


def check_data_config(data: DictConfig) -> None:
    """Settings that must agree with each other before any file is read."""
    if data.num_classes < 2:  # as fcn.cli.validate.check_classes says it for training
        raise UserError(
            f"data.num_classes={data.num_classes}: segmentation needs at least 2 classes (binary "
            "segmentation is background + foreground: data.num_classes=2)"
        )
    if len(data.class_names) != data.num_classes:
        raise UserError(
            f"data.class_names has {len(data.class_names)} names but data.num_classes={data.num_classes}: "
            "give one name per class"
        )
    if data.get("palette") and len(data.palette) != data.num_classes:
        raise UserError(f"data.palette has {len(data.palette)} colours for {data.num_classes} classes")
    if 0 <= data.ignore_index < data.num_classes:
        raise UserError(
            f"data.ignore_index={data.ignore_index} is one of the classes 0..{data.num_classes - 1}: "
            "choose a value outside them (255 is usual)"
        )


def scan_data(data: DictConfig, splits: list[str]) -> list[SplitReport]:
    """Check every file of ``splits`` before any training or evaluation starts (cached).

    Warnings are logged once per split; errors end the run with one message listing the files
    and the fix, pointing to ``scripts/check_data.py`` for the full report.
    """
    check_data_config(data)
    if not data.get("scan", True):
        return []
    reports = []
    for split in dict.fromkeys(splits):  # train and val may be the same split
        report = scan_split(data.root, split, data_layout(data), mask_decoder(data))
        log.info(
            "scanned %s split %r: %d pairs in %.1f s (%d files read, the rest cached)",
            data.name,
            split,
            report.pairs,
            report.seconds,
            report.rescanned,
        )
        for problem in report.warnings:
            log.warning("[%s] %s%s", split, problem.message, f" (e.g. {problem.files[0]})" if problem.files else "")
        reports.append(report)
    if data.train_split in splits and data.val_split in splits:  # training: val must not be train images
        overlap = split_overlap_problem(data.root, data_layout(data), data.train_split, data.val_split)
        if overlap is not None:
            log.warning("%s (e.g. %s)", overlap.message, overlap.files[0])
    if any(r.errors for r in reports):
        raise UserError(
            f"the {data.name} data at {Path(data.root).resolve()} has problems:\n  {format_errors(reports)}\n"
            f"Full report: python scripts/check_data.py data={data.name} {override('data.root', data.root)}"
        )
    return reports


def takes_class_weights(target: str) -> bool:
    """Whether the loss class ``target`` (a ``_target_`` path) accepts ``class_weights``."""
    return bool(target) and "class_weights" in inspect.signature(get_class(target)).parameters


def with_class_weights(loss_cfg: DictConfig, data: DictConfig, train_report: SplitReport | None) -> DictConfig:
    """``loss_cfg`` with every ``class_weights: auto`` (top level or inside ``losses``) replaced by
    median-frequency weights of the train split, and explicit lists checked against the classes."""
    loss_cfg = copy.deepcopy(loss_cfg)
    nodes = [("loss", loss_cfg), *((f"loss.losses.{i}", n) for i, n in enumerate(loss_cfg.get("losses") or []))]
    for key, node in nodes:
        weights = node.get("class_weights") if isinstance(node, DictConfig) else None
        if weights is None:
            continue
        target = node.get("_target_", "")
        if not takes_class_weights(target):
            inner = [k for k, n in nodes[1:] if takes_class_weights(n.get("_target_", ""))]
            hint = f"; set {inner[0]}.class_weights instead" if inner else f"; drop it with ~{key}.class_weights"
            raise UserError(f"{key}.class_weights is set but {target.rsplit('.', 1)[-1]} takes no class weights{hint}")
        if weights == "auto":
            if train_report is None:
                raise UserError("loss.class_weights=auto needs the data scan: set data.scan=true")
            node.class_weights = median_frequency_weights(train_report)
            log.info("class weights (median frequency, %s split): %s", train_report.split, list(node.class_weights))
        elif isinstance(weights, str) or len(weights) != data.num_classes:
            raise UserError(
                f"loss.class_weights={weights}: give auto or one weight per class ({data.num_classes} for {data.name})"
            )
    return loss_cfg


def build_model(model_cfg: DictConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Instantiate the configured model on ``device``, in NHWC memory order when asked.

    NHWC (channels-last) makes convolutions faster on CPUs (oneDNN) and on tensor cores.
    """
    model = instantiate(model_cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def pair(size: int | list | tuple) -> tuple[int, int]:
    """A crop size from config, ``S`` or ``[H, W]``, as ``(H, W)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def loader_options(trainer: DictConfig) -> dict:
    """The DataLoader settings of the ``trainer`` config, for every loader an entry point makes."""
    return {
        "num_workers": trainer.num_workers,
        "prefetch_factor": trainer.prefetch_factor,
        "pin_memory": trainer.pin_memory,
        "persistent_workers": trainer.persistent_workers,
    }


def _pair_setting(value, key: str) -> list[int] | None:
    if value is None:
        return None
    items = list(value) if not isinstance(value, int) else [value, value]
    if len(items) != 2 or not all(isinstance(v, int) and v > 0 for v in items):
        raise UserError(f"{key}={value}: give two positive integers [height, width] (or one for both)")
    return items


def eval_config(checkpoint_config: dict, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """How to infer: as the run validated (its ``eval`` settings, e.g. half resolution) unless
    ``eval=...`` or ``eval.*`` is given on the command line."""
    if any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "eval" for o in overrides):
        return cfg.eval
    trained = checkpoint_config.get("eval")
    if not trained:
        return cfg.eval
    keys = ("window", "stride", "scales", "hflip")
    return OmegaConf.merge(cfg.eval, {k: trained[k] for k in keys if k in trained})


def inference_fn(eval_cfg: DictConfig, num_classes: int) -> Callable | None:
    """The ``infer(model, images)`` the ``eval`` settings ask for, or None for a plain forward pass."""
    window = _pair_setting(eval_cfg.window, "eval.window")
    stride = _pair_setting(eval_cfg.stride, "eval.stride")
    if window is None and stride is not None:
        raise UserError("eval.stride needs eval.window")
    if window is not None and stride is not None and any(s > w for s, w in zip(stride, window)):
        raise UserError(
            f"eval.stride={stride} is larger than eval.window={window}: pixels between windows would never be predicted"
        )
    if not eval_cfg.scales or any(s <= 0 for s in eval_cfg.scales):
        raise UserError(f"eval.scales={list(eval_cfg.scales)}: give one or more positive scales")
    plain = window is None and list(eval_cfg.scales) == [1.0] and not eval_cfg.hflip
    if plain:
        return None
    return functools.partial(
        predict_logits,
        num_classes=num_classes,
        window=window,
        stride=stride,
        scales=list(eval_cfg.scales),
        hflip=eval_cfg.hflip,
    )
