"""FCN-32s/16s/8s/4s on the tiny and VGG16 encoders (every other backbone: test_backbones.py)."""

import pytest
import torch

from fcn.errors import UserError
from fcn.models import FCN


@pytest.mark.parametrize("variant", ["32s", "16s", "8s", "4s"])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (1, 1), (97, 31)])
def test_output_is_full_resolution_for_any_input_size(variant, size):
    model = FCN(num_classes=5, variant=variant, width=4)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


def test_score_layers_start_at_zero():
    model = FCN(num_classes=4, variant="8s", width=4)
    for layer in (model.score_out, model.score_pool4, model.score_pool3):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0


@pytest.mark.parametrize(("variant", "layers"), [("32s", 1), ("16s", 2), ("8s", 3), ("4s", 4)])
def test_variants_fuse_the_expected_skips(variant, layers):
    model = FCN(num_classes=3, variant=variant, width=4)
    upsamplers = [m for m in model.modules() if m.__class__.__name__ == "BilinearUpsample"]
    assert len(upsamplers) == layers
    assert hasattr(model, "score_pool4") == (variant != "32s")
    assert hasattr(model, "score_pool3") == (variant in ("8s", "4s"))
    assert hasattr(model, "score_pool2") == (variant == "4s")


def test_frozen_upsampling_leaves_only_the_decoder_frozen():
    model = FCN(num_classes=3, variant="8s", width=4, upsampling="frozen")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"up_out.deconv.weight", "up_pool4.deconv.weight", "up_final.deconv.weight"}


def test_skip_fusion_trains_end_to_end():
    torch.manual_seed(0)
    model = FCN(num_classes=3, variant="8s", width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 40, 44), torch.randint(0, 3, (2, 40, 44))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    # zero-initialised score layers receive a gradient on the first step and move
    assert model.score_pool3.weight.abs().sum() > 0


def test_vgg16_backbone_gives_full_resolution_scores():
    model = FCN(num_classes=4, backbone="vgg16", variant="8s", width=64).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 45, 61))
    assert out.shape == (1, 4, 45, 61)


def test_vgg16_loads_a_local_state_dict(tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(0)
    reference = vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    model = FCN(num_classes=4, backbone="vgg16", width=64, backbone_weights=str(path))
    assert torch.equal(model.encoder.stem_to_pool3[0].weight, reference.features[0].weight)
    # FCN surgery: the classifier's fc6 Linear becomes a 7x7 convolution with the same weights
    assert torch.equal(model.encoder.pool4_to_out[1].weight.flatten(), reference.classifier[0].weight.flatten())


def test_bad_model_settings_name_the_key():
    with pytest.raises(UserError, match="model.variant"):
        FCN(num_classes=3, variant="2s")
    with pytest.raises(UserError, match="model.backbone"):
        FCN(num_classes=3, backbone="resnet9000")
    with pytest.raises(UserError, match="pretrained"):
        FCN(num_classes=3, backbone="tiny", pretrained=True)
    with pytest.raises(UserError, match="not found"):
        FCN(num_classes=3, backbone="vgg16", width=64, backbone_weights="/no/such/file.pth")
