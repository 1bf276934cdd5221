"""Split lists as editors and other tools write them, and splits that share images.

Byte-order marks, UTF-16, Windows and old-Mac line endings, comments, duplicates, names written
with their extension or folder are all read; a list that is no text is one clear error; names
with unprintable characters are shown with ``repr``; validation images that are also training
images are a warning in training and in the doctor.
"""

from __future__ import annotations

import codecs
import logging

import pytest

from fcn.cli.check_data import run_check
from fcn.data.build import scan_data
from fcn.data.folder import find_pairs, list_split
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import write_folder

LAYOUT = {"split_file": "splits/{split}.txt"}


def _write_list(root, data: bytes, split="train"):
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / f"{split}.txt").write_bytes(data)


def _names(root, split="train") -> list[str]:
    return [image.stem for image, _ in find_pairs(root, split, **LAYOUT)]


def _data(root, *extra):
    base = ["data=folder", f"data.root={root}", "data.num_classes=2", "data.class_names=[a,b]"]
    return compose_config("train", [*base, *extra]).data


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    write_folder(tmp_path)
    _write_list(tmp_path, codecs.BOM_UTF8 + b"a\nb\n")
    assert _names(tmp_path) == ["a", "b"]
    assert any("UTF-8 byte-order mark" in n for n in list_split(tmp_path, "train", **LAYOUT).list_notes)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_list_with_its_byte_order_mark_is_read(tmp_path, encoding):
    write_folder(tmp_path)
    text = "a\r\nc\r\n"
    data = text.encode("utf-16") if encoding == "utf-16" else codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    _write_list(tmp_path, data)
    assert _names(tmp_path) == ["a", "c"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_list_without_a_byte_order_mark_is_read(tmp_path, encoding):
    write_folder(tmp_path)
    _write_list(tmp_path, "a\r\nc\r\n".encode(encoding))  # what some Windows tools save
    assert _names(tmp_path) == ["a", "c"]


def test_line_endings_blank_lines_spaces_and_comments_are_read(tmp_path):
    write_folder(tmp_path)
    _write_list(tmp_path, b"# my train split\r\n  a  \r\n\r\n\tb\rc \n\n")
    assert _names(tmp_path) == ["a", "b", "c"]


def test_duplicate_names_are_used_once_with_a_warning(tmp_path):
    write_folder(tmp_path)
    _write_list(tmp_path, b"a\nb\na\na\n")
    assert _names(tmp_path) == ["a", "b"]
    data = _data(tmp_path)
    (report,) = scan_data(data, ["train"])
    note = next(p.message for p in report.warnings if p.kind == "split_list_format")
    assert "2 names more than once" in note


def test_names_with_their_extension_or_the_image_folder_are_matched(tmp_path):
    write_folder(tmp_path)
    _write_list(tmp_path, b"images/a.jpg\nb.jpg\n./c\nimages\\a.jpg\n")
    assert _names(tmp_path) == ["a", "b", "c"]


def test_unmatched_names_with_unprintable_characters_are_shown_with_repr(tmp_path):
    write_folder(tmp_path)
    _write_list(tmp_path, "a\nb\u200b\nc\x00d\n".encode())
    with pytest.raises(UserError) as info:
        find_pairs(tmp_path, "train", **LAYOUT)
    assert "'b\\u200b'" in str(info.value) and "'c\\x00d'" in str(info.value)


def test_a_list_that_is_not_utf8_or_utf16_is_one_clear_error(tmp_path):
    write_folder(tmp_path)
    _write_list(tmp_path, "a\nb\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"train\.txt is not UTF-8 or UTF-16 text .* save it as UTF-8"):
        find_pairs(tmp_path, "train", **LAYOUT)


def test_one_folder_without_split_file_warns_in_training_that_val_is_train(tmp_path, caplog):
    write_folder(tmp_path)
    data = _data(tmp_path, "data.split_file=null")
    with caplog.at_level(logging.WARNING):
        scan_data(data, [data.train_split, data.val_split])
    assert "validation scores measure training images" in caplog.text and "same 3 images" in caplog.text


def test_a_val_list_inside_the_train_list_is_counted_in_the_doctor(tmp_path):
    root = write_folder(tmp_path / "d", split_lists={"train": ["a", "b", "c"], "val": ["c"]})
    cfg = compose_config(
        "check_data",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=2",
            "data.class_names=[a,b]",
            f"report={tmp_path / 'r.json'}",
        ],
    )
    report, usable = run_check(cfg, tmp_path)
    problems = report["splits"]["val"]["problems"]
    overlap = next(p for p in problems if p["kind"] == "split_overlap")
    assert overlap["count"] == 1 and "1 of the 1 images of split 'val' are also in split 'train'" in overlap["message"]
    assert usable  # a warning, not an error


def test_a_val_list_equal_to_the_train_list_is_said_loudly(tmp_path, capsys):
    root = write_folder(tmp_path / "d", split_lists={"train": ["a", "b"], "val": ["b", "a"]})
    cfg = compose_config(
        "check_data",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=2",
            "data.class_names=[a,b]",
            f"report={tmp_path / 'r.json'}",
        ],
    )
    run_check(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "WARNING splits 'train' and 'val' are the same 2 images: validation scores measure training images" in out
    assert "shares images with the training split" in out.split("verdict:")[1]


def test_file_names_with_unprintable_characters_are_shown_with_repr_in_the_doctor(tmp_path, capsys):
    root = write_folder(tmp_path / "d", split_lists={"train": ["a"], "val": ["b"]})
    (root / "images" / "a.jpg").rename(root / "images" / "a\tx.jpg")
    (root / "splits" / "train.txt").write_text("a\tx\n")
    cfg = compose_config(
        "check_data",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=2",
            "data.class_names=[a,b]",
            f"report={tmp_path / 'r.json'}",
        ],
    )
    run_check(cfg, tmp_path)
    assert "'a\\tx'" in capsys.readouterr().out  # the image without a mask, named unambiguously


def _lists(root) -> tuple[list[str], list[str]]:
    return tuple((root / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val"))


def test_the_default_lists_fcn_wrote_follow_the_folder_when_pairs_vanish_or_appear(tmp_path, caplog):
    root = write_folder(tmp_path / "d", names=[f"n{i}" for i in range(10)])
    list_split(root, "train", **LAYOUT)  # writes fcn's own default lists
    train, val = _lists(root)
    gone = val[0]
    (root / "images" / f"{gone}.jpg").unlink()  # an unreadable pair removed, as the doctor says
    (root / "masks" / f"{gone}.png").unlink()
    write_folder(root, names=["new1"])
    with caplog.at_level(logging.WARNING, logger="fcn.data.splits"):
        files = list_split(root, "train", **LAYOUT)
    assert not files.listed_without_image
    assert gone in files.refreshed and "new1" in files.refreshed and "appeared" in files.refreshed
    assert any("out of date" in r.getMessage() for r in caplog.records)
    train_now, val_now = _lists(root)
    assert set(train) <= set(train_now) and set(val) - {gone} <= set(val_now)  # the others keep their split
    assert gone not in train_now + val_now and "new1" in train_now + val_now
    assert not set(train_now) & set(val_now)
    assert _names(root, "val")  # training reads the rewritten lists without an error
    again = list_split(root, "train", **LAYOUT)
    assert again.refreshed is None  # in line with the folder: nothing more to say


def test_a_stale_list_of_the_users_is_never_rewritten_and_gets_one_line_with_both_fixes(tmp_path):
    root = write_folder(tmp_path / "d", names=["a", "b", "c"], split_lists={"train": ["a", "b"], "val": ["c"]})
    (root / "images" / "b.jpg").unlink()
    (root / "masks" / "b.png").unlink()
    with pytest.raises(UserError) as error:
        find_pairs(root, "train", **LAYOUT)
    message = str(error.value)
    assert "\n" not in message and "b" in message
    assert "remove them from the list" in message and "delete the train and val lists" in message
    assert (root / "splits" / "train.txt").read_text() == "a\nb\n"  # never rewritten
    report, usable = run_check(
        compose_config(
            "check_data",
            ["data=folder", f"data.root={root}", "data.num_classes=2", "data.class_names=[a,b]", "cache=false"],
        ),
        tmp_path / "report",
    )
    assert not usable
    problems = report["splits"]["train"]["problems"]
    assert any(p["kind"] == "listed_without_image" and "remove them from the list" in p["message"] for p in problems)


def test_a_default_list_the_user_edited_becomes_theirs(tmp_path):
    root = write_folder(tmp_path / "d", names=[f"n{i}" for i in range(10)])
    list_split(root, "train", **LAYOUT)
    train, val = _lists(root)
    (root / "splits" / "val.txt").write_text("".join(f"{n}\n" for n in val[:1]))  # the user's choice now
    (root / "images" / f"{train[0]}.jpg").unlink()
    (root / "masks" / f"{train[0]}.png").unlink()
    with pytest.raises(UserError, match="remove them from the list"):
        find_pairs(root, "train", **LAYOUT)
    assert (root / "splits" / "val.txt").read_text().split() == val[:1]
