"""``python scripts/export.py checkpoint=PATH format=onnx|safetensors output=FILE``: ship a model.

ONNX files are checked against PyTorch with onnxruntime on random inputs of two sizes right after
export (the largest difference is printed; above ``tolerance`` the export fails). safetensors
weights get a JSON sidecar (class names, palette, normalisation, model settings) from which
``fcn.export.load_safetensors`` rebuilds the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fcn.checkpoint import load_model, offline_model_settings
from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import validate_export_config
from fcn.errors import UserError
from fcn.export import check_onnx, export_onnx, save_safetensors
from fcn.models.fold import fold_batch_norm

log = logging.getLogger(__name__)


def run_export(cfg: DictConfig) -> Path:
    """Export ``cfg.checkpoint`` as ``cfg.format`` to ``cfg.output``; returns the written file."""
    validate_export_config(cfg)
    if cfg.checkpoint is None or cfg.output is None:
        raise UserError("pass checkpoint=PATH and output=FILE (and format=onnx or format=safetensors)")
    if cfg.format not in ("onnx", "safetensors"):
        raise UserError(f"format={cfg.format!r}: choose onnx or safetensors")
    output = Path(cfg.output)
    if cfg.format == "safetensors" and output.suffix == ".json":
        raise UserError(f"output={output}: the .json name is taken by the sidecar; use model.safetensors")
    model, ckpt = load_model(cfg.checkpoint, torch.device("cpu"), channels_last=False)
    if cfg.format == "onnx":
        export_onnx(fold_batch_norm(model), output, cfg.opset)  # batch norm folded into the convolutions
        diff = check_onnx(model, output, [list(s) for s in cfg.check_sizes])
        print(f"onnxruntime vs PyTorch on inputs {list(map(list, cfg.check_sizes))}: max abs difference {diff:.2e}")
        if diff > cfg.tolerance:
            raise UserError(f"exported {output} differs from PyTorch by {diff:.2e} > tolerance {cfg.tolerance}")
    else:
        settings = offline_model_settings(ckpt["config"]["model"])
        metadata = {
            "class_names": ckpt["class_names"],
            "palette": ckpt["palette"],
            "mean": ckpt["mean"],
            "std": ckpt["std"],
            "ignore_index": ckpt["ignore_index"],
            "model": settings,
            "source_checkpoint": str(cfg.checkpoint),
            "step": ckpt["step"],
        }
        sidecar = save_safetensors(model, output, metadata)
        print(f"sidecar: {sidecar}")
    print(f"wrote {output}")
    return output


@suggest_keys("export")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    log.debug("export config: %s", OmegaConf.to_yaml(cfg))
    run_export(cfg)


if __name__ == "__main__":
    main()
