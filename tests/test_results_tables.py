"""The results tables of the README and docs are generated from docs/results/*.json
(scripts/results_tables.py): a page that disagrees with its result file fails here."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tables_module():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_table_on_every_page_matches_its_result_file(tables_module):
    assert tables_module.write_pages(check=True) == [], "out of date: run python scripts/results_tables.py"


def test_a_changed_number_in_a_result_file_makes_the_check_fail(tables_module, tmp_path, monkeypatch):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    table = {"pages": ["page.md"], "columns": [["val mIoU", "val_miou", "miou"]], "rows": [{"val_miou": 0.5}]}
    (tmp_path / "docs" / "results" / "t.json").write_text(json.dumps(table))
    (tmp_path / "page.md").write_text("# x\n\n<!-- results: t -->\n\n<!-- /results -->\n")
    monkeypatch.setattr(tables_module, "ROOT", tmp_path)
    monkeypatch.setattr(tables_module, "RESULTS", tmp_path / "docs" / "results")
    assert tables_module.write_pages(check=False) == ["page.md"]
    assert "| 0.500 |" in (tmp_path / "page.md").read_text()
    assert tables_module.write_pages(check=True) == []
    table["rows"][0]["val_miou"] = 0.51
    (tmp_path / "docs" / "results" / "t.json").write_text(json.dumps(table))
    assert tables_module.write_pages(check=True) == ["page.md"]


def test_per_seed_values_are_shown_as_mean_and_sample_std(tables_module):
    assert tables_module.cell([0.5, 0.6, 0.7], "miou") == "0.600 ± 0.100"
    assert tables_module.cell({"mean": -0.0004, "std": 0.02}, "signed") == "-0.000 ± 0.020"
    assert tables_module.cell(None, "miou") == "not measured yet"
    assert tables_module.cell({"Sky": 92.04, "Pole": 10.2}, "classes") == "Sky 92.0, Pole 10.2"


def test_a_row_of_another_table_is_the_same_run_typed_once(tables_module):
    found = {
        "a": {"pages": [], "columns": [], "rows": [{"val_miou": 0.62, "minutes": 35.5}]},
        "b": {"pages": [], "columns": [["lever", "lever", "text"], ["val mIoU", "val_miou", "miou"]], "rows": []},
    }
    found["b"]["rows"] = [{"same_as": "a/0", "lever": "none"}]
    assert "| none | 0.620 |" in tables_module.render(found["b"], found)


def test_add_appends_a_finished_runs_metrics_json(tables_module, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "t.json").write_text(json.dumps({"pages": [], "columns": [], "rows": []}))
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"miou": 0.61234, "per_class_iou": {"Sky": 0.9, "Pole": 0.3, "Car": None}, "seed": 1, "epochs": 20}
    (run / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(tables_module, "RESULTS", results)
    tables_module.add("t", run, ["lever=width 48", "minutes=14.5"])
    row = json.loads((results / "t.json").read_text())["rows"][0]
    assert row == {
        "val_miou": 0.6123,
        "per_class_iou": {"Sky": 90.0, "Pole": 30.0},
        "seed": 1,
        "epochs": 20,
        "lever": "width 48",
        "minutes": 14.5,
    }
