"""torch and torchvision builds that do not match end in one line with the fix (issue 27, kind 10)."""

from __future__ import annotations

import builtins
import sys

import pytest

from fcn.environment import check_torchvision, fix_command
from fcn.errors import UserError


def _failing_import(monkeypatch, error: Exception):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise error
        return real(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("operator torchvision::nms does not exist"),
        OSError("libtorchvision.so: undefined symbol: _ZN3c1017RegisterOperators"),
        ImportError("cannot import name '_C' from 'torchvision'"),
    ],
)
def test_a_torchvision_that_does_not_load_with_this_torch_is_one_line_with_both_versions(monkeypatch, error):
    from importlib import metadata

    _failing_import(monkeypatch, error)
    with pytest.raises(UserError) as info:
        check_torchvision()
    message = str(info.value)
    assert "\n" not in message
    assert f"torch {metadata.version('torch')} and torchvision {metadata.version('torchvision')}" in message
    assert str(error).splitlines()[0] in message and message.endswith(fix_command())


def test_a_missing_torchvision_names_the_install_command(monkeypatch):
    _failing_import(monkeypatch, ModuleNotFoundError("No module named 'torchvision'", name="torchvision"))
    with pytest.raises(UserError, match="torchvision is not installed: pip install"):
        check_torchvision()


@pytest.mark.parametrize(
    ("torch_version", "command"),
    [
        ("2.5.1", "pip install --force-reinstall --no-deps 'torchvision==0.20.*'"),
        ("2.14.1", "pip install --force-reinstall --no-deps 'torchvision==0.29.*'"),
        (
            "2.6.0+cu124",
            "pip install --force-reinstall --no-deps 'torchvision==0.21.*' --index-url https://download.pytorch.org/whl/cu124",
        ),
        (
            "2.4.0+cpu",
            "pip install --force-reinstall --no-deps 'torchvision==0.19.*' --index-url https://download.pytorch.org/whl/cpu",
        ),
    ],
)
def test_the_fix_installs_the_torchvision_paired_with_this_torch(torch_version, command):
    assert fix_command(torch_version) == command


@pytest.mark.parametrize("torch_version", ["2.14.1", "2.6.0+cu124"])
def test_the_fix_as_pip_reads_it_reinstalls_torchvision_alone(torch_version):
    """pip's own parser: the pinned torchvision is reinstalled even when a build of that version is there
    (a plain install would be a no-op), and its dependencies (an exact torch) are left as installed."""
    import json
    import shlex
    import subprocess
    import sys

    words = shlex.split(fix_command(torch_version))
    assert words[:2] == ["pip", "install"]
    # in a child process: pip imports the standard library's distutils, which would break a later
    # import of setuptools in this process (torch.compile's inductor imports it)
    parse = (
        "import json, sys; from pip._internal.commands import create_command; "
        "o, r = create_command('install').parse_args(sys.argv[1:]); "
        "print(json.dumps([o.force_reinstall, o.ignore_dependencies, r, o.index_url]))"
    )
    out = subprocess.run([sys.executable, "-c", parse, *words[2:]], capture_output=True, text=True, check=True)
    force, no_deps, requirements, index_url = json.loads(out.stdout)
    assert force and no_deps
    assert requirements == [f"torchvision==0.{int(torch_version.split('.')[1]) + 15}.*"]
    assert (index_url == "https://download.pytorch.org/whl/cu124") == ("+cu124" in torch_version)


def test_an_entry_point_ends_in_the_one_line_and_exit_2(monkeypatch, capsys):
    from fcn.cli.exit import exit_on_user_error

    _failing_import(monkeypatch, RuntimeError("operator torchvision::nms does not exist"))
    with pytest.raises(SystemExit) as info:
        exit_on_user_error(lambda: pytest.fail("ran"))()
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: torch ") and "operator torchvision::nms does not exist" in line
