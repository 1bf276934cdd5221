"""Training features: parameter groups, gradient clipping, early stopping, and the TensorBoard
entries that explain a run (model summary, confusion matrix, decoder drift, hparams)."""

import functools

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn.engine import Settings, train_one_epoch
from fcn.models import FCN, BilinearUpsample
from fcn.optim import build_optimizer, param_groups
from fcn.schedule import constant
from fcn.summary import decoder_drift, model_summary
from fcn.train import train
from tests.conftest import compose_config, tiny_train_overrides


def test_no_weight_decay_on_biases_and_norms_and_a_faster_decoder():
    model = FCN(num_classes=3, width=4)
    groups = param_groups(model, weight_decay=0.01, decoder_lr_mult=10.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_id[id(names["encoder.stem_to_pool3.0.0.weight"])]["weight_decay"] == 0.01
    assert by_id[id(names["encoder.stem_to_pool3.0.1.weight"])]["weight_decay"] == 0.0  # batch norm
    assert by_id[id(names["score_out.bias"])]["weight_decay"] == 0.0
    assert by_id[id(names["up_final.deconv.weight"])]["lr_mult"] == 10.0
    assert by_id[id(names["encoder.stem_to_pool3.0.0.weight"])]["lr_mult"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(names)
    optimizer = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.01), model, 10.0)
    assert sorted({round(g["lr"], 6) for g in optimizer.param_groups}) == [0.1, 1.0]


def test_frozen_parameters_are_in_no_group():
    model = FCN(num_classes=3, width=4, upsampling="frozen")
    grouped = {id(p) for g in param_groups(model, 0.0) for p in g["params"]}
    assert id(model.up_final.deconv.weight) not in grouped


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 1)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = [(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), torch.zeros(1, 4, 4, dtype=torch.long))]
    loss = torch.nn.CrossEntropyLoss()
    train_one_epoch(
        model,
        batch,
        optimizer,
        constant(optimizer, 1),
        lambda x, y: 1000 * loss(x, y),
        Settings(device=torch.device("cpu"), mean=[0] * 3, std=[1] * 3, grad_clip_norm=0.5),
        step=0,
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(0.5, rel=1e-4)  # lr 1 x gradient clipped to norm 0.5


def test_summary_counts_parameters_and_flops_without_touching_batch_norm():
    model = FCN(num_classes=3, width=4, upsampling="frozen")
    stats = model.encoder.stem_to_pool3[0][1].running_mean.clone()
    summary = model_summary(model, (64, 64), torch.device("cpu"))
    assert summary["trainable"] + summary["frozen"] == summary["parameters"] and summary["frozen"] > 0
    assert summary["forward_gflops_per_image"] > 0
    assert torch.equal(stats, model.encoder.stem_to_pool3[0][1].running_mean)


def test_decoder_drift_is_zero_at_start_and_grows_when_learned():
    model = FCN(num_classes=3, width=4)
    assert all(v == pytest.approx(0.0) for v in decoder_drift(model).values())
    with torch.no_grad():
        model.up_final.deconv.weight.add_(0.1)
    assert decoder_drift(model)["up_final"] > 0
    assert isinstance(model.up_final, BilinearUpsample)


@pytest.mark.slow
def test_early_stopping_and_tensorboard_entries(shapes_root, tmp_path):
    overrides = [
        *tiny_train_overrides(shapes_root),
        "trainer.epochs=6",
        "optim.lr=0",
        "sched=constant",
        "trainer.early_stopping_patience=2",
    ]
    report = train(compose_config("train", overrides), tmp_path)
    assert report["epoch"] == 1  # lr 0: nothing improves after epoch 1, so epochs 2 and 3 run, then stop
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/mIoU")] == [3, 6, 9]
    assert {"val_per_class/confusion_matrix", "weights/decoder_kernel/up_final"} <= set(events.Tags()["images"])
    assert "weights/decoder_drift/up_final" in events.Tags()["scalars"]
    assert "model/summary" in events.Tags()["tensors"] or "model/summary/text_summary" in events.Tags()["tensors"]
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_the_per_epoch_line_says_which_epoch_of_how_many_and_labels_scores_as_percent(shapes_root, tmp_path, caplog):
    import re

    overrides = [*tiny_train_overrides(shapes_root), "trainer.epochs=1", "logger=none"]
    with caplog.at_level("INFO", logger="fcn.train"):
        report = train(compose_config("train", overrides), tmp_path)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1:"))
    match = re.search(r"val mIoU (\d+\.\d\d)%, pixel acc (\d+\.\d\d)%", line)
    assert match and float(match.group(1)) == pytest.approx(100 * report["miou"], abs=0.01)
