"""The speed switches: precision, torch.compile with its fallback, channels-last."""

import pytest
import torch

from fcn.cli.train import train
from fcn.device import maybe_compile, resolve_precision
from fcn.errors import UserError
from fcn.models import FCN
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
    cfg = compose_config("train", [*tiny_train_overrides(shapes_root), "trainer.precision=bf16", "logger=none",
                                   "trainer.epochs=1"])  # fmt: skip
    report = train(cfg, tmp_path)
    assert 0 <= report["miou"] <= 1
