"""``fcn-search`` / ``python scripts/search.py``: the process around :func:`fcn.search.run_search`.

Process plumbing only: Hydra (the ``search`` config: ``train.yaml`` plus the ``search`` group),
each trial's config composed as ``train.py`` would compose it from the command's training
overrides plus the trial's sampled ones, the trial's run directory (``.hydra/``, its own
``train.log``, the lock), signals (exit 128 + signal, with the command that continues) and exit
codes. The study itself (space, storage, pruning, summary) is :mod:`fcn.search`.

Every check happens before Hydra writes into the study's directory (:class:`SearchCallback`), so a
refused command leaves nothing; no directory outside ``search.dir`` is ever made.

Several workers of one study are several processes with the same ``search.name`` and
``search.storage``; ``-m search.worker=0,1,2,3 hydra/launcher=slurm`` starts them as SLURM jobs.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from fcn.cli import CONFIG_DIR, hydra_run_dir, multirun
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_settings, dotted_keys, validate_train_config
from fcn.errors import UserError

if TYPE_CHECKING:
    from fcn.search import SearchSettings

log = logging.getLogger(__name__)


@suggest_keys("search")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="search")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point of one worker; returns the study's best val mIoU (None before any trial completed)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(
            "a search runs one process per worker, not under torchrun or in a job of several tasks: start "
            "several workers instead (same search.name and search.storage), e.g. -m search.worker=0,1,2,3"
        )
    from fcn import search
    from fcn.signals import GracefulStop, TrainingInterrupted

    settings = search_settings(cfg, list(HydraConfig.get().overrides.task))
    with GracefulStop(also=multirun.requeue_signals(), exits=True) as stop:
        try:
            study = search.run_search(settings, lambda o, d, v: train_trial(o, d, v, stop))
        except TrainingInterrupted as exc:
            command = continue_command()
            log.warning("%s: the trial is recorded as failed and runs again first. Continue with:\n  %s", exc, command)
            multirun.hand_over_to_submitit(exc.signum)  # under submitit: requeued, then continues the study
            sys.exit(128 + exc.signum)
    summary, text = search.write_summary(study, settings)
    print(text)
    search.check_some_finished(study, summary)  # every trial failed: exit 2, not a "best" of nothing
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return study.best_value if complete else None


def search_settings(cfg: DictConfig, task_overrides: list[str]) -> SearchSettings:
    """The search the composed ``search`` config ``cfg`` and the command's overrides describe, with
    every check made before the first trial: each ``search.*`` and training value (one line naming
    the key), the training config every trial starts from, and the space (each value it can give
    checked against the key's setting, :func:`fcn.search.parse_space`). Raises :class:`UserError`."""
    try:
        import optuna  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f'the search needs Optuna ({exc}): pip install -e ".[search]" (optuna >= 4, matplotlib)'
        ) from exc
    from fcn import search

    check_settings(cfg)  # search.* and every training value: one line naming the key
    overrides = training_overrides(task_overrides)
    base = hydra.compose("train", overrides=overrides)
    validate_train_config(base)  # a bad training value ends here, before any trial
    space = OmegaConf.to_container(cfg.search.space, resolve=True)
    groups = {key: _group_options(key) for key in search.space_leaves(space or {}) if "." not in key}
    _refuse_fixed_and_searched(overrides, search.space_leaves(space or {}))
    search.check_storage(cfg.search.storage, Path(cfg.search.dir))  # a URL without its driver: before Hydra writes
    return search.SearchSettings(
        name=cfg.search.name,
        dir=Path(cfg.search.dir),
        n_trials=cfg.search.n_trials,
        space=search.parse_space(space or {}, set(dotted_keys(base)), {k: v for k, v in groups.items() if v}),
        direction=cfg.search.direction,
        storage=cfg.search.storage,
        seed=cfg.search.sampler.seed,
        n_startup_trials=cfg.search.sampler.n_startup_trials,
        pruner=cfg.search.pruner,
        pruner_startup_trials=cfg.search.pruner_startup_trials,
        pruner_warmup_epochs=cfg.search.pruner_warmup_epochs,
        epochs=base.trainer.epochs,
        base_overrides=tuple(overrides),
        worker=cfg.search.worker,
    )


class SearchCallback(Callback):
    """Hydra callback of the search (``configs/search/base/callbacks.yaml``).

    Run: every check of :func:`search_settings` before Hydra makes the study's directory or
    writes ``.hydra/`` and ``search.log`` there, so a refused command leaves nothing, and a
    continued study's directory stays as it was. Multirun: Hydra's config is set from the start
    (as a run sets it before reading ``hydra.run.dir``), so the sweep directory,
    ``${hydra:..search.dir}/workers``, resolves; ``search.dir`` is read through Hydra's config so
    that ``--cfg hydra --resolve``, which shows the ``hydra`` node alone, resolves it too.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_before_writing(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        OmegaConf.set_readonly(config.hydra, None)  # set_config made it read-only; the sweeper still fills it in
        _refuse_before_writing(config)  # what every worker shares; each checks its own swept values again


@exit_on_user_error
def _refuse_before_writing(config: DictConfig) -> None:
    parser = OverridesParser.create()
    plain = [o for o in config.hydra.overrides.task if not parser.parse_override(o).is_sweep_override()]
    try:
        search_settings(config, plain)
    except (ConfigAttributeError, ConfigKeyError):
        return  # a key removed with ~KEY: the task names the override, once Hydra's job config is set


def _refuse_fixed_and_searched(overrides: list[str], leaves: dict) -> None:
    """A key both given on the command line and sampled would leave each trial two values for it."""
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key in leaves:
            raise UserError(
                f"{key} is both given on the command line ({item}) and searched (search.space.{key}): "
                f"drop {item}, or stop searching it with ~search.space.{key}"
            )


def train_trial(overrides: list[str], run_dir: Path, on_validation: Callable[[int, dict], None], stop) -> dict:
    """One trial's training run, as ``python scripts/train.py <overrides> hydra.run.dir=<run_dir>``
    would do it: the config composed from ``train.yaml``, ``.hydra/`` and ``train.log`` in the run
    directory, the directory locked, TensorBoard events and checkpoints there; while it runs,
    Hydra's job config is the trial's (its overrides are what the run logs and what TensorBoard's
    HPARAMS tab shows). Returns :func:`fcn.train.train`'s report."""
    from fcn import rundir
    from fcn.train import train

    cfg = hydra.compose("train", overrides=overrides, return_hydra_config=True)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "train"
    _save_hydra_files(cfg, overrides, run_dir / ".hydra")
    search_hydra = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what the task sees, without hydra
    handler = _trial_log(run_dir / "train.log")
    lock = rundir.acquire_lock(run_dir)
    try:
        return train(task, run_dir, stop, on_validation)
    finally:
        rundir.release_lock(lock)
        logging.getLogger().removeHandler(handler)
        handler.close()
        HydraConfig.instance().cfg = search_hydra


def training_overrides(task: list[str]) -> list[str]:
    """The command's overrides that every trial trains with: all but ``search``'s, Hydra's own and
    ``resume=`` (a requeued worker continues the study, not a run)."""
    kept = []
    for item in task:
        key = item.lstrip("+~").split("=", 1)[0]
        if key in ("search", "resume") or key.startswith(("search.", "hydra.", "hydra/")):
            continue
        kept.append(item)
    return kept


def continue_command() -> str:
    """The command that continues this search: the same program and overrides."""
    argv0 = Path(sys.argv[0])
    program = ["python", sys.argv[0]] if argv0.suffix == ".py" else [argv0.name]
    return shlex.join([*program, *HydraConfig.get().overrides.task])


def _group_options(group: str) -> list[str]:
    return GlobalHydra.instance().config_loader().get_group_options(group)


def _save_hydra_files(cfg: DictConfig, overrides: list[str], hydra_dir: Path) -> None:
    """``config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` as Hydra writes them for a run: the
    trial's directory reads like one of ``train.py`` (resume, evaluate, :mod:`fcn.rundir`)."""
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), hydra_dir / "config.yaml")
    OmegaConf.save({"hydra": cfg.hydra}, hydra_dir / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")


def _trial_log(path: Path) -> logging.Handler:
    """The trial's own log file (the study's ``search.log`` keeps every trial's lines too)."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def main() -> None:
    """``fcn-search`` / ``python scripts/search.py``."""
    from fcn.process import start_process

    start_process()  # fcn-search starts here (scripts/search.py has called it already: a no-op then)
    # Every directory of a search is pinned (search.dir, its trials/NNN): train.yaml's run directory,
    # ${fcn.claim_dir:outputs/search/<time>}, which OmegaConf resolves while search.yaml's hydra.run.dir
    # is merged over it (once per composition), is never made.
    with hydra_run_dir.print_only():
        hydra_main()


if __name__ == "__main__":
    main()
