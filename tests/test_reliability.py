"""Training you can trust: every fault scenario of the README's reliability section.

Each test injects one fault (a kill mid-save, a signal, an interruption at a chosen step, a NaN,
an out-of-memory error, a full disk, a corrupt or mismatched or unsafe checkpoint) and checks
that no work is lost and the user is told what happened and what to do.
"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fcn.checkpoint
from fcn.checkpoint import load_checkpoint, previous_path, save_checkpoint
from fcn.cli.train import TrainingInterrupted, train
from fcn.errors import UserError
from fcn.signals import GracefulStop
from tests.conftest import StopAtStep, compose_config, tiny_train_overrides

REPO = Path(__file__).resolve().parents[1]


class NaNAtSteps(torch.nn.CrossEntropyLoss):
    """Cross-entropy that returns NaN on the given (1-based) training calls."""

    def __init__(self, ignore_index: int, bad: list[int], **unused) -> None:
        super().__init__(ignore_index=ignore_index)
        self.bad, self.calls = set(bad), 0

    def forward(self, logits, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad:
                return super().forward(logits, target) * float("nan")
        return super().forward(logits, target)


def _cfg(shapes_root, *extra):
    # 12 train images, batch 4: 3 steps per epoch, 2 epochs
    return compose_config("train", [*tiny_train_overrides(shapes_root), *extra])


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory):
    """Reference runs, one per worker count."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path_factory.mktemp(f"reference_w{workers}")
        train(_cfg(shapes_root, f"trainer.num_workers={workers}"), out)
        runs[workers] = out
    return runs


def test_same_seed_gives_identical_losses_whatever_the_worker_count(uninterrupted):
    a, b = _losses(uninterrupted[0]), _losses(uninterrupted[2])
    assert len(a) == 6 and a == b


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bit_exact(shapes_root, tmp_path, uninterrupted, workers, stop_at):
    cfg = _cfg(shapes_root, f"trainer.num_workers={workers}")
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path, stop=StopAtStep(stop_at))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == stop_at
    train(_cfg(shapes_root, f"trainer.num_workers={workers}", "resume=auto"), tmp_path)
    reference = uninterrupted[workers]
    # same per-step losses, each step logged once (TensorBoard purged nothing it should keep)
    assert _losses(tmp_path) == _losses(reference)
    ours, theirs = _weights(tmp_path), _weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_auto_without_checkpoint_starts_fresh_with_a_warning(shapes_root, tmp_path, caplog):
    train(_cfg(shapes_root, "resume=auto", "trainer.epochs=1", "logger=none"), tmp_path)
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(shapes_root, tmp_path, caplog):
    train(_cfg(shapes_root, "logger=none"), tmp_path)  # two epochs: last.pt and last.prev.pt
    last = tmp_path / "checkpoints" / "last.pt"
    assert load_checkpoint(previous_path(last))["step"] == 3
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match=f"{last}.*corrupt or truncated"):
        load_checkpoint(last)
    train(_cfg(shapes_root, "logger=none", "resume=auto"), tmp_path)
    assert "trying the previous checkpoint" in caplog.text and "last.prev.pt" in caplog.text
    assert load_checkpoint(last)["step"] == 6  # epoch 2 was redone from the previous checkpoint


def test_resume_with_another_architecture_explains_the_difference(shapes_root, tmp_path):
    train(_cfg(shapes_root, "trainer.epochs=1", "logger=none"), tmp_path)
    with pytest.raises(UserError, match=r"model.variant: checkpoint '8s', config '16s'.*init_from"):
        train(_cfg(shapes_root, "model=fcn16s", "resume=auto", "logger=none"), tmp_path)


def test_init_from_with_other_classes_resets_only_the_class_layers(shapes_root, tmp_path, caplog):
    source = tmp_path / "source"
    train(_cfg(shapes_root, "trainer.epochs=1", "logger=none"), source)
    target = tmp_path / "target"
    init = f"init_from={source / 'checkpoints' / 'last.pt'}"
    # 7 classes instead of 6 (the masks only use 0-5, which is fine for this check)
    train(_cfg(shapes_root, init, "data.num_classes=7", "data.class_names=[a,b,c,d,e,f,g]",
               "data.palette=null", "trainer.epochs=1", "logger=none"), target)  # fmt: skip
    assert "start from their initialisation: score_out.bias, score_out.weight" in caplog.text
    before, after = _weights(source), load_checkpoint(target / "checkpoints" / "best.pt")["model"]
    assert after["score_out.weight"].shape[0] == 7
    assert before["encoder.stem_to_pool3.0.0.weight"].shape == after["encoder.stem_to_pool3.0.0.weight"].shape


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(shapes_root, tmp_path):
    cfg = _cfg(shapes_root, "loss._target_=tests.test_reliability.NaNAtSteps", "+loss.bad=[5]", "logger=none")
    with pytest.raises(UserError, match=r"nan at step 5 .*last good checkpoint: .*last\.pt.*skip_nonfinite"):
        train(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_bad_steps_and_finishes(shapes_root, tmp_path, caplog):
    cfg = _cfg(shapes_root, "loss._target_=tests.test_reliability.NaNAtSteps", "+loss.bad=[2,3]",
               "trainer.skip_nonfinite=2", "logger=none")  # fmt: skip
    train(cfg, tmp_path)
    assert "batch skipped (2/2 in a row)" in caplog.text
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 6


def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    with pytest.raises(UserError, match="w holds NaN"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "config": {}}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_says_what_to_lower(shapes_root, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("fcn.cli.train.train_one_epoch", oom)
    with pytest.raises(
        UserError, match=r"batch_size=4, data.crop_size=40, precision float32.*lower trainer.batch_size"
    ):
        train(_cfg(shapes_root, "logger=none"), tmp_path)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path, keep_previous=True)

    def full(state, fd, close=True):
        os.write(fd, b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fcn.checkpoint, "_dump", full)
    with pytest.raises(UserError, match=r"disk full while writing .*last.pt.*previous checkpoint .* intact"):
        save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path, keep_previous=True)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


SLOW_SAVE = """
import sys, time, torch
from fcn import checkpoint
path = sys.argv[1]
checkpoint.save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path, keep_previous=True)
def slow(obj, f):
    f.write(b"partial" * 10000)
    f.flush()
    print("saving", flush=True)
    time.sleep(60)
checkpoint.torch.save = slow
checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path, keep_previous=True)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    proc.kill()
    proc.wait(timeout=30)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits_with_the_conventional_code(shapes_root, tmp_path, signum, code):
    run = tmp_path / "run"
    args = [a for a in tiny_train_overrides(shapes_root) if not a.startswith("trainer=")]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args, "trainer.epochs=1000",
         "trainer.num_workers=0", f"hydra.run.dir={run}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists():  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] >= 3 and state["progress"]["epoch"] < 1000
    assert "resume=auto" in (run / "train.log").read_text()


def test_second_ctrl_c_aborts_at_once():
    stop = GracefulStop()
    stop._handle(signal.SIGINT, None)
    assert stop.should_stop(1)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Payload()}, path)
    with pytest.raises(UserError, match="refused for safety"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_periodic_mid_epoch_checkpoint_resumes_exactly_after_a_crash(shapes_root, tmp_path, uninterrupted):
    # A NaN at step 5 ends the run (as a crash would); last.pt is the one saved after step 4.
    crashing = _cfg(shapes_root, "trainer.checkpoint_every_n_steps=1", "trainer.num_workers=0",
                    "loss._target_=tests.test_reliability.NaNAtSteps", "+loss.bad=[5]")  # fmt: skip
    with pytest.raises(UserError, match="at step 5"):
        train(crashing, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    # the same settings (a changed loss is refused on resume); its calls count afresh, so step 5 is not bad again
    train(_cfg(shapes_root, "trainer.checkpoint_every_n_steps=1", "trainer.num_workers=0", "resume=auto",
               "loss._target_=tests.test_reliability.NaNAtSteps", "+loss.bad=[5]"), tmp_path)  # fmt: skip
    assert _losses(tmp_path) == _losses(uninterrupted[0])
    ours, theirs = _weights(tmp_path), _weights(uninterrupted[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_with_another_schedule_or_batch_size_is_refused(shapes_root, tmp_path):
    train(_cfg(shapes_root, "logger=none"), tmp_path)
    with pytest.raises(UserError, match=r"schedule length \(trainer.epochs\): checkpoint 6, now 9.*init_from"):
        train(_cfg(shapes_root, "logger=none", "resume=auto", "trainer.epochs=3"), tmp_path)
    with pytest.raises(UserError, match="trainer.batch_size: checkpoint 4, now 3"):
        train(_cfg(shapes_root, "logger=none", "resume=auto", "trainer.batch_size=3"), tmp_path)


def test_resume_from_another_run_reports_where_the_best_checkpoint_is(shapes_root, tmp_path):
    first = tmp_path / "first"
    train(_cfg(shapes_root, "logger=none"), first)
    report = train(_cfg(shapes_root, "logger=none", f"resume={first / 'checkpoints' / 'last.pt'}"), tmp_path / "second")
    assert Path(report["checkpoint"]).is_file()


def test_ctrl_c_to_the_whole_process_group_with_workers_still_saves(shapes_root, tmp_path):
    run = tmp_path / "run"
    args = [a for a in tiny_train_overrides(shapes_root) if not a.startswith("trainer=")]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args, "trainer.epochs=1000",
         "trainer.num_workers=2", f"hydra.run.dir={run}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: main process and workers
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] >= 3
