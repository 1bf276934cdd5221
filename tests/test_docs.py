"""The documentation cannot drift: the generated configuration reference matches configs/, and every
relative link of the README points to a file of the repository."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date_with_configs():
    ref = _config_reference()
    page = ref.PAGE.read_text(encoding="utf-8")
    assert page == ref.render(), "out of date: run python scripts/config_reference.py"
    groups = [line for line in page.splitlines() if line.startswith("## ")]
    assert len(groups) == len(set(groups)), "a group's section is split (one heading per group)"


def test_configuration_reference_lists_every_key_with_its_default_and_comment(tmp_path):
    ref = _config_reference()
    (tmp_path / "x.yaml").write_text(
        "# header line\ndefaults:\n  - _self_\ntrainer:\n  epochs: 12   # how many\n"
        "                # and more\n  help: |\n    epochs: not a key\nseed: 0\n",
        encoding="utf-8",
    )
    header, rows = ref.rows(tmp_path / "x.yaml")
    assert header == ["header line"]
    assert ["trainer.epochs", "12", "how many and more"] in rows
    assert ["defaults[]", "_self_", ""] in rows
    assert ["seed", "0", ""] in rows
    assert not any(key.endswith("epochs") and value == "not a key" for key, value, _ in rows)


def test_configuration_reference_check_fails_when_a_config_changed(tmp_path, monkeypatch, capsys):
    ref = _config_reference()
    monkeypatch.setattr(ref, "PAGE", tmp_path / "configuration.md")
    (tmp_path / "configuration.md").write_text("stale\n", encoding="utf-8")
    monkeypatch.setattr(ref, "ROOT", tmp_path)
    assert ref.main(["--check"]) == 1
    assert "python scripts/config_reference.py" in capsys.readouterr().err


def test_every_relative_link_in_the_readme_points_to_an_existing_file():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    relative = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert relative, "the README links into the docs"
    missing = [t for t in relative if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_per_class_plot_draws_a_run_and_written_out_scores(tmp_path):
    import json

    pytest.importorskip("matplotlib")
    from PIL import Image

    spec = importlib.util.spec_from_file_location("plot_per_class", ROOT / "scripts" / "plot_per_class.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"miou": 0.5, "per_class_iou": {"sky": 0.9, "pole": 0.1, "car": None}}))
    assert module.read_source(f"run={metrics}") == ("run", {"sky": 90.0, "pole": 10.0})  # absent class skipped
    assert module.read_source("old=sky:92.0,pole:10.2") == ("old", {"sky": 92.0, "pole": 10.2})
    out = tmp_path / "plot.png"
    module.main([str(out), f"run={metrics}", "old=sky:92.0,pole:10.2"])
    assert Image.open(out).size == (900, 320)
    with pytest.raises(SystemExit, match="no such metrics file"):
        module.read_source(f"run={tmp_path / 'missing.json'}")


@pytest.mark.parametrize("argv", [["--help"], ["--bogus"]])
def test_the_reference_script_answers_help_and_refuses_unknown_flags_without_writing(argv, monkeypatch, capsys):
    module = _config_reference()
    written = []
    monkeypatch.setattr(module.Path, "write_text", lambda self, *a, **k: written.append(self))
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == (0 if argv == ["--help"] else 2) and written == []
    captured = capsys.readouterr()
    assert "usage: scripts/config_reference.py" in captured.out + captured.err
