"""SLURM through hydra-submitit-launcher (the search on Optuna has its own tests: test_search.py).

No SLURM cluster here: the SLURM tasks are simulated (their variables set by hand, two CPU
processes, gloo) and the launcher's path runs through ``hydra/launcher=local``, submitit's local
executor, which starts, signals and requeues jobs as SLURM would.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fcn.checkpoint import load_checkpoint
from fcn.distributed import slurm_environment
from tests.conftest import tiny_train_overrides
from tests.test_distributed import _entry_point_overrides, _losses, torchrun_run  # noqa: F401 (a fixture)

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

REPO = Path(__file__).resolve().parents[1]


class SignalOnce(nn.CrossEntropyLoss):
    """Cross-entropy whose process receives submitit's pre-timeout signal (SIGUSR2) during
    training call ``at``, the first time only (``marker`` records that it happened)."""

    def __init__(self, ignore_index: int, at: int, marker: str, **unused) -> None:
        super().__init__(ignore_index=ignore_index)
        self.at, self.marker, self.calls = at, Path(marker), 0

    def forward(self, logits, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at and not self.marker.exists():
                self.marker.write_text("signalled")
                os.kill(os.getpid(), signal.SIGUSR2)
        return super().forward(logits, target)


def _train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-W", "ignore", str(REPO / "scripts" / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# --- SLURM's variables ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[01-04,07]", "node01"),
        ("gpu5,cpu[9-11],login", "gpu5"),
        ("rack[1-2]-n[1,3]", "rack1-n1"),
        ("n[008-010]", "n008"),
    ],
)
def test_rank_0_runs_on_the_first_host_of_slurms_node_list(nodelist, first):
    env = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": nodelist}
    assert slurm_environment(env)["MASTER_ADDR"] == first  # zero padding kept, as SLURM writes it


def test_slurm_tasks_get_torchrun_variables_with_rank_0_on_the_first_host():
    env = {
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[12-15]",
        "SLURM_JOB_ID": "4321987",
    }
    assert slurm_environment(env) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu12",
        "MASTER_PORT": str(20000 + 4321987 % 20000),
    }
    # the step's own node list first; an address or port the user set is kept
    env |= {"SLURM_STEP_NODELIST": "gpu[14-15]", "MASTER_PORT": "29500"}
    assert slurm_environment(env)["MASTER_ADDR"] == "gpu14" and slurm_environment(env)["MASTER_PORT"] == "29500"


def test_one_process_in_a_slurm_job_is_not_a_rank_of_a_group():
    one_task = {"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert slurm_environment(one_task) is None
    # `python train.py` in an sbatch script of 4 tasks (no srun step): one plain process
    batch_script = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert slurm_environment(batch_script) is None
    assert slurm_environment({}) is None


def test_a_requeued_job_resumes_whatever_resume_it_was_given():
    from hydra_plugins.fcn_launchers import resuming

    assert resuming(["model=fcn8s"]) == ["model=fcn8s", "resume=auto"]
    assert resuming(["resume=/old/last.pt", "optim.lr=0.1", "+resume=x"]) == ["optim.lr=0.1", "resume=auto"]


def _free_slurm_job_id() -> str:
    # a job id whose derived MASTER_PORT (20000 + id % 20000) is free on this machine
    for port in range(20000 + os.getpid() % 20000, 40000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(1_000_000 + port - 20000)
    raise RuntimeError("no free port")


@pytest.mark.slow
def test_two_simulated_slurm_tasks_train_to_the_weights_of_torchrun(torchrun_run, shapes_root, tmp_path):  # noqa: F811
    job_id = _free_slurm_job_id()
    common = {
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": job_id,
        "SLURM_STEP_ID": "0",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-W", "ignore", str(REPO / "scripts" / "train.py"), *_entry_point_overrides(shapes_root)]
    tasks = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**env, **common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1  # one run directory, rank 0's
    assert "2 process(es) x batch 2" in (runs[0] / "train.log").read_text()
    reference = next((torchrun_run[0] / "outputs" / "train").iterdir())
    assert _losses(runs[0]) == _losses(reference)
    ours, theirs = _weights(runs[0]), _weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_a_two_task_job_of_the_launcher_trains_with_ddp_to_the_weights_of_torchrun(torchrun_run, shapes_root, tmp_path):  # noqa: F811
    # the launcher's own path: submitit starts two tasks, each runs the Hydra job and joins the group
    sweep = tmp_path / "sweep"
    proc = _train(
        [
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",
            f"hydra.sweep.dir={sweep}",
            *_entry_point_overrides(shapes_root),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = sweep / "0"
    assert "2 process(es) x batch 2" in (run / "train.log").read_text()
    assert "[rank 1]" not in (run / "train.log").read_text()  # rank 1 logs to its console only
    assert [r["run_dir"] for r in _summary(sweep)] == [str(run)]  # one job, one row, rank 0's
    reference = next((torchrun_run[0] / "outputs" / "train").iterdir())
    assert _losses(run) == _losses(reference)
    ours, theirs = _weights(run), _weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- the submitit launcher on this machine ---------------------------------------------------------


def _launcher_overrides(shapes_root) -> list[str]:
    return [*tiny_train_overrides(shapes_root), "trainer.device=cpu", "trainer.threads=1", "logger.num_images=1"]


@pytest.fixture(scope="module")
def local_sweep(shapes_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two jobs (two model variants) through hydra/launcher=local."""
    cwd = tmp_path_factory.mktemp("local_sweep")
    sweep = cwd / "sweep"
    proc = _train(
        [
            "-m",
            "hydra/launcher=local",
            "model.variant=32s,8s",
            f"hydra.sweep.dir={sweep}",
            *_launcher_overrides(shapes_root),
        ],
        cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep, proc


@pytest.mark.slow
def test_a_two_job_sweep_through_the_local_launcher_trains_both_and_writes_summary_csv(local_sweep):
    sweep, proc = local_sweep
    rows = _summary(sweep)
    assert [r["overrides"] for r in rows] == ["model.variant=32s", "model.variant=8s"]
    for job, row in enumerate(rows):
        run = sweep / str(job)
        metrics = load_checkpoint(run / "checkpoints" / "best.pt")["metrics"]
        assert row["status"] == "completed" and Path(row["run_dir"]) == run
        assert float(row["best_val_miou"]) == pytest.approx(metrics["miou"])
        assert float(row["pixel_acc"]) == pytest.approx(metrics["pixel_acc"]) and float(row["time_s"]) > 0
        assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["model"]["variant"] == ("32s", "8s")[job]
    assert "sweep summary" in proc.stdout and "model.variant=8s" in proc.stdout  # printed at the end


@pytest.mark.slow
def test_a_job_signalled_before_its_time_limit_is_requeued_and_resumes_to_the_uninterrupted_weights(
    local_sweep, shapes_root, tmp_path
):
    # job 0 of the sweep above trained model.variant=32s uninterrupted; this one gets SIGUSR2 in step 4
    sweep = tmp_path / "sweep"
    marker = tmp_path / "signalled"
    proc = _train(
        [
            "-m",
            "hydra/launcher=local",
            "model.variant=32s",
            f"hydra.sweep.dir={sweep}",
            "loss._target_=tests.test_cluster.SignalOnce",
            "+loss.at=4",
            f"+loss.marker={marker}",
            *_launcher_overrides(shapes_root),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()
    run = sweep / "0"
    log = (run / "train.log").read_text()
    assert "interrupted by signal" in log and "resumed from" in log and "at epoch 2, batch 1, step 4" in log
    assert "resume=auto" in (run / ".hydra" / "overrides.yaml").read_text()  # the requeued job's overrides
    assert [p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")] == ["0"]  # same run dir
    reference = local_sweep[0] / "0"
    assert _losses(run) == _losses(reference)
    ours, theirs = _weights(run), _weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- the sweep's summary --------------------------------------------------------------------------------


def test_summary_csv_has_one_row_per_job_in_job_order_with_each_jobs_own_overrides(tmp_path):
    import json

    from fcn.cli.multirun import ROW_FILE, write_summary

    common = ["data.root=/d", "model.variant=32s,8s"]  # the command line of the sweep
    for job, variant in ((1, "8s"), (0, "32s")):
        run = tmp_path / str(job)
        run.mkdir()
        overrides = [f"model.variant={variant}", "data.root=/d"]
        scores = {"best_val_miou": 0.5 + job / 10, "pixel_acc": 0.9, "time_s": 3.25}
        row = {"job": job, "overrides": overrides, "status": "completed", **scores, "run_dir": str(run), "error": ""}
        (run / ROW_FILE).write_text(json.dumps(row))
    path, table = write_summary(tmp_path, set(common))
    rows = _summary(tmp_path)
    assert path == tmp_path / "summary.csv"
    assert [(r["job"], r["overrides"], r["best_val_miou"]) for r in rows] == [
        ("0", "model.variant=32s", "0.5"),
        ("1", "model.variant=8s", "0.6"),
    ]
    assert list(rows[0]) == ["job", "overrides", "status", "best_val_miou", "pixel_acc", "time_s", "run_dir", "error"]
    assert table.splitlines()[1].split()[:4] == ["0", "model.variant=32s", "completed", "0.5000"]
    assert write_summary(tmp_path / "empty") == (None, "")


def test_the_slurm_preset_becomes_an_sbatch_script_with_one_task_per_gpu_and_the_requeue_signal(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from fcn.cli import CONFIG_DIR

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that SLURM is there
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=lab",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        f"hydra.sweep.dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = Plugins.instance()._instantiate(config.hydra.launcher)
    assert type(launcher).__name__ == "RequeueingSlurmLauncher"
    # the parameters as BaseSubmititLauncher.launch hands them to submitit
    params, init_keys = launcher.params, {"max_num_timeout", "submitit_folder"}
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in (
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=240",
        "--partition=gpu",
        "--account=lab",
        "--signal=USR2@120",
        "--requeue",
    ):
        assert f"#SBATCH {line}\n" in script, line
