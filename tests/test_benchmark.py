"""scripts/benchmark.py measures every figure it promises, on the tiny dataset."""

import json

import pytest

from fcn.cli.benchmark import run_benchmark
from tests.conftest import compose_config, tiny_train_overrides

FIELDS = {
    "train_img_s_compute", "train_img_s", "loader_img_s", "eval_img_s", "flops_per_img", "achieved_flop_s",
    "peak_flop_s", "mfu", "peak_mem_mb", "checkpoint_save_s", "resume_load_s", "device", "precision", "torch",
    "threads",
}  # fmt: skip


@pytest.mark.slow
def test_benchmark_reports_every_figure_and_writes_json(shapes_root, tmp_path):
    overrides = [*tiny_train_overrides(shapes_root), "bench.steps=2", "bench.repeats=1", "bench.warmup=1",
                 "bench.eval_batches=1", "bench.checkpoint_repeats=1", "bench.large_image=[64,96]",
                 "bench.window=[32,32]", "bench.stride=[24,24]"]  # fmt: skip
    result = run_benchmark(compose_config("benchmark", overrides), tmp_path)
    assert FIELDS <= set(result)
    for key in ("train_img_s_compute", "train_img_s", "loader_img_s", "eval_img_s", "flops_per_img", "peak_flop_s"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] < 1
    # forward + backward of the tiny FCN-8s at 40x40 is a few tens of MFLOPs per image
    assert 1e6 < result["flops_per_img"] < 1e9
    assert result["eval_img_s_tta"] > 0 and 0 < result["eval_metric_overhead"] < 1
    assert result["sliding_window"]["output"] == [1, 6, 64, 96] and result["sliding_window"]["peak_mem_mb"] > 0
    assert json.loads((tmp_path / "benchmark.json").read_text()) == result
