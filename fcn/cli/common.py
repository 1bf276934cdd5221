"""What the entry points share: turning config values into datasets, models, the device and
precision, and the one-line error exit."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from fcn.checkpoint import load_checkpoint
from fcn.data.download import download
from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.data.labels import MaskDecoder
from fcn.data.scan import SplitReport, format_errors, median_frequency_weights, scan_split
from fcn.data.shapes import ensure_shapes
from fcn.errors import UserError
from fcn.inference import predict_logits

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def exit_on_user_error(task: Callable) -> Callable:
    """Run ``task``; a :class:`UserError` or a missing mandatory setting ends it with one line.

    The message goes to stderr and the log file; the exit code is 2. Anything else is a bug and
    keeps its traceback.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is the user's mistake
            cause = _user_error_in_chain(exc)
            if cause is None:
                raise
            if isinstance(cause, MissingMandatoryValue):
                key = cause.full_key
                message = f"error: setting {key} has no value: pass {key}=VALUE on the command line"
            else:
                message = f"error: {_without_worker_traceback(str(cause))}"
        _log_to_files(message)  # the console gets the message once, from the print below
        print(message, file=sys.stderr)
        sys.exit(2)

    return wrapper


def _log_to_files(message: str) -> None:
    # The run's log file keeps the error; the console handler would print it a second time.
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _user_error_in_chain(exc: BaseException) -> BaseException | None:
    # Hydra's instantiate wraps what a constructor raised; follow the chain to the user's mistake.
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (UserError, MissingMandatoryValue)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _without_worker_traceback(message: str) -> str:
    # A DataLoader worker re-raises as "Caught UserError in DataLoader worker ... Original
    # Traceback ...", ending with the original "fcn.errors.UserError: <message>" line.
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("UserError: ", 1)[-1]


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; other names are passed to torch.

    ``threads`` sets torch's CPU threads (None keeps torch's choice: one per physical core).
    """
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    return torch.device(name)


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
    if data.num_classes < 1:
        raise UserError(f"data.num_classes={data.num_classes}: must be at least 1")
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
            data.name, split, report.pairs, report.seconds, report.rescanned,
        )  # fmt: skip
        for problem in report.warnings:
            log.warning("[%s] %s%s", split, problem.message, f" (e.g. {problem.files[0]})" if problem.files else "")
        reports.append(report)
    if any(r.errors for r in reports):
        raise UserError(
            f"the {data.name} data at {Path(data.root).resolve()} has problems:\n  {format_errors(reports)}\n"
            f"Full report: python scripts/check_data.py data={data.name} data.root={data.root}"
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


# Model settings that say how to train the network, not what it is: never passed to its constructor.
TRAINING_ONLY_MODEL_KEYS = ("sync_bn",)


def build_model(model_cfg: DictConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Instantiate the configured model on ``device``, in NHWC memory order when asked.

    NHWC (channels-last) makes convolutions faster on CPUs (oneDNN) and on tensor cores.
    Training-only settings (``sync_bn``, applied by the trainer) are left out of the constructor call.
    """
    model_cfg = copy.copy(model_cfg)  # shallow: interpolations still resolve against the whole config
    with open_dict(model_cfg):
        for key in TRAINING_ONLY_MODEL_KEYS:
            model_cfg.pop(key, None)
    model = instantiate(model_cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision``: None means plain float32.

    ``auto`` is bfloat16 on GPUs that support it (float16 on older ones) and float32 on the CPU,
    where autocast is slower than float32 for convolutions.
    """
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in choices:
        raise UserError(f"trainer.precision={name!r}: choose auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return choices[name]


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


def set_deterministic(deterministic: bool) -> None:
    """``trainer.deterministic``: deterministic algorithms, or cuDNN's autotuner for speed."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS
        # warn_only: a few CUDA kernels FCN needs (max-pool and 2-D NLL-loss backward) have no
        # deterministic version; torch warns about each instead of refusing to train.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def maybe_compile(
    model: torch.nn.Module, enabled: bool, batch_size: int, crop: tuple[int, int], channels_last: bool
) -> torch.nn.Module:
    """``torch.compile`` the model when ``enabled``, falling back to eager with a warning.

    Compilation is lazy, so a failure would only surface mid-training: one forward and backward
    pass on a zero batch of the training shape forces it here. The model's weights and batch-norm
    statistics are put back afterwards, so the trial leaves no trace in training.
    """
    if not enabled:
        return model
    device = next(model.parameters()).device
    example = torch.zeros(batch_size, 3, *crop, device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        compiled = torch.compile(model)
        compiled.train()
        compiled(example).float().mean().backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "run eagerly"
        log.warning("torch.compile failed (%s: %s); training without it", exc.__class__.__name__, str(exc)[:200])
        return model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    log.info("model compiled with torch.compile")
    return compiled


def offline_model_settings(model_config: dict) -> dict:
    """``FCN`` keyword arguments from a model config, with no download and no weights file:
    for rebuilding a network whose weights come from elsewhere (a checkpoint, an export)."""
    settings = {k: v for k, v in model_config.items() if not k.startswith("_") and k not in TRAINING_ONLY_MODEL_KEYS}
    return settings | {"pretrained": False, "backbone_weights": None}


def model_from_checkpoint(path: str | Path, device: torch.device, channels_last: bool) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network a checkpoint was trained as, with its weights, in eval mode.

    The model settings come from the checkpoint's own config; weights come from the checkpoint,
    never from a download (``pretrained`` and ``backbone_weights`` are switched off).
    """
    ckpt = load_checkpoint(path)
    model_cfg = OmegaConf.create(ckpt["config"]["model"])
    model_cfg.merge_with(offline_model_settings(ckpt["config"]["model"]))
    model = build_model(model_cfg, device, channels_last)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit its own model config: {str(exc).splitlines()[0]}") from exc
    return model.eval(), ckpt


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
        raise UserError(f"eval.stride={stride} is larger than eval.window={window}: pixels between windows "
                        "would never be predicted")  # fmt: skip
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
