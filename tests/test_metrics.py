"""Confusion matrix and the four FCN scores, against hand-computed values and torchmetrics."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from fcn.metrics import boundary_band, boundary_confusion, confusion_matrix, format_table, scores


def test_confusion_matrix_matches_a_hand_count():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=3, ignore_index=255)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])  # rows: ground truth
    assert torch.equal(cm, expected)


def test_scores_match_the_fcn_formulas_by_hand():
    cm = torch.tensor([[3, 1], [2, 4]])
    s = scores(cm, ["a", "b"])
    assert s["pixel_acc"] == pytest.approx(7 / 10)
    assert s["mean_acc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    iou_a, iou_b = 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)
    assert s["per_class_iou"] == pytest.approx({"a": iou_a, "b": iou_b})
    assert s["miou"] == pytest.approx((iou_a + iou_b) / 2)
    assert s["fwiou"] == pytest.approx(0.4 * iou_a + 0.6 * iou_b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_equals_torchmetrics_jaccard_with_ignored_pixels(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, ignore = 5, 255
    target = torch.randint(0, num_classes, (4, 32, 32), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = ignore
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.6,
        target.clamp(max=num_classes - 1),
        torch.randint(0, num_classes, target.shape, generator=g),
    )
    ours = scores(confusion_matrix(pred, target, num_classes, ignore))
    oracle = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore, average="none")(pred, target)
    assert ours["miou"] == pytest.approx(oracle.mean().item(), abs=1e-6)
    assert list(ours["per_class_iou"].values()) == pytest.approx(oracle.tolist(), abs=1e-6)


def test_ignored_pixels_do_not_count_whatever_is_predicted_there():
    target = torch.tensor([0, 1, 255, 255])
    a = confusion_matrix(torch.tensor([0, 1, 0, 0]), target, 2, 255)
    b = confusion_matrix(torch.tensor([0, 1, 1, 1]), target, 2, 255)
    assert torch.equal(a, b) and a.sum() == 2


def test_ignored_pixels_do_not_count_in_the_loss():
    # The training loss is built with the data's ignore_index (configs/loss/cross_entropy.yaml).
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [255, 255]]])
    changed = logits.clone()
    changed[..., 1, :] = 100.0  # wildly different logits on the ignored row
    assert loss_fn(logits, target) == pytest.approx(loss_fn(changed, target).item())


def test_class_absent_from_truth_and_prediction_is_na_and_left_out_of_the_mean():
    cm = torch.tensor([[5, 0, 1], [0, 0, 0], [1, 0, 3]])
    s = scores(cm, ["a", "absent", "c"])
    assert s["per_class_iou"]["absent"] is None
    assert s["miou"] == pytest.approx((5 / 7 + 3 / 5) / 2)
    assert "n/a" in format_table(s)


def test_out_of_range_labels_raise_instead_of_being_dropped():
    with pytest.raises(ValueError, match=r"\[7\]"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), num_classes=3, ignore_index=255)


def test_empty_confusion_gives_nan_not_a_crash():
    s = scores(torch.zeros(2, 2, dtype=torch.long))
    assert math.isnan(s["pixel_acc"]) and math.isnan(s["miou"])


def _score_py(hist):
    """The formulas of the original FCN score.py (numpy), as an independent oracle."""
    import numpy as np

    hist = hist.numpy().astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        acc_cls = np.nanmean(np.diag(hist) / hist.sum(1))
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        mean_iu = np.nanmean(iu)
        freq = hist.sum(1) / hist.sum()
        fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
    return acc, acc_cls, mean_iu, fwavacc


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_fcn_score_py_and_torchmetrics_dice_precision_recall(seed):
    from torchmetrics.classification import MulticlassF1Score, MulticlassPrecision, MulticlassRecall

    g = torch.Generator().manual_seed(seed)
    num_classes, ignore = 4, 255
    target = torch.randint(0, num_classes, (3, 20, 20), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.15] = ignore
    pred = torch.randint(0, num_classes, target.shape, generator=g)
    ours = scores(confusion_matrix(pred, target, num_classes, ignore))
    acc, acc_cls, mean_iu, fwavacc = _score_py(confusion_matrix(pred, target, num_classes, ignore))
    assert (ours["pixel_acc"], ours["mean_acc"], ours["miou"], ours["fwiou"]) == pytest.approx(
        (acc, acc_cls, mean_iu, fwavacc), abs=1e-9
    )
    kwargs = {"num_classes": num_classes, "ignore_index": ignore, "average": "none"}
    for key, oracle in (
        ("per_class_dice", MulticlassF1Score),
        ("per_class_precision", MulticlassPrecision),
        ("per_class_recall", MulticlassRecall),
    ):
        expected = oracle(**kwargs)(pred, target).tolist()
        assert list(ours[key].values()) == pytest.approx(expected, abs=1e-6), key


def test_the_metrics_table_prints_percent_and_labels_it():
    table = format_table({"per_class_iou": {"a": 0.5, "b": 0.25}, "miou": 0.375, "pixel_acc": 0.9})
    assert "IoU (%)" in table.splitlines()[0]
    assert any(line.startswith("mean IoU (%)") and line.endswith("37.5") for line in table.splitlines())
    assert "pixel acc (%)" in table and "90.0" in table


def _two_halves() -> torch.Tensor:
    """A 6 x 8 mask: class 0 in columns 0-3, class 1 in columns 4-7 (one vertical boundary)."""
    target = torch.zeros(1, 6, 8, dtype=torch.int64)
    target[..., 4:] = 1
    return target


def _columns(band: torch.Tensor) -> list[int]:
    return sorted(set(band[0].nonzero()[:, 1].tolist()))


def test_boundary_band_is_the_columns_either_side_of_the_boundary_and_widens_with_width():
    target = _two_halves()
    assert _columns(boundary_band(target, 1, ignore_index=255)) == [3, 4]
    assert _columns(boundary_band(target, 2, ignore_index=255)) == [2, 3, 4, 5]
    assert boundary_band(target, 1, ignore_index=255).sum() == 12  # every row, nothing at the image border
    with pytest.raises(ValueError, match=">= 1 pixel"):
        boundary_band(target, 0, ignore_index=255)


def test_ignored_pixels_make_no_boundary_and_are_never_in_the_band():
    target = _two_halves()
    target[0, 0] = 255  # a void first row
    target[0, 2, 1] = 255  # a void pixel inside class 0
    band = boundary_band(target, 1, ignore_index=255)[0]
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[1:, 3:5] = True
    assert torch.equal(band, expected)


def test_boundary_miou_by_hand_for_a_prediction_one_pixel_off_the_boundary():
    target = _two_halves()
    pred = torch.zeros_like(target)
    pred[..., 5:] = 1  # the boundary drawn one column too far right
    # band (width 1) = columns 3 and 4, 6 rows: column 3 is right (class 0), column 4 is class 1 called 0
    confusion = boundary_confusion(pred, target, num_classes=2, ignore_index=255, width=1)
    assert confusion.tolist() == [[6, 0], [6, 0]]
    boundary = scores(confusion)
    assert boundary["per_class_iou"] == {"0": 0.5, "1": 0.0}  # 6 / (6 + 6) and 0 / 6
    assert boundary["miou"] == pytest.approx(0.25)
    # the whole image hides the error: (24/30 + 18/24) / 2
    assert scores(confusion_matrix(pred, target, 2, 255))["miou"] == pytest.approx(0.775)
