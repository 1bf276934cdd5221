"""Split lists as users write them, the default split of a folder without lists, and overlap.

A split list is a text file with one image name per line. Lists come from editors, spreadsheets
and scripts on every system, so :func:`read_split_list` accepts what they write: a UTF-8 or
UTF-16 byte-order mark, ``\\r\\n`` / ``\\r`` line endings, blank lines, leading and trailing
spaces, ``#`` comment lines, and duplicates (kept once, with a note). :func:`resolve_names`
then matches the names to the image keys of :func:`fcn.data.folder.list_split`, accepting a name
written with its image extension or with the image folder in front (``images/a.jpg`` for ``a``).

A folder without split lists gets a default one (:func:`write_default_splits`): a seeded 80/20
train/val split of its images, written to the lists the config names, never over a list of the
user's. Lists fcn wrote itself are recorded with a hash of their bytes in :data:`TOOL_RECORD` beside
them (the lists stay plain names, for every other tool) and follow the folder
(:func:`refresh_default_splits`): when pairs appear or vanish they are rewritten, the names kept
where they were, with a warning naming the pairs. A list fcn did not write, or one edited since, is
the user's and is never rewritten; names in it without an image end in one line giving both fixes
(:func:`stale_list_message`).
:func:`split_overlap` counts the images two splits share.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import random
from pathlib import Path

from fcn.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("train", "val")
DEFAULT_SPLIT_FILE = "splits/{split}.txt"  # the folder layout's lists (configs/data/folder.yaml)
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SEED = 0
# Beside the lists fcn writes itself: {list file name: sha256 of its bytes}. A list whose bytes still match was
# written by fcn and follows the folder; any edit makes it the user's.
TOOL_RECORD = ".fcn_default_split.json"


def shown(name: str) -> str:
    """``name`` as printed in a message: as is when printable, else its ``repr`` (tabs, NULs, ...)."""
    return name if name.isprintable() else repr(name)


def read_split_list(path: Path) -> tuple[list[str], list[str]]:
    """The names of a split list and notes on what was cleaned up on the way.

    Returns ``(names, notes)``: the names in file order, each once, stripped of spaces, with
    backslashes turned into ``/`` and a leading ``./`` removed; ``notes`` says which byte-order
    mark, line endings, duplicates or comment lines were met (for the scan's warnings).

    Raises :class:`UserError` when the file is not text in UTF-8 or UTF-16.
    """
    raw = path.read_bytes()
    notes: list[str] = []
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, note = "utf-16", "is UTF-16 text"
    elif len(raw) >= 4 and raw[1::2].count(0) > 0.4 * len(raw) / 2 and raw[0::2].count(0) == 0:
        encoding, note = "utf-16-le", "is UTF-16 (little-endian) text without a byte-order mark"
    elif len(raw) >= 4 and raw[0::2].count(0) > 0.4 * len(raw) / 2 and raw[1::2].count(0) == 0:
        encoding, note = "utf-16-be", "is UTF-16 (big-endian) text without a byte-order mark"
    elif raw.startswith(codecs.BOM_UTF8):
        encoding, note = "utf-8-sig", "starts with a UTF-8 byte-order mark"
    else:
        encoding, note = "utf-8", ""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"split list {path} is not UTF-8 or UTF-16 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    if note:
        notes.append(f"{note} (read as such)")
    if "\r" in text:
        notes.append("has Windows or old-Mac line endings (read as such)")
    names: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    comments = 0
    for line in text.splitlines():
        name = line.strip().strip("\ufeff").strip()
        if not name:
            continue
        if name.startswith("#"):
            comments += 1
            continue
        name = name.replace("\\", "/")
        while name.startswith("./"):
            name = name[2:]
        if name in seen:
            duplicates.append(name)
            continue
        seen.add(name)
        names.append(name)
    if comments:
        notes.append(f"has {comments} comment lines starting with '#' (skipped)")
    if duplicates:
        listed = ", ".join(shown(d) for d in duplicates[:5])
        more = f" ... ({len(duplicates)} in all)" if len(duplicates) > 5 else ""
        notes.append(f"lists {len(duplicates)} names more than once, each used once: {listed}{more}")
    return names, notes


def resolve_names(names: list[str], images: dict[str, Path], image_dir: str) -> tuple[list[str], int]:
    """Map listed names to image keys: a name is a key, or a key once its image extension or the
    image folder in front of it is taken off (``images/a.jpg`` -> ``a``).

    Returns ``(keys, rewritten)``: the keys (names that match nothing are kept unchanged, for the
    caller to report) and how many names needed rewriting. Two names that resolve to the same key
    are kept once.
    """
    prefix = image_dir.strip("/") + "/"
    keys: list[str] = []
    rewritten = 0
    for name in names:
        key = name
        if key not in images:
            for candidate in _candidates(name, prefix):
                if candidate in images:
                    key, rewritten = candidate, rewritten + 1
                    break
        if key not in keys:
            keys.append(key)
    return keys, rewritten


def _candidates(name: str, prefix: str) -> list[str]:
    bare = name[len(prefix) :] if name.startswith(prefix) else name
    out = [bare]
    stem, dot, _ = bare.rpartition(".")
    if dot and stem:
        out.append(stem)
    return out


def default_split(
    keys: list[str], *, seed: int = DEFAULT_SEED, val_fraction: float = DEFAULT_VAL_FRACTION
) -> dict[str, list[str]]:
    """The seeded default ``{"train": names, "val": names}`` of ``keys`` (see :func:`write_default_splits`)."""
    shuffled = sorted(keys)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction)) if len(shuffled) > 1 else 0
    lists = {"train": sorted(shuffled[: len(shuffled) - n_val]), "val": sorted(shuffled[len(shuffled) - n_val :])}
    if not lists["val"]:
        lists["val"] = lists["train"]
    return lists


def write_default_splits(
    root: Path,
    split_file: str,
    keys: list[str],
    *,
    seed: int = DEFAULT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> dict[str, Path]:
    """Write a seeded train/val split of ``keys`` to ``root / split_file.format(split=...)``.

    The names are shuffled with ``random.Random(seed)``; the last ``round(len * val_fraction)``
    (at least one, and none when there is only one image: it then serves both) go to ``val``.
    Files are created exclusively: an existing list is never overwritten. Returns the paths written.

    Raises :class:`UserError` when the lists cannot be written (a read-only dataset).
    """
    lists = default_split(keys, seed=seed, val_fraction=val_fraction)
    written: dict[str, Path] = {}
    for split, names in lists.items():
        path = root / split_file.format(split=split)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("x", encoding="utf-8") as f:  # "x": never over an existing list
                f.write("".join(f"{n}\n" for n in names))
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(
                f"no split lists in {root} and the default split cannot be written ({exc}); write train.txt and "
                "val.txt (one image name per line, no name in both) in a folder you can write to and point "
                "data.split_file at them, e.g. data.split_file=/path/to/lists/{split}.txt (an absolute path is "
                "used as it is)"
            ) from exc
        written[split] = path
    _record(written.values())
    if written:
        log.warning(
            "no split lists found: wrote a default split of the %d images of %s (seed %d, %d%% val): %s; "
            "edit these lists to choose your own split",
            len(keys),
            root,
            seed,
            round(100 * val_fraction),
            ", ".join(f"{p} ({len(lists[s])} names)" for s, p in written.items()),
        )
    return written


def is_tool_list(path: Path | None) -> bool:
    """Whether the split list ``path`` is as fcn wrote it (recorded in :data:`TOOL_RECORD`, unedited since)."""
    if path is None:
        return False
    try:
        record = json.loads((path.parent / TOOL_RECORD).read_text(encoding="utf-8"))
        return record.get(path.name) == hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, ValueError, AttributeError):
        return False


def _record(paths) -> None:
    """Note ``paths`` as written by fcn (best effort: without the record a list is the user's, never lost)."""
    for path in paths:
        record_path = path.parent / TOOL_RECORD
        try:
            record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
            record[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            record_path.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        except (OSError, ValueError) as exc:
            log.debug("split list record not written (%s): %s", record_path, exc)


def write_split_list(path: Path, names: list[str], *, tool: bool = False) -> None:
    """Write a split list of ``names``, whole or not at all; recorded as fcn's own when ``tool``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    tmp.replace(path)
    if tool:
        _record([path])


def refresh_default_splits(root: Path, split_file: str, keys: list[str]) -> str | None:
    """Bring fcn's own train/val lists in line with the pairs of the folder (``keys``, every image with a mask).

    Names still there stay in their list; vanished names are dropped; new ones are split as
    :func:`default_split` splits them. Lists fcn did not write (or edited since) are the user's and are
    left alone. Returns the warning naming the pairs that appeared or vanished, or None when nothing changed.

    Raises :class:`UserError` when the lists cannot be rewritten (a read-only dataset).
    """
    paths = {split: root / split_file.format(split=split) for split in DEFAULT_SPLITS}
    if not all(is_tool_list(p) for p in paths.values()):
        return None
    lists = {split: read_split_list(p)[0] for split, p in paths.items()}
    listed = {n for names in lists.values() for n in names}
    present = set(keys)
    appeared, vanished = sorted(present - listed), sorted(listed - present)
    if not appeared and not vanished:
        return None
    kept = {split: [n for n in names if n in present] for split, names in lists.items()}
    if not kept["train"] or not kept["val"] or set(kept["train"]) == set(kept["val"]):
        kept = default_split(list(keys))  # too little left to keep: a fresh split
    elif appeared:  # the newcomers split as the default split splits them (one alone goes to train)
        extra = default_split(appeared) if len(appeared) > 1 else {"train": appeared, "val": []}
        kept = {split: names + extra[split] for split, names in kept.items()}
    try:
        for split, path in paths.items():
            write_split_list(path, sorted(set(kept[split])), tool=True)
    except OSError as exc:
        raise UserError(
            f"the default split lists {paths['train']} and {paths['val']} are out of date and cannot be rewritten "
            f"({exc}); delete them, or point data.split_file at lists of your own"
        ) from exc
    parts = []
    if appeared:
        parts.append(f"{len(appeared)} {'pair' if len(appeared) == 1 else 'pairs'} appeared ({_first(appeared)})")
    if vanished:
        parts.append(f"{len(vanished)} vanished ({_first(vanished)})")
    message = (
        f"the default split lists fcn wrote ({paths['train']}, {paths['val']}) were out of date: "
        + " and ".join(parts)
        + "; rewritten (the other names kept their split)"
    )
    log.warning("%s", message)
    return message


def stale_list_message(split_list: Path, missing: list[str], images_folder: Path, default_applies: bool) -> str:
    """The one line for a user's split list naming images that are not there, with both fixes."""
    other = (
        "or delete the train and val lists to let fcn write a default split it keeps up to date"
        if default_applies
        else "or set data.split_file=null to use every image of the folder"
    )
    return (
        f"{len(missing)} names in {split_list} have no image in {images_folder} ({_first(missing)}): remove them "
        f"from the list (or put the images back), {other}"
    )


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(shown(x) for x in names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def default_split_applies(split: str, split_file: str | None, image_dir: str, root: Path) -> bool:
    """Whether a missing list for ``split`` gets the default split: the lists are the folder
    layout's ``splits/{split}.txt`` (a published dataset's own lists, e.g. VOC's ImageSets, are
    never made up), the split is ``train`` or ``val``, the images of both share one folder, and
    neither list exists yet (a half-written pair is the user's and is reported, not completed)."""
    if split_file != DEFAULT_SPLIT_FILE or "{split}" in image_dir or split not in DEFAULT_SPLITS:
        return False
    return not any((root / split_file.format(split=s)).exists() for s in DEFAULT_SPLITS)


def split_overlap(train_keys: list[str], val_keys: list[str]) -> tuple[int, bool]:
    """``(shared, identical)``: how many image keys two splits share, and whether they are the same set."""
    train, val = set(train_keys), set(val_keys)
    shared = len(train & val)
    return shared, bool(train) and train == val


def overlap_message(train_split: str, val_split: str, shared: int, identical: bool, n_val: int) -> str:
    """The warning for images that are in both ``train_split`` and ``val_split``."""
    if identical:
        return (
            f"splits {train_split!r} and {val_split!r} are the same {shared} images: validation scores measure "
            "training images, not generalisation. Give the folder split lists (splits/train.txt, splits/val.txt), "
            "or leave data.split_file at its default for a seeded 80/20 split"
        )
    return (
        f"{shared} of the {n_val} images of split {val_split!r} are also in split {train_split!r}: validation "
        "scores on them measure training images; remove them from one of the lists"
    )
