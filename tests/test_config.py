"""Every option of every config group composes, and its objects build."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import fcn.process
from fcn.cli import CONFIG_DIR
from fcn.data.build import pair, with_class_weights
from fcn.train import build_model
from tests.conftest import compose_config

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
# the eval group belongs to evaluate.yaml and predict.yaml, search to search.yaml; every other group to train.yaml
OPTIONS = [
    (g, p.stem) for g in GROUPS if g not in ("eval", "search") for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))
]
# data=folder describes the user's own data: these are the settings it asks the user for.
USER_DATA = ["data.num_classes=3", "data.class_names=[a,b,c]"]


def test_the_required_groups_exist():
    assert {"model", "data", "aug", "optim", "sched", "loss", "trainer", "logger", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option):
    overrides = [f"{group}={option}", "model.pretrained=false", *USER_DATA]
    cfg = compose_config("train", overrides)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    model = build_model(cfg.model, torch.device("cpu"), channels_last=False)  # as training builds it
    assert model.num_classes == cfg.data.num_classes
    optimizer = instantiate(cfg.optim)(model.parameters())
    scheduler = instantiate(cfg.sched)(optimizer, total_steps=10)
    optimizer.step()
    scheduler.step()
    # class_weights=auto is resolved from the train split's scan first, as the entry point does
    scan = SimpleNamespace(
        split="train", class_pixels=[1] * cfg.data.num_classes, class_image_pixels=[2] * cfg.data.num_classes
    )
    loss = instantiate(with_class_weights(cfg.loss, cfg.data, scan))
    assert loss.ignore_index == cfg.data.ignore_index
    transform = instantiate(cfg.aug)
    out = transform(image=np.zeros((20, 30, 3), np.uint8), mask=np.zeros((20, 30), np.uint8))
    assert out["image"].shape[:2] == pair(cfg.data.crop_size)
    logger = instantiate(cfg.logger)  # every logger offers the loop's small interface
    assert all(callable(getattr(logger, m)) for m in ("open", "log_scalar", "log_image", "log_text", "close"))


@pytest.mark.parametrize("option", [p.stem for p in sorted((Path(CONFIG_DIR) / "search").glob("*.yaml"))])
def test_the_search_config_is_the_training_config_plus_its_search_group(option):
    cfg = compose_config("search", [f"search={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert set(compose_config("train", [])) | {"search"} == set(cfg)  # every training key, and search
    assert resolved["search"]["dir"].endswith(resolved["search"]["name"]) and resolved["search"]["space"]


@pytest.mark.parametrize("option", [p.stem for p in sorted((Path(CONFIG_DIR) / "data").glob("*.yaml"))])
def test_evaluate_config_composes_with_every_dataset(option):
    cfg = compose_config("evaluate", [f"data={option}", "checkpoint=x.pt", *USER_DATA])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.data.split == cfg.data.val_split


@pytest.mark.parametrize("config", ["evaluate", "predict"])
@pytest.mark.parametrize("option", [p.stem for p in sorted((Path(CONFIG_DIR) / "eval").glob("*.yaml"))])
def test_every_eval_option_composes_into_a_valid_inference(config, option):
    from fcn.inference import inference_fn

    cfg = compose_config(config, [f"eval={option}", "checkpoint=x.pt"])
    infer = inference_fn(cfg.eval, num_classes=3)
    assert (infer is None) == (option == "default")


def test_num_classes_has_one_source_of_truth():
    cfg = compose_config("train", ["data=camvid"])
    assert cfg.model.num_classes == 11 and cfg.loss.ignore_index == cfg.aug.ignore_index == 11


def test_scheduler_warms_up_then_decays_to_zero():
    cfg = compose_config("train", ["sched.warmup_steps=5"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg.sched)(opt, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


HELP_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["scripts/{name}.py", "{flag}"]
try:
    runpy.run_path("scripts/{name}.py", run_name="__main__")
except SystemExit:
    pass
print("imported:", sorted(m for m in ("torch", "torchvision") if m in sys.modules))
"""

ENTRY_POINTS = list(fcn.process.ENTRY_POINTS)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--help", "--cfg=job"])
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_script_answers_help_and_cfg_before_torch_is_imported(name, flag):
    import subprocess
    import sys

    code = HELP_WITHOUT_TORCH.format(name=name, flag=flag)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "imported: []" in proc.stdout
    assert ("== Configuration groups ==" if flag == "--help" else "trainer:" if name == "train" else ":") in proc.stdout
    if flag == "--help":  # its own description and example, not another entry point's
        assert proc.stdout.startswith(f"fcn-{name.replace('_', '-')}: ")


def test_a_mistyped_key_is_answered_with_the_closest_key_of_the_composed_config():
    from fcn.cli.suggest import unknown_key_hint

    hint = unknown_key_hint("train", ["trainer.epoch=3", "model=fcn16s"])
    assert "trainer.epoch'" in hint and "did you mean trainer.epochs?" in hint
    assert "did you mean trainer?" in unknown_key_hint("train", ["trainerr=debug"])  # a group name too
    assert "did you mean trainer.epochs?" in unknown_key_hint("train", ["~trainer.epoch"])
    assert "did you mean optim.lr?" in unknown_key_hint("train", ["optim.lrr=0.1"])
    # Overrides that compose get no hint (Hydra failed for another reason, or the task did).
    assert unknown_key_hint("train", ["trainer.epochs=3", "model=fcn16s", "-m"]) is None
    assert unknown_key_hint("train", ["model=fcn9s"]) is None  # Hydra lists the model options itself


def test_a_key_named_as_other_tools_name_it_or_owned_by_another_option_is_pointed_to():
    from fcn.cli.suggest import unknown_key_hint

    assert "did you mean optim.lr?" in unknown_key_hint("train", ["optim.learning_rate=0.1"])
    assert "did you mean trainer.epochs?" in unknown_key_hint("train", ["trainer.max_epochs=3"])
    hint = unknown_key_hint("train", ["optim.momentum=0.9"])  # AdamW has none; SGD does
    assert "optim=sgd has it" in hint


def test_the_key_hint_leaves_every_other_exit_alone(monkeypatch):
    from fcn.cli.suggest import suggest_keys

    monkeypatch.setattr("sys.argv", ["train", "trainer.epochs=3"])

    def crashes():
        raise SystemExit(1)  # as Hydra exits after a task's traceback

    with pytest.raises(SystemExit) as exit_info:
        suggest_keys("train")(crashes)()
    assert exit_info.value.code == 1
    assert suggest_keys("train")(lambda: 0.5)() == 0.5  # a run's result passes through


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_answers_a_mistyped_key_with_did_you_mean(name, monkeypatch, capsys):
    import importlib

    from fcn.cli.suggest import _compose
    from fcn.config import dotted_keys

    leaf = next(k for k in dotted_keys(_compose(name, [])) if not k.startswith("hydra") and len(k) > 3)
    monkeypatch.setattr("sys.argv", [name, f"{leaf}x=1"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(fcn.process.ENTRY_POINTS[name]).main()
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: no key '{leaf}x'") and "did you mean" in last


@pytest.mark.parametrize(
    ("name", "removed", "named"),
    [
        ("train", "~optim", "optim"),
        ("train", "~data.root", "data.root"),
        ("check_data", "~data.root", "data.root"),
        ("search", "~search.space", "search.space"),
    ],
)
def test_removing_a_needed_key_with_tilde_is_one_line_naming_it(name, removed, named, monkeypatch, capsys, tmp_path):
    import importlib

    if name == "search":
        pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [name, removed, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(fcn.process.ENTRY_POINTS[name]).main()
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: setting {named} is needed, but the override {removed} removed it: drop {removed}")
    assert not (tmp_path / "run").exists()  # the failed command leaves no run directory


def test_train_with_a_correct_key_still_composes(monkeypatch, capsys):
    from fcn.cli.train import main

    monkeypatch.setattr("sys.argv", ["train", "trainer.epochs=3", "--cfg=job"])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert "epochs: 3" in capsys.readouterr().out


def test_the_config_changes_name_each_override_and_what_it_changed():
    from fcn.run_logging import config_changes

    changes = config_changes(compose_config("train", ["trainer.epochs=3", "model=fcn16s"]), compose_config("train", []))
    assert "trainer.epochs: 12 -> 3" in changes
    assert "model.variant: 8s -> 16s" in changes
    assert config_changes(compose_config("train", []), compose_config("train", [])) == []


def test_a_run_from_the_command_line_logs_its_overrides_and_where_its_full_config_is(caplog, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from fcn.run_logging import log_config_changes, run_name

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer.epochs=3", "hydra.run.dir=x"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.job.config_name = "train"
        HydraConfig.instance().set_config(cfg)
        try:
            assert run_name() == "trainer.epochs=3"  # hydra.* overrides say where, not what: left out
            with caplog.at_level("INFO", logger="fcn.run_logging"):
                log_config_changes(cfg)
        finally:
            HydraConfig.instance().cfg = None
    text = caplog.text
    assert "overrides trainer.epochs=3" in text and "trainer.epochs: 12 -> 3" in text
    assert str(tmp_path / ".hydra" / "config.yaml") in text


@pytest.mark.slow
def test_train_script_with_a_mistyped_key_exits_2_with_did_you_mean(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "train.py"), "trainer.epoch=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: no key 'trainer.epoch' in the train config; did you mean trainer.epochs?"
    assert not (tmp_path / "outputs").exists()  # nothing left behind


def test_camvid_long_is_the_camvid_recipe_on_three_times_its_schedule():
    recipe = OmegaConf.to_container(compose_config("train", ["experiment=camvid"]), resolve=True)
    long = OmegaConf.to_container(compose_config("train", ["experiment=camvid_long"]), resolve=True)
    assert long["trainer"].pop("epochs") == 3 * recipe["trainer"].pop("epochs") == 360
    assert long["trainer"].pop("val_every") == 4
    recipe["trainer"].pop("val_every")
    assert long == recipe  # model, data, resolution, augmentation, loss and optimiser unchanged
