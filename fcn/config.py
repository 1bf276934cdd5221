"""Every setting a user can give, declared once (:data:`SETTINGS`): type, range or choices, whether null
is allowed and whether a resume may change it; below the table, the checks that relate several keys
(one name and colour per class, a sliding stride no larger than its window, ...).

Each refusal is one :class:`fcn.errors.UserError` line naming the key, the value and what is allowed
(exit 2 at the entry points, which check before they read a file or build a model). Why a table of our
own, not pydantic or Structured Configs: docs/architecture.md ("Settings"). Nothing here imports torch
(``--help`` answers before torch loads): the model's vocabulary is read from :mod:`fcn.models` when checked.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fcn.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """What one key accepts.

    ``kind``: ``int`` (whole numbers, not booleans), ``float`` (any finite number), ``bool``,
    ``str``, ``choice`` (one of ``choices``, a tuple or a function giving one; a bool among them
    matches true/false), ``path`` (a non-empty string), ``list`` (``item`` checks each element),
    ``int_or_pair`` (an int or ``[height, width]``), ``group`` (a node whose keys are declared one
    by one; declared only to say a resume may change all of it). ``length``/``min_length``: a
    list's exact or least length. ``low``/``high`` bound numbers (``open_low``/``open_high``
    exclude them); ``nullable``: null is allowed.

    ``harmless``: the key (and every key below it) cannot change what the model learns, step by
    step, so a resume may change it: it is applied and listed in a warning. ``aliases``: other
    tools' names for the key's last part, for "did you mean" (``learning_rate`` -> ``lr``).
    ``hint``: what to use instead, where the allowed range alone does not say it.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple | Callable[[], tuple] = ()
    nullable: bool = False
    item: Setting | None = None
    length: int | None = None
    min_length: int = 0
    harmless: bool = False
    aliases: tuple[str, ...] = ()
    hint: str = ""

    def options(self) -> tuple:
        """The allowed values of a ``choice``."""
        return self.choices() if callable(self.choices) else self.choices

    def allowed(self) -> str:
        """What is allowed, in words: ``a whole number >= 1, or null``."""
        if self.kind == "choice":
            text = "one of " + ", ".join(_word(c) for c in self.options())
        elif self.kind in ("int", "float"):
            text = "a whole number" if self.kind == "int" else "a finite number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
                text += f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {_num(self.low)}"
        elif self.kind in ("bool", "str", "path"):
            text = {"bool": "true or false", "str": "a string", "path": "a path"}[self.kind]
        elif self.kind == "int_or_pair":
            text = "two positive integers [height, width] (or one for both)"
        else:  # list
            count = f"{self.length} " if self.length else f"at least {self.min_length} " if self.min_length else ""
            text = f"a list of {count}values" + (f", each {self.item.allowed()}" if self.item else "")
        return text + (", or null" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (a plain Python value) is allowed."""
        if self.kind == "group" or value is None:
            return self.kind == "group" or self.nullable
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.options())
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind in ("str", "path"):
            return isinstance(value, str) and (self.kind == "str" or value != "")
        if self.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
                return False
            if not math.isfinite(value):
                return False
            if self.low is not None and (value <= self.low if self.open_low else value < self.low):
                return False
            return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))
        if self.kind == "int_or_pair":
            sides = [value] if isinstance(value, int) else value
            return (
                isinstance(sides, list)
                and len(sides) in ((1,) if isinstance(value, int) else (2,))
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides)
            )
        if self.kind == "list":
            if not isinstance(value, list) or (self.length is not None and len(value) != self.length):
                return False
            return len(value) >= self.min_length and (self.item is None or all(self.item.accepts(v) for v in value))
        raise ValueError(f"unknown setting kind {self.kind!r}")


def _word(value: Any) -> str:
    return {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def whole(low: int | None = None, **kw: Any) -> Setting:
    return Setting("int", low=low, **kw)


def number(low: float | None = None, high: float | None = None, **kw: Any) -> Setting:
    return Setting("float", low=low, high=high, **kw)


def one_of(*choices: Any, **kw: Any) -> Setting:
    return Setting("choice", choices=choices, **kw)


def model_names(registry: str, **kw: Any) -> Setting:
    """One of the names of ``fcn.models.<registry>`` (``BACKBONES``, ``VARIANTS``, ``UPSAMPLING``): the
    registry that builds them is the only list, read when a value is checked (fcn.models imports torch)."""
    return Setting("choice", choices=lambda: tuple(getattr(importlib.import_module("fcn.models"), registry)), **kw)


BOOL = Setting("bool")
HARMLESS_BOOL = Setting("bool", harmless=True)
PATH_OR_NULL = Setting("path", nullable=True)
PAIR = Setting("int_or_pair")
_UNIT = number(0, 1)
_RGB = Setting("list", item=whole(0, high=255), length=3)
# Masks are unsigned 8- or 16-bit images: a negative label cannot be stored in one.
_IGNORE_INDEX = whole(0, high=65535, hint="255 is usual (masks hold unsigned values, so -1 cannot appear in one)")
_PRECISION = ("auto", "fp32", "bf16", "fp16")

# Keys shared by every entry point that has them (absent keys are skipped). harmless=True marks the
# settings that cannot change what the model learns, step by step: loading speed, devices and kernels
# (floating-point results may differ in the last bits, as on another machine), logging, checkpoint
# frequency, and how validation is run and shown. Every other key (optimizer, lr, schedule, loss, model,
# data, crop, batch size, seed, augmentation, epochs, precision, ...) changes the run's trajectory: a
# resume with another value is refused. Keys absent on either side (settings added or removed since the
# checkpoint was written) are not compared.
SETTINGS: dict[str, Setting] = {
    "seed": whole(0),
    "resume": Setting("str", nullable=True, harmless=True),  # not even listed: it differs on every resume
    "init_from": Setting("path", nullable=True, harmless=True),  # the resumed weights replace what it loaded
    "logger": Setting("group", harmless=True),
    "eval": Setting("group", harmless=True),
    # data
    "data.name": Setting("str"),
    "data.root": Setting("path", harmless=True),  # the same files, moved
    "data.num_classes": whole(2, aliases=("n_classes", "classes")),
    "data.class_names": Setting("list", item=Setting("str"), min_length=1),
    "data.ignore_index": _IGNORE_INDEX,
    "data.palette": Setting("list", item=_RGB, nullable=True),
    "data.mean": Setting("list", item=number(0, 1), length=3),
    "data.std": Setting("list", item=number(0, 1, open_low=True), length=3),
    "data.image_dir": Setting("path"),
    "data.mask_dir": Setting("path"),
    "data.split_file": PATH_OR_NULL,
    "data.image_suffix": Setting("str", nullable=True),
    "data.mask_suffix": Setting("str"),
    "data.image_glob": Setting("str", nullable=True),
    "data.recursive": BOOL,
    "data.train_split": Setting("str"),
    "data.val_split": Setting("str"),
    "data.test_split": Setting("str", nullable=True),
    "data.split": Setting("str", harmless=True),  # the split evaluate.py scores, not one training reads
    "data.reduce_zero_label": BOOL,
    "data.scan": HARMLESS_BOOL,
    "data.max_image_pixels": whole(1, nullable=True, harmless=True),  # refuses images, never changes one
    "data.crop_size": PAIR,
    "data.generate": Setting("group", harmless=True),  # only used when data.root does not exist yet
    "data.generate.num_train": whole(1),
    "data.generate.num_val": whole(1),
    "data.generate.size": whole(32),
    "data.generate.seed": whole(0),
    # model
    "model.backbone": model_names("BACKBONES"),
    "model.variant": model_names("VARIANTS"),
    "model.width": whole(1),
    "model.upsampling": model_names("UPSAMPLING"),
    "model.pretrained": BOOL,
    "model.backbone_weights": PATH_OR_NULL,
    "model.scaled_skips": BOOL,
    # aug
    "aug.scale_range": Setting("list", item=number(0, open_low=True), length=2),
    "aug.crop_size": PAIR,
    "aug.ignore_index": _IGNORE_INDEX,
    "aug.hflip": _UNIT,
    "aug.color_jitter": _UNIT,
    # trainer
    "trainer.epochs": whole(1, aliases=("epoch", "num_epochs", "max_epochs")),
    "trainer.batch_size": whole(1, aliases=("batchsize", "bs")),
    "trainer.accumulate_grad_batches": whole(1),
    "trainer.num_workers": whole(0, harmless=True, aliases=("workers",)),
    "trainer.prefetch_factor": whole(1, harmless=True),
    "trainer.pin_memory": HARMLESS_BOOL,
    "trainer.persistent_workers": HARMLESS_BOOL,
    "trainer.threads": whole(1, nullable=True, harmless=True),
    "trainer.val_every": whole(1, harmless=True),
    "trainer.device": Setting("str", harmless=True),  # auto | cpu | cuda | cuda:N: fcn.device.resolve_device
    "trainer.channels_last": one_of("auto", True, False, harmless=True),
    "trainer.limit_train_batches": whole(1, nullable=True),
    "trainer.limit_val_batches": whole(1, nullable=True, harmless=True),
    "trainer.checkpoint_every_n_steps": whole(1, nullable=True, harmless=True),
    "trainer.skip_nonfinite": whole(0),
    "trainer.deterministic": HARMLESS_BOOL,
    "trainer.grad_clip_norm": number(0, open_low=True, nullable=True),
    "trainer.decoder_lr_mult": number(0, open_low=True),
    "trainer.early_stopping_patience": whole(1, nullable=True, harmless=True),
    "trainer.precision": one_of(*_PRECISION),
    "trainer.compile": HARMLESS_BOOL,
    "trainer.sync_bn": BOOL,
    "trainer.ema_decay": number(0, 1, open_low=True, open_high=True, nullable=True),
    # logger
    "logger.log_every_n_steps": whole(1),
    "logger.num_images": whole(0),
    # optimiser and schedule (the options of configs/optim, configs/sched)
    "optim.lr": number(0, aliases=("learning_rate", "base_lr")),  # 0 is allowed, with a warning
    "optim.weight_decay": number(0, nullable=True, aliases=("wd",)),
    "optim.momentum": number(0, 1, open_high=True, nullable=True),
    "optim.dampening": number(0, 1, open_high=True, nullable=True),
    "optim.nesterov": BOOL,
    "optim.eps": number(0, open_low=True, nullable=True),
    "optim.betas": Setting("list", item=number(0, 1, open_high=True), length=2, nullable=True),
    "optim.amsgrad": BOOL,
    "sched.power": number(0),
    "sched.warmup_steps": whole(0),
    "sched.warmup_factor": number(0, 1, open_low=True),
    # eval (validation, evaluate.py, predict.py)
    "eval.window": Setting("int_or_pair", nullable=True),
    "eval.stride": Setting("int_or_pair", nullable=True),
    "eval.scales": Setting("list", item=number(0, open_low=True), min_length=1),
    "eval.hflip": BOOL,
    "eval.save_predictions": BOOL,
    "eval.worst_images": whole(0),
    # evaluate.py / predict.py / export.py / check_data.py (top level)
    "checkpoint": PATH_OR_NULL,
    "device": Setting("str"),
    "batch_size": whole(1),
    "num_workers": whole(0),
    "precision": one_of(*_PRECISION),
    "channels_last": one_of("auto", True, False),
    "tensorboard": BOOL,
    "input": PATH_OR_NULL,
    "output": PATH_OR_NULL,
    "save_probs": BOOL,
    "apply_exif_orientation": BOOL,
    "format": one_of("onnx", "safetensors"),
    "opset": whole(13, high=24),
    "check_sizes": Setting("list", item=Setting("list", item=whole(1), length=4)),
    "tolerance": number(0, open_low=True, nullable=True),  # the largest logit difference
    "splits": Setting("list", item=Setting("str"), nullable=True),
    "report": PATH_OR_NULL,
    "workers": whole(1, nullable=True),
    "cache": BOOL,
    # fix_data.py
    "out": PATH_OR_NULL,
    "resize": one_of("image_to_mask", "mask_to_image"),
    # benchmark.py
    "bench.warmup": whole(0),
    "bench.steps": whole(1),
    "bench.repeats": whole(1),
    "bench.bare": BOOL,
    "bench.peak_convs": whole(0),
    "bench.eval_batches": whole(1),
    "bench.checkpoint_repeats": whole(1),
    "bench.scan_repeats": whole(1),
    "bench.scan_only": BOOL,
    "bench.tta_scales": Setting("list", item=number(0, open_low=True), min_length=1),
    "bench.large_image": Setting("list", item=whole(1), length=2),
    "bench.window": Setting("list", item=whole(1), length=2),
    "bench.stride": Setting("list", item=whole(1), length=2),
    # search.py (search.space is checked by fcn.search.parse_space)
    "search.name": Setting("str"),
    "search.dir": Setting("path"),
    "search.n_trials": whole(1),
    "search.direction": one_of("maximize", "minimize"),
    "search.storage": Setting("str", nullable=True),
    "search.sampler.seed": whole(0, nullable=True),
    "search.sampler.n_startup_trials": whole(0),
    "search.pruner": one_of("median", "hyperband", "none"),
    "search.pruner_startup_trials": whole(0),
    "search.pruner_warmup_epochs": whole(0),
    "search.worker": whole(0),
    # model_table.py
    "table.models": Setting("list", item=Setting("str"), min_length=1),
    "table.variants": Setting("list", item=model_names("VARIANTS"), min_length=1),
    "table.flops_size": Setting("list", item=whole(1), length=2),
    "table.warmup": whole(0),
    "table.steps": whole(1),
    "table.min_seconds": number(0),
    "table.repeats": whole(1),
    "table.train": BOOL,
    # upsampling_ablation.py
    "ablation.variants": Setting("list", item=model_names("UPSAMPLING"), min_length=1),
    "ablation.seeds": Setting("list", item=whole(0), min_length=1),
    "ablation.boundary_px": whole(1),
    "ablation.train_overrides": Setting("list", item=Setting("str")),
}

# Keys of each loss node (``loss``, and every ``loss.losses.N`` of a weighted sum).
LOSS_SETTINGS: dict[str, Setting] = {
    "ignore_index": _IGNORE_INDEX,
    "label_smoothing": number(0, 1, nullable=True),
    "top_k": number(0, 1, open_low=True, nullable=True),
    "min_pixels": whole(1, nullable=True),
    "smooth": number(0, nullable=True),
}

# Settings that were renamed: the old key -> the new key and the new value of each old value.
RENAMED: dict[str, tuple[str, dict[str, str]]] = {
    "model.learnable_upsampling": (
        "model.upsampling",
        {"true": "learned", "false": "frozen", "intermediate": "intermediate"},
    ),
}

#: Other tools' names for the last part of a key (``learning_rate`` -> ``lr``), from the declarations.
SYNONYMS = {alias: key.rpartition(".")[2] for key, setting in SETTINGS.items() for alias in setting.aliases}
#: The keys a resume may change, each with every key below it (``logger`` covers ``logger.num_images``).
RESUME_MAY_CHANGE = tuple(key for key, setting in SETTINGS.items() if setting.harmless)


def may_change_on_resume(key: str) -> bool:
    """Whether dotted ``key`` (e.g. ``trainer.num_workers``) may change on resume: it is, or is below,
    a key declared ``harmless`` (:data:`RESUME_MAY_CHANGE`)."""
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def renamed(key: str, value: str | None = None) -> str:
    """What a renamed ``key`` is now, in words; with the old ``value`` (as written), the override to write."""
    new, values = RENAMED[key]
    text = f"{key} is now {new} (" + ", ".join(f"{a} -> {b}" for a, b in values.items()) + ")"
    if value is not None and value.lower() in values:
        text += f": write {new}={values[value.lower()]}"
    return text


def check_settings(cfg: DictConfig) -> None:
    """Check every declared key present in ``cfg`` (resolved); raises :class:`UserError` with one
    line for the first value that is not allowed: ``trainer.epochs=2.5: must be a whole number >= 1``,
    or for a renamed key (a config file that still sets ``model.learnable_upsampling``)."""
    for key in RENAMED:
        found, value = _lookup(cfg, key)
        if found:
            raise UserError(renamed(key, _show(value)))
    for key, setting in SETTINGS.items():
        found, value = _lookup(cfg, key)
        if found:
            _check(key, value, setting)
    if "loss" in cfg and isinstance(cfg.get("loss"), DictConfig):
        for path, node in _loss_nodes(_plain(cfg.loss), "loss"):
            for name, setting in LOSS_SETTINGS.items():
                if name in node:
                    _check(f"{path}.{name}", node[name], setting)


# ---- relations between keys, checked once every value is known to be allowed on its own ----

# Every backbone reaches stride 32 at its deepest features (see fcn.models.backbones).
OUTPUT_STRIDE = 32
# Backbones without batch normalisation (a batch of one 1x1 map is fine for them).
_NO_BATCH_NORM = ("vgg16",)


def validate_train_config(cfg: DictConfig) -> None:
    """Check a composed training config before anything is built: each value, then the relations
    between keys; raises UserError on the first bad value."""
    check_settings(cfg)
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.val_every", "trainer.accumulate_grad_batches"):
        if OmegaConf.select(cfg, key) is None:  # deleted (~key): the run reads it (a null is refused above)
            raise UserError(f"{key}=None: must be at least 1")
    data = cfg.data
    if any(OmegaConf.is_missing(data, k) for k in ("num_classes", "class_names")):
        return  # Hydra's own "missing value" error names the key when it is read
    check_classes(data.num_classes, _plain(data.get("class_names")), _plain(data.get("palette")), data.ignore_index)
    crop = check_crop(data.crop_size, "data.crop_size")
    check_batch_norm_crop(cfg.trainer.batch_size, crop, cfg.model.get("backbone", ""))
    check_optimizer(_plain(cfg.optim), "optim")
    check_loss(_plain(cfg.loss), "loss", data.num_classes)
    if "eval" in cfg:
        check_eval(cfg.eval)


def validate_export_config(cfg: DictConfig) -> None:
    """Check the settings of export.py before the checkpoint is read."""
    check_settings(cfg)
    if cfg.get("opset") is None:  # deleted (~opset): the export reads it (a null is refused above)
        raise UserError("opset=None: give an ONNX opset between 13 and 24 (18 is the default)")


def validate_eval_config(cfg: DictConfig) -> None:
    """Check the settings of evaluate.py / predict.py before a checkpoint or image is read."""
    check_settings(cfg)
    if "eval" in cfg:
        check_eval(cfg.eval, window_here=False)  # the window may come from the checkpoint's run


def check_classes(num_classes: Any, class_names: Sequence | None, palette: Sequence | None, ignore_index: int) -> None:
    """``num_classes`` of at least 2 (binary segmentation is two classes), one name and colour per class,
    and an ``ignore_index`` that is not a class (also for a checkpoint's data, which no declaration saw)."""
    if not SETTINGS["data.num_classes"].accepts(num_classes):
        raise UserError(
            f"data.num_classes={num_classes}: segmentation needs at least 2 classes (binary segmentation is "
            "background + foreground: data.num_classes=2, with data.label_map={255:1} for 0/255 masks)"
        )
    if class_names is not None and not isinstance(class_names, str) and len(class_names) != num_classes:
        raise UserError(
            f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}: give one name per class"
        )
    if palette and len(palette) != num_classes:
        raise UserError(
            f"data.palette has {len(palette)} colours for data.num_classes={num_classes}: "
            "give one [r, g, b] per class or null"
        )
    if 0 <= ignore_index < num_classes:
        raise UserError(
            f"data.ignore_index={ignore_index} is one of the classes 0..{num_classes - 1}: "
            "choose a value outside them (255 is usual)"
        )


def check_crop(crop_size: Any, key: str) -> tuple[int, int]:
    """``crop_size`` (an int or ``[height, width]``) as ``(height, width)``; UserError naming ``key`` otherwise."""
    crop_size = _plain(crop_size)
    _check(key, crop_size, PAIR)
    return (crop_size, crop_size) if isinstance(crop_size, int) else (crop_size[0], crop_size[1])


def check_batch_norm_crop(batch_size: int, crop: tuple[int, int], backbone: str) -> None:
    """A batch of one image whose stride-32 feature map is a single cell gives batch norm one value
    per channel, which torch refuses in training ("Expected more than 1 value per channel")."""
    cells = math.ceil(crop[0] / OUTPUT_STRIDE) * math.ceil(crop[1] / OUTPUT_STRIDE)
    if batch_size == 1 and cells == 1 and backbone not in _NO_BATCH_NORM:
        raise UserError(
            f"trainer.batch_size=1 with data.crop_size={list(crop)}: the stride-{OUTPUT_STRIDE} features are "
            f"1x1, so batch norm sees one value per channel and cannot train; use data.crop_size>{OUTPUT_STRIDE} "
            "or trainer.batch_size>=2"
        )


def check_optimizer(optim: dict, key: str) -> None:
    """Warn about ``lr=0``: allowed (a frozen run measures the starting weights; the tests use it)."""
    if optim.get("lr") == 0:
        log.warning("%s.lr=0: the weights will not change", key)


def warmup_warning(warmup_steps: int | None, total_steps: int) -> str | None:
    """A warning when the warm-up is at least as long as the run: the lr never reaches its configured
    value (the schedule cuts the warm-up to ``total_steps - 1``). None when it fits. A warning, not
    an error: short check runs (``trainer=debug``) are meant to be shorter than the default warm-up."""
    if warmup_steps and warmup_steps >= total_steps:
        return (
            f"sched.warmup_steps={warmup_steps} but the run has only {total_steps} optimisation steps: the lr "
            f"never leaves the warm-up (lower sched.warmup_steps, e.g. to {total_steps // 10})"
        )
    return None


def crop_padding_warning(crop: tuple[int, int], image_sizes: dict[str, int]) -> str | None:
    """A warning when the training crop ``(height, width)`` is larger than every image (``image_sizes``:
    the scan's ``"WxH" -> count``): the crop is mostly padding, which costs compute and teaches nothing.
    Measured at scale 1 (before random scaling). None when some image fills the crop or none is known."""
    if not image_sizes:
        return None
    h, w = crop
    sizes = [(tuple(int(v) for v in key.split("x")), n) for key, n in image_sizes.items()]
    if any(iw >= w and ih >= h for (iw, ih), _ in sizes):
        return None
    images = sum(n for _, n in sizes)
    covered = sum(min(ih, h) * min(iw, w) * n for (iw, ih), n in sizes) / images
    padding = 1 - covered / (h * w)
    (big_w, big_h), _ = max(sizes, key=lambda item: item[0][0] * item[0][1])
    return (
        f"data.crop_size={[h, w]} is larger than every training image (largest {big_w}x{big_h}): "
        f"{padding:.0%} of each crop is padding on average, so a step costs {h * w / covered:.1f}x the "
        f"compute of the image itself; lower data.crop_size (e.g. to {min(big_h, h)} x {min(big_w, w)})"
    )


def check_loss(loss: dict, key: str, num_classes: int) -> None:
    """Every loss node (a ``WeightedSum`` and the losses inside it): class weights finite, >= 0, one per
    class and not all 0; a sum's weights finite, >= 0 and one per loss."""
    for path, node in _loss_nodes(loss, key):
        weights = node.get("class_weights")
        if isinstance(weights, list):
            if len(weights) != num_classes:
                raise UserError(
                    f"{path}.class_weights has {len(weights)} weights for data.num_classes={num_classes}: "
                    "give one per class, or auto"
                )
            if not all(_finite_weight(w) for w in weights) or not any(weights):
                raise UserError(f"{path}.class_weights={weights}: give finite weights >= 0, not all 0")
        if "losses" in node and isinstance(node.get("weights"), list):
            if not all(_finite_weight(w) for w in node["weights"]):
                raise UserError(f"{path}.weights={node['weights']}: give finite weights >= 0")
            if len(node["weights"]) != len(node["losses"]):
                raise UserError(f"{path}.weights has {len(node['weights'])} values for {len(node['losses'])} losses")


def check_eval(eval_cfg: Any, window_here: bool = True) -> None:
    """A sliding stride no larger than its window. ``window_here=False``: a stride without a window may
    take the checkpoint's run's window (evaluate/predict; :func:`fcn.inference.inference_fn` checks the
    merged settings)."""
    window, stride = (eval_cfg.get(k) for k in ("window", "stride"))
    window = None if window is None else check_crop(window, "eval.window")
    if stride is None:
        return
    stride = check_crop(stride, "eval.stride")
    if window is None and window_here:
        raise UserError("eval.stride needs eval.window")
    if window is not None and (stride[0] > window[0] or stride[1] > window[1]):
        raise UserError(
            f"eval.stride={list(stride)} is larger than eval.window={list(window)}: pixels between "
            "windows would never be predicted"
        )


def _finite_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _check(key: str, value: Any, setting: Setting) -> None:
    if not setting.accepts(value):
        raise UserError(
            f"{key}={_show(value)}: must be {setting.allowed()}" + (f"; {setting.hint}" if setting.hint else "")
        )


def _lookup(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        if OmegaConf.is_missing(node, part):
            return False, None  # "???": Hydra's own message names it when it is read
        node = node[part]
    return True, _plain(node)


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return _word(value)
    if isinstance(value, list):  # as it is written on the command line: [9s, 1.0], not ['9s', 1.0]
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _loss_nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every dict of a loss config with its key path (``loss``, ``loss.losses.0``, ...)."""
    if isinstance(node, dict):
        yield path, node
        for i, child in enumerate(node.get("losses") or []):
            yield from _loss_nodes(child, f"{path}.losses.{i}")


def dotted_keys(cfg: DictConfig) -> list[str]:
    """Every key of ``cfg`` as a dotted path, inner nodes too (``trainer``, ``trainer.epochs``)."""
    keys = []

    def walk(node, prefix: str) -> None:
        for name in node.keys():
            path = f"{prefix}{name}"
            keys.append(path)
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{path}.")

    walk(cfg, "")
    return keys
