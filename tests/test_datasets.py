"""Every supported dataset layout reads through its data config, with its label conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.cli.compose import build_dataset, prepare_data_root, scan_data
from fcn.data.folder import find_pairs
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import mask_array, save, write_ade20k, write_camvid, write_cityscapes, write_folder, write_voc


def _data(option: str, root, *extra: str):
    return compose_config("train", [f"data={option}", f"data.root={root}", *extra]).data


def _mask_values(dataset) -> set[int]:
    return {int(v) for i in range(len(dataset)) for v in torch.unique(dataset[i][1])}


def test_camvid_segnet_layout_keeps_void_11_ignored(tmp_path):
    data = _data("camvid", write_camvid(tmp_path))
    reports = scan_data(data, [data.train_split, data.val_split])
    assert [r.pairs for r in reports] == [3, 3] and not any(r.problems for r in reports if r.errors)
    dataset = build_dataset(data, "train", None)
    assert _mask_values(dataset) == {0, 3, 8, 11} and data.ignore_index == 11


def test_camvid_test_split_is_read_where_it_exists(tmp_path):
    data = _data("camvid", write_camvid(tmp_path, splits=("train", "val", "test")))
    assert len(build_dataset(data, data.test_split, None)) == 3


def test_voc_palette_masks_are_read_as_indices_with_255_borders(tmp_path):
    data = _data("voc", write_voc(tmp_path / "VOCdevkit" / "VOC2012"))
    train = build_dataset(data, data.train_split, None)
    assert [p[0].name for p in train.pairs] == ["2007_000032.jpg", "2007_000039.jpg"]  # ImageSets order
    assert _mask_values(train) == {0, 1, 2, 255}  # indices, not the palette's colours
    assert len(build_dataset(data, data.val_split, None)) == 1
    assert not scan_data(data, ["train", "val"])[0].errors


def test_voc_download_goes_through_torchvision_into_the_devkit_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeVOC:
        def __init__(self, root, year, image_set, download):
            calls.append((root, year, image_set, download))
            write_voc(tmp_path / "VOCdevkit" / "VOC2012")

    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", FakeVOC)
    data = _data("voc", tmp_path / "VOCdevkit" / "VOC2012", "data.download=true")
    prepare_data_root(data)
    assert calls == [(str(tmp_path), "2012", "trainval", True)]
    assert len(build_dataset(data, "train", None)) == 2
    prepare_data_root(data)  # already there: no second download
    assert len(calls) == 1


def test_voc_download_failure_says_how_to_get_the_files_offline(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", offline)
    data = _data("voc", tmp_path / "VOCdevkit" / "VOC2012", "data.download=true")
    with pytest.raises(UserError, match="VOCtrainval_11-May-2012.tar by hand"):
        prepare_data_root(data)


def test_cityscapes_matches_images_and_train_id_masks_across_city_folders(tmp_path):
    data = _data("cityscapes", write_cityscapes(tmp_path))
    pairs = build_dataset(data, "train", None).pairs
    assert [(i.parent.name, m.name) for i, m in pairs] == [
        ("aachen", "aachen_000000_000019_gtFine_labelTrainIds.png"),
        ("bochum", "bochum_000001_000019_gtFine_labelTrainIds.png"),
    ]  # instanceIds files in the same folders are not masks
    assert _mask_values(build_dataset(data, "train", None)) == {0, 13, 18, 255}
    assert not any(r.errors for r in scan_data(data, ["train", "val"]))


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    data = _data("cityscapes_labelids", write_cityscapes(tmp_path, mask_kind="labelIds"))
    # label ids 7 (road), 26 (car), 33 (bicycle), 0 (unlabelled) -> train ids 0, 13, 18, ignore
    assert _mask_values(build_dataset(data, "val", None)) == {0, 13, 18, 255}


def test_ade20k_reduce_zero_label_ignores_other_and_shifts_classes_down(tmp_path):
    data = _data("ade20k", write_ade20k(tmp_path))
    dataset = build_dataset(data, data.train_split, None)
    assert _mask_values(dataset) == {255, 0, 149}  # file values 0, 1, 150
    report = scan_data(data, [data.train_split])[0]
    assert report.class_pixels[0] > 0 and report.class_pixels[149] > 0 and report.ignored_pixels > 0


def test_binary_0_255_masks_train_with_a_label_map(tmp_path):
    root = write_folder(tmp_path, values=(0, 255), split_lists={"train": ["a", "b"], "val": ["c"]})
    extra = ["data.num_classes=2", "data.class_names=[bg,fg]"]
    with pytest.raises(UserError, match=r"data.label_map=\{255:1\}"):
        scan_data(_data("folder", root, *extra), ["train"])
    data = _data("folder", root, *extra, "data.label_map={255:1}")
    assert not scan_data(data, ["train"])[0].errors
    assert _mask_values(build_dataset(data, "train", None)) == {0, 1}


def test_rgb_colour_masks_map_through_the_palette_and_ignore_colours(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[:, 3:6] = palette[1]
    rgb[:, 6:] = palette[2]
    rgb[0, 0] = [255, 255, 255]  # a void colour
    write_folder(tmp_path, names=("a",), size=(8, 9))
    save(rgb, tmp_path / "masks" / "a.png")
    extra = ["data.num_classes=3", "data.class_names=[bg,red,blue]", "data.split_file=null", f"data.palette={palette}"]
    with pytest.raises(UserError, match=r"colours not in data.palette: \[255, 255, 255\]"):
        scan_data(_data("folder", tmp_path, *extra), ["train"])
    data = _data("folder", tmp_path, *extra, "data.ignore_colors=[[255,255,255]]")
    scan_data(data, ["train"])
    mask = build_dataset(data, "train", None)[0][1]
    assert mask[0, 0] == 255 and mask[1, 0] == 0 and mask[1, 4] == 1 and mask[1, 7] == 2


def test_index_masks_saved_as_gray_rgb_are_read_as_indices(tmp_path, caplog):
    write_folder(tmp_path, names=("a",), size=(6, 8))
    save(np.repeat(np.full((6, 8, 1), 1, np.uint8), 3, axis=2), tmp_path / "masks" / "a.png")
    data = _data("folder", tmp_path, "data.num_classes=2", "data.class_names=[bg,fg]", "data.split_file=null")
    report = scan_data(data, ["train"])[0]
    assert [p.kind for p in report.warnings] == ["rgb_index_masks", "absent_classes"]
    assert _mask_values(build_dataset(data, "train", None)) == {1}


def test_split_lists_and_recursive_layout_use_relative_names(tmp_path):
    for city in ("x", "y"):
        write_folder(tmp_path / "images_root" / city, names=("n1",))
    root = tmp_path / "nested"
    for city in ("x", "y"):
        for kind in ("images", "masks"):
            (root / kind / city).mkdir(parents=True)
            for f in (tmp_path / "images_root" / city / kind).iterdir():
                f.rename(root / kind / city / f.name)
    (root / "list.txt").write_text("y/n1\n")
    pairs = find_pairs(root, "train", split_file="list.txt", recursive=True)
    assert [(i.parent.name, i.name) for i, _ in pairs] == [("y", "n1.jpg")]


def test_mixed_sizes_train_and_are_scored_one_image_at_a_time_at_their_own_size(tmp_path, monkeypatch):
    import fcn.cli.train as train_module
    from fcn.cli.evaluate import run_evaluation

    sizes = {"a": (24, 32), "b": (30, 20), "c": (17, 41), "d": (24, 32)}
    root = tmp_path / "data"
    for i, (name, (h, w)) in enumerate(sizes.items()):
        save(np.full((h, w, 3), 40 * i, np.uint8), root / "images" / f"{name}.png")
        save(mask_array(h, w, [0, 1], i), root / "masks" / f"{name}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\nc\nd\n")
    (root / "splits" / "val.txt").write_text("b\nc\nd\n")
    seen = []
    real_evaluate = train_module.evaluate

    def spy(model, loader, **kwargs):
        seen.extend(tuple(images.shape) for images, _ in loader)
        return real_evaluate(model, loader, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", spy)
    cfg = compose_config("train", ["data=folder", f"data.root={root}", "data.num_classes=2", "data.class_names=[x,y]",
                                   "data.crop_size=16", "trainer=debug", "trainer.epochs=1", "trainer.batch_size=2",
                                   "logger=none", "model.width=4"])  # fmt: skip
    train_module.train(cfg, tmp_path / "run")
    assert seen == [(1, 3, 30, 20), (1, 3, 17, 41), (1, 3, 24, 32)]  # each val image alone, unpadded
    ecfg = compose_config("evaluate", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "num_workers=0",
                                       "tensorboard=false", "eval.save_predictions=true"])  # fmt: skip
    report = run_evaluation(ecfg, tmp_path / "eval", overrides=[])
    assert report["images"] == 3
    predicted = {p.stem: Image.open(p).size for p in (tmp_path / "eval" / "predictions").glob("?.png")}
    assert predicted == {"b": (20, 30), "c": (41, 17), "d": (32, 24)}
