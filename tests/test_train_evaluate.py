"""End to end: a few training steps through the compose API, then evaluation of the checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn.cli.evaluate import run_evaluation
from fcn.errors import UserError
from tests.conftest import compose_config, tiny_train_overrides

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"miou", "pixel_acc", "mean_acc", "fwiou", "per_class_iou"}


@pytest.fixture
def run_dir(trained_run) -> Path:
    return trained_run


def test_training_writes_both_checkpoints_and_metrics(run_dir):
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert list(metrics["per_class_iou"]) == ["background", "circle", "square", "triangle", "star", "cross"]


def test_every_score_of_the_metrics_table_reaches_metrics_json_tensorboard_and_the_best_record(run_dir):
    from fcn.metrics import METRICS

    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["progress"]["best"]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert "mean_dice" in METRICS
    for key, metric in METRICS.items():
        assert 0.0 <= metrics[key] <= 1.0, key
        assert best[key] == metrics[key], key  # the best checkpoint's record is what metrics.json reports
        assert [e.step for e in events.Scalars(f"val/{metric.tag}")] == [3, 6], key
    at_best = {e.step: e.value for e in events.Scalars("val/mean_dice")}[metrics["step"]]
    assert at_best == pytest.approx(metrics["mean_dice"], abs=1e-6)  # logged at the best checkpoint's validation


def test_checkpoint_holds_everything_evaluation_needs_and_loads_safely(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "config", "class_names", "palette"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6  # trainer=debug: 2 epochs x 3 steps
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["model"]["variant"] == "8s"
    assert len(ckpt["palette"]) == len(ckpt["class_names"]) == ckpt["num_classes"]


def test_tensorboard_events_have_the_curves_and_images(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "val/loss", "val/mIoU", "val/pixel_acc", "val_per_class/IoU/background"}
    assert expected <= scalars
    assert len(events.Scalars("train/loss")) == 6  # one per step with log_every_n_steps=1
    assert [e.step for e in events.Scalars("val/mIoU")] == [3, 6]
    image = events.Images("val/samples")[-1]
    assert image.width > 0 and image.height > 0


def test_tensorboard_puts_train_and_val_first_with_an_overview_layout_and_the_config(run_dir):
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    # Time Series groups cards by the tag's first part, sorted by name, and opens the first two:
    # train and val; the per-class scores and the diagnostics sort after them (the whole logdir,
    # sub-runs and evaluate runs included: tests/test_tensorboard_layout.py).
    groups = sorted({tag.split("/")[0] for tag in tags["scalars"] + tags["images"]})
    assert groups == ["train", "val", "val_per_class", "weights"]
    assert {"weights/norm", "weights/decoder_drift/up_final"} <= set(tags["scalars"])
    # Custom Scalars: the loss of train and val in one chart, val mIoU beside it.
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["loss (train, val)"] == ["train/loss", "val/loss"] and charts["val mIoU"] == ["val/mIoU"]
    # The resolved config as YAML in the Text tab.
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("```yaml") and "epochs: 2" in text
    # HPARAMS: a run of its own, named by the overrides ("defaults" when none, as here: no Hydra command line).
    assert (run_dir / "tensorboard" / "defaults").is_dir()


def test_evaluating_the_best_checkpoint_reproduces_its_metrics(run_dir, tmp_path):
    cfg = compose_config("evaluate", [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "num_workers=0"])
    report = run_evaluation(cfg, tmp_path, overrides=[])
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert report["images"] == 5  # the val split of the tiny dataset, taken from the checkpoint
    assert report["miou"] == pytest.approx(trained["miou"], abs=1e-9)
    assert report["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text())["miou"] == report["miou"]


def test_evaluation_data_overrides_apply_to_the_checkpoint_dataset(run_dir, tmp_path):
    overrides = [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "num_workers=0", "data.split=train"]
    report = run_evaluation(compose_config("evaluate", overrides), tmp_path, overrides=overrides)
    assert report["split"] == "train" and report["images"] == 12


def test_evaluation_of_a_missing_checkpoint_names_it(tmp_path):
    cfg = compose_config("evaluate", [f"checkpoint={tmp_path / 'nope.pt'}"])
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pt"):
        run_evaluation(cfg, tmp_path, overrides=[])


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=240
    )


@pytest.mark.slow
def test_cli_missing_checkpoint_is_one_clear_line_and_exit_2(tmp_path):
    proc = _run("evaluate.py", "checkpoint=/does/not/exist.pt", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "error: checkpoint not found: /does/not/exist.pt (check the checkpoint=PATH you gave)"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_missing_data_root_names_the_path(tmp_path):
    proc = _run(
        "train.py",
        "data=folder",
        "data.num_classes=2",
        "data.class_names=[a,b]",
        f"data.root={tmp_path / 'missing'}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert f"dataset root not found: {tmp_path / 'missing'}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_unknown_option_names_the_key(tmp_path):
    proc = _run("train.py", "trainer.epochz=3", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "epochz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_missing_required_setting_says_which(tmp_path):
    proc = _run("train.py", "data=folder", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.num_classes" in proc.stderr or "data.class_names" in proc.stderr


@pytest.mark.slow
def test_cli_multirun_sweep_trains_each_variant(shapes_root, tmp_path):
    # commas separate sweep values, so the generator settings (a dict) are switched off instead:
    # the tiny dataset is already on disk
    overrides = [o for o in tiny_train_overrides(shapes_root) if not o.startswith("data.generate")]
    overrides.append("data.generate=null")
    proc = _run(
        "train.py",
        "-m",
        "model=fcn32s,fcn16s",
        "trainer.epochs=1",
        "logger=none",
        *overrides,
        f"hydra.sweep.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    for job in ("0", "1"):
        assert (tmp_path / job / "metrics.json").is_file()
        assert (tmp_path / job / ".hydra" / "config.yaml").is_file()


def test_constructor_errors_reach_the_user_as_one_line_despite_hydra_wrapping(capsys):
    from fcn.cli.exit import exit_on_user_error
    from fcn.models.fcn import VARIANTS
    from fcn.train import build_model

    cfg = compose_config("train", ["model.variant=2s"])
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: build_model(cfg.model, torch.device("cpu"), channels_last=False))()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: unknown FCN variant '2s' (model.variant): choose one of {VARIANTS}"]


@pytest.mark.slow
def test_with_the_scan_off_a_bad_mask_met_in_a_worker_is_still_one_clear_line(shapes_root, tmp_path, capsys):
    import shutil

    import numpy as np
    from PIL import Image

    from fcn.cli.exit import exit_on_user_error
    from fcn.train import train

    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    bad = sorted((root / "masks").glob("*.png"))[0]
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(bad)
    overrides = [o for o in tiny_train_overrides(shapes_root) if not o.startswith("data.root")]
    cfg = compose_config(
        "train", [*overrides, f"data.root={root}", "trainer.num_workers=2", "logger=none", "data.scan=false"]
    )
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(train)(cfg, tmp_path / "run")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"mask {bad} has values [9] outside [0, 6)" in err[0]


def test_camvid_layout_trains_and_evaluates_with_no_code_change(tmp_path):
    import numpy as np
    from PIL import Image

    from fcn.train import train

    root = tmp_path / "camvid"
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(root / split / f"f{i}.jpg")
            mask = rng.integers(0, 12, (36, 48), dtype=np.uint8)  # 11 = void, ignored
            Image.fromarray(mask).save(root / f"{split}annot" / f"f{i}.png")
    overrides = [
        "experiment=camvid",
        f"data.root={root}",
        "data.crop_size=32",
        "trainer.epochs=1",
        "trainer.batch_size=2",
        "trainer.num_workers=0",
        "logger=none",
    ]
    report = train(compose_config("train", overrides), tmp_path / "run")
    assert list(report["per_class_iou"])[:2] == ["Sky", "Building"] and len(report["per_class_iou"]) == 11
    cfg = compose_config("evaluate", [f"checkpoint={report['checkpoint']}", "num_workers=0", "tensorboard=false"])
    assert run_evaluation(cfg, tmp_path / "eval", overrides=[])["images"] == 2
