"""One declaration per setting a user can give on the command line: its type, range or choices,
and whether null is allowed. :func:`check_settings` checks a composed config against them before
anything runs; each violation is one line naming the key, the value and what is allowed.

Relations between keys (a stride no larger than its window, one colour per class) stay in
:mod:`fcn.cli.validate`; this table is only about each value on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fcn.errors import UserError


@dataclass(frozen=True)
class Setting:
    """What one key accepts.

    ``kind``: ``int`` (whole numbers, not booleans), ``float`` (any finite number), ``bool``,
    ``str``, ``choice`` (one of ``choices``; a bool among them matches true/false), ``path`` (a
    string), ``list`` (a list; ``item`` checks each element), ``int_or_pair`` (an int or
    ``[height, width]``). ``length``/``min_length``: a list's exact or least length.
    ``low``/``high`` bound numbers (``open_low``/``open_high`` exclude them);
    ``nullable``: null is allowed.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple = ()
    nullable: bool = False
    item: Setting | None = None
    length: int | None = None
    min_length: int = 0

    def allowed(self) -> str:
        """What is allowed, in words: ``a whole number >= 1, or null``."""
        if self.kind == "choice":
            text = "one of " + ", ".join(_word(c) for c in self.choices)
        elif self.kind in ("int", "float"):
            text = "a whole number" if self.kind == "int" else "a finite number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
                text += f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {_num(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.open_high else '<='} {_num(self.high)}"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind in ("str", "path"):
            text = "a string" if self.kind == "str" else "a path"
        elif self.kind == "int_or_pair":
            text = "two positive integers [height, width] (or one for both)"
        else:  # list
            count = f"{self.length} " if self.length else f"at least {self.min_length} " if self.min_length else ""
            text = f"a list of {count}values" + (f", each {self.item.allowed()}" if self.item else "")
        return text + (", or null" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (a plain Python value) is allowed."""
        if value is None:
            return self.nullable
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
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
            if len(value) < self.min_length:
                return False
            return self.item is None or all(self.item.accepts(v) for v in value)
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


BOOL = Setting("bool")
PATH_OR_NULL = Setting("path", nullable=True)
_UNIT = number(0, 1)
_RGB = Setting("list", item=whole(0, high=255), length=3)
_DEVICE = Setting("str")  # auto | cpu | cuda | cuda:N: checked by fcn.device.resolve_device with its own message

BACKBONES = ("tiny", "vgg16", "vgg16_bn", "resnet18", "resnet50", "mobilenet_v3_large")

# Keys shared by every entry point that has them (absent keys are skipped).
SETTINGS: dict[str, Setting] = {
    "seed": whole(0),
    "resume": Setting("str", nullable=True),
    "init_from": PATH_OR_NULL,
    # data
    "data.name": Setting("str"),
    "data.root": Setting("path"),
    "data.num_classes": whole(2),
    "data.class_names": Setting("list", item=Setting("str"), min_length=1),
    "data.ignore_index": whole(0, high=65535),
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
    "data.split": Setting("str"),
    "data.reduce_zero_label": BOOL,
    "data.scan": BOOL,
    "data.max_image_pixels": whole(1, nullable=True),
    "data.crop_size": Setting("int_or_pair"),
    "data.generate.num_train": whole(1),
    "data.generate.num_val": whole(1),
    "data.generate.size": whole(32),
    "data.generate.seed": whole(0),
    # model
    "model.backbone": one_of(*BACKBONES),
    "model.variant": one_of("32s", "16s", "8s", "4s"),
    "model.width": whole(1),
    "model.upsampling": one_of("learned", "frozen", "intermediate", "random", "interpolate"),
    "model.pretrained": BOOL,
    "model.backbone_weights": PATH_OR_NULL,
    "model.scaled_skips": BOOL,
    # aug
    "aug.scale_range": Setting("list", item=number(0, open_low=True), length=2),
    "aug.crop_size": Setting("int_or_pair"),
    "aug.ignore_index": whole(0, high=65535),
    "aug.hflip": _UNIT,
    "aug.color_jitter": _UNIT,
    # trainer
    "trainer.epochs": whole(1),
    "trainer.batch_size": whole(1),
    "trainer.accumulate_grad_batches": whole(1),
    "trainer.num_workers": whole(0),
    "trainer.prefetch_factor": whole(1),
    "trainer.pin_memory": BOOL,
    "trainer.persistent_workers": BOOL,
    "trainer.threads": whole(1, nullable=True),
    "trainer.val_every": whole(1),
    "trainer.device": _DEVICE,
    "trainer.channels_last": one_of("auto", True, False),
    "trainer.limit_train_batches": whole(1, nullable=True),
    "trainer.limit_val_batches": whole(1, nullable=True),
    "trainer.checkpoint_every_n_steps": whole(1, nullable=True),
    "trainer.skip_nonfinite": whole(0),
    "trainer.deterministic": BOOL,
    "trainer.grad_clip_norm": number(0, open_low=True, nullable=True),
    "trainer.decoder_lr_mult": number(0, open_low=True),
    "trainer.early_stopping_patience": whole(1, nullable=True),
    "trainer.precision": one_of("auto", "fp32", "bf16", "fp16"),
    "trainer.compile": BOOL,
    "trainer.sync_bn": BOOL,
    "trainer.ema_decay": number(0, 1, open_low=True, open_high=True, nullable=True),
    # logger
    "logger.log_every_n_steps": whole(1),
    "logger.num_images": whole(0),
    # optimiser and schedule (the options of configs/optim, configs/sched)
    "optim.lr": number(0),
    "optim.weight_decay": number(0, nullable=True),
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
    "device": _DEVICE,
    "batch_size": whole(1),
    "num_workers": whole(0),
    "precision": one_of("auto", "fp32", "bf16", "fp16"),
    "channels_last": one_of("auto", True, False),
    "tensorboard": BOOL,
    "input": PATH_OR_NULL,
    "output": PATH_OR_NULL,
    "save_probs": BOOL,
    "apply_exif_orientation": BOOL,
    "format": one_of("onnx", "safetensors"),
    "opset": whole(13, high=24),
    "check_sizes": Setting("list", item=Setting("list", item=whole(1), length=4)),
    "tolerance": number(0, open_low=True, nullable=True),
    "splits": Setting("list", item=Setting("str"), nullable=True),
    "report": PATH_OR_NULL,
    "workers": whole(1, nullable=True),
    "cache": BOOL,
    # fix_data.py (for the lead to move into the one declaration of settings)
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
    "table.variants": Setting("list", item=one_of("32s", "16s", "8s", "4s"), min_length=1),
    "table.flops_size": Setting("list", item=whole(1), length=2),
    "table.warmup": whole(0),
    "table.steps": whole(1),
    "table.min_seconds": number(0),
    "table.repeats": whole(1),
    "table.train": BOOL,
    # upsampling_ablation.py
    "ablation.variants": Setting(
        "list", item=one_of("learned", "frozen", "intermediate", "random", "interpolate"), min_length=1
    ),
    "ablation.seeds": Setting("list", item=whole(0), min_length=1),
    "ablation.boundary_px": whole(1),
    "ablation.train_overrides": Setting("list", item=Setting("str")),
}

# Settings that were renamed: the old key -> the new key and the new value of each old value.
RENAMED: dict[str, tuple[str, dict[str, str]]] = {
    "model.learnable_upsampling": (
        "model.upsampling",
        {"true": "learned", "false": "frozen", "intermediate": "intermediate"},
    ),
}


def renamed(key: str, value: str | None = None) -> str:
    """What a renamed ``key`` is now, in words; with the old ``value`` (as written), the override to write."""
    new, values = RENAMED[key]
    text = f"{key} is now {new} (" + ", ".join(f"{a} -> {b}" for a, b in values.items()) + ")"
    if value is not None and value.lower() in values:
        text += f": write {new}={values[value.lower()]}"
    return text


# Keys of each loss node (``loss``, and every ``loss.losses.N`` of a weighted sum).
LOSS_SETTINGS: dict[str, Setting] = {
    "ignore_index": whole(0, high=65535),
    "label_smoothing": number(0, 1, nullable=True),
    "top_k": number(0, 1, open_low=True, nullable=True),
    "min_pixels": whole(1, nullable=True),
    "smooth": number(0, nullable=True),
}


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


def _check(key: str, value: Any, setting: Setting) -> None:
    if not setting.accepts(value):
        raise UserError(f"{key}={_show(value)}: must be {setting.allowed()}")


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


def _loss_nodes(node: Any, path: str):
    if isinstance(node, dict):
        yield path, node
        for i, child in enumerate(node.get("losses") or []):
            yield from _loss_nodes(child, f"{path}.losses.{i}")
