"""The speed switches: precision, torch.compile with its fallback, channels-last."""

import functools

import pytest
import torch

from fcn.device import maybe_compile, resolve_precision
from fcn.errors import UserError
from fcn.models import FCN
from fcn.train import train
from tests.conftest import compose_config, tiny_train_overrides


def test_precision_auto_is_float32_on_cpu_and_bad_names_are_refused():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UserError, match="trainer.precision='half'"):
        resolve_precision("half", cpu)


def test_compile_failure_falls_back_to_eager_and_leaves_weights_untouched(monkeypatch, caplog):
    def broken(model):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    model = FCN(num_classes=3, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert maybe_compile(model, True, 2, (32, 32), channels_last=False) is model
    assert "torch.compile failed" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compile_trial_restores_batch_norm_statistics(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: model)  # "compiles" to itself: the trial runs eagerly
    model = FCN(num_classes=3, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maybe_compile(model, True, 2, (32, 32), channels_last=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_gives_the_same_predictions():
    torch.manual_seed(0)
    model = FCN(num_classes=3, width=4).eval()
    for m in model.modules():  # non-zero scores so the comparison means something
        if isinstance(m, torch.nn.Conv2d) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 3, 45, 37)
    with torch.no_grad():
        plain = model(x)
        nhwc = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, nhwc, atol=1e-4)


def test_bf16_autocast_trains_on_cpu(shapes_root, tmp_path):
    cfg = compose_config(
        "train", [*tiny_train_overrides(shapes_root), "trainer.precision=bf16", "logger=none", "trainer.epochs=1"]
    )
    report = train(cfg, tmp_path)
    assert 0 <= report["miou"] <= 1


def test_channels_last_auto_resolves_per_backbone_and_device():
    from fcn.device import CHANNELS_LAST_CPU, resolve_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_channels_last("auto", "tiny", cpu) is True
    assert resolve_channels_last("auto", "vgg16", cpu) is False  # fc6's weight copy makes NHWC slower
    assert all(resolve_channels_last("auto", b, cpu) is v for b, v in CHANNELS_LAST_CPU.items())
    assert resolve_channels_last("auto", "vgg16", cuda) is True
    assert resolve_channels_last(False, "tiny", cpu) is False  # an explicit value wins
    assert resolve_channels_last(True, "vgg16", cpu) is True
    with pytest.raises(UserError, match="trainer.channels_last='yes': choose auto, true or false"):
        resolve_channels_last("yes", "tiny", cpu)


def test_trainer_channels_last_defaults_to_auto():
    assert compose_config("train", []).trainer.channels_last == "auto"


def _optimizer_run(factory, steps=5):
    """``steps`` updates of the tiny model's weights with the same seeded gradients each time, so
    only the optimiser's implementation can make two runs differ (through a network, Adam would
    amplify a last-bit difference of a near-zero gradient into a whole step)."""
    from fcn.optim import build_optimizer

    torch.manual_seed(0)
    model = FCN(num_classes=3, width=4)
    optimizer = build_optimizer(factory, model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer, model


@pytest.mark.parametrize(
    "factory",
    [
        functools.partial(torch.optim.AdamW, lr=0.005, weight_decay=1e-4),
        functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4),
    ],
    ids=["adamw", "sgd"],
)
def test_fused_optimizer_is_chosen_on_cpu_and_matches_the_per_tensor_update(factory):
    fast, fast_model = _optimizer_run(factory)
    assert fast.defaults.get("fused") is True  # torch has fused CPU kernels for AdamW and SGD
    plain, plain_model = _optimizer_run(functools.partial(factory.func, **factory.keywords, foreach=False))
    assert not plain.defaults.get("fused") and plain.defaults.get("foreach") is False
    torch.manual_seed(0)
    start = FCN(num_classes=3, width=4).state_dict()  # the same initial weights
    moved = False
    for name, a in fast_model.state_dict().items():
        b = plain_model.state_dict()[name]
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=f"{name} differs")
        moved |= not torch.equal(a, start[name])
    assert moved  # the updates did change the weights


def test_an_optimizer_implementation_set_in_the_config_wins():
    from fcn.optim import implementation

    model = FCN(num_classes=3, width=4)
    assert implementation(functools.partial(torch.optim.AdamW, lr=1.0, fused=False), model) == {}
    assert implementation(functools.partial(torch.optim.AdamW, lr=1.0), model) == {"fused": True}
    assert implementation(functools.partial(torch.optim.RMSprop, lr=1.0), model) == {"foreach": True}


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "mobilenet_v3_large"])
def test_folding_batch_norm_keeps_the_outputs_and_leaves_the_model_alone(backbone):
    from fcn.models.fold import fold_batch_norm

    torch.manual_seed(0)
    model = FCN(num_classes=3, backbone=backbone, width=4 if backbone == "tiny" else None).train()
    for p in model.parameters():  # non-zero score layers, so the outputs carry the encoder's values
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            model(x)  # running statistics away from 0 / 1, so folding has something to fold
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.slow
def test_compile_trains_the_model_on_the_cpu_with_the_eager_results(caplog):
    # torch 2.14's inductor failed on the backward of replicate padding in NHWC (issue 17); the
    # decoder pads with slices now, so the compiled model must be used, not the eager fallback.
    torch.manual_seed(0)
    model = FCN(num_classes=3, width=4).to(memory_format=torch.channels_last)
    for m in model.modules():  # non-zero scores so the comparison means something
        if isinstance(m, torch.nn.Conv2d) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.1)
    compiled = maybe_compile(model, True, 2, (32, 32), channels_last=True)
    assert compiled is not model and "torch.compile failed" not in caplog.text
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    compiled(x).square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    eager = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager.keys() and len(grads) > 0
    # inductor's fused batch norm rounds differently: 1.5e-3 relative off float64 where eager is 2.5e-4 off
    # (and a bias whose true gradient is 0, ahead of a batch norm, gets rounding noise): compare all at once
    difference = torch.cat([(grads[name] - eager[name]).flatten() for name in grads]).norm()
    assert difference <= 1e-2 * torch.cat([eager[name].flatten() for name in grads]).norm()


def _measure_fast_paths(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "measure_fast_paths.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def test_measure_fast_paths_prints_every_comparison_for_a_small_model():
    import json

    done = _measure_fast_paths(
        "--backbones", "tiny", "--crop", "32", "--batch", "2", "--classes", "3", "--variant", "32s",
        "--rounds", "1", "--steps", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["variant"], result["classes"], result["crop"]) == ("32s", 3, 32)
    assert set(result["step_s"]) == {"contiguous", "channels_last", "transposed"}
    for key in ("channels_last_speedup", "subpixel_speedup", "fused_speedup_vs_per_tensor", "fold_speedup"):
        assert result[key] > 0


@pytest.mark.parametrize(
    "args, named",
    [
        (["--classes", "0"], "--classes: 0 is less than 1"),
        (["--steps", "x"], "--steps: 'x' is not a whole number"),
        (["--backbones", "nope"], "--backbones: invalid choice: 'nope'"),
        (["--variant", "2s"], "--variant: invalid choice: '2s'"),
        (["--backbones", "tiny", "--crop", "32", "--batch", "1"], "tiny at --crop 32 --batch 1: Expected more than 1"),
    ],
)
def test_measure_fast_paths_refuses_a_bad_argument_in_one_line_naming_it(args, named):
    done = _measure_fast_paths(*args)
    assert done.returncode == 2
    assert named in done.stderr and "Traceback" not in done.stderr
