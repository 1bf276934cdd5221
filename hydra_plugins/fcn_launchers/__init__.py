"""hydra-submitit-launcher's SLURM and local launchers with what a training job needs on top
(``hydra/launcher=slurm`` and ``hydra/launcher=local`` select them; ``pip install -e ".[cluster]"``).

Hydra accepts launchers only from the ``hydra_plugins`` namespace package, hence this folder
beside ``fcn/``; without hydra-submitit-launcher installed it defines nothing.

* A requeued job resumes: submitit's checkpoint hook (:meth:`Requeueing.checkpoint`, called on
  task 0 after training saved ``last.pt``) resubmits the same job with ``resume=auto``, and a job
  that SLURM requeued itself (``SLURM_RESTART_COUNT`` > 0, e.g. after a preemption) gets it too.
  The run directory is the job's folder in the sweep directory, pinned when the sweep was
  submitted, so the requeued job continues exactly there.
* Every task of a job runs the same Hydra job in that same directory; tasks other than 0 write
  no ``.hydra/`` and no log file there (as under torchrun). The process group comes from SLURM's
  variables, see :func:`fcn.distributed.adopt_slurm_environment`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # the cluster extras are not installed: no launcher to extend
    LocalLauncher = SlurmLauncher = None

RESUME = "resume=auto"


def resuming(overrides: list[str]) -> list[str]:
    """``overrides`` with any ``resume=...`` replaced by ``resume=auto``."""
    return [o for o in overrides if o.lstrip("+~").split("=")[0] != "resume"] + [RESUME]


def quiet_rank_overrides(rank: int) -> list[str]:
    """Hydra overrides for a task other than 0: no ``.hydra/`` or log file in the shared run
    directory, console output for warnings only, each line marked with the rank."""
    return [
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
        f"hydra.job_logging.formatters.simple.format='[rank {rank}][%(levelname)s] - %(message)s'",
    ]


class Requeueing:
    """Mixed into a submitit launcher: runs each task of a job, and resubmits a stopped job so
    that it resumes."""

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state):
        import os

        import submitit

        overrides = list(sweep_overrides)
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:  # requeued by SLURM itself
            overrides = resuming(overrides)
        job = submitit.JobEnvironment()
        if job.cluster == "local" and job.num_tasks > 1 and "WORLD_SIZE" not in os.environ:
            # several tasks on this machine: torchrun's variables, as fcn.distributed reads them from SLURM's
            os.environ.update(
                RANK=str(job.global_rank),
                WORLD_SIZE=str(job.num_tasks),
                LOCAL_RANK=str(job.local_rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(20000 + int(job.job_id) % 20000),
            )
        rank = job.global_rank
        if rank:
            overrides += quiet_rank_overrides(rank)
        return super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on the pre-timeout / preemption signal: the same job, with ``resume=auto``."""
        return super().checkpoint(resuming(list(sweep_overrides)), *args, **kwargs)


if SlurmLauncher is not None:

    class RequeueingSlurmLauncher(Requeueing, SlurmLauncher):
        """``submitit_slurm`` whose jobs resume when requeued."""

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            import shutil
            import sys

            if shutil.which("sbatch") is None:  # submitit's own error is a traceback about srun
                print(
                    "error: hydra/launcher=slurm needs SLURM's sbatch, which is not on this machine's PATH: run on "
                    "the cluster's login node, or use hydra/launcher=local to run the same jobs here",
                    file=sys.stderr,
                )
                sweep_dir = Path(self.config.hydra.sweep.dir)
                if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
                    shutil.rmtree(sweep_dir)  # nothing ran: leave nothing behind
                    for parent in (sweep_dir.parent, sweep_dir.parent.parent):  # outputs/multirun/, outputs/
                        try:
                            parent.rmdir()
                        except OSError:  # not empty: other runs
                            break
                sys.exit(2)
            return super().launch(job_overrides, initial_job_idx)

    class RequeueingLocalLauncher(Requeueing, LocalLauncher):
        """``submitit_local`` (jobs as processes on this machine) whose jobs resume when requeued."""
