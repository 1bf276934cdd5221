"""``fcn-train`` / ``python scripts/train.py``: the process around :func:`fcn.train.train`.

Process plumbing only: Hydra, ``torchrun`` and SLURM process groups, the run directory and its
lock, signals (exit 128 + signal, with the resume command) and a search's failed trials. The run
itself, read from the composed config, is :mod:`fcn.train`.

torch is imported only once a run starts (:mod:`fcn.train` inside :func:`_run_job`): ``--help``
and ``--cfg job`` answer before it loads (seconds on a busy machine).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fcn.cli import CONFIG_DIR, hydra_run_dir, multirun  # hydra_run_dir registers ${fcn.claim_dir:...}
from fcn.cli.exit import exit_on_user_error
from fcn.cli.info import asks_for_info
from fcn.cli.suggest import suggest_keys
from fcn.errors import UserError
from fcn.signals import GracefulStop, TrainingInterrupted

log = logging.getLogger(__name__)


@suggest_keys("train")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> float:
    """Hydra entry point of one process; returns the best val mIoU (for sweepers)."""
    from fcn import distributed

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    # One task of a job started by the submitit launcher (SLURM's variables, or torchrun's set by the
    # launcher on this machine): every task runs this same Hydra job, in the same directory.
    launcher_task = distributed.adopt_slurm_environment() or distributed.launched_by_torchrun()
    if launcher_task and not distributed.is_initialized():
        with distributed.process_group():
            return _run_job(cfg, hydra_dir, tell_other_ranks=False)
    # Under torchrun the other ranks wait in main(), before their Hydra starts, for rank 0's directory.
    return _run_job(cfg, hydra_dir, tell_other_ranks=distributed.world_size() > 1)


def _run_job(cfg: DictConfig, hydra_dir: Path, tell_other_ranks: bool) -> float:
    """Train in the run directory until done or stopped by a signal (exit 128 + its number, after
    printing the command that resumes, and after submitit's requeue where it sent the signal); in a
    search, a user's mistake becomes a failed trial."""
    from fcn import distributed
    from fcn.train import train

    failed = None
    # Locked while it runs; a resume without hydra.run.dir continues in the resumed run's directory.
    with hydra_run_dir.run_directory(cfg, hydra_dir, distributed.is_main()) as run_dir:
        if tell_other_ranks and distributed.is_main():
            distributed.broadcast_object(str(run_dir))
        with GracefulStop(also=multirun.requeue_signals(), exits=True) as stop:
            try:
                return train(cfg, run_dir, stop)["miou"]
            except TrainingInterrupted as exc:
                command = hydra_run_dir.resume_command(run_dir)
                log.warning("%s; saved %s. Resume with:\n  %s", exc, exc.checkpoint, command)
                signum = exc.signum
            except UserError as exc:
                if not multirun.failures_go_on():
                    raise
                failed = str(exc)  # raised below, outside this handler, so it is not a UserError's exit 2
    if failed is not None:  # one trial of a search: recorded as failed, the search goes on
        raise multirun.JobFailed(failed)
    multirun.hand_over_to_submitit(signum)  # under submitit: requeue with resume=auto
    sys.exit(128 + signum)


def main() -> None:
    """``fcn-train`` / ``python scripts/train.py``: a plain run, or one process of a ``torchrun`` job.

    Under torchrun every process runs Hydra, which would give each its own timestamped run
    directory (and its own copy of the config and log). So the processes join their process group
    first; rank 0 runs Hydra as usual and sends its run directory to the others, which then run in
    that directory, writing neither ``.hydra/`` nor a log file, and printing only warnings.
    """
    from fcn.process import start_process

    start_process()  # fcn-train starts here (scripts/train.py has called it already: a no-op then)
    argv = sys.argv[1:]
    if asks_for_info(argv):  # no process group for a command that only prints
        with hydra_run_dir.print_only():  # no run directory is made for a command that only prints
            hydra_main()  # before importing torch (fcn.distributed): --help answers in a second
        return
    hydra_run_dir.check_pinned_run_dir(argv)  # a fresh run never takes a directory holding checkpoints
    from fcn import distributed

    distributed.adopt_slurm_environment()  # `srun python scripts/train.py`: SLURM's tasks join as torchrun's would
    if not distributed.launched_by_torchrun():
        hydra_main()
        return
    if any(a in ("-m", "--multirun") for a in argv):
        print("error: a sweep (-m) cannot run under torchrun; launch one torchrun per setting", file=sys.stderr)
        sys.exit(2)
    with distributed.process_group():
        if not distributed.is_main():
            sys.argv.extend(_other_rank_overrides(distributed.broadcast_object(None), distributed.rank()))
        hydra_main()


def _other_rank_overrides(run_dir: str, rank: int) -> list[str]:
    """Hydra overrides for a rank other than 0: rank 0's run directory, no second ``.hydra/`` or
    log file there, console output for warnings only, each line marked with the rank."""
    quoted = "'" + run_dir.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [
        f"hydra.run.dir={quoted}",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
        f"hydra.job_logging.formatters.simple.format='[rank {rank}][%(levelname)s] - %(message)s'",
    ]


if __name__ == "__main__":
    main()
