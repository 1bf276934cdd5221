"""Command lines as users have them: every printed command pastes back as it is (issue 27, kind 8)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from fcn.overrides import hydra_value, override, unreadable_override_hint
from fcn.resume import resume_command

ROOT = Path(__file__).resolve().parents[1]
ODD_PATHS = [
    "/tmp/données",
    "/tmp/my data",
    "/tmp/a=b",
    "/tmp/it's",
    '/tmp/say "hi"',
    "/tmp/a,b",
    "/tmp/cam[1]",
    "/tmp/x{1}",
    "/tmp/(copy)",
    "/tmp/#1",
    "/tmp/~me",
    "/tmp/a!&b",
    "/tmp/数据",
    "/tmp/both ' and \"",
    "/tmp/back\\slash'",
]


def _as_hydra_reads(word: str) -> object:
    """What Hydra receives from the shell word ``word`` and reads as the value."""
    (arg,) = shlex.split(word)
    return OverridesParser.create().parse_overrides([arg])[0].value()


@pytest.mark.parametrize("path", ODD_PATHS)
def test_a_printed_override_pastes_back_to_the_same_path(path):
    assert _as_hydra_reads(override("data.root", path)) == path


@pytest.mark.parametrize("path", ["/tmp/plain/dir", "/tmp/run_2026-12-05_20-30-26"])
def test_a_plain_path_is_printed_without_quotes(path):
    assert hydra_value(path) == path and override("data.root", path) == f"data.root={path}"


@pytest.mark.parametrize("path", ODD_PATHS)
def test_the_resume_command_pastes_back_with_an_odd_run_directory(path):
    line = resume_command("python scripts/train.py", ["data.root=/d", "'x.y=\"a b\"'"], Path(path))
    words = shlex.split(line)
    assert words[-2] == "resume=auto"
    assert OverridesParser.create().parse_overrides([words[-1]])[0].value() == path


@pytest.mark.parametrize("path", ["/tmp/données", "/tmp/a=b", "/tmp/it's", "/tmp/cam[1]", "/tmp/~me", "/tmp/#1"])
def test_an_unreadable_override_is_one_line_with_its_quoted_form(path):
    hint = unreadable_override_hint([f"data.root={path}"])
    assert hint.startswith("error: Hydra cannot read the override data.root=") and "\n" not in hint
    fix = hint.rsplit("write it as ", 1)[1]
    assert _as_hydra_reads(fix) == path


def test_readable_overrides_and_flags_get_no_hint():
    assert unreadable_override_hint(["-m", "data.root=/tmp/my data", "trainer.epochs=3", "model=fcn8s"]) is None


@pytest.mark.slow
def test_train_with_a_non_ascii_root_unquoted_exits_2_with_the_quoted_fix(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "data.root=/tmp/données"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: Hydra cannot read the override data.root=/tmp/données (the character é needs quotes): "
        "write it as 'data.root=\"/tmp/données\"'"
    ]
