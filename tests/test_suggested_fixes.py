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
