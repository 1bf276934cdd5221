"""A resume reads, checks and renames files of the run it resumes only: a copied or moved run
directory resumes as itself (its own ``best.pt``, whatever path the checkpoint recorded), and the
run it was copied from is never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fcn.errors import UserError
from fcn.train import train
from tests.conftest import StopAtStep, compose_config, tiny_train_overrides
from tests.test_reliability import _flip, _tensor_offset


def _cfg(shapes_root, *extra):
    # 12 train images, batch 4: 3 steps per epoch, 2 epochs
    return compose_config("train", [*tiny_train_overrides(shapes_root), "logger=none", *extra])


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path: what "untouched" compares."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _damage(best: Path) -> None:
    _flip(best, _tensor_offset(best, 0) + 3, 0x40)  # one exponent bit: a weight of ~1e37


@pytest.fixture(scope="module")
def finished_run(shapes_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("original")
    train(_cfg(shapes_root), run)
    return run


@pytest.mark.slow
def test_a_copied_run_with_a_damaged_best_checkpoint_is_refused_in_the_copy_and_the_original_untouched(
    shapes_root, finished_run, tmp_path
):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "metrics.json").unlink()
    _damage(copy / "checkpoints" / "best.pt")
    before = _files(finished_run)
    # The copy's best.pt is the one checked (not the original's, intact, at the recorded path): the
    # finished run cannot write a new one, so it ends with one line naming the copy's last.pt.
    with pytest.raises(UserError, match=r"corrupt or truncated.*finished") as caught:
        train(_cfg(shapes_root, "resume=auto"), copy)
    assert f"checkpoint={copy / 'checkpoints' / 'last.pt'}" in str(caught.value)
    assert (copy / "checkpoints" / "best.damaged.pt").is_file() and not (copy / "checkpoints" / "best.pt").exists()
    assert _files(finished_run) == before  # nothing of the original read as the copy's result, nothing renamed


@pytest.mark.slow
def test_a_copy_of_an_intact_run_resumes_as_itself_and_never_renames_the_originals_files(
    shapes_root, finished_run, tmp_path
):
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(finished_run, original)
    shutil.copytree(finished_run, copy)
    (copy / "metrics.json").unlink()
    _damage(original / "checkpoints" / "best.pt")  # the recorded path holds a damaged file; the copy's is intact
    before = _files(original)
    report = train(_cfg(shapes_root, "resume=auto"), copy)
    own = str(copy / "checkpoints" / "best.pt")
    assert report["checkpoint"] == own
    assert json.loads((copy / "metrics.json").read_text())["checkpoint"] == own
    assert not (copy / "checkpoints" / "best.damaged.pt").exists()
    assert _files(original) == before and not (original / "checkpoints" / "best.damaged.pt").exists()


@pytest.mark.slow
def test_an_interrupted_copy_with_a_damaged_best_checkpoint_writes_its_own_new_one(shapes_root, tmp_path, caplog):
    original, copy = tmp_path / "original", tmp_path / "copy"
    with pytest.raises(Exception, match="interrupted"):
        train(_cfg(shapes_root, "trainer.val_every=1"), original, stop=StopAtStep(4))  # best.pt of epoch 1
    shutil.copytree(original, copy)
    _damage(copy / "checkpoints" / "best.pt")
    before = _files(original)
    report = train(_cfg(shapes_root, "trainer.val_every=1", "resume=auto"), copy)
    assert "digest mismatch" in caplog.text and "writes a new best.pt" in caplog.text
    assert (copy / "checkpoints" / "best.damaged.pt").is_file()
    assert report["checkpoint"] == str(copy / "checkpoints" / "best.pt") and report["epoch"] == 2
    assert _files(original) == before
