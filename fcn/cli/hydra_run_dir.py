"""The training entry point's run directory, on the Hydra side: claimed exclusively, never
overwritten, resumed where it is, removed again when a command fails before writing anything
of value. The rules themselves (plain arguments, no Hydra) are in :mod:`fcn.rundir` and :mod:`fcn.resume`.

- ``${fcn.claim_dir:PATH}`` (configs/train.yaml, ``hydra.run.dir``) makes the default run
  directory with an atomic ``mkdir`` before Hydra writes into it (:func:`claim_run_dir`).
- A pinned ``hydra.run.dir=DIR`` is checked before Hydra rewrites ``DIR/.hydra/``
  (:func:`check_pinned_run_dir`).
- :func:`run_directory` wraps one run: it moves a ``resume=`` without a pinned directory into
  the run it continues, locks the directory, and cleans up after a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fcn import rundir
from fcn.errors import UserError

log = logging.getLogger(__name__)

_CLAIMED: dict[str, str] = {}  # the run directory this process made: {path asked for: path made}
_MADE_BEFORE_HYDRA: set[str] = set()  # pinned run directories that did not exist before this command
_HYDRA_FILES_BEFORE: dict[Path, bytes] = {}  # a pinned existing run's .hydra/ files, put back if this command fails
_PRINT_ONLY: list[bool] = []  # non-empty inside print_only(): --help, --cfg ... run no job and claim nothing


@contextlib.contextmanager
def print_only() -> Iterator[None]:
    """Within this block the command only prints (``--help``, ``--cfg hydra --resolve``, ...): the
    resolver names the run directory without making it. The flag ends with the block, so a later
    command in the same process (a test, a notebook) claims its directory as usual."""
    _PRINT_ONLY.append(True)
    try:
        yield
    finally:
        _PRINT_ONLY.pop()


def claim_run_dir(path: str) -> str:
    """Resolver ``${fcn.claim_dir:PATH}``: make a new run directory atomically, ``PATH`` or
    ``PATH_1``, ... once per process (Hydra may resolve ``hydra.run.dir`` more than once)."""
    if _PRINT_ONLY:
        return path
    if path not in _CLAIMED:
        _CLAIMED[path] = str(rundir.claim_run_dir(path).resolve())
    return _CLAIMED[path]


OmegaConf.register_new_resolver("fcn.claim_dir", claim_run_dir, replace=True)


def created_here(run_dir: Path) -> bool:
    """Whether this command made ``run_dir`` (so it may remove it again after a failure)."""
    return str(Path(run_dir).resolve()) in set(_CLAIMED.values()) | _MADE_BEFORE_HYDRA


def check_pinned_run_dir(argv: list[str]) -> None:
    """``hydra.run.dir=DIR`` on the command line ``argv``, before Hydra writes ``.hydra/`` there.

    Rank 0 makes and locks ``DIR`` (:func:`fcn.rundir.claim_pinned_run_dir`; a run holding it ends this
    command, nothing touched). A fresh run (no ``resume=``) into a directory holding checkpoints ends
    with one line and exit code 2. A directory that did not exist is noted as made by this command;
    an existing run's ``.hydra/`` files are kept, to be put back if the command fails.
    """
    pinned = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not pinned or any(a in ("-m", "--multirun") for a in argv):
        return
    run_dir = Path(pinned[-1].strip("'\"")).expanduser()
    resume = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("resume=")]
    try:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        if rank == "0" and rundir.claim_pinned_run_dir(run_dir):  # locked before Hydra writes there
            _MADE_BEFORE_HYDRA.add(str(run_dir.resolve()))
        if (run_dir / ".hydra").is_dir():  # Hydra rewrites them before our checks; a refused command puts them back
            _HYDRA_FILES_BEFORE.update({p: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")})
        if not resume or resume[-1] in ("", "null", "None"):
            rundir.refuse_fresh_start(run_dir)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def run_directory(cfg: DictConfig, hydra_dir: Path, main_rank: bool) -> Iterator[Path]:
    """The directory this process's run writes into, locked while it runs (rank 0 only).

    Usually Hydra's ``hydra_dir``; a ``resume=`` without a pinned ``hydra.run.dir`` continues in
    the directory of the run it resumes (:func:`_run_dir_to_resume`). A command that fails before
    writing anything of value leaves no directory behind (never one holding a checkpoint, never
    one it did not make) and puts back the ``.hydra/`` files of a pinned run it was refused;
    an interrupted run (exit 128 + signal) keeps everything.
    """
    run_dir, lock, held_by_other = hydra_dir, None, False
    try:
        if main_rank:
            run_dir = _run_dir_to_resume(cfg, hydra_dir)
            held_by_other = True  # until locked: that run's files are not this command's to clean up
            lock = rundir.acquire_lock(run_dir)  # one run per directory (a pinned one is locked already)
            held_by_other = False
        yield run_dir
    except BaseException as exc:
        interrupted = isinstance(exc, SystemExit) and exc.code not in (None, 0, 2)
        if main_rank and not interrupted and not held_by_other:
            if created_here(run_dir):
                rundir.remove_failed_run(run_dir)
            for path, content in _HYDRA_FILES_BEFORE.items():  # the directory's config describes what ran
                if path.parent.parent.resolve() == hydra_dir.resolve():
                    path.write_bytes(content)
        raise
    finally:
        if lock is not None:
            rundir.release_lock(lock)


def resume_command(run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir``: this command's program and
    overrides, with ``resume=auto hydra.run.dir=<run_dir>``."""
    argv0 = Path(sys.argv[0])
    program = f"python {shlex.quote(sys.argv[0])}" if argv0.suffix == ".py" else argv0.name
    from fcn import resume  # torch: not before a run starts (--help answers without it)

    return resume.resume_command(program, list(HydraConfig.get().overrides.task), run_dir)


def _run_dir_to_resume(cfg: DictConfig, run_dir: Path) -> Path:
    """Without a pinned ``hydra.run.dir``, ``resume=auto`` continues the newest unfinished run of
    the same config under the outputs root, and ``resume=RUN_DIR`` continues that run, each in its
    own directory; the directory just made for this command is removed. Otherwise ``run_dir``."""
    if not cfg.resume or str(run_dir.resolve()) not in _CLAIMED.values():
        return run_dir
    from fcn import resume  # torch: not before a run starts (--help answers without it)

    if cfg.resume == "auto":
        config = OmegaConf.to_container(cfg, resolve=True)
        found = resume.find_unfinished_runs(run_dir.parent, config, exclude=run_dir)
        if not found:
            raise UserError(
                f"resume=auto: no hydra.run.dir given and no unfinished run of this config under {run_dir.parent}; "
                "continue a run with resume=<its run directory>, or start a fresh run without resume="
            )
        target = found[0]
        log.warning("resume=auto: continuing the newest unfinished run of this config, %s", target)
    elif Path(cfg.resume).is_dir():
        target = Path(cfg.resume)
        resume.resume_source(str(cfg.resume), target)  # a directory with no checkpoint: one line, here
    else:
        return run_dir  # resume=CHECKPOINT: a new run directory continues from it
    _move_file_logs(run_dir, target)
    rundir.remove_failed_run(run_dir)
    return target.resolve()


def _move_file_logs(src: Path, dst: Path) -> None:
    """Point the log file handlers writing into ``src`` at the same file names in ``dst`` (appending)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == src.resolve():
            moved = logging.FileHandler(dst / Path(handler.baseFilename).name, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
