"""The hyperparameter search on Optuna (scripts/search.py, fcn/search.py): the space is checked before
any trial, trials that fall behind are pruned, a stopped search continues in the same storage, two
workers share one study. Trials are a few steps on the tiny shapes dataset."""

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from fcn.errors import UserError  # noqa: E402
from fcn.search import (  # noqa: E402
    SearchSettings,
    check_some_finished,
    open_storage,
    parse_space,
    retry_dead_trials,
    run_search,
    sampler_seed,
    summary_rows,
)
from tests.conftest import tiny_train_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = {"optim", "optim.lr", "optim.weight_decay", "model", "model.variant", "trainer", "trainer.epochs"}
GROUPS = {"aug": ["default", "light", "none"]}
# lr 0 keeps the initial model (every pixel background on shapes); 0.05 trains it off that plateau in
# 3 steps to a lower val mIoU: two clearly different trials, so the median pruner has something to prune.
TWO_LRS = ["~search.space", "+search.space.optim.lr={type:categorical,choices:[0.0,0.05]}"]
PRUNE_EARLY = ["search.pruner=median", "search.pruner_startup_trials=1", "search.pruner_warmup_epochs=0"]


def _search(args: list[str], cwd: Path, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-W", "ignore", str(REPO / "scripts" / "search.py"), *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _trial_overrides(shapes_root: Path) -> list[str]:
    # three epochs of three steps, no warm-up (the lr acts from the first step), no images or events
    return [*tiny_train_overrides(shapes_root), "trainer.epochs=3", "sched.warmup_steps=0", "logger=none"]


def _rows(study_dir: Path) -> list[dict]:
    with open(study_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# --- The space: every mistake is one line naming search.space.<key>, before any trial ----------------


@pytest.mark.parametrize(
    ("space", "named", "says"),
    [
        ({"optim": {"lrr": {"type": "float", "low": 0.1, "high": 1}}}, "search.space.optim.lrr", "no key optim.lrr"),
        ({"optim": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "search.space.optim.lr", "empty range"),
        ({"optim": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}}, "search.space.optim.lr", "empty range"),
        ({"optim": {"lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}}, "search.space.optim.lr", "log"),
        (
            {"trainer": {"epochs": {"type": "int", "low": -1, "high": 4, "log": True}}},
            "search.space.trainer.epochs",
            "above 0",
        ),
        (
            {"trainer": {"epochs": {"type": "int", "low": 1.5, "high": 4}}},
            "search.space.trainer.epochs.low",
            "whole number",
        ),
        ({"model": {"variant": {"type": "categorical", "choices": []}}}, "search.space.model.variant.choices", "empty"),
        ({"model": {"variant": {"type": "choice", "choices": ["8s"]}}}, "search.space.model.variant", "not one of"),
        (
            {"model": {"variant": {"type": "categorical", "values": ["8s"]}}},
            "search.space.model.variant.values",
            "not a field",
        ),
        ({"aug": {"type": "categorical", "choices": ["strong"]}}, "search.space.aug.choices", "no option strong"),
        ({"aug": {"type": "float", "low": 0, "high": 1}}, "search.space.aug", "config group"),
        ({}, "search.space", "empty"),
    ],
)
def test_a_bad_search_space_is_one_line_naming_its_key(space, named, says):
    with pytest.raises(UserError) as raised:
        parse_space(space, KEYS, GROUPS)
    message = str(raised.value)
    assert message.startswith(named) and says in message and "\n" not in message
    assert any(f"{verb} " in message for verb in ("give", "drop", "sample")), message  # and what to use instead


SETTINGS_KEYS = KEYS | {
    "optim.momentum",
    "trainer.batch_size",
    "trainer.precision",
    "trainer.compile",
    "loss.label_smoothing",
}


@pytest.mark.parametrize(
    ("space", "named", "value", "allowed"),
    [
        # a choice the setting refuses; every choice is checked, not only the first
        (
            {"model": {"variant": {"type": "categorical", "choices": ["8s", "2s"]}}},
            "search.space.model.variant.choices",
            "2s",
            "one of 32s, 16s, 8s, 4s",
        ),
        (
            {"trainer": {"precision": {"type": "categorical", "choices": ["fp32", "fp8"]}}},
            "search.space.trainer.precision.choices",
            "fp8",
            "one of auto, fp32, bf16, fp16",
        ),
        (
            {"trainer": {"compile": {"type": "categorical", "choices": [True, "maybe"]}}},
            "search.space.trainer.compile.choices",
            "maybe",
            "true or false",
        ),
        # an int range's low end, and its high end
        (
            {"trainer": {"batch_size": {"type": "int", "low": 0, "high": 8}}},
            "search.space.trainer.batch_size.low=0",
            "",
            "a whole number >= 1",
        ),
        (
            {"model": {"variant": {"type": "int", "low": 8, "high": 32}}},
            "search.space.model.variant.low=8",
            "",
            "one of 32s",
        ),
        # a float range reaching an open end, on a linear and on a log scale
        (
            {"optim": {"momentum": {"type": "float", "low": 0.8, "high": 1}}},
            "search.space.optim.momentum.high=1",
            "",
            "in [0, 1)",
        ),
        (
            {"optim": {"momentum": {"type": "float", "low": 0.5, "high": 1.0, "log": True}}},
            "search.space.optim.momentum.high=1.0",
            "",
            "in [0, 1)",
        ),
        (
            {"optim": {"lr": {"type": "float", "low": -0.1, "high": 0.1}}},
            "search.space.optim.lr.low=-0.1",
            "",
            ">= 0",
        ),
        # the step grid's last value, where the range is not a whole number of steps
        (
            {"optim": {"momentum": {"type": "float", "low": 0.5, "high": 1.0, "step": 0.25}}},
            "search.space.optim.momentum.high=1.0",
            "",
            "in [0, 1)",
        ),
        (
            {"trainer": {"batch_size": {"type": "int", "low": -3, "high": 9, "step": 4}}},
            "search.space.trainer.batch_size.low=-3",
            "",
            ">= 1",
        ),
        # fractions for a whole-number setting
        (
            {"trainer": {"batch_size": {"type": "float", "low": 1, "high": 8}}},
            "search.space.trainer.batch_size.low=1.0",
            "type: int",
            "a whole number >= 1",
        ),
        # a loss node's setting
        (
            {"loss": {"label_smoothing": {"type": "float", "low": 0.0, "high": 1.5}}},
            "search.space.loss.label_smoothing.high=1.5",
            "",
            "in [0, 1]",
        ),
    ],
)
def test_a_space_value_the_setting_refuses_is_one_line_naming_it_and_what_is_allowed(space, named, value, allowed):
    with pytest.raises(UserError) as raised:
        parse_space(space, SETTINGS_KEYS, GROUPS)
    message = str(raised.value)
    assert message.startswith(named) and value in message and allowed in message and "\n" not in message
    assert any(f"{verb} " in message for verb in ("give", "drop", "sample")), message


@pytest.mark.parametrize(
    "space",
    [
        {"optim": {"momentum": {"type": "float", "low": 0.5, "high": 1.0, "step": 0.2}}},  # the grid ends at 0.9
        {"optim": {"momentum": {"type": "float", "low": 0.5, "high": 0.99, "log": True}}},
        {"trainer": {"batch_size": {"type": "int", "low": 1, "high": 16, "log": True}}},
        {"trainer": {"batch_size": {"type": "int", "low": 2, "high": 8, "step": 2}}},
        {"trainer": {"compile": {"type": "categorical", "choices": [True, False]}}},
        {"model": {"variant": {"type": "categorical", "choices": ["32s", "16s", "8s", "4s"]}}},
        {"optim": {"lr": {"type": "categorical", "choices": [0, 0.05]}}},  # an int 0 for a float setting: allowed
    ],
)
def test_a_space_whose_every_value_the_settings_accept_is_taken(space):
    assert parse_space(space, SETTINGS_KEYS, GROUPS)


def test_a_stepped_range_samples_only_its_grid():
    space = {"trainer": {"batch_size": {"type": "int", "low": 2, "high": 9, "step": 3}}}
    distribution = parse_space(space, SETTINGS_KEYS, GROUPS)["trainer.batch_size"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = {study.ask({"trainer.batch_size": distribution}).params["trainer.batch_size"] for _ in range(30)}
    assert values == {2, 5, 8}


def test_a_good_space_becomes_optuna_distributions_by_dotted_key():
    space = {
        "optim": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "trainer": {"epochs": {"type": "int", "low": 1, "high": 4}},
        "aug": {"type": "categorical", "choices": ["none", "light"]},
    }
    found = parse_space(space, KEYS, GROUPS)
    assert found["optim.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert found["trainer.epochs"] == optuna.distributions.IntDistribution(1, 4)
    assert found["aug"] == optuna.distributions.CategoricalDistribution(["none", "light"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("search.space.optim.lr.low=0.1", "search.space.optim.lr: empty range low=0.1 >= high=0.01"),
        # a process each (seconds): the fast lane runs one, parse_space's test above covers every case
        pytest.param(
            "+search.space.optim.lrr={type:float,low:0.1,high:1}",
            "search.space.optim.lrr: no key optim.lrr",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "search.space.optim.lr.low=0",
            "search.space.optim.lr: a log range must stay above 0",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_entry_point_refuses_a_bad_space_with_exit_2_before_any_trial(override, named, tmp_path):
    proc = _search([f"search.dir={tmp_path / 'study'}", override], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"error: {named}")
    assert list(tmp_path.iterdir()) == []  # no study directory, nothing in the current one


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["search.space.model.variant.choices=[8s,2s]"],
            "error: search.space.model.variant.choices: 2s is not a value of model.variant, which must be one of "
            "32s, 16s, 8s, 4s; drop 2s from the choices",
        ),
        pytest.param(
            ["+search.space.optim.momentum={type:float,low:0.8,high:1}", "optim=sgd"],
            "error: search.space.optim.momentum.high=1: optim.momentum must be a finite number in [0, 1), or null; "
            "give a high that optim.momentum accepts",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["trainer.epochs=2.5"], "error: trainer.epochs=2.5: must be a whole number >= 1", marks=pytest.mark.slow
        ),
    ],
)
def test_a_refused_command_leaves_a_continued_study_as_it_was_and_writes_nothing_elsewhere(args, says, tmp_path):
    study = tmp_path / "study"
    (study / ".hydra").mkdir(parents=True)
    (study / ".hydra" / "config.yaml").write_text("search: {name: fcn}\n")
    (study / "search.log").write_text("the first start's log\n")
    before = _tree(study)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = _search([f"search.dir={study}", *args], cwd)
    assert proc.returncode == 2 and proc.stderr.strip() == says, proc.stderr[-2000:]
    assert _tree(study) == before and list(cwd.iterdir()) == []


@pytest.mark.parametrize("pinned", [True, False], ids=["search.dir", "default-dir"])
def test_a_refused_search_writes_nothing_in_the_current_directory(pinned, tmp_path):
    # ${now} resolved while the config is composed once made empty outputs/search/<time>/ folders here
    args = [f"search.dir={tmp_path / 'study'}"] if pinned else []
    proc = _search([*args, "trainer.epochs=2.5"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: trainer.epochs=2.5: must be a whole number >= 1"
    assert list(tmp_path.iterdir()) == []


def test_a_refused_multirun_of_workers_writes_nothing(tmp_path):
    proc = _search(["-m", "search.worker=0,1", f"search.dir={tmp_path / 'study'}", "trainer.epochs=2.5"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: trainer.epochs=2.5: must be a whole number >= 1"
    assert list(tmp_path.iterdir()) == []


def test_cfg_hydra_resolve_shows_the_study_directory_as_run_and_sweep_directory(tmp_path):
    proc = _search(["--cfg", "hydra", "--resolve", f"search.dir={tmp_path / 'study'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"dir: {tmp_path / 'study'}\n" in proc.stdout and f"dir: {tmp_path / 'study'}/workers\n" in proc.stdout
    proc = _search(["--cfg", "hydra", "--resolve", "search.name=mine"], tmp_path)
    assert proc.returncode == 0 and "dir: outputs/search/mine\n" in proc.stdout, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# --- Pruning and the study, with a stand-in for training ---------------------------------------------


def _settings(tmp_path: Path, **kw) -> SearchSettings:
    space = {"optim.lr": optuna.distributions.CategoricalDistribution([0.1, 0.2])}
    defaults = dict(
        name="t",
        dir=tmp_path / "study",
        n_trials=3,
        space=space,
        seed=0,
        pruner_startup_trials=1,
        pruner_warmup_epochs=0,
        epochs=3,
        base_overrides=("trainer.epochs=3",),
    )
    return SearchSettings(**{**defaults, **kw})


def test_every_validation_is_reported_and_a_trial_behind_the_median_is_pruned_with_a_note(tmp_path):
    calls = []

    def train_trial(overrides, run_dir, on_validation):
        calls.append(overrides)
        curve = [0.5, 0.6, 0.7] if len(calls) == 1 else [0.1, 0.2, 0.3]  # the later trials fall behind
        for epoch, miou in enumerate(curve, start=1):
            on_validation(epoch, {"miou": miou})
        return {"miou": max(curve)}

    study = run_search(_settings(tmp_path), train_trial)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"]
    assert study.trials[0].intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}
    assert study.trials[1].intermediate_values == {1: 0.1}  # stopped after its first validation
    assert all(c[0] == "trainer.epochs=3" and c[1].startswith("optim.lr=") for c in calls)
    note = json.loads((tmp_path / "study" / "trials" / "001" / "trial.json").read_text())
    assert note["state"] == "PRUNED" and "pruned after epoch 1" in note["note"]


def _record(calls):
    def train_trial(overrides, run_dir, on_validation):
        calls.append(tuple(overrides[1:]))  # the sampled values (the first is the shared trainer.epochs=3)
        on_validation(1, {"miou": 0.5})
        return {"miou": 0.5}

    return train_trial


def test_a_continued_seeded_search_never_repeats_a_trial_and_a_fresh_one_is_reproducible(tmp_path):
    space = {
        "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.variant": optuna.distributions.CategoricalDistribution(["32s", "16s", "8s"]),
    }
    first, again, fresh = [], [], []
    settings = _settings(tmp_path, space=space, seed=7, pruner="none", n_startup_trials=10)
    run_search(dataclasses.replace(settings, n_trials=3), _record(first))
    run_search(dataclasses.replace(settings, n_trials=6), _record(again))  # stopped, then started again
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 6 and len(set(params)) == 6 and len(first) == len(again) == 3
    other = dataclasses.replace(settings, dir=tmp_path / "fresh", n_trials=3)
    run_search(other, _record(fresh))
    assert fresh == first  # the same seed: the same first trials


def test_each_worker_and_each_start_of_a_seeded_study_draws_its_own_stream():
    assert sampler_seed(None, 0, 5) is None
    assert sampler_seed(3, 0, 0) == 3  # a fresh study, worker 0: the seed itself
    seeds = {sampler_seed(3, w, n) for w in range(3) for n in range(4)}
    assert len(seeds) == 12 and sampler_seed(3, 1, 2) == sampler_seed(3, 1, 2)


def test_a_trial_left_running_by_a_killed_worker_is_failed_and_enqueued_again(tmp_path):
    settings = _settings(tmp_path)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="t", storage=storage, direction="maximize")
    lost = study.ask({"optim.lr": settings.space["optim.lr"]})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lost.set_user_attr("worker", f"{socket.gethostname()}:{dead.stdout.strip()}")  # a process that has ended
    alive = study.ask({"optim.lr": settings.space["optim.lr"]})
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # this one still runs

    assert retry_dead_trials(study, storage) == [lost.number]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == {} and trials[2].system_attrs["fixed_params"] == lost.params
    assert trials[2].user_attrs["retry_of"] == lost.number
    assert "stopped without recording the trial" in trials[0].user_attrs["error"]  # the summary's note
    assert "stopped without recording" in summary_rows(study)[0]["note"]


def test_a_search_whose_every_trial_failed_is_an_error_naming_the_first_failure(tmp_path):
    def fails(overrides, run_dir, on_validation):
        raise UserError("loss became non-finite at step 3")

    study = run_search(_settings(tmp_path, n_trials=2), fails)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # n_trials bounds the attempts of a start
    with pytest.raises(UserError, match=r"all 2 failed \(trial 0: loss became non-finite at step 3\); see "):
        check_some_finished(study, tmp_path / "summary.csv")

    def trains(overrides, run_dir, on_validation):
        return {"miou": 0.5}

    study = run_search(_settings(tmp_path, n_trials=1), trains)  # the same study: one trial completes
    check_some_finished(study, tmp_path / "summary.csv")  # failures beside a finished trial: no error


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("bogus://x", "Optuna cannot open it (Can't load plugin"),
        ("mysql://u@localhost/db", "Optuna cannot open it"),
        ("sqlite:///{file}/study.db", "cannot make the directory"),
        ("journal:{file}/journal.log", "cannot make the directory"),
        ("journal:{dir}", "cannot open"),
        ("localhost/db", "give a database URL"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line_naming_search_storage(storage, says, tmp_path):
    (tmp_path / "a_file").write_text("")
    url = storage.format(file=tmp_path / "a_file", dir=tmp_path)
    with pytest.raises(UserError) as info:
        open_storage(url, tmp_path / "study")
    assert str(info.value).startswith(f"search.storage={url}: ") and says in str(info.value)
    assert "\n" not in str(info.value) and "give " in str(info.value)  # and what to use instead


@pytest.mark.parametrize("storage", ["bogus://x", "mysql://u@localhost/db"])
def test_a_storage_url_optuna_cannot_open_is_refused_before_a_continued_study_is_touched(storage, tmp_path):
    study = tmp_path / "study"
    (study / ".hydra").mkdir(parents=True)
    (study / "search.log").write_text("the first start's log\n")
    before = _tree(study)
    proc = _search([f"search.dir={study}", f"search.storage={storage}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Optuna cannot open it" in proc.stderr
    assert _tree(study) == before and [p.name for p in tmp_path.iterdir()] == ["study"]


def test_a_key_both_given_and_searched_is_refused_before_any_trial(tmp_path):
    proc = _search([f"search.dir={tmp_path / 'study'}", "optim.lr=0.01"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "error: optim.lr is both given on the command line (optim.lr=0.01) and searched (search.space.optim.lr): "
        "drop optim.lr=0.01, or stop searching it with ~search.space.optim.lr"
    )
    assert not (tmp_path / "study" / "trials").exists()


# --- The entry point: real trials -------------------------------------------------------------------


@pytest.mark.slow
def test_a_search_prunes_writes_its_summary_and_continues_to_n_trials_in_the_same_storage(shapes_root, tmp_path):
    study_dir = tmp_path / "study"
    args = [*_trial_overrides(shapes_root), *TWO_LRS, *PRUNE_EARLY, f"search.dir={study_dir}", "search.sampler.seed=0"]
    proc = _search([*args, "search.n_trials=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(study_dir)
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert {"COMPLETE", "PRUNED"} <= {r["state"] for r in rows}
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert json.loads((run_dir / "trial.json").read_text())["state"] == row["state"]
        assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "checkpoints" / "last.pt").exists()
        if row["state"] == "PRUNED":
            assert row["epochs"] == "1" and "pruned after epoch 1" in row["note"]
            assert not (run_dir / "metrics.json").exists()  # it never finished
        else:
            assert row["epochs"] == "3" and (run_dir / "metrics.json").exists()
    best = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["value"]))
    assert f"python scripts/train.py data.root={shapes_root}" in proc.stdout
    assert f"{best['params']}\n" in proc.stdout  # the best command ends with the best trial's values
    assert (study_dir / "optimization_history.png").stat().st_size > 1000
    assert f"optuna-dashboard sqlite:///{study_dir}/study.db" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["study"]  # nothing outside search.dir (no outputs/search/<time>)

    # the same command with a larger total continues the study: one more trial, the first three kept
    proc = _search([*args, "search.n_trials=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _rows(study_dir)
    assert len(again) == 4 and again[:3] == rows and again[3]["state"] in ("COMPLETE", "PRUNED")
    # and once there, a start runs nothing
    proc = _search([*args, "search.n_trials=4"], tmp_path)
    assert proc.returncode == 0 and len(_rows(study_dir)) == 4


@pytest.mark.slow
def test_a_search_stopped_by_a_signal_retries_that_trial_first_when_started_again(shapes_root, tmp_path):
    study_dir = tmp_path / "study"
    args = [*_trial_overrides(shapes_root), "search.pruner=none", f"search.dir={study_dir}", "search.n_trials=2"]
    worker = _search(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (study_dir / "trials" / "001" / ".hydra").exists() and time.time() < deadline:
        time.sleep(0.2)  # the second trial has started training
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Continue with:" in out and "scripts/search.py" in out
    storage = f"sqlite:///{study_dir / 'study.db'}"
    trials = optuna.load_study(study_name="fcn", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]

    proc = _search(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="fcn", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1


@pytest.mark.slow
def test_workers_started_with_multirun_share_the_study_and_log_under_its_workers_directory(shapes_root, tmp_path):
    study_dir = tmp_path / "study"
    args = [*_trial_overrides(shapes_root), "trainer.epochs=1", "search.pruner=none", "search.n_trials=2"]
    proc = _search(["-m", "search.worker=0,1", f"search.dir={study_dir}", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((study_dir / "workers" / n / "search.log").exists() for n in ("0", "1"))
    assert len(_rows(study_dir)) == 2 and [p.name for p in tmp_path.iterdir()] == ["study"]


@pytest.mark.slow
def test_two_workers_with_the_same_journal_storage_share_one_study(shapes_root, tmp_path):
    study_dir = tmp_path / "study"
    journal = tmp_path / "shared" / "study.log"
    args = [
        *_trial_overrides(shapes_root),
        "trainer.epochs=2",
        "search.pruner=none",
        f"search.dir={study_dir}",
        f"search.storage=journal:{journal}",
        "search.n_trials=4",
    ]
    workers = [_search(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    study = optuna.load_study(study_name="fcn", storage=optuna.storages.JournalStorage(backend))
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    # each worker stops once the study holds 4; one trial in flight at that moment may finish as a fifth
    assert 4 <= len(finished) <= 5 and len({t.number for t in finished}) == len(finished)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both processes ran trials of the one study
    assert len(list((study_dir / "trials").iterdir())) == len(study.trials)
