"""Every option of every config group composes, and its objects build."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fcn.cli import CONFIG_DIR
from fcn.cli.compose import build_model, pair, with_class_weights
from tests.conftest import compose_config

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
# the eval group belongs to evaluate.yaml and predict.yaml; every other group to train.yaml
OPTIONS = [(g, p.stem) for g in GROUPS if g != "eval" for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]
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
    scan = SimpleNamespace(split="train", class_pixels=[1] * cfg.data.num_classes,
                           class_image_pixels=[2] * cfg.data.num_classes)  # fmt: skip
    loss = instantiate(with_class_weights(cfg.loss, cfg.data, scan))
    assert loss.ignore_index == cfg.data.ignore_index
    transform = instantiate(cfg.aug)
    out = transform(image=np.zeros((20, 30, 3), np.uint8), mask=np.zeros((20, 30), np.uint8))
    assert out["image"].shape[:2] == pair(cfg.data.crop_size)
    logger = instantiate(cfg.logger)  # every logger offers the loop's small interface
    assert all(callable(getattr(logger, m)) for m in ("open", "log_scalar", "log_image", "log_text", "close"))


@pytest.mark.parametrize("option", [p.stem for p in sorted((Path(CONFIG_DIR) / "data").glob("*.yaml"))])
def test_evaluate_config_composes_with_every_dataset(option):
    cfg = compose_config("evaluate", [f"data={option}", "checkpoint=x.pt", *USER_DATA])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.data.split == cfg.data.val_split


@pytest.mark.parametrize("config", ["evaluate", "predict"])
@pytest.mark.parametrize("option", [p.stem for p in sorted((Path(CONFIG_DIR) / "eval").glob("*.yaml"))])
def test_every_eval_option_composes_into_a_valid_inference(config, option):
    from fcn.cli.compose import inference_fn

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
import sys
from fcn.cli.{name} import main
sys.argv = ["{name}", "{flag}"]
try:
    main()
except SystemExit:
    pass
print("imported:", sorted(m for m in ("torch", "torchvision") if m in sys.modules))
"""


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--help", "--cfg=job"])
def test_train_help_and_cfg_answer_before_torch_is_imported(flag):
    import subprocess
    import sys

    code = HELP_WITHOUT_TORCH.format(name="train", flag=flag)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "imported: []" in proc.stdout
