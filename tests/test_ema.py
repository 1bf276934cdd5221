"""trainer.ema_decay: an exponential moving average of the weights validates and is saved as best.pt."""

import pytest
import torch

import fcn.train
from fcn.checkpoint import load_checkpoint
from fcn.config import check_settings
from fcn.errors import UserError
from fcn.train import TrainingInterrupted, train
from tests.conftest import StopAtStep, compose_config, tiny_train_overrides


def _cfg(shapes_root, *extra):
    return compose_config("train", [*tiny_train_overrides(shapes_root), "trainer.epochs=2", "logger=none", *extra])


def _ckpt(run, name):
    return load_checkpoint(run / "checkpoints" / f"{name}.pt")


def _averaged(ckpt):  # the EMA's own weights and buffers, as AveragedModel stores them (module.<key>)
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}


def test_ema_off_validates_and_saves_the_trained_weights_and_stores_no_ema(shapes_root, tmp_path, monkeypatch):
    scored = []
    real = fcn.train.evaluate
    monkeypatch.setattr(fcn.train, "evaluate", lambda net, *a, **k: scored.append(net) or real(net, *a, **k))
    train(_cfg(shapes_root, "trainer.epochs=1"), tmp_path)
    best, last = _ckpt(tmp_path, "best"), _ckpt(tmp_path, "last")
    assert "ema" not in best and "ema" not in last
    assert not isinstance(scored[0], torch.optim.swa_utils.AveragedModel)
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])  # the last epoch was best


def test_ema_validates_the_averaged_weights_and_saves_them_as_best(shapes_root, tmp_path, monkeypatch):
    scored = []
    real = fcn.train.evaluate
    monkeypatch.setattr(
        fcn.train,
        "evaluate",
        lambda net, *a, **k: scored.append({n: p.clone() for n, p in net.state_dict().items()}) or real(net, *a, **k),
    )
    train(_cfg(shapes_root, "trainer.epochs=1", "trainer.ema_decay=0.5"), tmp_path)
    best, last = _ckpt(tmp_path, "best"), _ckpt(tmp_path, "last")
    averaged = _averaged(last)
    # what validated is the average, not the trained weights, and best.pt holds exactly it
    assert all(torch.equal(scored[0][k], averaged[k]) for k in averaged)
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert any(not torch.equal(last["model"][k], averaged[k]) for k in averaged if averaged[k].is_floating_point())
    assert int(last["ema"]["n_averaged"]) == last["step"]  # one update per optimisation step


@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1", "true", "fast"])
def test_ema_decay_outside_zero_one_is_refused_naming_the_key(shapes_root, decay):
    with pytest.raises(UserError, match=r"trainer.ema_decay=.*: must be a finite number in \(0, 1\), or null"):
        check_settings(_cfg(shapes_root, f"trainer.ema_decay={decay}"))


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_keeps_the_ema_state_bit_exactly(shapes_root, tmp_path, stop_at):
    reference = tmp_path / "reference"
    train(_cfg(shapes_root, "trainer.ema_decay=0.9"), reference)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_cfg(shapes_root, "trainer.ema_decay=0.9"), run, stop=StopAtStep(stop_at))
    train(_cfg(shapes_root, "trainer.ema_decay=0.9", "resume=auto"), run)
    ours, theirs = _ckpt(run, "last"), _ckpt(reference, "last")
    assert all(torch.equal(ours["ema"][k], theirs["ema"][k]) for k in theirs["ema"])
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert all(torch.equal(_ckpt(run, "best")["model"][k], _ckpt(reference, "best")["model"][k]) for k in ours["model"])
