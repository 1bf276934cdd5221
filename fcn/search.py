"""A hyperparameter search on Optuna: the space, the study, the trials' pruning and the summary.

Each trial samples a value for every key of the search space, trains with those values as
command-line overrides (through ``train_trial``, which :mod:`fcn.cli.search` wires to
:func:`fcn.train.train` in the trial's own run directory) and reports every validation's val mIoU
to Optuna, whose pruner stops a trial that falls behind the others at the same epoch. The study
lives in a storage (SQLite in the study's directory by default, any database URL, or Optuna's
journal file), so a stopped search continues where it was and several workers share one study.

Everything here takes plain values; the Hydra side (composing each trial's config, the process,
signals, exit codes) is :mod:`fcn.cli.search`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import socket
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.engine
import sqlalchemy.exc  # Optuna's database layer: its errors name a bad storage URL
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fcn.config import LOSS_SETTINGS, SETTINGS, Setting
from fcn.errors import UserError

log = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"  # in each trial's run directory: its number, state, value, parameters
SUMMARY_COLUMNS = ("trial", "state", "value", "params", "minutes", "epochs", "run_dir", "note")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count towards search.n_trials
_TYPES = ("float", "int", "categorical")
_WORKER = "worker"  # user attribute of a trial: "host:pid" of the process running it

# train_trial(overrides, run_dir, on_validation) -> the best validation metrics ({"miou": ...});
# on_validation(epoch, metrics) is called after every validation and may raise optuna.TrialPruned.
TrainTrial = Callable[[list[str], Path, Callable[[int, dict], None]], dict]


@dataclass(frozen=True)
class SearchSettings:
    """One search, as ``configs/search/default.yaml`` describes it (the ``search`` node, plain).

    ``space`` maps each sampled key (a dotted training key or a config group) to its Optuna
    distribution (:func:`parse_space`); ``base_overrides`` are the command's training overrides,
    which every trial shares (and the printed best command repeats); ``epochs``: each trial's
    ``trainer.epochs`` (Hyperband's largest budget); ``worker``: ``search.worker``, which gives each
    worker of a seeded study its own random stream (:func:`sampler_seed`).
    """

    name: str
    dir: Path
    n_trials: int
    space: dict[str, BaseDistribution]
    direction: str = "maximize"
    storage: str | None = None
    seed: int | None = None
    n_startup_trials: int = 4
    pruner: str = "median"
    pruner_startup_trials: int = 2
    pruner_warmup_epochs: int = 1
    epochs: int = 1
    base_overrides: tuple[str, ...] = field(default_factory=tuple)
    worker: int = 0


# --- The space -------------------------------------------------------------------------------------


def space_leaves(space: Mapping, prefix: str = "") -> dict[str, dict]:
    """The distributions of a nested space mapping by dotted key: a node with a ``type`` is a
    leaf (``{"optim": {"lr": {"type": "float", ...}}}`` -> ``{"optim.lr": {...}}``)."""
    leaves: dict[str, dict] = {}
    for key, node in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(node, Mapping) and "type" not in node and node:
            leaves.update(space_leaves(node, f"{dotted}."))
        else:
            leaves[dotted] = node
    return leaves


def parse_space(space: Mapping, keys: set[str], groups: Mapping[str, list[str]]) -> dict[str, BaseDistribution]:
    """Check the space and turn each leaf into an Optuna distribution.

    ``space``: the plain ``search.space`` mapping (nested by key, see :func:`space_leaves`);
    ``keys``: every dotted key of the composed training config; ``groups``: each config group's
    options (``{"aug": ["default", "light", "none"], ...}``), a group being sampled by option.
    Raises :class:`UserError` with one line naming ``search.space.<key>`` for an unknown key, an
    unknown type, an empty range (low >= high), a log range that reaches 0 or below, a range
    whose bounds are not numbers (whole ones for ``int``), a step that is not a positive number
    or comes with ``log``, empty choices, a group option that does not exist, or a value the
    key's setting refuses (:data:`fcn.config.SETTINGS`): every choice, and both ends of a
    range (its step grid's last value for the upper one), as the trial would read them from the
    command line; before any trial runs.
    """
    if not space:
        raise UserError(
            "search.space is empty: give at least one key, e.g. '+search.space.optim.lr={type:float,"
            "low:1e-4,high:1e-2,log:true}'"
        )
    distributions: dict[str, BaseDistribution] = {}
    for key, spec in space_leaves(space).items():
        name = f"search.space.{key}"
        if key not in keys and key not in groups:
            raise UserError(
                f"{name}: no key {key} in the training config (and no config group of that name); "
                "sample a key that python scripts/train.py --cfg job shows, or a group such as aug"
            )
        if not isinstance(spec, Mapping) or spec.get("type") not in _TYPES:
            kind = spec.get("type") if isinstance(spec, Mapping) else spec
            raise UserError(
                f"{name}: type {kind} is not one of {', '.join(_TYPES)}: give e.g. "
                f"{name}={{type:float,low:0.001,high:0.1,log:true}}"
            )
        if key in groups and spec["type"] != "categorical":
            raise UserError(
                f"{name}: {key} is a config group: sample it as {{type:categorical,choices:[{','.join(groups[key])}]}}"
            )
        distributions[key] = _distribution(name, dict(spec), groups.get(key))
        if (setting := _setting(key)) is not None:
            _check_values(name, key, distributions[key], setting, spec.get("high"))
    return distributions


_FIELDS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}


def _distribution(name: str, spec: dict, options: list[str] | None) -> BaseDistribution:
    fields = _FIELDS[spec["type"]]
    if unknown := [f for f in spec if f not in (*fields, "type")]:
        raise UserError(
            f"{name}.{unknown[0]}: not a field of a {spec['type']} distribution: drop it; "
            f"a {spec['type']} distribution has {', '.join(fields)}"
        )
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{name}.choices is empty: give a list of at least one value, e.g. choices: [a, b]")
        if options is not None and (unknown := [c for c in choices if str(c) not in options]):
            raise UserError(
                f"{name}.choices: no option {unknown[0]} in the {name.split('.', 2)[2]} group: "
                f"give options it has ({', '.join(options)})"
            )
        return CategoricalDistribution(choices)
    low, high, log_scale, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
    whole = spec["type"] == "int"
    for bound, value in (("low", low), ("high", high), ("step", step)):
        if bound == "step" and value is None:
            continue  # no step: every value of the range (every whole one for int)
        number = isinstance(value, int) if whole else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not math.isfinite(value):
            what = "a whole number" if whole else "a finite number"
            raise UserError(f"{name}.{bound}={value}: must be {what}: give e.g. {name}.{bound}={1 if whole else 0.1}")
    if low >= high:
        raise UserError(f"{name}: empty range low={low} >= high={high}: give low < high")
    if log_scale and low <= 0:
        raise UserError(f"{name}: a log range must stay above 0 (low={low}): give low > 0, or log: false")
    if step is not None and step <= 0:
        raise UserError(f"{name}.step={step}: must be above 0: give a positive step, or drop step")
    if step is not None and log_scale and not (whole and step == 1):
        raise UserError(f"{name}: step={step} and log: true cannot go together (Optuna): drop step, or log")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a range that is not a whole number of steps: its grid's last value is high
        if whole:
            return IntDistribution(int(low), int(high), log=log_scale, step=int(step or 1))
        return FloatDistribution(float(low), float(high), log=log_scale, step=None if step is None else float(step))


def _setting(key: str) -> Setting | None:
    """The declaration of training key ``key``: :data:`~fcn.config.SETTINGS`, or a loss
    node's (``loss.label_smoothing``, ``loss.losses.0.top_k``); None for a key declared nowhere."""
    if key in SETTINGS:
        return SETTINGS[key]
    parts = key.split(".")
    in_loss = parts[0] == "loss" and all(p == "losses" or p.isdigit() for p in parts[1:-1])
    return LOSS_SETTINGS.get(parts[-1]) if in_loss and len(parts) > 1 else None


def _check_values(name: str, key: str, distribution: BaseDistribution, setting: Setting, high: Any) -> None:
    """Every value ``distribution`` can give ``key`` is one its ``setting`` accepts: each choice;
    a range's two ends (the settings' ranges are intervals, so the values between follow), the
    upper one being the step grid's last value where the range given (``high``) is not a whole
    number of steps."""
    if isinstance(distribution, CategoricalDistribution):
        for choice in distribution.choices:
            if not setting.accepts(_as_written(key, choice)):
                raise UserError(
                    f"{name}.choices: {_text(choice)} is not a value of {key}, which must be {setting.allowed()}; "
                    f"drop {_text(choice)} from the choices"
                )
        return
    ends = (("low", distribution.low), ("high", distribution.high))
    for bound, value in ends:
        if setting.accepts(_as_written(key, value)):
            continue
        where = f"{name}.{bound}={_text(high if bound == 'high' and value == high else value)}"
        if bound == "high" and value != high:
            where = f"{name}: the step grid's last value {_text(value)} (high={high}, step={distribution.step})"
        whole = setting.kind == "int" and isinstance(distribution, FloatDistribution)
        hint = "sample it with type: int" if whole else f"give a {bound} that {key} accepts"
        raise UserError(f"{where}: {key} must be {setting.allowed()}; {hint}")


def _as_written(key: str, value: Any) -> Any:
    """``value`` as the trial's training config reads it: through its command-line override."""
    try:
        return OverridesParser.create().parse_override(override(key, value)).value()
    except OverrideParseException:  # a value Hydra cannot read back: checked as it is
        return value


def _text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else "null" if value is None else str(value)


def suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    """The trial's value for ``key`` from ``distribution`` (Optuna's public ``suggest_*``)."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    return trial.suggest_float(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def override(key: str, value: Any) -> str:
    """One command-line override for a sampled value: ``optim.lr=0.0012``, ``aug=light``."""
    text = "true" if value is True else "false" if value is False else "null" if value is None else repr(value)
    return f"{key}={text if not isinstance(value, str) else value}"


# --- The study -------------------------------------------------------------------------------------


def storage_url(storage: str | None, study_dir: Path) -> str:
    """The storage as it is written: ``sqlite:///<study_dir>/study.db`` for None, else as given."""
    return f"sqlite:///{study_dir / 'study.db'}" if storage is None else storage


def open_storage(storage: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    """Optuna's storage: ``journal:PATH`` is a journal file (workers on a shared file system,
    where SQLite's locks are unreliable); anything else a database URL, with a heartbeat so a
    trial whose worker died (killed, a lost node) is marked failed and retried once."""
    url = storage_url(storage, study_dir)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:")).expanduser()
        _make_parent(url, path)
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            reason = exc.strerror or exc
            raise UserError(f"search.storage={url}: cannot open {path} ({reason}); give a file you can write") from exc
    check_storage(url, study_dir)
    if url.startswith("sqlite:///"):
        _make_parent(url, Path(url.removeprefix("sqlite:///")).expanduser())
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # workers wait for the lock
    # A stale trial is retried once, with the same parameters (Optuna 4.9 renamed the callback).
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat: since 2.8
            if retry is not None:
                stale = {"heartbeat_stale_trial_callback": retry(max_retry=1)}
            else:
                stale = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=60, grace_period=300, **stale
            )
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:  # no driver, a bad URL, no database
        raise _cannot_open(url, exc, study_dir) from exc


def check_storage(storage: str | None, study_dir: Path) -> None:
    """What can be checked of a storage without opening it (nothing is written): a database URL
    names a dialect SQLAlchemy knows and whose driver is installed. Raises :class:`UserError`."""
    url = storage_url(storage, study_dir)
    if url.startswith("journal:"):
        return
    if "://" not in url:
        raise UserError(
            f"search.storage={url}: give a database URL (sqlite:///PATH, postgresql://...), "
            "journal:PATH, or null for SQLite in the study's directory"
        )
    try:
        dialect = sqlalchemy.engine.make_url(url).get_dialect()
        # the driver (mysql:// needs MySQLdb, postgresql:// psycopg); SQLAlchemy 1.4 names the import dbapi
        (dialect.import_dbapi if hasattr(dialect, "import_dbapi") else dialect.dbapi)()
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise _cannot_open(url, exc, study_dir) from exc


def _cannot_open(url: str, exc: Exception, study_dir: Path) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"search.storage={url}: Optuna cannot open it ({first}); give sqlite:///PATH, a database URL whose driver "
        f"is installed (pip install it), journal:PATH, or null for SQLite in {study_dir}"
    )


def _make_parent(url: str, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"search.storage={url}: cannot make the directory {path.parent} ({exc.strerror}); "
            "give a path in a directory you can write"
        ) from exc


def make_sampler(seed: int | None, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """TPE; with several workers a running trial's parameters count as already tried
    (``constant_liar``), so workers do not all propose the same point."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)


def sampler_seed(seed: int | None, worker: int, trials: int) -> int | None:
    """The sampler's seed for one start of one worker of a study that holds ``trials`` trials.

    ``seed`` itself for worker 0 of a fresh study, so a fresh seeded search repeats exactly;
    otherwise a seed drawn from (``seed``, ``worker``, ``trials``): a continued search, or another
    worker, never restarts a random stream an earlier start used (its start-up trials would repeat
    the values of finished ones). None (no seed) stays None."""
    if seed is None:
        return None
    if worker == 0 and trials == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker, trials]).generate_state(1)[0])


def make_pruner(name: str, startup_trials: int, warmup_epochs: int, epochs: int) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose val mIoU at an epoch is below the median of the earlier
    trials' at that epoch; ``hyperband``: successive halving over budgets of 1 .. ``epochs``
    epochs; ``none``: every trial runs to the end."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"search.pruner={name}: must be one of median, hyperband, none: give one of them")


def open_study(settings: SearchSettings, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The study of this name in ``storage``: made on the first start, loaded on any later
    start or by another worker (``load_if_exists``); its sampler seeded by :func:`sampler_seed`."""
    # Our log says what each trial did (a failed one in one line); Optuna's would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=settings.name,
        storage=storage,
        pruner=make_pruner(
            settings.pruner, settings.pruner_startup_trials, settings.pruner_warmup_epochs, settings.epochs
        ),
        direction=settings.direction,
        load_if_exists=True,
    )
    seed = sampler_seed(settings.seed, settings.worker, len(study.get_trials(deepcopy=False)))
    study.sampler = make_sampler(seed, settings.n_startup_trials)  # seeded by what the study holds already
    return study


def finished(study: optuna.Study) -> int:
    """Trials that count towards ``search.n_trials``: completed and pruned ones."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def retry_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Trials left RUNNING by a worker of this machine that no longer exists (killed without a
    chance to record anything): marked failed, each re-enqueued with the same parameters so it
    runs again first. A running trial of another machine is left to the storage's heartbeat
    (database storages) or listed as a warning (journal files). Returns the numbers retried."""
    retried, host = [], socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get(_WORKER, "")).rpartition(":")
        if worker_host != host or not pid.isdigit():
            log.warning(
                "trial %d is running on %s (another worker, or one lost with its machine)",
                trial.number,
                worker_host or "an unknown worker",
            )
            continue
        if _alive(int(pid)):
            continue
        note = f"its worker (pid {pid}) stopped without recording the trial (killed?); enqueued again"
        storage.set_trial_user_attr(trial._trial_id, "error", note)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        if "run_dir" in trial.user_attrs:
            _write_trial_file(Path(trial.user_attrs["run_dir"]), trial.number, "FAIL", None, trial.params, note)
        log.warning(
            "trial %d was left running by a stopped worker (pid %s): marked failed, enqueued again", trial.number, pid
        )
        retried.append(trial.number)
    return retried


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def trial_dir(study_dir: Path, number: int) -> Path:
    """A trial's run directory: ``<study dir>/trials/<number, 3 digits>``."""
    return study_dir / "trials" / f"{number:03d}"


def run_search(settings: SearchSettings, train_trial: TrainTrial) -> optuna.Study:
    """Run trials until the study holds ``settings.n_trials`` finished (completed or pruned) ones,
    counting those of earlier starts and of other workers; returns the study.

    Each trial: sample ``settings.space``, train through ``train_trial`` in
    :func:`trial_dir`, report every validation's val mIoU (``trial.report``, the epoch as the step)
    and stop when the pruner says so. A trial that fails on a user's kind of error (a diverged
    loss, out of memory for a sampled size) is recorded as failed and the search goes on; a
    signal's :class:`~fcn.signals.TrainingInterrupted` ends the search after the trial is
    recorded as failed and re-enqueued (the next start runs it again first).
    """
    from fcn.signals import TrainingInterrupted

    settings.dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(settings.storage, settings.dir)
    study = open_study(settings, storage)
    retry_dead_trials(study, storage)
    left = settings.n_trials - finished(study)
    if left <= 0:
        log.info(
            "study %s already has %d finished trials (search.n_trials=%d): nothing to run",
            settings.name,
            finished(study),
            settings.n_trials,
        )
        return study
    log.info(
        "study %s in %s: %d finished trials, running up to %d more",
        settings.name,
        storage_url(settings.storage, settings.dir),
        finished(study),
        left,
    )

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(_WORKER, f"{socket.gethostname()}:{os.getpid()}")
        params = {key: suggest(trial, key, dist) for key, dist in settings.space.items()}
        overrides = [override(k, v) for k, v in params.items()]
        run_dir = trial_dir(settings.dir, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        log.info("trial %d: %s (run directory %s)", trial.number, " ".join(overrides), run_dir)

        def on_validation(epoch: int, metrics: dict) -> None:
            trial.report(metrics["miou"], epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                _write_trial_file(
                    run_dir,
                    trial.number,
                    "PRUNED",
                    metrics["miou"],
                    params,
                    f"pruned after epoch {epoch}: val mIoU {metrics['miou']:.4f} behind the other trials",
                )
                log.info("trial %d pruned after epoch %d (val mIoU %.4f)", trial.number, epoch, metrics["miou"])
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        try:
            report = train_trial(list(settings.base_overrides) + overrides, run_dir, on_validation)
        except TrainingInterrupted as exc:
            trial.set_user_attr("error", f"interrupted by signal {exc.signum}")
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            _write_trial_file(
                run_dir,
                trial.number,
                "FAIL",
                None,
                params,
                f"interrupted by signal {exc.signum}; enqueued again for the next start",
            )
            raise
        except UserError as exc:
            trial.set_user_attr("error", str(exc))
            _write_trial_file(run_dir, trial.number, "FAIL", None, params, str(exc))
            log.warning("trial %d failed: %s", trial.number, exc)
            raise
        _write_trial_file(run_dir, trial.number, "COMPLETE", report["miou"], params, "")
        return report["miou"]

    # Stops every worker once the study holds n_trials finished trials (another worker's included);
    # n_trials=left bounds this start even if every trial fails.
    enough = optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED)
    study.optimize(objective, n_trials=left, callbacks=[enough], catch=(UserError,), gc_after_trial=True)
    return study


def check_some_finished(study: optuna.Study, summary: Path) -> None:
    """Raises :class:`UserError` naming the first failed trial's error and ``summary`` when the
    study holds failed trials and none that finished (completed or pruned)."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if failed and not finished(study):
        error = failed[0].user_attrs.get("error", "no message recorded")
        raise UserError(
            f"no trial of study {study.study_name} finished: all {len(failed)} failed (trial {failed[0].number}: "
            f"{error}); see {summary} and each trial's train.log, fix the cause and run the same command again"
        )


def _write_trial_file(run_dir: Path, number: int, state: str, value: float | None, params: dict, note: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"trial": number, "state": state, "value": value, "params": params, "note": note}
    (run_dir / TRIAL_FILE).write_text(json.dumps(record, indent=2) + "\n")


# --- The summary -----------------------------------------------------------------------------------


def summary_rows(study: optuna.Study) -> list[dict]:
    """One row per trial of the whole study, in trial order (columns :data:`SUMMARY_COLUMNS`)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        minutes = None
        if t.datetime_start is not None and t.datetime_complete is not None:
            minutes = round((t.datetime_complete - t.datetime_start).total_seconds() / 60, 2)
        note = t.user_attrs.get("error", "")
        if t.state == TrialState.PRUNED:
            note = f"pruned after epoch {t.user_attrs.get('pruned_at_epoch', t.last_step)}"
        elif "retry_of" in t.user_attrs:
            note = (note + "; " if note else "") + f"retry of trial {t.user_attrs['retry_of']}"
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": " ".join(override(k, v) for k, v in t.params.items()),
                "minutes": minutes,
                "epochs": len(t.intermediate_values),
                "run_dir": t.user_attrs.get("run_dir", ""),
                "note": note,
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows as an aligned console table (run directories left out: they are in the CSV)."""
    shown = ("trial", "state", "value", "minutes", "epochs", "params", "note")

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [list(shown)] + [[cell(r[c]) for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


def best_command(study: optuna.Study, base_overrides: tuple[str, ...] | list[str]) -> str | None:
    """The training command with the best completed trial's values: ``python scripts/train.py
    <the search's training overrides> <the best values>``; None before any trial completed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    overrides = [*base_overrides, *(override(k, v) for k, v in study.best_trial.params.items())]
    return shlex.join(["python", "scripts/train.py", *overrides])


def save_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNG files in ``out_dir``.
    Importances need two completed trials; with fewer (or a single-valued space) they are left
    out, with a log line. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("optimization_history.png", optuna_plots.plot_optimization_history)]
    if len(complete) >= 2:
        plots.append(("param_importances.png", optuna_plots.plot_param_importances))
    else:
        log.info("parameter importances need two completed trials (%d so far): no param_importances.png", len(complete))
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" warnings of Optuna's matplotlib plots
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.tight_layout()
            figure.savefig(out_dir / name, dpi=100)
            plt.close(figure)
            written.append(out_dir / name)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of parameters that never varied
            log.info("no %s: %s", name, exc)
    return written


def write_summary(study: optuna.Study, settings: SearchSettings) -> tuple[Path, str]:
    """``summary.csv`` in the study's directory (every trial of the study), the plots, and the
    text to print: the table, the best trial, its command, the files and the dashboard command."""
    rows = summary_rows(study)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = settings.dir / "summary.csv"
    path.write_text(text.getvalue())
    lines = [f"\nstudy {settings.name} ({path}):", format_rows(rows)]
    counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n))
    command = best_command(study, settings.base_overrides)
    if command is not None:
        best = study.best_trial
        lines.append(f"best: trial {best.number}, val mIoU {best.value:.4f}; train with it:\n  {command}")
    for plot in save_plots(study, settings.dir):
        lines.append(f"plot: {plot}")
    url = storage_url(settings.storage, settings.dir)
    dashboard = url.removeprefix("journal:")
    lines.append(f"live view: pip install optuna-dashboard && optuna-dashboard {shlex.quote(dashboard)}")
    return path, "\n".join(lines)
