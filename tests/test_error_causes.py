"""Error messages keep the cause: weights saved by other tools load or say exactly what does not fit,
and an image too large for Pillow's decompression-bomb guard is named as such, with the setting."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.errors import UserError
from fcn.models.backbones import resnet18, tiny


@pytest.fixture
def pillow_limit():
    """Tests change Pillow's process-wide limit; it is restored afterwards."""
    yield set_max_image_pixels
    set_max_image_pixels(PILLOW_DEFAULT)


def _tiny_state(width: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return tiny(width=width).state_dict()


WRAPPINGS = {
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compile_prefix": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp_of_compiled": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "state_dict_with_epoch": lambda sd: {"state_dict": sd, "epoch": 90},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "model_state": lambda sd: {"model_state": sd},
    "wrapped_and_prefixed": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_backbone_weights_saved_wrapped_or_prefixed_load_and_say_so(wrapping, tmp_path, caplog):
    state = _tiny_state()
    path = tmp_path / "w.pt"
    torch.save(WRAPPINGS[wrapping](state), path)
    with caplog.at_level(logging.INFO, logger="fcn.state_dict"):
        encoder = tiny(width=4, weights_path=str(path))
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert any(str(path) in r.getMessage() for r in caplog.records)  # the unwrapping is said


def test_backbone_weights_that_do_not_fit_list_counts_and_keys(tmp_path):
    path = tmp_path / "other_width.pt"
    state = _tiny_state(width=8)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(UserError) as caught:
        tiny(width=4, weights_path=str(path))
    message = str(caught.value)
    assert "model.backbone_weights" in message and "of another shape" in message and "extra.weight" in message
    assert "1 keys unexpected" in message and "\n" not in message


def test_resnet_weights_of_another_network_name_the_missing_keys(tmp_path):
    path = tmp_path / "not_resnet.pt"
    torch.save({"state_dict": {"features.0.weight": torch.zeros(3)}, "epoch": 90}, path)
    with pytest.raises(UserError) as caught:
        resnet18(weights_path=str(path))
    message = str(caught.value)
    assert "ResNet" in message and "keys missing: conv1.weight" in message and "features.0.weight" in message
    assert "Error(s) in loading state_dict" not in message


def test_a_file_without_a_state_dict_says_what_it_holds(tmp_path):
    path = tmp_path / "hyper.pt"
    torch.save({"epoch": 90, "lr": 0.1}, path)
    with pytest.raises(UserError, match=r"holds a dict with keys \['epoch', 'lr'\], not a state dict"):
        tiny(width=4, weights_path=str(path))


def _prefixed_copy(trained_run, tmp_path, prefix: str):
    ckpt = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["model"] = {prefix + k: v for k, v in ckpt["model"].items()}
    path = tmp_path / "prefixed.pt"
    torch.save(ckpt, path)
    return path, ckpt


def test_checkpoint_with_prefixed_keys_evaluates(trained_run, tmp_path, caplog):
    from fcn.checkpoint import load_model

    path, ckpt = _prefixed_copy(trained_run, tmp_path, "module.")
    with caplog.at_level(logging.INFO, logger="fcn.state_dict"):
        model, _ = load_model(path, torch.device("cpu"), channels_last=False)
    assert any("'module.'" in r.getMessage() for r in caplog.records)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"]["module." + key])


def test_init_from_a_checkpoint_saved_from_a_compiled_model(trained_run, tmp_path):
    from omegaconf import OmegaConf

    from fcn.resume import init_weights
    from fcn.train import build_model

    path, ckpt = _prefixed_copy(trained_run, tmp_path, "_orig_mod.")
    model_config = ckpt["config"]["model"]
    model = build_model(OmegaConf.create(model_config), torch.device("cpu"), False)
    init_weights(model, path, model_config)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"]["_orig_mod." + key])


def _grey_png(path, size=(120, 100)) -> None:
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(path)


def test_image_over_the_decompression_bomb_guard_is_named_with_the_setting(pillow_limit, tmp_path):
    from fcn.data.folder import read_image

    _grey_png(tmp_path / "huge.png")
    pillow_limit(1000)  # refuses above 2000 pixels, as the default refuses a 14000 x 13000 image
    with pytest.raises(UserError) as caught:
        read_image(tmp_path / "huge.png")
    message = str(caught.value)
    assert "decompression-bomb" in message and "data.max_image_pixels=12000" in message
    assert "corrupt" not in message.replace("not corrupt", "")
    pillow_limit(None)
    assert read_image(tmp_path / "huge.png").shape == (100, 120, 3)


def test_the_scan_calls_an_oversized_image_oversized_not_corrupt_and_rereads_it(pillow_limit, tmp_path):
    from fcn.data.doctor.scan import scan_split
    from fcn.data.labels import MaskDecoder

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    _grey_png(tmp_path / "images" / "a.png")
    _grey_png(tmp_path / "masks" / "a.png", size=(120, 100))
    layout = {"image_dir": "images", "mask_dir": "masks", "split_file": None, "mask_suffix": ".png"}
    pillow_limit(1000)
    report = scan_split(tmp_path, "train", layout, MaskDecoder(2, 255), cache=tmp_path / "cache")
    kinds = {p.kind for p in report.errors}
    assert "too_many_pixels" in kinds and "corrupt_image" not in kinds and "corrupt_mask" not in kinds
    pillow_limit(None)  # the setting raised: the cached refusal is not reused
    again = scan_split(tmp_path, "train", layout, MaskDecoder(2, 255), cache=tmp_path / "cache")
    assert not again.errors


def test_loader_workers_take_the_limit_of_the_main_process(pillow_limit):
    from fcn.data.loader import make_loader

    pillow_limit(None)
    loader = make_loader([], batch_size=1, num_workers=0, ignore_index=255)
    assert loader.worker_init_fn.keywords["max_image_pixels"] is None


def test_cause_is_the_innermost_reason_not_the_wrapper_headline():
    from fcn.errors import cause

    try:
        try:
            raise RuntimeError("Compiler: cl is not found.")
        except RuntimeError as inner:
            raise ValueError("backend='inductor' raised:\n\nsee above") from inner
    except ValueError as outer:
        assert cause(outer) == "RuntimeError: Compiler: cl is not found."


def test_compile_failure_warning_keeps_the_reason(monkeypatch, caplog):
    from fcn.device import maybe_compile

    def broken(model):
        try:
            raise RuntimeError("Compiler: cl is not found.")
        except RuntimeError as exc:
            raise ValueError("backend='inductor' raised:") from exc

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING):
        maybe_compile(torch.nn.Conv2d(3, 2, 1), True, 1, (8, 8), False)
    assert "cl is not found" in caplog.text


def test_out_of_memory_message_keeps_how_much_was_asked_for(shapes_root, tmp_path, monkeypatch):
    from fcn.train import train
    from tests.conftest import compose_config, tiny_train_overrides

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("fcn.train.train_one_epoch", oom)
    with pytest.raises(UserError, match=r"lower trainer.batch_size.*Tried to allocate 2.00 GiB"):
        train(compose_config("train", [*tiny_train_overrides(shapes_root), "logger=none"]), tmp_path / "run")
