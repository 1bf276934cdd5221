"""Every file evaluate, predict and export write for a user appears under its final name only when
complete (issue 36, item 6): a write that fails half way (an exception, a full disk) leaves neither
a partial file under the final name nor a temporary."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.atomic import atomic_path, write_text
from fcn.cli.evaluate import run_evaluation
from fcn.cli.export import run_export
from fcn.cli.predict import run_prediction
from fcn.errors import UserError
from fcn.report import write_metrics
from tests.conftest import compose_config

FULL = OSError(errno.ENOSPC, "No space left on device")


def _files(folder: Path) -> list[str]:
    """Every file below ``folder``, hidden ones included, relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fail_after_some_bytes(error: Exception):
    """A writer that puts some bytes into the file it was given, then fails as a full disk does."""

    def write(target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89PNG half a file")
        raise error

    return write


def _write_png_then_fail(monkeypatch, error: Exception = FULL) -> None:
    real = Image.Image.save

    def save(self, fp, *args, **kwargs):
        real(self, fp, *args, **kwargs)  # the whole file, then the failure (a full disk at the last block)
        raise error

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_failed_write_leaves_no_file_under_its_name_and_no_temporary(tmp_path):
    target = tmp_path / "mask.png"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_a_failed_write_keeps_the_older_file_as_it_was(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("new, half")
        raise KeyboardInterrupt
    assert _files(tmp_path) == ["metrics.json"] and target.read_text() == "old\n"


def test_a_full_disk_is_one_line_naming_the_final_path(tmp_path):
    target = tmp_path / "out" / "0001.png"
    target.parent.mkdir()
    with pytest.raises(UserError) as caught, atomic_path(target) as tmp:
        _fail_after_some_bytes(OSError(errno.ENOSPC, "No space left on device", str(tmp)))(tmp)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"disk full while writing {target}:")
    assert ".tmp" not in message and _files(tmp_path) == []


def test_a_complete_write_has_the_final_name_and_the_writers_format(tmp_path):
    write_text(tmp_path / "a.json", "{}\n")
    with atomic_path(tmp_path / "b.npy") as tmp:
        np.save(tmp, np.arange(3))  # np.save appends .npy to other names: the temporary keeps the extension
    with atomic_path(tmp_path / "c.jpg") as tmp:
        Image.new("RGB", (4, 4)).save(tmp)  # Pillow picks the format from the extension
    assert _files(tmp_path) == ["a.json", "b.npy", "c.jpg"]
    assert np.load(tmp_path / "b.npy").tolist() == [0, 1, 2] and Image.open(tmp_path / "c.jpg").format == "JPEG"


def test_predict_on_a_full_disk_leaves_no_half_written_mask(trained_run, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    cfg = compose_config(
        "predict",
        [f"checkpoint={trained_run / 'checkpoints/best.pt'}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"],
    )
    _write_png_then_fail(monkeypatch)
    with pytest.raises(UserError) as caught:
        run_prediction(cfg)
    assert "\n" not in str(caught.value) and f"writing {tmp_path / 'out' / 'a.png'}:" in str(caught.value)
    assert _files(tmp_path / "out") == []


def test_predict_probabilities_appear_only_when_complete(trained_run, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "in" / "a.png")
    cfg = compose_config(
        "predict",
        [
            f"checkpoint={trained_run / 'checkpoints/best.pt'}",
            f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}",
            "save_probs=true",
        ],
    )
    real = np.lib.format.write_array_header_1_0

    def header_then_full_disk(f, header):
        real(f, header)
        raise FULL

    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", header_then_full_disk)
    with pytest.raises(UserError, match=f"writing {tmp_path / 'out' / 'a.npy'}:"):
        run_prediction(cfg)
    assert _files(tmp_path / "out") == []  # the probabilities are written first, while the model infers


def test_evaluate_saving_predictions_on_a_full_disk_leaves_no_half_written_mask(trained_run, tmp_path, monkeypatch):
    cfg = compose_config(
        "evaluate",
        [f"checkpoint={trained_run / 'checkpoints/best.pt'}", "num_workers=0", "eval.save_predictions=true"],
    )
    _write_png_then_fail(monkeypatch)
    with pytest.raises(UserError, match="disk full while writing .*predictions"):
        run_evaluation(cfg, tmp_path, overrides=[])
    assert _files(tmp_path / "predictions") == []


def test_the_reports_appear_only_when_complete(tmp_path, monkeypatch):
    _write_png_then_fail(monkeypatch, RuntimeError("killed while drawing"))
    confusion = torch.tensor([[3, 1], [0, 2]])
    metrics = {f"per_class_{k}": {"a": 0.5, "b": None} for k in ("iou", "dice", "precision", "recall")}
    with pytest.raises(RuntimeError, match="killed while drawing"):
        write_metrics(tmp_path, metrics, confusion, ["a", "b"])
    assert _files(tmp_path) == ["confusion_matrix.csv", "metrics.json", "per_class.csv"]
    assert json.loads((tmp_path / "metrics.json").read_text())["per_class_iou"] == {"a": 0.5, "b": None}


def test_an_onnx_export_that_fails_half_way_leaves_no_model_file(trained_run, tmp_path, monkeypatch):
    write = _fail_after_some_bytes(RuntimeError("exporter killed"))
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, path, **kwargs: write(path))
    out = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="exporter killed"):
        run_export(compose_config("export", [f"checkpoint={trained_run / 'checkpoints/best.pt'}", f"output={out}"]))
    assert _files(tmp_path) == []


def test_a_safetensors_export_on_a_full_disk_leaves_no_model_file(trained_run, tmp_path, monkeypatch):
    import safetensors.torch

    write = _fail_after_some_bytes(FULL)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, *args: write(path))
    out = tmp_path / "model.safetensors"
    cfg = compose_config(
        "export", [f"checkpoint={trained_run / 'checkpoints/best.pt'}", "format=safetensors", f"output={out}"]
    )
    with pytest.raises(UserError, match=f"disk full while writing {out}:"):
        run_export(cfg)
    assert _files(tmp_path) == []
