"""The upsampling ablation (scripts/upsampling_ablation.py): the table's arithmetic, and one
tiny end-to-end run of two decoders."""

import json
import math

import pytest

from fcn.bench.upsampling_ablation import format_markdown, run_overrides, summarise
from tests.conftest import tiny_train_overrides


def _row(upsampling, seed, miou, boundary, drift=0.0):
    return {
        "upsampling": upsampling,
        "seed": seed,
        "miou": miou,
        "boundary_miou": boundary,
        "drift_2x": drift,
        "drift_final": drift,
        "minutes": 1.0,
    }


def test_summary_gives_mean_std_over_seeds_and_the_difference_from_the_first_variant_paired_by_seed():
    rows = [
        _row("learned", 0, 0.60, 0.40, 0.2),
        _row("learned", 1, 0.70, 0.50, 0.4),
        _row("frozen", 0, 0.50, 0.35),
        _row("frozen", 1, 0.64, 0.43),
        _row("interpolate", 0, 0.55, 0.30, math.nan),  # no kernels: no drift
    ]
    learned, frozen, interpolate = summarise(rows, ["learned", "frozen", "interpolate"])
    assert learned["miou_mean"] == pytest.approx(0.65) and learned["miou_std"] == pytest.approx(0.0707, abs=1e-4)
    assert learned["miou_diff_mean"] == 0 and learned["drift_2x_mean"] == pytest.approx(0.3)
    # frozen - learned per seed: -0.10 and -0.06
    assert frozen["miou_diff_mean"] == pytest.approx(-0.08) and frozen["miou_diff_std"] == pytest.approx(
        0.0283, abs=1e-4
    )
    assert frozen["boundary_miou_diff_mean"] == pytest.approx(-0.06)
    assert (
        interpolate["seeds"] == 1 and math.isnan(interpolate["miou_std"]) and math.isnan(interpolate["drift_2x_mean"])
    )
    table = format_markdown([learned, frozen, interpolate], boundary_px=3)
    assert "| `frozen` | 2 | 0.570 ± 0.099 | 0.390 ± 0.057 | -0.080 ± 0.028 |" in table
    assert "| `interpolate` | 1 | 0.550 | 0.300 | -0.050 | -0.100 | - | - |" in table


def test_each_run_sets_its_own_decoder_and_seed_after_the_shared_schedule_and_the_command_line():
    overrides = run_overrides(["trainer.epochs=1"], ["model.width=4", "seed=7", "ablation.seeds=[0]"], "random", 2)
    assert overrides == ["trainer.epochs=1", "model.width=4", "model.upsampling=random", "seed=2"]


@pytest.mark.slow
def test_the_ablation_trains_scores_and_tabulates_every_variant(shapes_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from fcn.bench.upsampling_ablation import run_ablation
    from fcn.cli import CONFIG_DIR

    overrides = [
        *tiny_train_overrides(shapes_root),
        "model.width=4",
        "eval=half",  # scored as each run validated: at half resolution, logits resized back
        "ablation.variants=[learned,interpolate]",
        "ablation.seeds=[0]",
        'ablation.train_overrides=["trainer.epochs=1","logger=none"]',
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        rows = run_ablation(compose("upsampling_ablation", overrides), tmp_path, overrides)
    assert [r["upsampling"] for r in rows] == ["learned", "interpolate"]
    for row in rows:
        assert 0 <= row["boundary_miou"] <= 1 and 0 <= row["miou"] <= 1 and row["minutes"] > 0
        run_dir = tmp_path / f"{row['upsampling']}-seed0"
        assert (run_dir / "checkpoints" / "best.pt").is_file()
        assert row["miou"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["miou"], abs=1e-6)
    assert rows[0]["drift_final"] >= 0 and math.isnan(rows[1]["drift_final"])
    assert {"runs.csv", "summary.csv", "summary.md"} <= {p.name for p in tmp_path.iterdir()}
    assert "| `interpolate` | 1 |" in (tmp_path / "summary.md").read_text()


def test_a_checkpoint_is_scored_as_its_run_validated(trained_run, shapes_root, monkeypatch):
    import fcn.bench.upsampling_ablation as ablation
    from tests.conftest import compose_config

    seen = []
    real = ablation.evaluate
    monkeypatch.setattr(ablation, "evaluate", lambda *a, **kw: seen.append(kw["infer"]) or real(*a, **kw))
    cfg = compose_config("train", [*tiny_train_overrides(shapes_root), "eval=half"])
    scored = ablation.score_checkpoint(trained_run / "checkpoints" / "best.pt", cfg, boundary_px=3)
    assert seen[0].keywords["scales"] == [0.5] and not seen[0].keywords["hflip"]  # eval=half, as in training
    assert 0 <= scored["miou"] <= 1
    plain = compose_config("train", tiny_train_overrides(shapes_root))
    ablation.score_checkpoint(trained_run / "checkpoints" / "best.pt", plain, boundary_px=3)
    assert seen[1] is None  # the default eval: one plain forward pass at full size
