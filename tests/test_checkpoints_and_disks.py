"""Issue 27, kinds 1-4: integrity on every path that trusts a checkpoint, errors of the operating
system on every write path in one line, a skipped non-finite step that leaves no trace, and a
whole job stopped by SIGTERM / SIGHUP with DataLoader workers."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fcn.checkpoint import load_checkpoint, save_checkpoint
from fcn.cli.exit import exit_on_user_error
from fcn.engine import Settings, train_one_epoch
from fcn.errors import UserError, write_error
from fcn.loggers import TensorBoardLogger
from fcn.models import FCN
from fcn.models.buffers import restore_buffers, snapshot_buffers
from fcn.resume import checked_best, find_resume_checkpoint
from fcn.rundir import acquire_lock
from fcn.train import train
from tests.conftest import StopAtStep, compose_config, tiny_train_overrides
from tests.test_reliability import _flip, _small_checkpoint, _tensor_offset

REPO = Path(__file__).resolve().parents[1]


def _cfg(shapes_root, *extra):
    # 12 train images, batch 4: 3 steps per epoch, 2 epochs
    return compose_config("train", [*tiny_train_overrides(shapes_root), *extra])


# --- 1. integrity on every path that trusts a checkpoint -------------------------------------------


@pytest.mark.slow
def test_resume_with_a_damaged_best_checkpoint_never_keeps_it_as_the_result(shapes_root, tmp_path, caplog):
    cfg = _cfg(shapes_root, "logger=none", "trainer.val_every=1")
    with pytest.raises(Exception, match="interrupted"):
        train(cfg, tmp_path, stop=StopAtStep(4))  # best.pt of epoch 1, then stopped in epoch 2
    best = tmp_path / "checkpoints" / "best.pt"
    _flip(best, _tensor_offset(best, 0) + 3, 0x40)  # one exponent bit: a weight of ~1e37
    report = train(_cfg(shapes_root, "logger=none", "trainer.val_every=1", "resume=auto"), tmp_path)
    assert "digest mismatch" in caplog.text and "writes a new best.pt" in caplog.text
    assert (tmp_path / "checkpoints" / "best.damaged.pt").is_file()  # kept for inspection, read by nothing
    assert load_checkpoint(best)["epoch"] == 2  # a new, intact best.pt from the resumed run
    assert report["epoch"] == 2


def test_damaged_best_checkpoint_of_an_unfinished_run_is_set_aside(tmp_path, caplog):
    best = _small_checkpoint(tmp_path / "best.pt")
    _flip(best, _tensor_offset(best) + 3, 0x40)
    progress = {"step": 3, "total_steps": 6, "stale": 2, "best": {"miou": 0.9, "checkpoint": str(best)}}
    checked = checked_best(progress, best)
    assert checked["best"] is None and checked["stale"] == 0
    assert not best.exists() and (tmp_path / "best.damaged.pt").is_file()


def test_missing_or_intact_best_checkpoint_on_resume(tmp_path):
    best = _small_checkpoint(tmp_path / "best.pt")
    progress = {"step": 3, "total_steps": 6, "best": {"miou": 0.5, "checkpoint": str(best)}}
    assert checked_best(progress, best) == progress  # intact: trusted as it is
    best.unlink()
    assert checked_best(progress, best)["best"] is None  # gone: not reported as the run's result


def test_damaged_best_checkpoint_of_a_finished_run_is_one_line_naming_last_pt(tmp_path):
    best = _small_checkpoint(tmp_path / "best.pt")
    _flip(best, _tensor_offset(best) + 3, 0x40)
    progress = {"step": 6, "total_steps": 6, "best": {"miou": 0.9, "checkpoint": str(best)}}
    with pytest.raises(UserError, match=r"corrupt or truncated.*finished.*last\.pt") as caught:
        checked_best(progress, best)
    assert "\n" not in str(caught.value)


def test_checkpoint_holding_nan_weights_is_refused_when_read_on_every_path(tmp_path):
    # A file without a digest (an older fcn, a copy tool that rewrote it): the weights are checked too.
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.tensor([1.0, float("inf")])}, "config": {}}, path)
    for key in ("checkpoint", "resume", "init_from"):
        with pytest.raises(UserError, match=rf"{path} \(given as {key}=\) is damaged: weight w holds NaN or inf"):
            load_checkpoint(path, key=key)


def test_resume_falls_back_when_last_checkpoint_holds_nan_weights(tmp_path, caplog):
    from fcn.checkpoint import load_resumable

    ckpt = tmp_path / "checkpoints"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "step": 1}, ckpt / "last.pt")
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "step": 2}, ckpt / "last.pt", keep_previous=True)
    torch.save({"model": {"w": torch.tensor([float("nan")])}, "config": {}, "step": 2}, ckpt / "last.pt")
    state, source = load_resumable(ckpt / "last.pt")
    assert source.name == "last.prev.pt" and state["step"] == 1 and "NaN or inf" in caplog.text


# --- 2. errors of the operating system on every write path -----------------------------------------


def test_directory_where_last_checkpoint_should_be_is_refused_before_training(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, ckpt / "last.prev.pt")
    (ckpt / "last.pt").mkdir()
    with pytest.raises(UserError, match=rf"cannot write checkpoint {ckpt / 'last.pt'}: a directory is in its place"):
        find_resume_checkpoint("auto", ckpt)


def test_saving_onto_a_directory_is_one_line_and_keeps_everything(tmp_path):
    (tmp_path / "last.pt").mkdir()
    (tmp_path / "last.pt" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="a directory is in its place; move or remove it"):
        save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, tmp_path / "last.pt", keep_previous=True)
    assert (tmp_path / "last.pt" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (OSError(errno.EFBIG, "File too large"), r"File too large: .*ulimit -f unlimited"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . File too large"), r"File too large: .*ulimit -f"),
        (OSError(errno.EROFS, "Read-only file system"), r"Read-only file system: .*writable directory"),
        (PermissionError(errno.EACCES, "Permission denied"), r"Permission denied: .*permissions"),
        (PermissionError(errno.EPERM, "Operation not permitted"), r"Operation not permitted: .*permissions"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), r"Is a directory: .*move or remove it"),
        (OSError(errno.ENOSPC, "No space left on device"), r"disk full .*free space there"),
    ],
    ids=["EFBIG", "torch-zip-EFBIG", "EROFS", "EACCES", "EPERM", "EISDIR", "ENOSPC"],
)
def test_every_write_error_of_the_os_is_one_line_naming_path_reason_and_fix(tmp_path, raised, expected, capsys):
    target = tmp_path / "metrics.json"

    @exit_on_user_error
    def task():
        try:
            raise raised
        except (OSError, RuntimeError) as exc:
            raise RuntimeError("wrapped") from exc

    assert write_error(raised, path=target) is not None
    assert str(target) in str(write_error(raised, path=target))
    with pytest.raises(SystemExit) as caught:
        task()
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(expected, err), err


def test_other_errors_are_not_taken_for_write_errors():
    assert write_error(ValueError("bad value")) is None
    assert write_error(OSError(errno.ECONNRESET, "Connection reset")) is None


_SAVE_UNDER_LIMIT = """
import sys, torch
from fcn.checkpoint import save_checkpoint
from fcn.errors import UserError
path = sys.argv[1]
try:
    save_checkpoint({"model": {"w": torch.ones(1 << 20)}, "config": {}}, path, keep_previous=True)
except UserError as exc:
    print(exc)
    sys.exit(2)
"""


def test_file_size_limit_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(4)}, "config": {}, "step": 1}, path)

    def limit():  # what `ulimit -f 1024` does: files of at most 1 MiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_UNDER_LIMIT, str(path)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "File too large" in proc.stdout and "ulimit -f" in proc.stdout and str(path) in proc.stdout
    assert load_checkpoint(path)["step"] == 1  # nothing was lost


def test_tensorboard_writer_on_a_full_disk_is_one_line_without_the_thread_traceback(tmp_path, monkeypatch, capfd):
    from tensorboard.summary.writer import record_writer

    logger = TensorBoardLogger(log_every_n_steps=1)
    logger.open(tmp_path)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    with pytest.raises(UserError, match=rf"disk full while writing {tmp_path / 'tensorboard'}") as caught:
        for step in range(200):
            logger.log_scalar("train/loss", 1.0, step)
            time.sleep(0.01)
        logger.close()
    assert "\n" not in str(caught.value)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_locking_a_run_directory_on_a_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, code):
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).endswith(".run.lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UserError, match=rf"{tmp_path / '.run.lock'}.*nothing in the run directory was changed"):
        acquire_lock(tmp_path)


# --- 3. a skipped non-finite step leaves no trace ---------------------------------------------------


class _NaNInputAt(torch.nn.Module):
    """Conv + batch norm whose input becomes NaN at the given (1-based) training calls."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.conv, self.bn, self.bad, self.calls = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), bad, 0

    def forward(self, x):
        self.calls += 1
        if self.calls in self.bad:
            x = x * float("nan")
        return self.bn(self.conv(x))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_skipped_nonfinite_step_restores_batch_norm_running_statistics(accumulate, caplog):
    torch.manual_seed(0)
    model = _NaNInputAt(bad={3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=generator),
            torch.randint(0, 4, (2, 8, 8), generator=generator),
        )
        for _ in range(6)
    ]
    result = train_one_epoch(
        model,
        batches,
        optimizer,
        scheduler,
        torch.nn.CrossEntropyLoss(),
        Settings(device=torch.device("cpu"), mean=[0.5] * 3, std=[0.5] * 3, accumulate=accumulate, skip_nonfinite=1),
        step=0,
    )
    assert "skipped" in caplog.text and result.step == 6 // accumulate
    for name, buffer in model.named_buffers():
        assert torch.isfinite(buffer.float()).all(), name
    # the skipped window's batches are not counted: 6 batches, one window of `accumulate` skipped
    # (after a NaN batch the rest of its window is not run through the model)
    assert model.bn.num_batches_tracked.item() == 6 - accumulate


def test_restore_buffers_puts_every_buffer_back_in_place():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("1.")}
    live = model[1].running_mean
    snapshot = snapshot_buffers(model)
    model(torch.full((2, 3, 4, 4), float("nan")))
    assert not torch.isfinite(model[1].running_mean).all()
    restore_buffers(snapshot)
    assert model[1].running_mean is live  # the same tensor: DDP and torch.compile keep their views
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


class NaNInputFCN(FCN):
    """An FCN whose second training batch is all NaN, as a damaged image decoded to NaN would be."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 2:
                x = x * float("nan")
        return super().forward(x)


@pytest.mark.slow
def test_nan_input_batch_skipped_leaves_the_run_with_checkpoints(shapes_root, tmp_path):
    cfg = _cfg(
        shapes_root,
        "model._target_=tests.test_checkpoints_and_disks.NaNInputFCN",
        "trainer.skip_nonfinite=1",
        "logger=none",
    )
    train(cfg, tmp_path)
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "checkpoints" / name)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --- 4. a whole job stopped by a signal -------------------------------------------------------------


def _train_then_signal(shapes_root, tmp_path, signum, *extra):
    run = tmp_path / "run"
    args = [a for a in tiny_train_overrides(shapes_root) if not a.startswith("trainer=")]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            *args,
            "trainer.epochs=1000",
            "trainer.num_workers=2",
            *extra,
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.time() + 180
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signum)  # what schedulers, docker stop and a closed terminal do: every process
    _, stderr = proc.communicate(timeout=90)
    return proc.returncode, stderr, run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "extra"),
    [
        (signal.SIGTERM, ()),
        (signal.SIGTERM, ("trainer.persistent_workers=false", "trainer.prefetch_factor=4")),
        (signal.SIGHUP, ()),
    ],
    ids=["SIGTERM", "SIGTERM-fresh-workers-prefetch-4", "SIGHUP"],
)
def test_signal_to_the_whole_process_group_with_workers_saves_and_exits(shapes_root, tmp_path, signum, extra):
    code, stderr, run = _train_then_signal(shapes_root, tmp_path, signum, *extra)
    assert code == 128 + signum, stderr
    assert "killed by signal" not in stderr and "Traceback" not in stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] >= 3


_WORKER = """
import os, signal, sys, time
from fcn.signals import protect_worker
protect_worker()
for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    os.kill(os.getpid(), signum)  # each one as the group's: survived
time.sleep(0.2)
print("alive", flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # the main process stopping the worker: ends it
time.sleep(5)
print("still alive", flush=True)
"""


def test_worker_survives_the_group_signals_and_ends_on_the_main_process_terminate():
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.strip() == "alive" and proc.returncode == -signal.SIGTERM, proc.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_resuming_into_a_full_or_read_only_pinned_run_directory_is_one_line(tmp_path, monkeypatch, capsys, code):
    from fcn import rundir
    from fcn.cli import hydra_run_dir

    def refuse(run_dir):
        raise OSError(code, os.strerror(code), str(run_dir / ".run.lock"))

    real_open = os.open
    monkeypatch.setattr(
        rundir.os, "open", lambda *a, **k: refuse(tmp_path) if str(a[0]).endswith(".run.lock") else real_open(*a, **k)
    )
    with pytest.raises(SystemExit) as caught:
        hydra_run_dir.check_pinned_run_dir([f"hydra.run.dir={tmp_path}", "resume=auto"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / ".run.lock") in err
    assert os.strerror(code) in err and "nothing in the run directory was changed" in err


def test_directory_where_the_previous_checkpoint_goes_is_named_before_anything_is_written(tmp_path):
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "step": 1}, tmp_path / "last.pt")
    (tmp_path / "last.prev.pt").mkdir()
    with pytest.raises(UserError, match=rf"cannot write checkpoint {tmp_path / 'last.prev.pt'}: a directory"):
        save_checkpoint(
            {"model": {"w": torch.ones(2)}, "config": {}, "step": 2}, tmp_path / "last.pt", keep_previous=True
        )
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
