"""Evaluation reports, prediction on folders, and export, from a checkpoint trained in the tests."""

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn.checkpoint import load_checkpoint, load_model
from fcn.cli.evaluate import run_evaluation
from fcn.cli.export import run_export
from fcn.cli.predict import run_prediction
from fcn.errors import UserError
from fcn.export import load_safetensors
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]


def _best(run: Path) -> Path:
    return run / "checkpoints" / "best.pt"


def test_evaluation_writes_every_report(trained_run, tmp_path):
    cfg = compose_config(
        "evaluate", [f"checkpoint={_best(trained_run)}", "num_workers=0", "eval.save_predictions=true"]
    )
    report = run_evaluation(cfg, tmp_path, overrides=[])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "miou",
        "pixel_acc",
        "mean_acc",
        "fwiou",
        "mean_dice",
        "per_class_dice",
        "per_class_precision",
        "per_class_recall",
        "absent_classes",
    ):
        assert key in metrics, key
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [r["class"] for r in rows] == list(report["per_class_iou"])
    counts = list(csv.reader(open(tmp_path / "confusion_matrix.csv")))
    assert sum(int(v) for row in counts[1:] for v in row[1:]) == sum(int(r["pixels"]) for r in rows)
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 100
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"z_eval_per_class/confusion_matrix", "z_eval/worst_images"} <= set(events.Tags()["images"])
    # saved predictions: index PNGs in the image's size with the checkpoint's palette, plus overlays
    masks = sorted((tmp_path / "predictions").glob("*[0-9].png"))
    assert len(masks) == report["images"] == 5
    mask = Image.open(masks[0])
    assert mask.mode == "P" and mask.size == (48, 48)
    assert mask.getpalette()[3:6] == load_checkpoint(_best(trained_run))["palette"][1]
    assert (tmp_path / "predictions" / f"{masks[0].stem}_overlay.jpg").is_file()


def test_tta_and_sliding_window_evaluation_run_at_full_resolution(trained_run, tmp_path):
    for option, *extra in (
        ("eval=tta", "eval.hflip=true"),
        ("eval=sliding", "eval.window=[32,32]", "eval.stride=[24,24]"),
    ):
        cfg = compose_config("evaluate", [f"checkpoint={_best(trained_run)}", "num_workers=0", option, *extra])
        report = run_evaluation(cfg, tmp_path / option, overrides=[option, *extra])
        assert report["images"] == 5 and 0 <= report["miou"] <= 1
        assert report["eval"]["hflip"] == (option == "eval=tta")  # the command line, not the checkpoint


def test_evaluation_infers_as_the_run_validated_unless_told_otherwise(trained_run, tmp_path):
    import torch

    ckpt = load_checkpoint(_best(trained_run))
    ckpt["config"]["eval"] = {**ckpt["config"]["eval"], "scales": [0.5]}  # a run validated at half resolution
    half = tmp_path / "half.pt"
    torch.save(ckpt, half)
    cfg = compose_config("evaluate", [f"checkpoint={half}", "num_workers=0"])
    assert run_evaluation(cfg, tmp_path / "as_trained", overrides=[])["eval"]["scales"] == [0.5]
    cfg = compose_config("evaluate", [f"checkpoint={half}", "num_workers=0", "eval.scales=[1.0]"])
    assert run_evaluation(cfg, tmp_path / "told", overrides=["eval.scales=[1.0]"])["eval"]["scales"] == [1.0]
    # one key on the command line changes that key only: flips added, still at the run's half resolution
    cfg = compose_config("evaluate", [f"checkpoint={half}", "num_workers=0", "eval.hflip=true"])
    report = run_evaluation(cfg, tmp_path / "flip", overrides=["eval.hflip=true"])["eval"]
    assert (report["scales"], report["hflip"]) == ([0.5], True)
    # a group choice replaces the run's settings: eval=tta's scales, not the run's
    cfg = compose_config("evaluate", [f"checkpoint={half}", "num_workers=0", "eval=tta"])
    assert run_evaluation(cfg, tmp_path / "tta", overrides=["eval=tta"])["eval"]["scales"] == [0.75, 1.0, 1.25]


def test_a_new_eval_stride_alone_slides_the_runs_window(trained_run, tmp_path):
    import torch

    ckpt = load_checkpoint(_best(trained_run))
    ckpt["config"]["eval"] = {**ckpt["config"]["eval"], "window": [32, 32], "stride": [24, 24]}
    windowed = tmp_path / "windowed.pt"
    torch.save(ckpt, windowed)
    told = ["eval.stride=[16,16]"]
    report = run_evaluation(compose_config("evaluate", [f"checkpoint={windowed}", *told]), tmp_path / "a", told)
    assert (report["eval"]["window"], report["eval"]["stride"]) == ([32, 32], [16, 16])
    told = ["eval.stride=[40,40]"]  # larger than the run's window: one line, before any image is read
    with pytest.raises(UserError, match=r"eval.stride=\[40, 40\] is larger than eval.window=\[32, 32\]"):
        run_evaluation(compose_config("evaluate", [f"checkpoint={windowed}", *told]), tmp_path / "b", told)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "told, window, stride",
    [
        (["eval.window=[32,32]"], [32, 32], None),  # a new window: its own default stride, not the run's 48
        (["eval.window=null"], None, None),  # windows off: the run's stride goes with them
        (["eval.stride=[16,16]"], [64, 64], [16, 16]),  # a new stride over the run's window
        (["eval.hflip=true"], [64, 64], [48, 48]),  # another key: the run's pair kept
    ],
)
def test_a_new_eval_window_takes_its_own_stride_not_the_runs(told, window, stride):
    from fcn.inference import eval_config

    saved = {"eval": {"window": [64, 64], "stride": [48, 48], "scales": [1.0], "hflip": False}}
    merged = eval_config(saved, compose_config("evaluate", told), told)
    assert (merged.window, merged.stride) == (window, stride)


def _images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 29, 3), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / "c.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def test_predict_writes_masks_and_overlays_and_reports_bad_files(trained_run, tmp_path):
    _images(tmp_path / "in")
    cfg = compose_config(
        "predict",
        [
            f"checkpoint={_best(trained_run)}",
            f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}",
            "save_probs=true",
            "batch_size=2",
        ],
    )
    written, failed = run_prediction(cfg)
    assert [p.name for p in written] == ["a.png", "b.jpg", "c.png"]
    assert [p.name for p, _ in failed] == ["broken.jpg"]
    for stem, size in (("a", (52, 40)), ("b", (29, 33)), ("c", (52, 40))):
        mask = Image.open(tmp_path / "out" / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.jpg").size == size
        probs = np.load(tmp_path / "out" / f"{stem}.npy")
        assert probs.shape == (6, size[1], size[0]) and np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)


@pytest.mark.parametrize("window", [[32, 32], None], ids=["sliding", "whole"])
def test_predict_writes_bitwise_what_whole_image_inference_gives(trained_run, tmp_path, window):
    """Banded sliding windows (fcn/inference.py) change no byte of the masks or probabilities."""
    import io

    from fcn.engine import to_model_input
    from fcn.inference import predict_logits
    from fcn.models.fold import fold_batch_norm

    (tmp_path / "in").mkdir()
    array = np.random.default_rng(1).integers(0, 255, (70, 93, 3), dtype=np.uint8)  # not a multiple of the stride
    Image.fromarray(array).save(tmp_path / "in" / "a.png")
    told = [] if window is None else [f"eval.window={window}", "eval.stride=[24,20]", "eval.hflip=true"]
    cfg = compose_config(
        "predict",
        [
            f"checkpoint={_best(trained_run)}",
            f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}",
            "save_probs=true",
            "device=cpu",
            "eval=default",
            *told,
        ],
    )
    run_prediction(cfg, ["eval=default", *told])
    model, ckpt = load_model(_best(trained_run), torch.device("cpu"), channels_last=True)
    model = fold_batch_norm(model)
    x = to_model_input(torch.from_numpy(array).permute(2, 0, 1)[None], "cpu", ckpt["mean"], ckpt["std"], True)
    with torch.no_grad():  # the whole image's class scores, as predict held them before
        settings = {} if window is None else {"window": window, "stride": [24, 20], "hflip": True}
        logits = predict_logits(model, x, num_classes=ckpt["num_classes"], **settings).float()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), logits.argmax(1)[0].numpy())
    expected = io.BytesIO()
    np.save(expected, logits.softmax(1).half().numpy()[0])
    assert (tmp_path / "out" / "a.npy").read_bytes() == expected.getvalue()


@pytest.mark.slow
def test_predict_cli_exit_code_says_some_failed(trained_run, tmp_path):
    _images(tmp_path / "in")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            f"checkpoint={_best(trained_run)}",
            f"input={tmp_path / 'in' / '*'}",
            f"output={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1
    assert "wrote 3 predictions" in proc.stdout and "broken.jpg" in proc.stdout
    assert (tmp_path / "out" / "c.png").is_file()


def test_predict_refuses_to_run_without_a_checkpoint(tmp_path):
    cfg = compose_config("predict", [f"input={tmp_path}", f"output={tmp_path / 'out'}"])
    with pytest.raises(UserError, match="never runs with random weights"):
        run_prediction(cfg)


def test_onnx_export_matches_pytorch_and_keeps_the_exporter_quiet(trained_run, tmp_path, capsys, caplog):
    out = tmp_path / "model.onnx"
    with caplog.at_level(logging.INFO):
        run_export(compose_config("export", [f"checkpoint={_best(trained_run)}", "format=onnx", f"output={out}"]))
    assert out.is_file()
    assert "max abs difference" in capsys.readouterr().out
    # the ONNX exporter logs ~80 INFO lines per export at the root logger's INFO level; none may reach the console
    noise = [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir", "torch"))]
    assert noise == [], [r.getMessage() for r in noise[:3]]


def test_safetensors_export_rebuilds_the_model_without_the_checkpoint(trained_run, tmp_path):
    out = tmp_path / "model.safetensors"
    run_export(compose_config("export", [f"checkpoint={_best(trained_run)}", "format=safetensors", f"output={out}"]))
    rebuilt, meta = load_safetensors(out)
    original, ckpt = load_model(_best(trained_run), torch.device("cpu"), channels_last=False)
    assert meta["class_names"] == ckpt["class_names"] and meta["mean"] == ckpt["mean"]
    x = torch.randn(1, 3, 37, 41)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval=sliding", "eval.stride=[600,600]"], "larger than eval.window"),
        (["eval.window=[0,32]"], "two positive integers"),
        (["eval.stride=[8,8]"], "eval.stride needs eval.window"),
        (["eval.scales=[]"], r"eval.scales=\[\]: must be a list of at least 1 values"),
    ],
)
def test_bad_inference_settings_name_the_key(trained_run, tmp_path, overrides, message):
    cfg = compose_config("evaluate", [f"checkpoint={_best(trained_run)}", *overrides])
    with pytest.raises(UserError, match=message):
        run_evaluation(cfg, tmp_path, overrides=overrides)


def test_no_worst_images_and_no_tensorboard_still_evaluates(trained_run, tmp_path):
    cfg = compose_config("evaluate", [f"checkpoint={_best(trained_run)}", "eval.worst_images=0", "tensorboard=false"])
    assert run_evaluation(cfg, tmp_path, overrides=[])["images"] == 5
    assert not (tmp_path / "predictions").exists()


def test_predict_refuses_inputs_that_would_overwrite_each_other(trained_run, tmp_path):
    # same folder, same stem, two extensions: one x.png each (same stems in two folders are mirrored,
    # see tests/test_label_geometry.py)
    (tmp_path / "a").mkdir()
    for ext in ("png", "jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "a" / f"x.{ext}")
    cfg = compose_config(
        "predict", [f"checkpoint={_best(trained_run)}", f"input={tmp_path}/a/x.*", f"output={tmp_path / 'out'}"]
    )
    with pytest.raises(UserError, match="would both be written as x.png"):
        run_prediction(cfg)
