"""scripts/benchmark.py measures every figure it promises, on the tiny dataset."""

import json

import pytest

from fcn.bench.run import run_benchmark
from tests.conftest import compose_config, tiny_train_overrides

FIELDS = {
    "train_img_s_compute",
    "train_img_s",
    "loader_img_s",
    "eval_img_s",
    "flops_per_img",
    "achieved_flop_s",
    "peak_flop_s",
    "mfu",
    "peak_mem_mb",
    "checkpoint_save_s",
    "resume_load_s",
    "resume_load_s_unverified",
    "device",
    "precision",
    "torch",
    "threads",
    "peak_flop_s_matmul",
    "peak_flop_s_conv",
    "mfu_matmul",
    "peak_source",
}


@pytest.mark.slow
def test_benchmark_reports_every_figure_and_writes_json(shapes_root, tmp_path):
    overrides = [
        *tiny_train_overrides(shapes_root),
        "bench.steps=2",
        "bench.repeats=1",
        "bench.warmup=1",
        "bench.eval_batches=1",
        "bench.checkpoint_repeats=1",
        "bench.large_image=[64,96]",
        "bench.window=[32,32]",
        "bench.stride=[24,24]",
        "bench.bare=true",
        "loss=ce_dice",
        "loss.losses.0.class_weights=auto",  # computed from the scan, as training does
    ]
    result = run_benchmark(compose_config("benchmark", overrides), tmp_path)
    assert FIELDS <= set(result)
    for key in ("train_img_s_compute", "train_img_s", "loader_img_s", "eval_img_s", "flops_per_img", "peak_flop_s"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] < 1
    # the honest peak is the best of the matmul and the model's own convolutions, so mfu <= mfu_matmul
    conv_rates = [c["flop_s"] for c in result["peak_flop_s_conv"]]
    assert len(conv_rates) == 2 and result["peak_flop_s"] == max([result["peak_flop_s_matmul"], *conv_rates])
    assert result["mfu"] <= result["mfu_matmul"]
    assert result["train_img_s_bare"] > 0 and result["bare_ratio"] == round(
        result["train_img_s_compute"] / result["train_img_s_bare"], 3
    )
    assert result["eval_img_s_bare"] > 0 and result["eval_img_s_in_memory"] > 0
    assert result["eval_bare_ratio"] == round(result["eval_img_s_in_memory"] / result["eval_img_s_bare"], 3)
    assert result["optimizer"] == "AdamW/fused" and result["channels_last"] is True  # auto: tiny on the CPU
    # forward + backward of the tiny FCN-8s at 40x40 is a few tens of MFLOPs per image
    assert 1e6 < result["flops_per_img"] < 1e9
    assert result["eval_img_s_tta"] > 0 and 0 < result["eval_metric_overhead"] < 1
    assert result["sliding_window"]["output"] == [1, 6, 64, 96] and result["sliding_window"]["peak_mem_mb"] > 0
    assert json.loads((tmp_path / "benchmark.json").read_text()) == result


def test_dominant_convolutions_are_the_models_costliest_shapes():
    import torch

    from fcn.bench.probes import conv_probe, dominant_convolutions
    from fcn.models import FCN

    model = FCN(num_classes=3, width=4).train()
    images = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = dominant_convolutions(model, images, top=3)
    assert len(convs) == 3 and convs[0]["flops"] >= convs[1]["flops"] >= convs[2]["flops"] > 0
    assert all(c["input"][0] == 2 for c in convs)
    every = dominant_convolutions(model, images, top=1000)
    total = sum(
        2 * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        for m in model.modules()
        if type(m) is torch.nn.Conv2d
    )  # per output pixel; the shapes found must cover every Conv2d layer
    assert sum(c["flops"] for c in every) > total
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert conv_probe(convs[0], torch.device("cpu"), None, channels_last=True)() > 0
