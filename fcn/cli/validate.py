"""Settings checked before any set-up: values that torch would refuse only after the data scan and
model build (or accept and then train on nothing), each named by its key with the fix.

Every check raises :class:`fcn.errors.UserError` (one line, exit 2 at the entry points). The entry
points call :func:`validate_train_config` / :func:`validate_eval_config` first thing; the rules
themselves take plain values, so they can be read (and tested) without a config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fcn.cli.settings import check_settings
from fcn.errors import UserError

log = logging.getLogger(__name__)

# Every backbone reaches stride 32 at its deepest features (see fcn.models.backbones).
OUTPUT_STRIDE = 32
# Backbones without batch normalisation (a batch of one 1x1 map is fine for them).
_NO_BATCH_NORM = ("vgg16",)


def validate_train_config(cfg: DictConfig) -> None:
    """Check a composed training config before anything is built; raises UserError on the first bad value."""
    check_settings(cfg)  # each value's type and range, from one declaration per key (fcn/cli/settings.py)
    if any(OmegaConf.is_missing(cfg.data, k) for k in ("num_classes", "class_names")):
        return  # Hydra's own "missing value" error names the key when it is read
    check_classes(
        cfg.data.num_classes,
        _plain(cfg.data.get("class_names")),
        _plain(cfg.data.get("palette")),
        cfg.data.ignore_index,
    )
    crop = check_crop(cfg.data.crop_size, "data.crop_size")
    trainer = cfg.trainer
    for key in ("epochs", "batch_size", "val_every", "accumulate_grad_batches"):
        _at_least(trainer.get(key), 1, f"trainer.{key}")
    for key in ("limit_train_batches", "limit_val_batches", "checkpoint_every_n_steps", "early_stopping_patience"):
        if trainer.get(key) is not None:
            _at_least(trainer[key], 1, f"trainer.{key}", "or null")
    _at_least(trainer.get("skip_nonfinite", 0), 0, "trainer.skip_nonfinite")
    if trainer.get("grad_clip_norm") is not None:
        _positive(trainer.grad_clip_norm, "trainer.grad_clip_norm", "or null to turn clipping off")
    _positive(trainer.get("decoder_lr_mult", 1.0), "trainer.decoder_lr_mult")
    check_batch_norm_crop(trainer.batch_size, crop, cfg.model.get("backbone", ""))
    if cfg.get("logger") is not None and "log_every_n_steps" in cfg.logger:
        _at_least(cfg.logger.log_every_n_steps, 1, "logger.log_every_n_steps")
    check_optimizer(_plain(cfg.optim), "optim")
    check_schedule(_plain(cfg.sched), "sched")
    check_loss(_plain(cfg.loss), "loss", cfg.data.num_classes)
    check_max_image_pixels(cfg.data.get("max_image_pixels"))
    if "eval" in cfg:
        check_eval(cfg.eval)


def validate_export_config(cfg: DictConfig) -> None:
    """Check the settings of export.py before the checkpoint is read."""
    check_settings(cfg)
    opset = cfg.get("opset")
    if not isinstance(opset, int) or not 13 <= opset <= 24:
        raise UserError(f"opset={_show(opset)}: give an ONNX opset between 13 and 24 (18 is the default)")
    if cfg.get("tolerance") is not None and not (_number(cfg.tolerance) and cfg.tolerance > 0):
        raise UserError(f"tolerance={_show(cfg.tolerance)}: must be a positive number (largest logit difference)")


def validate_eval_config(cfg: DictConfig) -> None:
    """Check the settings of evaluate.py / predict.py before a checkpoint or image is read."""
    check_settings(cfg)
    if "data" in cfg:
        check_max_image_pixels(cfg.data.get("max_image_pixels"))
    if "eval" in cfg:
        check_eval(cfg.eval, window_here=False)  # the window may come from the checkpoint's run
    if "batch_size" in cfg and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise UserError(f"batch_size={_show(cfg.batch_size)}: must be a whole number of images, at least 1")


def check_classes(num_classes: Any, class_names: Sequence | None, palette: Sequence | None, ignore_index: int) -> None:
    """``num_classes`` of at least 2 (binary segmentation is two classes), one name and colour per class,
    and an ``ignore_index`` that is not a class."""
    if not isinstance(num_classes, int) or num_classes < 2:
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
    """``crop_size`` (an int or ``[height, width]``) as ``(height, width)`` of positive integers."""
    sides = [crop_size, crop_size] if isinstance(crop_size, int) else list(crop_size or [])
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise UserError(f"{key}={_show(crop_size)}: give two positive integers [height, width] (or one for both)")
    return sides[0], sides[1]


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
    """lr finite and >= 0 (0 warned about), weight decay >= 0, momentum / dampening in [0, 1),
    betas in [0, 1), eps > 0."""
    if "lr" in optim:
        # 0 is allowed (a frozen run measures the starting weights; the tests use it), with a warning
        _at_least(optim["lr"], 0, f"{key}.lr", "a finite learning rate, e.g. 0.01 for SGD or 0.001 for AdamW")
        if optim["lr"] == 0:
            log.warning("%s.lr=0: the weights will not change", key)
    if optim.get("weight_decay") is not None:
        _at_least(optim["weight_decay"], 0, f"{key}.weight_decay", "0 turns it off")
    for name in ("momentum", "dampening"):
        if optim.get(name) is not None:
            _in_range(optim[name], 0, 1, f"{key}.{name}", upper_open=True)
    if optim.get("betas") is not None:
        betas = list(optim["betas"])
        if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
            raise UserError(f"{key}.betas={_show(betas)}: give two values in [0, 1), e.g. [0.9, 0.999]")
    if optim.get("eps") is not None:
        _positive(optim["eps"], f"{key}.eps")


def check_schedule(sched: dict, key: str) -> None:
    """Warm-up steps >= 0, warm-up factor in (0, 1], power >= 0."""
    if sched.get("warmup_steps") is not None:
        _at_least(sched["warmup_steps"], 0, f"{key}.warmup_steps")
    if sched.get("warmup_factor") is not None:
        _in_range(sched["warmup_factor"], 0, 1, f"{key}.warmup_factor", lower_open=True)
    if sched.get("power") is not None:
        _at_least(sched["power"], 0, f"{key}.power")


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
    """Every loss node (a ``WeightedSum`` and the losses inside it): label smoothing in [0, 1], top-k
    fraction in (0, 1], smooth >= 0, class weights finite, >= 0, one per class and not all 0, sum
    weights finite and >= 0."""
    for path, node in _nodes(loss, key):
        if node.get("label_smoothing") is not None:
            _in_range(node["label_smoothing"], 0, 1, f"{path}.label_smoothing")
        if node.get("top_k") is not None:
            _in_range(node["top_k"], 0, 1, f"{path}.top_k", lower_open=True)
        if node.get("min_pixels") is not None:
            _at_least(node["min_pixels"], 1, f"{path}.min_pixels")
        if node.get("smooth") is not None:
            _at_least(node["smooth"], 0, f"{path}.smooth")
        weights = node.get("class_weights")
        if isinstance(weights, list):
            if len(weights) != num_classes:
                raise UserError(
                    f"{path}.class_weights has {len(weights)} weights for data.num_classes={num_classes}: "
                    "give one per class, or auto"
                )
            if not all(_number(w) and math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
                raise UserError(f"{path}.class_weights={_show(weights)}: give finite weights >= 0, not all 0")
        if "losses" in node and isinstance(node.get("weights"), list):
            if not all(_number(w) and math.isfinite(w) and w >= 0 for w in node["weights"]):
                raise UserError(f"{path}.weights={_show(node['weights'])}: give finite weights >= 0")
            if len(node["weights"]) != len(node["losses"]):
                raise UserError(f"{path}.weights has {len(node['weights'])} values for {len(node['losses'])} losses")


def check_eval(eval_cfg: Any, window_here: bool = True) -> None:
    """Sliding windows and strides of positive sides, stride no larger than the window, positive scales.
    ``window_here=False``: a stride without a window may take the checkpoint's run's window
    (evaluate/predict; :func:`fcn.inference.inference_fn` checks the merged settings)."""
    window, stride = eval_cfg.get("window"), eval_cfg.get("stride")
    if window is not None:
        window = check_crop(_plain(window), "eval.window")
    if stride is not None:
        stride = check_crop(_plain(stride), "eval.stride")
        if window is None and window_here:
            raise UserError("eval.stride needs eval.window")
        if window is not None and (stride[0] > window[0] or stride[1] > window[1]):
            raise UserError(
                f"eval.stride={list(stride)} is larger than eval.window={list(window)}: pixels between "
                "windows would never be predicted"
            )
    scales = eval_cfg.get("scales")
    if scales is not None and (not scales or not all(_number(s) and 0 < s < math.inf for s in scales)):
        raise UserError(f"eval.scales={_show(scales)}: give one or more positive scales")


def check_max_image_pixels(value: Any) -> None:
    """``data.max_image_pixels``: null (no limit) or a positive pixel count."""
    if value is not None and not (isinstance(value, int) and value > 0):
        raise UserError(f"data.max_image_pixels={value}: give a positive pixel count, or null for no limit")


# ---- rules on single values ----


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return str(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _positive(value: Any, key: str, hint: str = "") -> None:
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}={value}: must be a finite number > 0" + (f" ({hint})" if hint else ""))


def _at_least(value: Any, low: float, key: str, hint: str = "") -> None:
    if not _number(value) or not math.isfinite(value) or value < low:
        raise UserError(f"{key}={value}: must be at least {low}" + (f" ({hint})" if hint else ""))


def _in_range(
    value: Any, low: float, high: float, key: str, *, lower_open: bool = False, upper_open: bool = False
) -> None:
    ok = (
        _number(value)
        and (low < value if lower_open else low <= value)
        and (value < high if upper_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if lower_open else '['}{low}, {high}{')' if upper_open else ']'}"
        raise UserError(f"{key}={value}: must be in {interval}")


def _nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every dict of a loss config with its key path (``loss``, ``loss.losses.0``, ...)."""
    if isinstance(node, dict):
        yield path, node
        for i, child in enumerate(node.get("losses") or []):
            yield from _nodes(child, f"{path}.losses.{i}")
