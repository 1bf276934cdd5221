"""Where and how the network runs: the device, the autocast precision, determinism and
``torch.compile``. Plain arguments; the messages name the ``trainer.*`` settings they come from."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

from fcn.errors import UserError, cause
from fcn.process import malloc_setting_warning

log = logging.getLogger(__name__)


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; other names are passed to torch.

    ``threads`` sets torch's CPU threads. None keeps torch's choice (one per physical core of the
    process's affinity mask).
    """
    if threads is not None:  # 0 is refused by the settings check, never read as "unset"
        torch.set_num_threads(threads)
    if warning := malloc_setting_warning():
        log.warning("%s", warning)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    return torch.device(name)


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
        log.warning("torch.compile failed (%s); training without it", cause(exc))  # the reason, not the headline
        return model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    log.info("model compiled with torch.compile")
    return compiled


# trainer.channels_last=auto on the CPU, per backbone: True where NHWC trained faster than NCHW.
# Measured on the 2-core AMD EPYC, torch 2.14.1, 2 threads, float32, batch 8, 128 px, in one process,
# 3 interleaved rounds of 3 steps, medians, with other jobs on the machine (load average 1.8-5.3):
#   python scripts/measure_fast_paths.py --backbones tiny vgg16 --rounds 3 --steps 3
# NCHW step / NHWC step: tiny 0.290 s / 0.214 s (NHWC 1.36x faster); vgg16 11.28 s / 12.90 s (NHWC
# 1.14x slower: fc6, a 7x7 convolution with a 411 MB weight on a 4x4 map, copies its weight).
CHANNELS_LAST_CPU = {
    "tiny": True,
    "vgg16": False,
    "vgg16_bn": False,  # not measured: the same fc6 as vgg16, which is what makes NHWC slower there
}


def resolve_channels_last(setting: bool | str, backbone: str, device: torch.device) -> bool:
    """``trainer.channels_last``: ``true``/``false`` as given; ``auto`` picks the faster memory
    format for ``backbone`` on ``device``: the measured choice in :data:`CHANNELS_LAST_CPU` on the
    CPU (NHWC for a backbone not measured yet, the format oneDNN's convolutions prefer), and NHWC
    on GPUs (what tensor-core convolutions read without a transpose; not measured here yet).

    Raises UserError for any other value.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise UserError(f"trainer.channels_last={setting!r}: choose auto, true or false")
    if device.type == "cpu":
        return CHANNELS_LAST_CPU.get(backbone, True)
    return True


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the machine the numbers belong to)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
