"""Shipping a trained model: ONNX with dynamic batch and image size, or safetensors weights with a
JSON sidecar from which :func:`load_safetensors` rebuilds the model without the checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn.atomic import atomic_path, write_text
from fcn.checkpoint import rebuild_model
from fcn.errors import UserError
from fcn.models import FCN

# The exporter's own loggers: at INFO they print ~80 lines per export ("Removed 128 unused
# nodes", "Skipping constant folding ...") around the two lines a user wants.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch._export")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Raise the exporter's loggers to WARNING for the duration of an export; restore them after."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model: nn.Module, path: Path, opset: int = 18) -> None:
    """Write ``model`` (eval mode, float32, CPU) to ``path``; batch, height and width are dynamic.
    The file appears under ``path`` only when complete (:func:`fcn.atomic.atomic_path`)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise UserError("ONNX export needs the export extra: pip install -e '.[export]'") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, 64, 64)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with _quiet_exporter(), atomic_path(path) as tmp:
        torch.onnx.export(
            model.eval(),
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"x": dims},
            dynamo=True,
            opset_version=opset,
            verbose=False,
            external_data=False,
        )


def check_onnx(model: nn.Module, path: Path, shapes: Sequence[Sequence[int]], seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime and PyTorch logits on random inputs of ``shapes``."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError("checking the ONNX file needs onnxruntime: pip install -e '.[export]'") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        (onnx_out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch_out = model.eval()(x).numpy()
        if onnx_out.shape != torch_out.shape:
            raise UserError(f"ONNX output shape {onnx_out.shape} differs from PyTorch's {torch_out.shape} for {shape}")
        worst = max(worst, float(np.abs(onnx_out - torch_out).max()))
    return worst


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, Any]) -> Path:
    """Weights to ``path`` (.safetensors) and ``metadata`` to a ``.json`` sidecar; returns the sidecar.
    Each file appears under its name only when complete (:func:`fcn.atomic.atomic_path`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    sidecar = path.with_suffix(".json")
    write_text(sidecar, json.dumps(metadata, indent=2) + "\n")
    return sidecar


def load_safetensors(path: str | Path) -> tuple[FCN, dict[str, Any]]:
    """Rebuild an exported model from ``path`` and its ``.json`` sidecar.

    Returns the model in eval mode and the sidecar: class names, palette, normalisation
    (``mean``/``std`` of images scaled to [0, 1]) and the model settings.
    """
    from safetensors.torch import load_file

    path = Path(path)
    sidecar = path.with_suffix(".json")
    for file in (path, sidecar):
        if not file.is_file():
            raise UserError(f"exported model file not found: {file.resolve()}")
    metadata = json.loads(sidecar.read_text())
    model = rebuild_model(metadata["model"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), metadata
