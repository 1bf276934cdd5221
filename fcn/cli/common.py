"""What the entry points share: turning config values into datasets, models, the device and
precision, and the one-line error exit."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from fcn.checkpoint import load_checkpoint
from fcn.data.folder import SegmentationFolder, find_pairs
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
        log.error(message)
        print(message, file=sys.stderr)
        sys.exit(2)

    return wrapper


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
    """Generate the built-in dataset on first use (data configs with a ``generate`` section)."""
    if data.get("generate"):
        ensure_shapes(data.root, **data.generate)


def build_dataset(data: DictConfig, split: str, transform: Callable | None) -> SegmentationFolder:
    """The dataset of one split, laid out as ``data`` says."""
    pairs = find_pairs(
        data.root,
        split,
        image_dir=data.image_dir,
        mask_dir=data.mask_dir,
        split_file=data.split_file,
        mask_suffix=data.mask_suffix,
        image_glob=data.get("image_glob"),
    )
    return SegmentationFolder(pairs, transform, num_classes=data.num_classes, ignore_index=data.ignore_index)


def build_model(model_cfg: DictConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """Instantiate the configured model on ``device``, in NHWC memory order when asked.

    NHWC (channels-last) makes convolutions faster on CPUs (oneDNN) and on tensor cores.
    """
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
    settings = {k: v for k, v in model_config.items() if not k.startswith("_")}
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
