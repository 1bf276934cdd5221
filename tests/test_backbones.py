"""Every backbone with every FCN variant; pretrained weights from a local file; FCN surgery;
staged training (init_from a coarser variant) and the at-once variant's scaled skips."""

import functools
import hashlib
import logging
import math
import socket

import pytest
import torch
import torchvision
from torch import nn

from fcn.checkpoint import save_checkpoint
from fcn.errors import UserError
from fcn.models import BACKBONES, FCN, VARIANTS, BilinearUpsample, backbones
from fcn.models.backbones import STRIDES
from tests.conftest import compose_config, tiny_train_overrides

WIDTH = {"tiny": 4}  # the others take their own fixed width (None)
HEAVY = {"vgg16", "vgg16_bn", "resnet50"}  # seconds per forward and backward on a 2-core CPU
ALL_BACKBONES = [pytest.param(b, marks=pytest.mark.slow) if b in HEAVY else b for b in BACKBONES]


@functools.cache
def _encoder(backbone: str) -> nn.Module:
    # Building VGG16 takes seconds (138M random weights): each encoder is built once per session
    # and shared by the variants, whose heads are built afresh around it.
    torch.manual_seed(0)
    return BACKBONES[backbone](width=WIDTH.get(backbone))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_every_backbone_and_variant_trains_on_an_odd_sized_input(backbone, variant, monkeypatch):
    encoder = _encoder(backbone).train()
    encoder.zero_grad(set_to_none=True)
    monkeypatch.setitem(BACKBONES, backbone, lambda **kwargs: encoder)
    model = FCN(num_classes=3, backbone=backbone, variant=variant, width=WIDTH.get(backbone))
    # score layers start at zero: give them weights so gradients reach the whole encoder
    for name, param in model.named_parameters():
        if name.startswith("score_"):
            nn.init.normal_(param, std=0.01)
    x = torch.randn(1, 3, 67, 93)
    out = model(x)
    assert out.shape == (1, 3, 67, 93)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.randint(0, 3, (1, 67, 93))).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every layer, first conv included


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_every_tap_has_ceil_size_cells_and_the_declared_channels(backbone):
    # ceil(H/s) cells at every stride is what lets the decoder crop at the top-left corner
    encoder = _encoder(backbone).eval()
    height, width = 97, 131
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, height, width))
    assert set(features) == set(STRIDES) == set(encoder.channels)
    for tap, stride in STRIDES.items():
        expected = (1, encoder.channels[tap], math.ceil(height / stride), math.ceil(width / stride))
        assert tuple(features[tap].shape) == expected, tap


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v3_large"])
def test_backbone_loads_a_local_torchvision_state_dict(backbone, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, backbone)(weights=None).eval()
    path = tmp_path / f"{backbone}.pth"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality below means "loaded"
    # pretrained=true too: a local file wins and nothing is downloaded
    model = FCN(num_classes=3, backbone=backbone, pretrained=True, backbone_weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model.encoder(x)["out"]
        if backbone == "mobilenet_v3_large":
            expected = reference.features(x)
        else:
            expected = nn.Sequential(*list(reference.children())[:-2])(x)  # without avgpool and fc
    torch.testing.assert_close(out, expected)


def test_a_state_dict_of_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match=f"backbone weights {path} .*cannot be loaded into this ResNet: .*shape"):
        FCN(num_classes=3, backbone="resnet50", backbone_weights=str(path))


def _block_network(monkeypatch):
    """Every connection attempt (name lookup or connect) fails at once, as on an offline node."""

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution (network blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)


def _hub_in(tmp_path, monkeypatch):
    """torch.hub.get_dir() -> tmp_path/hub, through $TORCH_HOME as on a user's machine."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrained_loads_a_hand_copied_file_from_the_torch_cache_without_network(tmp_path, monkeypatch, caplog):
    checkpoints = _hub_in(tmp_path, monkeypatch)
    _block_network(monkeypatch)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    checkpoints.mkdir(parents=True)
    staged = checkpoints / "staged.pth"
    torch.save(reference.state_dict(), staged)
    # the file under its torchvision-style name: <arch>-<first 8 hex digits of its sha256>.pth
    file = checkpoints / f"resnet18-{_sha256(staged)[:8]}.pth"
    staged.rename(file)
    url = f"https://download.pytorch.org/models/{file.name}"
    monkeypatch.setattr(backbones, "_imagenet_weights_url", lambda name: url)
    torch.manual_seed(1)  # another random init: equality below means "loaded from the file"
    with caplog.at_level(logging.INFO, logger="fcn.models.backbones"):
        model = FCN(num_classes=3, backbone="resnet18", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = nn.Sequential(*list(reference.children())[:-2])(x)
        torch.testing.assert_close(model.encoder(x)["out"], expected)
    assert str(file) in caplog.text and _sha256(file) in caplog.text  # the path and the full hash


def test_the_real_torchvision_file_name_is_looked_for_in_the_torch_cache(tmp_path, monkeypatch):
    checkpoints = _hub_in(tmp_path, monkeypatch)
    _block_network(monkeypatch)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    expected = checkpoints / url.rsplit("/", 1)[-1]  # resnet18-f37072fd.pth
    with pytest.raises(UserError) as error:
        FCN(num_classes=3, backbone="resnet18", pretrained=True)
    message = str(error.value)
    assert f"fetch {url} " in message and f"copy it to {expected} " in message
    assert "network blocked by the test" in message  # the download was tried and failed, with no hang
    assert "\n" not in message


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18", "mobilenet_v3_large"])  # one code path for all
def test_pretrained_offline_with_no_file_says_what_to_fetch_and_where(backbone, tmp_path, monkeypatch):
    checkpoints = _hub_in(tmp_path, monkeypatch)
    _block_network(monkeypatch)
    url = backbones._imagenet_weights_url(backbone)
    with pytest.raises(UserError, match=rf"{backbone} ImageNet weights.*fetch {url} .*{checkpoints}.*backbone_weights"):
        FCN(num_classes=3, backbone=backbone, pretrained=True)
    assert not any(checkpoints.glob("*.pth"))  # no partial file left behind for the next run to trust


def test_a_cached_file_whose_hash_does_not_match_its_name_is_refused(tmp_path, monkeypatch):
    checkpoints = _hub_in(tmp_path, monkeypatch)
    _block_network(monkeypatch)
    checkpoints.mkdir(parents=True)
    file = checkpoints / "resnet18-00000000.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), file)
    monkeypatch.setattr(backbones, "_imagenet_weights_url", lambda name: f"https://example.org/{file.name}")
    with pytest.raises(UserError, match=rf"{file} is not torchvision's resnet18.*name says 00000000.*delete it"):
        FCN(num_classes=3, backbone="resnet18", pretrained=True)


def test_pretrained_through_the_cli_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from fcn.cli.exit import exit_on_user_error

    _hub_in(tmp_path, monkeypatch)
    _block_network(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(lambda: FCN(num_classes=3, backbone="resnet18", pretrained=True))()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "Traceback" not in err


def test_a_training_run_without_the_weights_ends_before_reading_any_data(tmp_path, monkeypatch):
    from fcn.train import train
    from tests.conftest import compose_config

    _hub_in(tmp_path, monkeypatch)
    _block_network(monkeypatch)
    cfg = compose_config("train", ["model=resnet18_fcn8s", "model.pretrained=true", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(Exception, match="resnet18 ImageNet weights"):  # not "dataset root not found"
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "none").exists()  # the built-in dataset was not generated first


def test_fixed_width_backbones_name_the_setting_and_the_config():
    with pytest.raises(UserError, match=r"model.width=16.*model=resnet18_fcn8s"):
        FCN(num_classes=3, backbone="resnet18", width=16)


@pytest.mark.slow
def test_surgery_fc6_fc7_convolutions_compute_the_classifier_on_a_7x7_input(monkeypatch):
    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None).eval()
    # the encoder is built from this very network, so its fc6/fc7 are converted from these Linears
    monkeypatch.setattr(torchvision.models, "vgg16", lambda weights=None: net)
    encoder = BACKBONES["vgg16"]().eval().double()
    head = encoder.pool4_to_out
    fc6, fc7 = head[1], head[4]
    linear6, linear7 = net.classifier[0].double(), net.classifier[3].double()
    pool5 = torch.randn(2, 512, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        conv = fc7(torch.relu(fc6(pool5)))  # 7x7 output (padding 3); the centre sees the whole input
        linear = linear7(torch.relu(linear6(pool5.flatten(1))))
    torch.testing.assert_close(conv[:, :, 3, 3], linear, rtol=1e-10, atol=1e-10)


def test_intermediate_upsampling_learns_the_2x_layers_and_keeps_the_final_one_bilinear():
    model = FCN(num_classes=3, variant="4s", width=4, upsampling="intermediate")
    learnable = {n: m.learnable for n, m in model.named_modules() if isinstance(m, BilinearUpsample)}
    assert learnable == {"up_out": True, "up_pool4": True, "up_pool3": True, "up_final": False}
    with pytest.raises(UserError, match="model.upsampling='final': choose one of learned, frozen"):
        FCN(num_classes=3, width=4, upsampling="final")


def test_scaled_skips_multiply_pool4_and_pool3_features_before_scoring():
    torch.manual_seed(0)
    scaled = FCN(num_classes=3, variant="8s", width=4, scaled_skips=True).eval()
    for layer in (scaled.score_pool4, scaled.score_pool3):
        nn.init.normal_(layer.weight)
    plain = FCN(num_classes=3, variant="8s", width=4).eval()
    state = scaled.state_dict()
    # scaling the features before a 1x1 convolution = scaling its weights (not its bias)
    state["score_pool4.weight"] = state["score_pool4.weight"] * 0.01
    state["score_pool3.weight"] = state["score_pool3.weight"] * 1e-4
    plain.load_state_dict(state)
    x = torch.randn(1, 3, 45, 51)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), plain(x))
        plain.load_state_dict(scaled.state_dict())  # same weights, unscaled features: another output
        assert not torch.allclose(scaled(x), plain(x))


def _fake_checkpoint(model: FCN, model_config: dict, path):
    save_checkpoint({"model": model.state_dict(), "config": {"model": model_config}}, path)


def test_init_from_a_32s_checkpoint_loads_shared_layers_and_keeps_new_skips_at_their_init(tmp_path, caplog):
    from fcn.resume import init_weights

    torch.manual_seed(0)
    coarse = FCN(num_classes=3, variant="32s", width=4)
    with torch.no_grad():
        for param in coarse.parameters():
            param.add_(torch.randn_like(param))  # a "trained" 32s: every weight moved
    config = {"backbone": "tiny", "width": 4, "num_classes": 3}
    _fake_checkpoint(coarse, {**config, "variant": "32s"}, tmp_path / "fcn32s.pt")
    fine = FCN(num_classes=3, variant="16s", width=4)
    with caplog.at_level(logging.INFO):
        init_weights(fine, tmp_path / "fcn32s.pt", {**config, "variant": "16s"})
    source, loaded = coarse.state_dict(), fine.state_dict()
    shared = [k for k in source if k.startswith(("encoder.", "score_out."))]
    assert shared and all(torch.equal(loaded[k], source[k]) for k in shared)
    assert fine.score_pool4.weight.abs().sum() == 0 and fine.score_pool4.bias.abs().sum() == 0
    assert fine.up_out.drift() == 0 and fine.up_final.drift() == 0  # new 2x and 16x layers: bilinear
    assert "FCN-32s weights into FCN-16s" in caplog.text
    assert "score_pool4.bias, score_pool4.weight, up_out.deconv.weight" in caplog.text
    assert "up_final.deconv.weight" in caplog.text  # 32x kernel does not fit the 16x layer


def test_init_from_still_refuses_another_backbone(tmp_path):
    from fcn.resume import init_weights

    model = FCN(num_classes=3, variant="32s", width=4)
    _fake_checkpoint(model, {"backbone": "tiny", "width": 4, "num_classes": 3, "variant": "32s"}, tmp_path / "a.pt")
    with pytest.raises(UserError, match="model.backbone: checkpoint 'tiny', config 'resnet18'"):
        init_weights(
            model, tmp_path / "a.pt", {"backbone": "resnet18", "width": 64, "num_classes": 3, "variant": "16s"}
        )


@pytest.mark.slow
def test_staged_experiments_chain_32s_16s_8s_through_init_from(shapes_root, tmp_path, caplog):
    from fcn.train import train

    common = [
        *tiny_train_overrides(shapes_root),
        "model.width=4",
        "logger=none",
        "trainer.epochs=1",
        f"staged.dir={tmp_path}",
    ]
    before = {"16s": "fcn32s", "8s": "fcn16s"}
    for variant in ("32s", "16s", "8s"):
        cfg = compose_config("train", [*common, f"experiment=staged_fcn{variant}"])
        assert cfg.model.variant == variant and cfg.model.upsampling == "intermediate"
        # each stage starts from the best checkpoint the stage before wrote in its pinned directory
        with caplog.at_level(logging.INFO):
            train(cfg, tmp_path / f"fcn{variant}")
        if variant in before:
            assert cfg.init_from == str(tmp_path / before[variant] / "checkpoints" / "best.pt")
    assert "FCN-16s weights into FCN-8s; new layers keep their initialisation: score_pool3" in caplog.text


@pytest.mark.slow
def test_model_table_measures_each_row_with_the_same_overrides(shapes_root, tmp_path):
    from hydra import compose, initialize_config_dir

    from fcn.bench.model_table import run_table
    from fcn.cli import CONFIG_DIR

    overrides = [
        *tiny_train_overrides(shapes_root),
        "logger=none",
        "trainer.epochs=1",
        "model.width=4",
        "model=fcn16s",
        "table.models=[fcn8s]",
        "table.variants=[32s,4s]",
        "table.steps=1",
        "table.repeats=1",
        "table.warmup=1",
        "table.min_seconds=0",
        "table.flops_size=[64,64]",
        "loss.class_weights=auto",  # computed from the scan, as training does
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        rows = run_table(compose("model_table", overrides), tmp_path, overrides)
    assert [(r["backbone"], r["variant"]) for r in rows] == [("tiny", "32s"), ("tiny", "4s")]
    for row in rows:
        params = sum(p.numel() for p in FCN(num_classes=6, variant=row["variant"], width=4).parameters())
        assert row["parameters"] == params  # the row's model (width 4 from the command line)
        assert row["gflops"] > 0 and row["train_img_s"] > 0 and 0 <= row["miou"] <= 1
        assert (tmp_path / f"fcn8s-{row['variant']}" / "metrics.json").is_file()
    table = (tmp_path / "model_table.md").read_text()
    assert "| `fcn8s` | tiny | 4s |" in table and "train img/s at 40x40" in table
