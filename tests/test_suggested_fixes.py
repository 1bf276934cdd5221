"""Every fix the application suggests is right, and following it is never silent (issue 27, kind 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fcn.cli.suggest import added_key_hint

ROOT = Path(__file__).resolve().parents[1]


def test_a_plus_key_that_nothing_reads_is_refused_with_did_you_mean():
    hint = added_key_hint("train", ["+trainer.epoch=3"])
    assert hint.startswith("error: no key 'trainer.epoch' in the train config; did you mean trainer.epochs?")
    assert "+trainer.epoch adds a key that nothing reads: refused" in hint
    assert "did you mean trainer.epochs?" in added_key_hint("train", ["++trainer.epoch=3"])


@pytest.mark.parametrize(
    "override",
    ["+optim.fused=false", "++trainer.epochs=3", "+trainer.epochs=3", "+experiment=camvid", "+hydra.job.foo=1"],
)
def test_a_plus_key_that_is_read_is_accepted(override):
    # a keyword of an instantiated node, a key the config has, a group, Hydra's own node
    assert added_key_hint("train", [override]) is None


def test_no_plus_override_composes_nothing(monkeypatch):
    import fcn.cli.suggest as suggest

    monkeypatch.setattr(suggest, "_compose", lambda *a: pytest.fail("composed"))
    assert added_key_hint("train", ["trainer.epochs=3", "-m"]) is None


@pytest.mark.slow
def test_following_hydras_plus_hint_is_refused_before_hydra_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "+trainer.epoch=3", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no key 'trainer.epoch' in the train config")
    assert not (tmp_path / "run" / ".hydra").exists() and not (tmp_path / "outputs").exists()  # Hydra never ran


def test_masks_holding_0_1_2_with_two_classes_suggest_three_classes_first():
    from fcn.data.doctor.diagnose import _value_fix

    fix = _value_fix([2], {0, 1, 2}, num_classes=2, ignore_index=255, mapped=False, histogram={0: 88, 1: 6, 2: 6})
    first, second = fix.split("; or ")[:2]
    assert first == "if the values 0..2 are all classes: data.num_classes=3"
    assert "data.reduce_zero_label=true" in second and "become data.ignore_index=255, never trained or scored" in second
    assert "0 holds most pixels (88%)" in second  # dropping the class that holds most pixels is said


def test_reduce_zero_label_says_the_share_of_a_small_zero_class():
    from fcn.data.doctor.diagnose import _value_fix

    fix = _value_fix(
        [3], {0, 1, 2, 3}, num_classes=3, ignore_index=255, mapped=False, histogram={0: 1, 1: 3, 2: 3, 3: 3}
    )
    assert fix.index("data.num_classes=4") < fix.index("data.reduce_zero_label=true")
    assert "0 holds 10% of the pixels" in fix and "most pixels" not in fix


def test_classes_stored_from_one_say_they_are_shifted_down():
    from fcn.data.doctor.diagnose import _value_fix

    fix = _value_fix([2], {1, 2}, num_classes=2, ignore_index=255, mapped=False)
    assert fix == "classes are stored as 1..N: data.reduce_zero_label=true (1..2 become classes 0..1)"


def test_the_scan_of_0_1_2_masks_with_two_classes_leads_with_num_classes_3(tmp_path):
    from tests.layouts import write_folder
    from tests.test_data_scan import _error

    write_folder(tmp_path, values=(0, 0, 0, 0, 0, 0, 1, 2))  # 0 holds 75% of the pixels
    message = _error(tmp_path, "data.num_classes=2", "data.class_names=[a,b]")
    assert message.index("data.num_classes=3") < message.index("data.reduce_zero_label=true")
    assert "0 holds most pixels (75%)" in message


def test_a_batch_size_larger_than_the_training_set_is_said():
    from fcn.data.loader import short_batch_warnings

    train_line, val_line = short_batch_warnings(16, train_images=5, val_images=3, val_batch_size=16)
    assert "trainer.batch_size=16 is larger than the 5 training images" in train_line
    assert "every step trains on a batch of 5" in train_line and "trainer.batch_size=5" in train_line
    assert "3 val images, fewer than trainer.batch_size=16" in val_line
    assert short_batch_warnings(4, train_images=5, val_images=4, val_batch_size=4) == []


@pytest.mark.slow
def test_training_with_a_batch_larger_than_the_dataset_warns(shapes_root, tmp_path, caplog):
    from fcn.train import train
    from tests.conftest import compose_config, tiny_train_overrides

    train(compose_config("train", [*tiny_train_overrides(shapes_root), "trainer.batch_size=64"]), tmp_path / "run")
    assert "trainer.batch_size=64 is larger than the 12 training images" in caplog.text


def test_label_settings_changed_from_training_are_named():
    from fcn.data.labels import label_reading_changes, trained_label_reading

    trained = {"num_classes": 3, "reduce_zero_label": False, "label_map": None, "ignore_index": 255}
    assert label_reading_changes(trained, {**trained}) is None
    assert label_reading_changes(trained, {**trained, "reduce_zero_label": None}) is None  # unset reads as false
    assert (
        label_reading_changes(trained, {**trained, "reduce_zero_label": True})
        == "data.reduce_zero_label: False -> True"
    )
    assert "data.label_map: None -> {7: 1}" in label_reading_changes(trained, {**trained, "label_map": {7: 1}})
    assert trained_label_reading(trained) == (
        "data.num_classes=3, data.reduce_zero_label=false, data.label_map=None, data.ignore_index=255"
    )


def test_evaluating_with_labels_read_unlike_training_says_so(trained_run, tmp_path, caplog):
    from fcn.cli.evaluate import run_evaluation
    from tests.conftest import compose_config

    overrides = ["data.label_map={1:1}"]
    cfg = compose_config(
        "evaluate", [f"checkpoint={trained_run / 'checkpoints' / 'best.pt'}", "num_workers=0", *overrides]
    )
    run_evaluation(cfg, tmp_path, overrides=overrides)
    assert "masks are read differently from training (data.label_map: None -> {1: 1})" in caplog.text
