"""Data config -> datasets, the data scan and loaders: the data set-up every run shares.

The one place that turns the ``data`` and ``trainer`` config nodes into the plain arguments of
:mod:`fcn.data.folder`, :mod:`fcn.data.scan` and :mod:`fcn.data.loader` (the config-to-arguments
translation next to the factories it feeds); training, the benchmark and the model table all
build their loaders through :func:`loaders`.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from fcn.data.doctor.commands import doctor_lines
from fcn.data.doctor.scan import SplitReport, format_errors, median_frequency_weights, scan_split, split_overlap_problem
from fcn.data.download import download
from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.data.labels import MaskDecoder
from fcn.data.loader import make_loader
from fcn.data.sampler import ResumableSampler
from fcn.data.shapes import ensure_shapes
from fcn.errors import UserError

log = logging.getLogger(__name__)

MIN_WEIGHT_PIXELS = 100  # fewer training pixels than this make a class weight noise


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


def scan_data(data: DictConfig, splits: list[str]) -> list[SplitReport]:
    """Check every file of ``splits`` before any training or evaluation starts (cached).

    Warnings are logged once per split; errors end the run with one message listing the files
    and the fix, pointing to ``scripts/check_data.py`` for the full report.
    """
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
            + doctor_lines(data, {p.kind for r in reports for p in r.problems})
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
            names = list(data.get("class_names") or range(data.num_classes))
            for warning in class_weight_warnings(train_report, [str(n) for n in names], key):
                log.warning("%s", warning)
        elif isinstance(weights, str) or len(weights) != data.num_classes:
            raise UserError(
                f"loss.class_weights={weights}: give auto or one weight per class ({data.num_classes} for {data.name})"
            )
    return loss_cfg


def checked_splits(data: DictConfig | dict) -> list[str]:
    """The splits the doctor and the repair read by default: train, val and the test split if any."""
    splits = [data["train_split"], data["val_split"]] + ([data["test_split"]] if data.get("test_split") else [])
    return list(dict.fromkeys(splits))


def class_weight_warnings(report: SplitReport, names: list[str], key: str = "loss") -> list[str]:
    """What median-frequency weights computed from too little data hide: a class with fewer than
    :data:`MIN_WEIGHT_PIXELS` training pixels gets a weight from a handful of pixels, a class with
    none gets 1.0 without having been weighed. One line each, naming the classes and the fix."""
    weights, lines = median_frequency_weights(report), []
    rare = [(n, p, w) for n, p, w in zip(names, report.class_pixels, weights) if 0 < p < MIN_WEIGHT_PIXELS]
    if rare:
        shown = ", ".join(f"{n!r} {w:g} from {p} pixel{'s' * (p != 1)}" for n, p, w in rare)
        lines.append(
            f"class weights from fewer than {MIN_WEIGHT_PIXELS} {report.split} pixels: {shown}; such a weight is "
            f"noise: give {key}.class_weights=[...] by hand, or add images of these classes"
        )
    if absent := [n for n, p in zip(names, report.class_pixels) if p == 0]:
        lines.append(
            f"classes with no pixels in the {report.split} split get class weight 1.0, unweighed: "
            f"{', '.join(map(repr, absent))}; check data.num_classes and the masks"
        )
    return lines


def build_loss(loss_cfg: DictConfig, data: DictConfig, train_report: SplitReport | None = None):
    """The loss module of ``loss_cfg`` as training builds it (:func:`with_class_weights`); without
    ``train_report``, the train split's scan (cached) provides it when ``data.scan`` is on."""
    if train_report is None:
        train_report = next(iter(scan_data(data, [data.train_split])), None)
    return instantiate(with_class_weights(loss_cfg, data, train_report))


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


def loaders(
    train_set: Dataset,
    val_set: Dataset | None,
    trainer: DictConfig,
    *,
    ignore_index: int,
    seed: int,
    val_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    val_sampler=None,
) -> tuple[DataLoader, DataLoader | None]:
    """The training loader (a :class:`ResumableSampler` drawing this rank's share of every epoch's
    order, ``trainer.batch_size`` images per batch) and the validation loader (``val_batch_size``,
    default the same; ``val_sampler`` this rank's share, default all), with ``trainer``'s
    DataLoader settings. A last short batch is dropped when a rank has more than one batch
    (BatchNorm dislikes a batch of one). ``val_loader`` is None without ``val_set``."""
    sampler = ResumableSampler(len(train_set), seed, rank=rank, world_size=world_size)
    train_loader = make_loader(
        train_set,
        batch_size=trainer.batch_size,
        ignore_index=ignore_index,
        sampler=sampler,
        drop_last=sampler.per_rank > trainer.batch_size,
        seed=seed,
        **loader_options(trainer),
    )
    if val_set is None:
        return train_loader, None
    val_loader = make_loader(
        val_set,
        batch_size=val_batch_size or trainer.batch_size,
        ignore_index=ignore_index,
        sampler=val_sampler,
        seed=seed,
        **loader_options(trainer),
    )
    return train_loader, val_loader
