"""Run directories: claimed exclusively, never overwritten by a fresh run, resumed where they are,
settings changed on resume checked key by key, and nothing left behind by a failed command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fcn import resume, rundir
from fcn.config import may_change_on_resume
from fcn.errors import UserError
from tests.conftest import StopAtStep, compose_config, tiny_train_overrides

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "seed": 0,
    "resume": None,
    "init_from": None,
    "optim": {"_target_": "torch.optim.AdamW", "lr": 0.01},
    "trainer": {"epochs": 2, "batch_size": 4, "num_workers": 0, "device": "auto"},
    "logger": {"tensorboard": True, "log_every_n_steps": 10},
    "data": {"root": "data/shapes", "crop_size": 40, "mean": [0.5, 0.5, 0.5]},
}


def _with(config: dict, **changes) -> dict:
    """A deep copy of ``config`` with dotted keys set: ``_with(CONFIG, **{"optim.lr": 0.1})``."""
    import copy

    out = copy.deepcopy(config)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def _fake_checkpoint(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "model": {"w": torch.zeros(2)}}, path)
    return path


# ---- resume with changed settings (issue 14 kind 4)


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.lr", 0.001),
        ("optim._target_", "torch.optim.SGD"),
        ("seed", 1),
        ("trainer.batch_size", 2),
        ("trainer.epochs", 3),
        ("data.crop_size", 64),
        ("data.mean", [0.4, 0.5, 0.5]),
    ],
)
def test_resume_refuses_every_setting_that_changes_the_trajectory_naming_both_values(key, value, tmp_path):
    source = tmp_path / "last.pt"
    old = resume.flatten(CONFIG)[key]
    with pytest.raises(UserError) as info:
        resume.check_resume_config(CONFIG, _with(CONFIG, **{key: value}), source)
    message = str(info.value)
    assert f"{key}: checkpoint {old!r}, now {value!r}" in message.splitlines()[1].strip()
    assert f"init_from={source}" in message and "drop these overrides" in message


def test_resume_refusal_lists_one_line_per_changed_key():
    now = _with(CONFIG, **{"optim.lr": 0.5, "seed": 7, "trainer.num_workers": 2})
    with pytest.raises(UserError) as info:
        resume.check_resume_config(CONFIG, now, Path("x.pt"))
    lines = [line.strip() for line in str(info.value).splitlines()]
    assert lines[1:3] == ["optim.lr: checkpoint 0.01, now 0.5", "seed: checkpoint 0, now 7"]
    assert not any("num_workers" in line for line in lines)  # harmless keys are not refused


def test_resume_applies_settings_that_cannot_change_the_result_and_lists_them():
    now = _with(
        CONFIG,
        **{
            "trainer.num_workers": 2,
            "logger.log_every_n_steps": 1,
            "data.root": "/moved",
            "trainer.device": "cpu",
            "resume": "auto",
        },
    )
    applied = resume.check_resume_config(CONFIG, now, Path("x.pt"))
    assert applied == [
        "data.root: checkpoint 'data/shapes', now '/moved'",
        "logger.log_every_n_steps: checkpoint 10, now 1",
        "trainer.device: checkpoint 'auto', now 'cpu'",
        "trainer.num_workers: checkpoint 0, now 2",
    ]  # resume itself differs on every resume and is not listed


def test_unknown_keys_are_refused_by_default_and_keys_missing_on_one_side_are_not_compared():
    assert not may_change_on_resume("trainer.precision") and not may_change_on_resume("model.width")
    assert may_change_on_resume("logger.num_images") and may_change_on_resume("eval.scales")
    assert not may_change_on_resume("loggers.x")  # a prefix must end at a dot
    now = _with(CONFIG, **{"trainer.new_setting": 1})
    assert resume.compare_configs(CONFIG, now).refused == []
    assert resume.compare_configs(CONFIG, _with(CONFIG, **{"optim.lr": 0.01000})).refused == []
    assert resume.compare_configs({"a": 1}, {"a": 1.0}).refused == []
    assert resume.compare_configs({"a": True}, {"a": 1}).refused == ["a: checkpoint True, now 1"]


def test_settings_added_since_the_rules_were_written_are_placed_deliberately():
    # data.max_image_pixels only refuses images; data.split is evaluate's split; sync_bn changes the statistics
    assert may_change_on_resume("data.max_image_pixels") and may_change_on_resume("data.split")
    assert not may_change_on_resume("trainer.sync_bn") and not may_change_on_resume("data.reduce_zero_label")
    now = _with(CONFIG, **{"data.max_image_pixels": None})
    assert resume.check_resume_config(_with(CONFIG, **{"data.max_image_pixels": 89478485}), now, Path("x.pt")) == [
        "data.max_image_pixels: checkpoint 89478485, now None"
    ]


# ---- a fresh run never overwrites checkpoints (issue 14 kind 4, issue 15 point 3)


@pytest.mark.parametrize("names", [["last.pt", "best.pt"], ["best.pt"], ["last.prev.pt"], ["other.pt"]])
def test_a_fresh_run_refuses_a_directory_holding_any_checkpoint(tmp_path, names):
    for name in names:
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
    with pytest.raises(UserError, match=f"{tmp_path} already holds checkpoints .*resume=auto hydra.run.dir="):
        rundir.refuse_fresh_start(tmp_path)


def test_a_fresh_run_accepts_a_new_or_empty_directory(tmp_path):
    rundir.refuse_fresh_start(tmp_path / "new")
    (tmp_path / "checkpoints").mkdir()
    rundir.refuse_fresh_start(tmp_path)


# ---- resume= takes auto, a run directory or a checkpoint


def test_resume_accepts_a_run_directory_its_checkpoints_folder_or_a_file(tmp_path):
    last = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", CONFIG)
    assert resume.resume_source(str(tmp_path / "run"), tmp_path / "elsewhere") == (last, "last.pt")
    assert resume.resume_source(str(tmp_path / "run" / "checkpoints"), tmp_path / "elsewhere") == (last, "last.pt")
    assert resume.resume_source(str(last), tmp_path / "elsewhere") == (last, "the given checkpoint")
    assert resume.resume_source("auto", tmp_path / "run") == (last, "last.pt")


def test_resume_of_a_missing_path_names_the_resume_key(tmp_path):
    with pytest.raises(UserError, match=r"^resume=/no/such/run: not found; give a checkpoint file, a run directory"):
        resume.resume_source("/no/such/run", tmp_path)


def test_resume_of_a_directory_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"resume={tmp_path}: no resumable checkpoint in {tmp_path}"):
        resume.resume_source(str(tmp_path), tmp_path)


def test_resume_auto_in_a_directory_with_only_best_pt_resumes_from_it_and_says_so(tmp_path):
    best = _fake_checkpoint(tmp_path / "checkpoints" / "best.pt", CONFIG)
    path, how = resume.resume_source("auto", tmp_path)
    assert path == best and "only best.pt found" in how and "no last.pt" in how


def test_resume_auto_never_starts_fresh_over_unknown_checkpoint_files(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoints" / "epoch3.pt", CONFIG)
    with pytest.raises(UserError, match="found epoch3.pt: give one as resume=PATH"):
        resume.resume_source("auto", tmp_path)


def test_resume_auto_in_an_empty_pinned_directory_starts_fresh(tmp_path):
    assert resume.resume_source("auto", tmp_path) == (tmp_path / "checkpoints" / "last.pt", "nothing")


# ---- finding the run to resume, and the command that resumes it


def test_find_unfinished_runs_returns_the_newest_run_of_the_same_config(tmp_path):
    old = _fake_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt", CONFIG)
    _fake_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt", CONFIG)
    _fake_checkpoint(tmp_path / "other_lr" / "checkpoints" / "last.pt", _with(CONFIG, **{"optim.lr": 0.5}))
    _fake_checkpoint(tmp_path / "finished" / "checkpoints" / "last.pt", CONFIG)
    (tmp_path / "finished" / "metrics.json").write_text("{}")
    stopped = _fake_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt", CONFIG)
    (tmp_path / "stopped" / "metrics.json").write_text('{"status": "stopped by signal 15"}')  # reports, unfinished
    (tmp_path / "empty").mkdir()
    os.utime(old, (time.time() - 100, time.time() - 100))
    os.utime(stopped, (time.time() - 200, time.time() - 200))
    now = _with(CONFIG, **{"trainer.num_workers": 3, "resume": "auto"})  # harmless differences still match
    found = resume.find_unfinished_runs(tmp_path, now, exclude=tmp_path / "empty")
    assert found == [tmp_path / "b", tmp_path / "a", tmp_path / "stopped"]
    assert resume.find_unfinished_runs(tmp_path, now, exclude=tmp_path / "b") == [tmp_path / "a", tmp_path / "stopped"]
    assert resume.find_unfinished_runs(tmp_path / "missing", now) == []


def test_the_resume_command_repeats_the_overrides_and_pins_the_run(tmp_path):
    run = tmp_path / "my run"
    command = resume.resume_command(
        "python scripts/train.py", ["optim.lr=0.01", "resume=auto", "data.class_names=[a, b]"], run
    )
    assert command == (
        f"python scripts/train.py optim.lr=0.01 'data.class_names=[a, b]' resume=auto 'hydra.run.dir={run}'"
    )
    pinned = resume.resume_command("fcn-train", ["hydra.run.dir=/x", "seed=1"], Path("/x"))
    assert pinned == "fcn-train seed=1 resume=auto hydra.run.dir=/x"


# ---- exclusive claims


def test_claiming_the_same_run_directory_twice_gives_two_directories(tmp_path):
    first = rundir.claim_run_dir(tmp_path / "outputs" / "train" / "2026-01-01_00-00-00")
    second = rundir.claim_run_dir(tmp_path / "outputs" / "train" / "2026-01-01_00-00-00")
    assert first.name == "2026-01-01_00-00-00" and second.name == "2026-01-01_00-00-00_1"
    assert first.is_dir() and second.is_dir()


def test_simultaneous_claims_never_share_a_directory(tmp_path):
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(rundir.claim_run_dir(tmp_path / "same-second"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8


HOLD = """
import sys, time
from fcn import rundir
for run_dir in sys.argv[1:]:
    rundir.acquire_lock(run_dir)
print("held", flush=True)
time.sleep(60)
"""


def _hold_lock(*run_dirs: Path) -> subprocess.Popen:
    """Another run, still going: a process holding the locks of ``run_dirs`` (kill it when done)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, *map(str, run_dirs)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_directory_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = rundir.acquire_lock(tmp_path)
    rundir.release_lock(lock)
    assert not lock.exists()
    import socket

    alive = _hold_lock(tmp_path)  # another run, still going
    try:
        with pytest.raises(UserError, match=f"{tmp_path} is in use by process {alive.pid}"):
            rundir.acquire_lock(tmp_path)
        lock.write_text("unreadable\n")  # whatever its record says, the OS says who holds the lock
        with pytest.raises(UserError, match="in use by another process.*delete the lock file"):
            rundir.acquire_lock(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert rundir.acquire_lock(tmp_path) == lock  # its process is gone: taken over, whatever its file says
    assert lock.read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]
    rundir.release_lock(lock)
    lock.write_text(f"another-host-{socket.gethostname()} 1\n")  # left by a run on a node that was lost
    assert rundir.acquire_lock(tmp_path) == lock
    rundir.release_lock(lock)


def test_a_lock_left_on_another_node_by_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    # A requeued SLURM job keeps its SLURM_JOB_ID and may start on another node after a hard kill.
    lock = tmp_path / rundir.LOCK_NAME
    lock.write_text("node-that-died 4242 777\n")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert rundir.acquire_lock(tmp_path) == lock
    assert lock.read_text().split()[2] == "777"
    rundir.release_lock(lock)
    holder = _hold_lock(tmp_path)  # another job's run, running
    try:
        lock.write_text("node-that-runs 4242 778\n")  # its record, as written on its node
        with pytest.raises(UserError, match="in use by process 4242 on node-that-runs"):
            rundir.acquire_lock(tmp_path)
        monkeypatch.delenv("SLURM_JOB_ID")
        with pytest.raises(UserError, match="delete the lock file"):
            rundir.acquire_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_file_system_without_flock_still_locks_the_run_directory(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # some Lustre and FUSE mounts

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="flock not supported"):
        lock = rundir.acquire_lock(tmp_path)  # filelock's marker file instead
    assert lock.read_text().split()[1] == str(os.getpid())
    rundir.release_lock(lock)
    assert not lock.exists()


RACE = """
import sys
from fcn import rundir
from fcn.errors import UserError
sys.stdin.readline()  # both processes start together
try:
    rundir.acquire_lock(sys.argv[1])
    print("won", flush=True)
except UserError as exc:
    print(exc, flush=True)
sys.stdin.readline()  # the winner holds the lock until the loser has tried
"""


@pytest.mark.slow
def test_two_starts_racing_for_a_killed_runs_lock_never_both_win(tmp_path):
    """After a crash, two ``resume=auto`` starts race for the run directory: exactly one gets it, every time."""
    import socket

    runs = [tmp_path / f"run{i}" for i in range(30)]
    for run in runs:
        run.mkdir()
    killed = _hold_lock(*runs)  # the crashed run: its lock files and records stay behind
    killed.kill()
    killed.wait()
    assert all((run / rundir.LOCK_NAME).read_text().split()[1] == str(killed.pid) for run in runs)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "env": env}
    for run in runs:
        starts = [subprocess.Popen([sys.executable, "-c", RACE, str(run)], **pipes) for _ in range(2)]
        for start in starts:
            start.stdin.write("go\n")
            start.stdin.flush()
        said = {start.pid: start.stdout.readline().strip() for start in starts}
        for start in starts:
            start.communicate("done\n", timeout=30)
        winners = [pid for pid, line in said.items() if line == "won"]
        assert len(winners) == 1, said
        (loser,) = (line for line in said.values() if line != "won")
        assert loser == (
            f"run directory {run} is in use by process {winners[0]} on {socket.gethostname()} (lock file "
            f"{run / rundir.LOCK_NAME}); wait for that run, choose another directory, or delete the lock file "
            "if that run is no longer running"
        )


def test_a_second_command_into_a_running_runs_directory_is_refused_before_touching_it(tmp_path, monkeypatch):
    from fcn.cli import hydra_run_dir

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the first run's config\n")
    (run / "train.log").write_text("the first run's log\n")
    holder = _hold_lock(run)  # the first run, still going
    try:
        monkeypatch.delenv("RANK", raising=False)
        with pytest.raises(SystemExit) as stopped:
            hydra_run_dir.check_pinned_run_dir([f"hydra.run.dir={run}", "trainer.epochs=3"])
        assert stopped.value.code == 2
        # nothing of the first run was touched: its config, its log and its lock
        assert (run / ".hydra" / "config.yaml").read_text() == "the first run's config\n"
        assert (run / "train.log").read_text() == "the first run's log\n"
        assert (run / rundir.LOCK_NAME).read_text().split()[1] == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()


def test_a_pinned_directory_is_locked_before_hydra_writes_and_the_run_keeps_that_lock(tmp_path, monkeypatch):
    from fcn.cli import hydra_run_dir

    run = tmp_path / "new_run"
    monkeypatch.delenv("RANK", raising=False)
    hydra_run_dir.check_pinned_run_dir([f"hydra.run.dir={run}"])
    lock = run / rundir.LOCK_NAME
    assert lock.read_text().split()[1] == str(os.getpid())
    assert rundir.acquire_lock(run) == lock  # the same process may take it again (re-entrant)
    rundir.release_lock(lock)
    assert not lock.exists()


def test_a_mapping_setting_that_gains_or_loses_entries_on_resume_is_refused():
    saved = {"data": {"label_map": None, "root": "a"}, "optim": {"lr": 0.01}}
    changes = resume.compare_configs(saved, {"data": {"label_map": {1: 0}, "root": "a"}, "optim": {"lr": 0.01}})
    assert changes.refused == ["data.label_map: checkpoint None, now {1: 0}"]
    saved = {"data": {"label_map": {255: 1}}}
    changes = resume.compare_configs(saved, {"data": {"label_map": {255: 1, 128: 1}}})
    assert changes.refused == ["data.label_map: checkpoint {255: 1}, now {255: 1, 128: 1}"]
    # a setting that another version of the code added to a section is not a change of this run
    assert resume.compare_configs({"data": {"root": "a"}}, {"data": {"root": "a", "new_key": 3}}).refused == []


# ---- failed commands leave nothing behind


def test_a_failed_run_directory_is_removed_only_when_it_holds_nothing_of_value(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "train.log").write_text("error\n")
    assert rundir.remove_failed_run(run) and not run.exists()
    for keep in ("checkpoints/best.pt", "metrics.json", "notes.txt", "checkpoints/.last.pt.tmp"):
        (run / ".hydra").mkdir(parents=True, exist_ok=True)
        (run / keep).parent.mkdir(parents=True, exist_ok=True)
        (run / keep).write_text("x")
        assert not rundir.remove_failed_run(run) and (run / keep).exists(), keep
        (run / keep).unlink()


# ---- through the entry point


def _train_args(shapes_root: Path) -> list[str]:
    return [*tiny_train_overrides(shapes_root), "logger=none", "trainer.epochs=1", "trainer.num_workers=0"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_resuming_with_another_learning_rate_is_refused_before_training(shapes_root, tmp_path):
    from fcn.train import TrainingInterrupted, train

    with pytest.raises(TrainingInterrupted):
        train(compose_config("train", _train_args(shapes_root) + ["trainer.epochs=2"]), tmp_path, StopAtStep(2))
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    cfg = compose_config("train", _train_args(shapes_root) + ["trainer.epochs=2", "optim.lr=0.001", "resume=auto"])
    with pytest.raises(UserError, match=r"optim.lr: checkpoint 0.005, now 0.001"):
        train(cfg, tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_a_fresh_train_call_refuses_a_run_directory_holding_best_pt(shapes_root, tmp_path):
    from fcn.train import train

    best = _fake_checkpoint(tmp_path / "checkpoints" / "best.pt", CONFIG)
    before = best.read_bytes()
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(compose_config("train", _train_args(shapes_root)), tmp_path)
    assert best.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


@pytest.mark.slow
def test_cli_fresh_run_into_a_run_with_checkpoints_is_one_line_exit_2_and_touches_nothing(shapes_root, tmp_path):
    run = tmp_path / "run"
    assert _cli(*_train_args(shapes_root), f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _cli(*_train_args(shapes_root), f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: run directory {run} already holds checkpoints (best.pt, last.pt); a fresh run would overwrite "
        f"them: continue it with resume=auto hydra.run.dir={run}, or choose another directory (hydra.run.dir=...)"
    ]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_cli_failed_commands_leave_no_run_directory_and_print_the_error_once(shapes_root, tmp_path):
    failing = [
        ["resume=/no/such/checkpoint.pt"],
        ["trainer.batch_size=0"],
        ["resume=auto"],  # no pinned run directory and nothing to resume
        [f"hydra.run.dir={tmp_path / 'pinned_new'}", "trainer.epochs=0"],
    ]
    for args in failing:
        proc = _cli(*_train_args(shapes_root), *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
        assert len(errors) == 1, (args, errors)
        assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs" / "train").iterdir()), args
        assert not (tmp_path / "pinned_new").exists()
    proc = _cli(*_train_args(shapes_root), "resume=/no/such/checkpoint.pt", cwd=tmp_path)
    assert proc.stderr.strip().startswith("error: resume=/no/such/checkpoint.pt: not found")


@pytest.mark.slow
def test_cli_interrupted_run_prints_the_command_that_resumes_it_and_resume_auto_finds_it(shapes_root, tmp_path):
    import signal

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "train.py"), *args, *extra],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def interrupt(proc: subprocess.Popen, ready) -> str:
        deadline = time.time() + 120
        while not ready():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        return out

    args = [*_train_args(shapes_root), "trainer.epochs=1000", "trainer.limit_train_batches=2"]
    out = interrupt(start(), lambda: list(tmp_path.glob("outputs/train/*/checkpoints/last.pt")))
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    lines = out.splitlines()
    command = lines[[i for i, line in enumerate(lines) if "Resume with:" in line][0] + 1].strip()
    assert command.endswith(f"resume=auto hydra.run.dir={run}")
    assert command.startswith(f"python {REPO / 'scripts' / 'train.py'} ") and "trainer.epochs=1000" in command
    step = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]

    # resume=auto without hydra.run.dir continues that run, in its own directory (no new one is left)
    proc = start("trainer.num_workers=0", "resume=auto")
    log = run / "train.log"
    out = interrupt(proc, lambda: "resumed from" in log.read_text())
    assert f"continuing the newest unfinished run of this config, {run}" in out
    assert re.search(
        rf"resumed from {re.escape(str(run))}/checkpoints/last.pt at epoch \d+, batch \d, step {step}\n",
        log.read_text(),
    )
    assert list((tmp_path / "outputs" / "train").iterdir()) == [run]

    # the printed command, run as printed (its words as a shell splits them), continues the same run
    words = shlex.split(command)
    assert words[0] == "python"
    proc = subprocess.Popen(
        [sys.executable, *words[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    resumed = log.read_text().count("resumed from")
    interrupt(proc, lambda: log.read_text().count("resumed from") > resumed)
    assert list((tmp_path / "outputs" / "train").iterdir()) == [run]


@pytest.mark.slow
def test_a_command_that_only_prints_makes_no_run_directory(tmp_path):
    for flags in (["--cfg", "hydra", "--resolve"], ["--help"]):
        proc = _cli(*flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert not (tmp_path / "outputs").exists(), flags
    assert "dir: outputs/train/" in _cli("--cfg", "hydra", "--resolve", cwd=tmp_path).stdout


def test_a_user_error_reaches_the_console_once_and_the_log_file_once(tmp_path, capsys):
    import logging

    from fcn.cli.exit import exit_on_user_error

    root = logging.getLogger()
    console, logfile = logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "train.log")
    root.addHandler(console)
    root.addHandler(logfile)
    try:

        def fail():
            raise UserError("resume=/x: not found")

        with pytest.raises(SystemExit) as info:
            exit_on_user_error(fail)()
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
        logfile.close()
    assert info.value.code == 2
    assert capsys.readouterr().err.count("resume=/x: not found") == 1
    assert (tmp_path / "train.log").read_text().count("resume=/x: not found") == 1


def test_the_default_run_directory_is_claimed_once_per_process(tmp_path):
    from fcn.cli import hydra_run_dir

    base = str(tmp_path / "outputs" / "train" / "2026-01-01_00-00-00")
    (tmp_path / "outputs" / "train" / "2026-01-01_00-00-00").mkdir(parents=True)  # another job's, same second
    first = hydra_run_dir.claim_run_dir(base)
    assert first == str((tmp_path / "outputs" / "train" / "2026-01-01_00-00-00_1").resolve())
    assert hydra_run_dir.claim_run_dir(base) == first  # Hydra may resolve it again: the same directory
    assert hydra_run_dir.created_here(Path(first))
    assert "${fcn.claim_dir:outputs/" in (REPO / "configs" / "train.yaml").read_text()
