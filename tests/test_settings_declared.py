"""Every setting a user can give is declared once (fcn/config.py) and checked before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from fcn.cli import CONFIG_DIR
from fcn.config import LOSS_SETTINGS, SETTINGS, check_settings
from fcn.errors import UserError
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = (
    "train",
    "evaluate",
    "predict",
    "export",
    "benchmark",
    "check_data",
    "fix_data",
    "model_table",
    "upsampling_ablation",
)
# Keys whose values are checked elsewhere with their relations (label maps, loss weights per class)
# or that name the constructor: not single values a table can judge.
FREE = {"_target_", "_partial_", "label_map", "ignore_colors", "class_weights", "weights", "losses", "num_classes"}


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig) and key not in ("label_map",):
            yield from _leaves(value, path + ".")
        else:
            yield path, key


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_key_of_every_entry_point_is_declared(name):
    cfg = compose_config(name, [])
    undeclared = [
        path
        for path, leaf in _leaves(cfg)
        if path not in SETTINGS
        and leaf not in FREE
        and not (path.startswith("loss.") and leaf in LOSS_SETTINGS)
        and not path.startswith("data.class_names")
    ]
    assert undeclared == []


@pytest.mark.parametrize(
    "group", ["data", "model", "aug", "optim", "sched", "loss", "trainer", "logger", "eval", "experiment"]
)
def test_every_shipped_option_passes_its_declarations(group):
    for option in _options(group):
        overrides = [f"{group}={option}"]
        cfg = compose_config("train", overrides)
        if OmegaConf.is_missing(cfg.data, "num_classes"):
            continue
        check_settings(cfg)  # raises on a shipped default that its own declaration refuses


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=2.5", "trainer.epochs=2.5: must be a whole number >= 1"),
        ("model.width=0", "model.width=0: must be a whole number >= 1"),
        ("trainer.threads=0", "trainer.threads=0: must be a whole number >= 1, or null"),
        ("trainer.num_workers=-1", "trainer.num_workers=-1: must be a whole number >= 0"),
        ("trainer.batch_size=true", "trainer.batch_size=true: must be a whole number >= 1"),
        ("trainer.precision=fp8", "trainer.precision=fp8: must be one of auto, fp32, bf16, fp16"),
        ("model.variant=2s", "model.variant=2s: must be one of 32s, 16s, 8s, 4s"),
        ("model.backbone=resnet101", "model.backbone=resnet101: must be one of tiny"),
        ("model.upsampling=maybe", "must be one of learned, frozen, intermediate, random, interpolate"),
        ("trainer.deterministic=1", "trainer.deterministic=1: must be true or false"),
        ("aug.hflip=1.5", "aug.hflip=1.5: must be a finite number in [0, 1]"),
        ("optim.lr=nan", "optim.lr=nan: must be a finite number >= 0"),
        ("data.crop_size=[64]", "data.crop_size=[64]: must be two positive integers [height, width] (or one for both)"),
        ("eval.scales=[1.0,0]", "eval.scales=[1.0, 0]: must be a list of at least 1 values, each a finite number > 0"),
        ("logger.num_images=-2", "logger.num_images=-2: must be a whole number >= 0"),
        ("seed=-1", "seed=-1: must be a whole number >= 0"),
        ("loss=ohem", None),
    ],
)
def test_a_value_outside_its_declaration_is_one_line_naming_key_value_and_what_is_allowed(override, message):
    cfg = compose_config("train", [override])
    if message is None:
        check_settings(cfg)
        return
    with pytest.raises(UserError) as exc:
        check_settings(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("name", "override", "key"),
    [
        ("evaluate", "batch_size=0", "batch_size=0"),
        ("evaluate", "eval.hflip=yes", "eval.hflip=yes"),
        ("predict", "save_probs=2", "save_probs=2"),
        ("predict", "channels_last=sometimes", "channels_last=sometimes"),
        ("export", "format=tflite", "format=tflite"),
        ("export", "opset=12", "opset=12"),
        ("check_data", "workers=0", "workers=0"),
        ("check_data", "cache=maybe", "cache=maybe"),
        ("benchmark", "bench.steps=0", "bench.steps=0"),
        ("model_table", "table.variants=[9s]", "table.variants=[9s]"),
    ],
)
def test_every_entry_point_checks_its_own_keys(name, override, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
        check_settings(compose_config(name, [override]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    ["trainer.epochs=2.5", "model.width=0", "trainer.threads=0", "trainer.epoch=3", "model=fcn9s"],
)
def test_a_refused_setting_exits_2_in_one_line_and_leaves_no_pinned_run_directory(tmp_path, override):
    run_dir = tmp_path / "pinned" / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), override, "logger=none", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    # Hydra's own refusal of an unknown option (exit 1) lists the options; everything else is ours (exit 2)
    assert result.returncode == (1 if override.startswith("model=") else 2), result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists() and not run_dir.parent.exists()


BUILT_ON_TRAIN = sorted(
    p.stem for p in Path(CONFIG_DIR).glob("*.yaml") if p.stem != "train" and "\n  - train\n" in p.read_text()
)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_ON_TRAIN)
def test_every_entry_point_built_on_train_names_its_default_run_directory(tmp_path, name):
    # configs/train.yaml's hydra.run.dir is ${fcn.claim_dir:...}: each entry point must know the resolver
    # (one with no pinned directory once ended in an omegaconf traceback, exit 1)
    from fcn.process import ENTRY_POINTS

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    for command in ([str(REPO / "scripts" / f"{name}.py")], ["-m", ENTRY_POINTS[name]]):
        result = run(*command, "trainer.epochs=2.5")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == ["error: trainer.epochs=2.5: must be a whole number >= 1"]
    shown = run(str(REPO / "scripts" / f"{name}.py"), "--cfg", "hydra", "--resolve")
    assert shown.returncode == 0 and "dir: outputs/" in shown.stdout, shown.stderr
    # the refused command writes nothing: the claimed run directory (a search's study directory) is removed again
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_refused_setting_keeps_a_pinned_directory_that_existed_before(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "trainer.epoch=3", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "key", ["ablation.seeds", "ablation.variants", "eval.scales", "table.models", "data.class_names"]
)
def test_a_list_that_must_hold_something_refuses_an_empty_one_naming_the_key(key):
    from omegaconf import OmegaConf

    from fcn.config import check_settings
    from fcn.errors import UserError

    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, [], force_add=True)
    with pytest.raises(UserError, match=rf"^{key}=\[\]: must be a list of at least 1 values"):
        check_settings(cfg)


def test_the_keys_a_resume_may_change_are_those_declared_harmless_with_everything_below_them():
    from fcn.config import may_change_on_resume

    harmless = ["resume", "init_from", "logger", "logger.num_images", "eval.scales", "data.root", "data.generate.size"]
    harmless += ["data.max_image_pixels", "data.split", "trainer.num_workers", "trainer.early_stopping_patience"]
    refused = ["trainer.precision", "model.width", "trainer.sync_bn", "data.reduce_zero_label", "trainer.epochs"]
    refused += ["loggers.x", "data.generated", "optim.lr", "seed", "trainer.limit_train_batches"]  # prefix ends at "."
    assert all(may_change_on_resume(k) for k in harmless)
    assert not any(may_change_on_resume(k) for k in refused)


def test_model_names_are_read_from_the_registry_that_builds_the_models(monkeypatch):
    from fcn import models

    monkeypatch.setattr(models, "BACKBONES", {**models.BACKBONES, "newnet": models.BACKBONES["tiny"]})
    check_settings(compose_config("train", ["model.backbone=newnet"]))  # one entry in BACKBONES, nothing else
    with pytest.raises(UserError, match="model.variant=2s: must be one of " + ", ".join(models.VARIANTS)):
        check_settings(compose_config("train", ["model.variant=2s"]))


def test_importing_the_declarations_does_not_import_torch():
    code = "import sys, fcn.config, fcn.cli.suggest; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("key", ["data.ignore_index", "aug.ignore_index", "loss.ignore_index"])
def test_a_negative_ignore_index_is_refused_with_the_value_to_use(key):
    from fcn.config import check_settings
    from fcn.errors import UserError

    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, -1, force_add=True)
    with pytest.raises(UserError, match=rf"^{key}=-1: must be a whole number in \[0, 65535\]; 255 is usual"):
        check_settings(cfg)
