"""The bilinear-initialised transposed convolution at the heart of the FCN decoder."""

import pytest
import torch
import torch.nn.functional as F

from fcn.models import BilinearUpsample, bilinear_kernel


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (12, 9)])
def test_upsample_matches_bilinear_interpolation_at_every_pixel(factor, size):
    torch.manual_seed(factor)
    x = torch.randn(2, 4, *size)
    up = BilinearUpsample(4, factor)
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    out = up(x)
    assert out.shape == expected.shape
    # every output pixel, the border rows and columns included
    assert (out - expected).abs().max().item() < 1e-5


def test_upsample_border_differs_without_replicate_padding():
    # Guards the reason for the padding: a plain transposed convolution is wrong at the border.
    x = torch.ones(1, 1, 4, 4)
    up = BilinearUpsample(1, 8)
    plain = F.conv_transpose2d(x, up.deconv.weight, stride=8, padding=4)
    assert plain[..., 0, 0].item() < 0.99  # zero padding darkens the corner
    assert up(x)[..., 0, 0].item() == pytest.approx(1.0)


def _transposed_reference(up, x):
    """What the module computes, written as the transposed convolution itself."""
    from fcn.models.upsample import replicate_pad1

    y = up.deconv(replicate_pad1(x))
    o, f = up._offset, up.factor
    return y[..., o : o + x.shape[-2] * f, o : o + x.shape[-1] * f]


@pytest.mark.parametrize("factor", [2, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_computation_equals_the_transposed_convolution_for_a_learned_kernel(factor, channels_last):
    # A learned kernel is no longer bilinear (nor diagonal across channels): the sub-pixel form must
    # give the transposed convolution's outputs and its gradients for any kernel (odd factors:
    # a (2f - 1)-tap kernel, zero-padded to 2f).
    torch.manual_seed(factor)
    up = BilinearUpsample(3, factor)
    with torch.no_grad():
        up.deconv.weight.normal_()
    x = torch.randn(2, 3, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad_out = torch.randn(2, 3, 5 * factor, 7 * factor)
    out = up(x)
    got = torch.autograd.grad(out, [x, up.deconv.weight], grad_out)
    ref = _transposed_reference(up, x)
    want = torch.autograd.grad(ref, [x, up.deconv.weight], grad_out)
    assert out.shape == ref.shape == grad_out.shape
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 1e-5 * scale
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max()
    with torch.no_grad():  # inference computes the transposed convolution itself: the same map
        assert (up(x) - out.detach()).abs().max() <= 1e-5 * scale
    up.eval()  # eval mode with gradients enabled (saliency, tracing, export): the transposed one
    assert torch.equal(up(x), ref)
    up.train()
    up.subpixel_training = False  # the transposed convolution for training too (measurements)
    assert torch.equal(up(x), ref)


def test_an_upsampling_layer_in_eval_mode_exports_the_transposed_convolution_with_grad_enabled():
    # Tracers (torch.export, the ONNX exporter) run with gradients enabled: eval mode decides.
    up = BilinearUpsample(3, 4).eval()
    x = torch.randn(1, 3, 5, 6)
    program = torch.export.export(up, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("pixel_shuffle" in op for op in ops), ops
    assert torch.equal(program.module()(x), up(x))


def test_subpixel_weight_puts_each_kernel_tap_in_its_phase_and_tap():
    up = BilinearUpsample(2, 2)
    with torch.no_grad():
        up.deconv.weight.copy_(torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4))
    w, sub = up.deconv.weight, up.subpixel_weight()
    assert sub.shape == (2 * 2 * 2, 2, 2, 2)
    for c in range(2):
        for rh in range(2):
            for rw in range(2):
                for a in range(2):
                    for b in range(2):
                        assert sub[c * 4 + rh * 2 + rw, 1, a, b] == w[1, c, rh + 2 * (1 - a), rw + 2 * (1 - b)]


def test_bilinear_kernel_is_the_fcn_surgery_filter():
    k = bilinear_kernel(2)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(k, taps[:, None] * taps[None, :])


def test_learnable_upsample_receives_gradients_and_changes():
    up = BilinearUpsample(3, 4, learnable=True)
    before = up.deconv.weight.detach().clone()
    opt = torch.optim.SGD(up.parameters(), lr=0.1)
    up(torch.randn(1, 3, 5, 5)).square().sum().backward()
    assert up.deconv.weight.grad is not None and up.deconv.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, up.deconv.weight)


def test_frozen_upsample_is_frozen_through_requires_grad():
    up = BilinearUpsample(3, 4, learnable=False)
    assert not up.learnable
    assert not any(p.requires_grad for p in up.parameters())
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    up(x).sum().backward()
    assert up.deconv.weight.grad is None
    assert x.grad is not None  # gradients still flow through to the scores below


@pytest.mark.parametrize("channels_last", [False, True])
def test_replicate_pad_gives_the_values_and_gradients_of_torch_replicate_padding(channels_last):
    from fcn.models.upsample import replicate_pad1

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(2, 3, 7, 9)  # a different weight per output pixel, so every path of the gradient counts
    (replicate_pad1(ours) * weight).sum().backward()
    (F.pad(theirs, (1, 1, 1, 1), mode="replicate") * weight).sum().backward()
    assert torch.equal(replicate_pad1(x), F.pad(x, (1, 1, 1, 1), mode="replicate"))
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)


# --- The five decoders of the upsampling ablation (model.upsampling) --------------------------


def _fcn(upsampling: str, seed: int = 0):
    from fcn.models import FCN

    torch.manual_seed(seed)
    model = FCN(num_classes=3, variant="8s", width=4, upsampling=upsampling)
    with torch.no_grad():  # score layers start at zero: give them weights so the decoder matters
        for name, param in model.named_parameters():
            if name.startswith("score_"):
                param.normal_(std=0.1)
    return model


def _up_layers(model):
    from fcn.models import InterpolateUpsample

    return {n: m for n, m in model.named_modules() if isinstance(m, (BilinearUpsample, InterpolateUpsample)) and n}


# which upsampling layers of FCN-8s learn, per variant (interpolate: none has weights)
LEARNS = {
    "learned": {"up_out": True, "up_pool4": True, "up_final": True},
    "frozen": {"up_out": False, "up_pool4": False, "up_final": False},
    "intermediate": {"up_out": True, "up_pool4": True, "up_final": False},
    "random": {"up_out": True, "up_pool4": True, "up_final": True},
    "interpolate": {"up_out": False, "up_pool4": False, "up_final": False},
}


@pytest.mark.parametrize("upsampling", sorted(LEARNS))
def test_every_upsampling_variant_gives_full_size_scores_and_gradients_only_where_it_learns(upsampling):
    model = _fcn(upsampling).train()
    x = torch.randn(2, 3, 45, 61)
    out = model(x)
    assert out.shape == (2, 3, 45, 61) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.randint(0, 3, (2, 45, 61))).backward()
    layers = _up_layers(model)
    assert set(layers) == set(LEARNS[upsampling])
    for name, layer in layers.items():
        weights = list(layer.parameters())
        if upsampling == "interpolate":
            assert weights == []  # no transposed convolution at all
            continue
        (weight,) = weights
        assert weight.requires_grad == LEARNS[upsampling][name], name
        if weight.requires_grad:
            assert weight.grad is not None and weight.grad.abs().sum() > 0, name
        else:
            assert weight.grad is None, name
    # the gradient reaches the encoder through every decoder, fixed or learned
    assert model.encoder.stem_to_pool3[0][0].weight.grad.abs().sum() > 0


def test_random_upsampling_starts_far_from_bilinear_and_the_bilinear_ones_start_on_it():
    random_ = _up_layers(_fcn("random"))
    bilinear = _up_layers(_fcn("learned"))
    assert all(layer.drift() == 0 for layer in bilinear.values())
    assert all(layer.drift() > 0.5 for layer in random_.values())
    # ConvTranspose2d's own init: every channel pair non-zero, not bilinear's diagonal
    assert (random_["up_final"].deconv.weight[0, 1] != 0).any()


def test_interpolate_upsampling_computes_what_the_frozen_transposed_convolution_computes():
    frozen, interpolate = _fcn("frozen").eval(), _fcn("interpolate").eval()
    # same encoder and score layers (the state dicts differ only by the frozen kernels)
    state = {k: v for k, v in frozen.state_dict().items() if ".deconv." not in k}
    interpolate.load_state_dict(state)
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(interpolate(x), frozen(x), rtol=1e-4, atol=1e-5)


def test_interpolate_upsample_doubles_and_refuses_factor_1():
    from fcn.models import InterpolateUpsample

    assert InterpolateUpsample(4)(torch.randn(1, 2, 3, 5)).shape == (1, 2, 12, 20)
    with pytest.raises(ValueError, match="factor >= 2"):
        InterpolateUpsample(1)


@pytest.mark.parametrize(("old", "new"), [(True, "learned"), (False, "frozen"), ("intermediate", "intermediate")])
def test_old_checkpoints_learnable_upsampling_setting_still_builds_the_same_decoder(old, new):
    from fcn.models import FCN

    model = FCN(num_classes=3, width=4, learnable_upsampling=old)
    assert model.upsampling == new
    learnable = {n: m.learnable for n, m in _up_layers(model).items()}
    assert learnable == LEARNS[new]


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        ("model.learnable_upsampling=false", "write model.upsampling=frozen"),
        ("+model.learnable_upsampling=false", "write model.upsampling=frozen"),  # Hydra's own advice
        ("++model.learnable_upsampling=true", "write model.upsampling=learned"),
        ("~model.learnable_upsampling", "model.upsampling (true -> learned"),
    ],
)
def test_the_old_upsampling_key_is_refused_in_one_line_in_every_form(override, fix, monkeypatch, capsys):
    from fcn.cli.train import main

    monkeypatch.setattr("sys.argv", ["train", override])  # refused before Hydra runs
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: model.learnable_upsampling is now model.upsampling")
        and fix in err[0]
    )


def test_a_config_file_that_still_sets_the_old_upsampling_key_is_refused_before_anything_runs():
    from omegaconf import OmegaConf

    from fcn.config import check_settings
    from fcn.errors import UserError

    cfg = OmegaConf.create({"model": {"upsampling": "learned", "learnable_upsampling": False}})
    with pytest.raises(
        UserError, match=r"learnable_upsampling is now model.upsampling .*write model.upsampling=frozen"
    ):
        check_settings(cfg)
