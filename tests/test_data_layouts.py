"""Finding image/mask pairs: the folder layout (split lists, globs, {split} placeholders) and every
supported dataset's layout read through its data config, downloads included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.data.build import build_dataset, prepare_data_root, scan_data
from fcn.data.folder import SegmentationFolder, find_pairs
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import mask_array, save, write_camvid, write_cityscapes, write_folder, write_pair, write_voc


def test_images_match_masks_by_stem_for_any_image_extension(tmp_path):
    write_pair(tmp_path, "a", ext=".jpg")
    write_pair(tmp_path, "b", ext=".png")
    write_pair(tmp_path, "c", ext=".bmp")
    pairs = find_pairs(tmp_path, "train", split_file=None)
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.png", "b.png"), ("c.bmp", "c.png")]


def test_split_list_selects_and_orders_images(tmp_path):
    for stem in "abc":
        write_pair(tmp_path, stem)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("c\na\n")
    pairs = find_pairs(tmp_path, "val")
    assert [i.stem for i, _ in pairs] == ["c", "a"]


def test_split_placeholder_in_folder_names(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "trainannot" / "x.png")
    pairs = find_pairs(tmp_path, "train", image_dir="{split}", mask_dir="{split}annot", split_file=None)
    assert pairs[0][1] == tmp_path / "trainannot" / "x.png"


def test_missing_root_names_the_absolute_path_and_the_key(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'}.*data.root"):
        find_pairs(tmp_path / "nowhere", "train")


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserError, match="split 'train' is empty"):
        find_pairs(tmp_path, "train", split_file=None)


def test_images_without_masks_are_listed(tmp_path):
    write_pair(tmp_path, "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "orphan.png")
    with pytest.raises(UserError, match="1 images .* no mask.*orphan"):
        find_pairs(tmp_path, "train", split_file=None)


def test_mask_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path, "a", size=(20, 16))
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(tmp_path / "masks" / "a.png")  # transposed
    dataset = SegmentationFolder(find_pairs(tmp_path, "train", split_file=None))
    with pytest.raises(UserError, match=r"a\.png is 16x20 but image .*a\.jpg is 20x16"):
        dataset[0]


def test_items_are_uint8_images_and_int64_masks(tmp_path):
    write_pair(tmp_path, "a", size=(20, 16), value=2)
    image, mask = SegmentationFolder(find_pairs(tmp_path, "train", split_file=None))[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 20)
    assert mask.dtype == torch.int64 and mask.shape == (16, 20) and mask.unique().tolist() == [2]


def test_a_glob_selects_the_split_without_a_list(tmp_path):
    for stem in ("seq1_a", "seq1_b", "seq2_a"):
        write_pair(tmp_path, stem)
    pairs = find_pairs(tmp_path, "train", split_file=None, image_glob="seq1_*")
    assert [i.stem for i, _ in pairs] == ["seq1_a", "seq1_b"]
    with pytest.raises(UserError, match="no files matching 'seq9_\\*'"):
        find_pairs(tmp_path, "train", split_file=None, image_glob="seq9_*")


def _data(option: str, root, *extra: str):
    return compose_config("train", [f"data={option}", f"data.root={root}", *extra]).data


def _mask_values(dataset) -> set[int]:
    return {int(v) for i in range(len(dataset)) for v in torch.unique(dataset[i][1])}


def test_camvid_test_split_is_read_where_it_exists(tmp_path):
    data = _data("camvid", write_camvid(tmp_path, splits=("train", "val", "test")))
    assert len(build_dataset(data, data.test_split, None)) == 3


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
    import fcn.train
    from fcn.cli.evaluate import run_evaluation
    from fcn.train import train

    sizes = {"a": (24, 32), "b": (30, 20), "c": (17, 41), "d": (24, 32)}
    root = tmp_path / "data"
    for i, (name, (h, w)) in enumerate(sizes.items()):
        save(np.full((h, w, 3), 40 * i, np.uint8), root / "images" / f"{name}.png")
        save(mask_array(h, w, [0, 1], i), root / "masks" / f"{name}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\nc\nd\n")
    (root / "splits" / "val.txt").write_text("b\nc\nd\n")
    seen = []
    real_evaluate = fcn.train.evaluate

    def spy(model, loader, settings, **kwargs):
        seen.extend(tuple(images.shape) for images, _ in loader)
        return real_evaluate(model, loader, settings, **kwargs)

    monkeypatch.setattr(fcn.train, "evaluate", spy)
    cfg = compose_config(
        "train",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=2",
            "data.class_names=[x,y]",
            "data.crop_size=16",
            "trainer=debug",
            "trainer.epochs=1",
            "trainer.batch_size=2",
            "logger=none",
            "model.width=4",
        ],
    )
    train(cfg, tmp_path / "run")
    assert seen == [(1, 3, 30, 20), (1, 3, 17, 41), (1, 3, 24, 32)]  # each val image alone, unpadded
    ecfg = compose_config(
        "evaluate",
        [
            f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}",
            "num_workers=0",
            "tensorboard=false",
            "eval.save_predictions=true",
        ],
    )
    report = run_evaluation(ecfg, tmp_path / "eval", overrides=[])
    assert report["images"] == 3
    predicted = {p.stem: Image.open(p).size for p in (tmp_path / "eval" / "predictions").glob("?.png")}
    assert predicted == {"b": (20, 30), "c": (41, 17), "d": (32, 24)}
