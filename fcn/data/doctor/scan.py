"""The dataset scan: every file of a split opened and checked in the main process, before training.

A bad file found mid-epoch is a worker traceback or a CUDA device-side assert; found here it is
one message naming the files and the fix. The scan decodes every image and mask (a truncated
JPEG only shows when decoded), reads masks in parallel threads (Pillow decodes with the GIL
released), and caches each file's result keyed by its path, size and modification time, so a
second scan of an unchanged dataset only stats the files and opens each (reading its first
bytes: a file made unreadable since is still caught). It also gathers what the dataset
doctor (``scripts/check_data.py``) reports: image sizes, mask values, per-class pixel counts,
and suggestions such as a ``label_map`` or median-frequency class weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.data.doctor.diagnose import diagnose_values, palette_order, palette_order_message
from fcn.data.folder import SplitFiles, list_split
from fcn.data.labels import (
    RGB_MASK_MODES,
    WIDE_MODES,
    MaskDecoder,
    conversion,
    exif_orientation,
    float_image_error,
    wide_colour_values,
)
from fcn.data.pixel_limit import too_many_pixels_message
from fcn.data.splits import DEFAULT_SPLIT_FILE, overlap_message, split_overlap, stale_list_message
from fcn.data.splits import shown as shown_name
from fcn.errors import UserError

log = logging.getLogger(__name__)

_UNREADABLE = ("PermissionError", "IsADirectoryError", "FileNotFoundError", "NotADirectoryError")
SCAN_VERSION = 3  # bump when what a file's entry holds changes: old cache entries are then rescanned


@dataclass
class Problem:
    """Something wrong (``error``: training would fail or learn garbage) or worth knowing
    (``warning``) about a split, with the files concerned (the first few) and their count."""

    kind: str
    severity: str
    message: str
    files: list[str] = field(default_factory=list)
    count: int = 0


@dataclass
class SplitReport:
    """What the scan found in one split."""

    split: str
    images_folder: str
    masks_folder: str
    pairs: int
    image_sizes: dict[str, int]  # "WxH" -> number of images
    image_modes: dict[str, int]
    mask_values: list[int]  # stored index values (before label_map), over all index masks
    class_pixels: list[int]  # per class, after label handling
    class_image_pixels: list[int]  # labelled pixels of the images where each class appears
    ignored_pixels: int
    problems: list[Problem]
    seconds: float
    rescanned: int  # files read this time (the rest came from the cache)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def uniform_size(self) -> bool:
        """Whether every image has the same size (then evaluation can batch without padding)."""
        return len(self.image_sizes) <= 1

    def to_dict(self) -> dict:
        return asdict(self)


def scan_split(
    root: str | Path,
    split: str,
    layout: dict,
    decoder: MaskDecoder,
    *,
    workers: int | None = None,
    cache: bool | str | Path = True,
) -> SplitReport:
    """Open and check every image and mask of ``split``.

    Args:
        root, split, layout: where the files are (``layout``: the keywords of
            :func:`fcn.data.folder.list_split`).
        decoder: how mask pixels become class indices.
        workers: threads reading files (default: two per CPU core, at most 16).
        cache: reuse the results of files unchanged since the last scan, cached in
            :func:`cache_dir` (or in this directory, when a path).

    Raises :class:`UserError` only for a wrong layout (missing root, folder or split list);
    problems with files are returned in the report.
    """
    start = time.perf_counter()
    files = list_split(root, split, **layout)
    pairs = _pairs_to_scan(files, root, split, layout)
    cache_path = _cache_path(root, split, decoder, None if cache is True else cache) if cache else None
    cached = _read_cache(cache_path)
    entries: dict[str, dict] = {}
    todo: list[tuple[str, tuple, Path, Path]] = []
    root = Path(root)
    keys = [_relative(image, root) + "|" + _relative(mask, root) for image, mask in pairs]
    hits: list[tuple[str, tuple, Path, Path]] = []
    for key, (image, mask) in zip(keys, pairs):
        signature = _signature(image, mask)
        hit = cached.get(key)
        # files refused for their size are read again: the limit is a setting that may have changed
        refused = hit is not None and any(k.startswith("too_many_pixels") for k, _ in hit["result"]["errors"])
        if hit is not None and hit["sig"] == list(signature) and not refused:
            entries[key] = hit
            hits.append((key, signature, image, mask))
        else:
            todo.append((key, signature, image, mask))
    threads = workers or min(16, 2 * (os.cpu_count() or 1))
    if hits:
        # A cache hit vouches for the contents, not for the file still being readable (a permission
        # change keeps the modification time): open each one anyway, a rescan reports the unreadable.
        with ThreadPoolExecutor(max_workers=threads) as pool:
            readable = list(pool.map(lambda item: _readable(item[2]) and _readable(item[3]), hits))
        todo += [item for item, ok in zip(hits, readable) if not ok]
    if todo:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(lambda item: inspect_pair(item[2], item[3], decoder), todo)
            for (key, signature, _, _), result in zip(todo, results):
                entries[key] = {"sig": list(signature), "result": result}
        _write_cache(cache_path, entries)
    # File names as this caller spelled the root (the cache may have been written through another path).
    ordered = [entries[k]["result"] | {"image": str(i), "mask": str(m)} for k, (i, m) in zip(keys, pairs)]
    report = _summarise(split, files, ordered, decoder, layout)
    report.seconds = round(time.perf_counter() - start, 3)
    report.rescanned = len(todo)
    return report


def _pairs_to_scan(files: SplitFiles, root: str | Path, split: str, layout: dict) -> list[tuple[Path, Path]]:
    """The pairs to scan: the split's own, or, when none of its images has a mask under
    ``data.mask_suffix`` but all have one under another image suffix, those, so that one run reports
    every other problem of the files too (the missing suffix stays an error)."""
    if files.pairs or files.alternative is None or files.alternative.readable_suffix is None:
        return files.pairs
    # listed without split lists, so that none is written into the user's data (not usable yet); the split's own
    # images are kept
    ours = set(files.images)
    every = list_split(root, split, **{**layout, "mask_suffix": files.alternative.readable_suffix, "split_file": None})
    return [(image, mask) for image, mask in every.pairs if image in ours]


def _alpha_values(entries: list[dict]) -> list[int]:
    return sorted({v for e in entries for v in e.get("alpha_values", [])})[:8]


def inspect_pair(image_path: Path, mask_path: Path, decoder: MaskDecoder) -> dict:
    """Everything the scan needs from one image and its mask, as JSON-ready values."""
    entry: dict = {"image": str(image_path), "mask": str(mask_path), "errors": []}
    try:
        if (refused := float_image_error(image_path)) is not None:  # from the TIFF header, before decoding
            entry["errors"].append(["float_image", refused])
        with Image.open(image_path) as image:
            entry["conversion"] = conversion(image)  # first: reading the EXIF block moves Pillow's tile list
            colour = wide_colour_values(image, image_path)  # 16-bit RGB at full depth (reads the tile list too)
            entry.update(image_size=list(image.size), image_mode=image.mode, exif=exif_orientation(image))
            if not entry["errors"] and (refused := float_image_error(image_path, image)) is not None:
                entry["errors"].append(["float_image", refused])
            image.load()  # a full decode: truncated files only fail here
            if image.mode in WIDE_MODES:
                entry["wide_max"] = int(np.asarray(image).max())
            elif colour is not None:  # 16-bit RGB: its real range, not Pillow's high bytes
                entry["wide_max"] = int(colour.max())
    except Image.DecompressionBombError as exc:  # a setting, not corruption
        entry["errors"].append(["too_many_pixels_image", too_many_pixels_message(image_path, exc)])
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, struct.error...: any failure is a bad file
        if not any(kind == "float_image" for kind, _ in entry["errors"]):  # a float TIFF is not corrupt
            entry["errors"].append(["corrupt_image", f"{exc.__class__.__name__}: {exc}"])
    if (refused := float_image_error(mask_path, what="mask")) is not None:  # not "corrupt": say what it is
        entry["errors"].append(["bad_mask", refused])
        return entry
    try:
        with Image.open(mask_path) as mask:
            entry.update(mask_size=list(mask.size), mask_mode=mask.mode, mask_format=mask.format)
            values, is_index = decoder.raw_values(mask, mask_path)
            if mask.mode == "RGBA":  # the alpha channel is dropped: it must not be where the labels are
                alpha = np.asarray(mask.getchannel("A"))
                if alpha.min() != alpha.max():
                    rgb = np.asarray(mask.convert("RGB"))
                    entry["alpha_labels"] = bool((rgb == rgb.reshape(-1, 3)[0]).all())  # colour says nothing
                    entry["alpha_values"] = sorted(int(v) for v in np.unique(alpha)[:8])
    except UserError as exc:
        kind = "rgb_mask_no_palette" if not decoder.palette else "unknown_colours"
        entry["errors"].append([kind if entry.get("mask_mode") in RGB_MASK_MODES else "bad_mask", str(exc)])
        return entry
    except Image.DecompressionBombError as exc:
        entry["errors"].append(["too_many_pixels_mask", too_many_pixels_message(mask_path, exc)])
        return entry
    except Exception as exc:  # noqa: BLE001 - as for images
        entry["errors"].append(["corrupt_mask", f"{exc.__class__.__name__}: {exc}"])
        return entry
    entry["gray_rgb_mask"] = is_index and entry["mask_mode"] in RGB_MASK_MODES
    try:
        counts = _class_counts(values, is_index, decoder, mask_path, entry)
    except UserError as exc:  # e.g. 32-bit values no label table covers
        entry["errors"].append(["bad_mask", str(exc)])
        return entry
    entry["ignored"] = counts.pop(decoder.ignore_index, 0)
    entry["counts"] = {str(c): n for c, n in counts.items() if 0 <= c < decoder.num_classes}
    entry["outside"] = {str(c): n for c, n in counts.items() if not 0 <= c < decoder.num_classes}
    return entry


def _class_counts(values: np.ndarray, is_index: bool, decoder: MaskDecoder, path: Path, entry: dict) -> Counter:
    """Pixels per class of one mask (``entry["raw_values"]``: the stored values, for index masks)."""
    if is_index and values.dtype == np.uint8:
        # One bincount over the 256 stored values, mapped through the label table: no sort, no copy.
        stored = np.bincount(values.ravel(), minlength=256)
        present = np.flatnonzero(stored)
        entry["raw_values"] = present.tolist()
        counts: Counter = Counter()
        for value, target in zip(present.tolist(), decoder.lut8[present].tolist()):
            counts[target] += int(stored[value])
        return counts
    if is_index:
        entry["raw_values"] = np.unique(values).tolist()[:1024]
        values = decoder.map_values(values, path)
    return Counter(dict(zip(*(a.tolist() for a in np.unique(values, return_counts=True)))))


def _summarise(split: str, files, entries: list[dict], decoder: MaskDecoder, layout: dict) -> SplitReport:
    num_classes, ignore_index = decoder.num_classes, decoder.ignore_index
    by_kind: dict[str, list[str]] = defaultdict(list)
    details: dict[str, str] = {}
    sizes: Counter = Counter()
    modes: Counter = Counter()
    raw_values: set[int] = set()
    class_pixels = [0] * num_classes
    class_image_pixels = [0] * num_classes
    ignored = 0
    outside: dict[int, list[str]] = defaultdict(list)
    converted: dict[str, list[str]] = defaultdict(list)
    rotated, mismatched, gray_rgb, lossy, unlabelled = [], [], [], [], []
    alpha_only = [e["mask"] for e in entries if e.get("alpha_labels")]
    alpha_too = [e["mask"] for e in entries if "alpha_labels" in e and not e["alpha_labels"]]
    for entry in entries:
        for kind, detail in entry["errors"]:
            of_image = kind in ("corrupt_image", "too_many_pixels_image", "float_image")
            by_kind[kind].append(entry["image"] if of_image else entry["mask"])
            details.setdefault(kind, detail)
        if "image_size" in entry:
            sizes["{}x{}".format(*entry["image_size"])] += 1
            modes[entry["image_mode"]] += 1
            if entry.get("conversion") and not entry["errors"]:
                converted[entry["conversion"]].append(entry["image"])
            if entry.get("exif", 1) != 1:
                rotated.append(entry["image"])
        if entry.get("mask_format") == "JPEG":
            lossy.append(entry["mask"])
        if "image_size" in entry and "mask_size" in entry and entry["image_size"] != entry["mask_size"]:
            (iw, ih), (mw, mh) = entry["image_size"], entry["mask_size"]
            transposed = (iw, ih) == (mh, mw)
            note = " (transposed: the image may carry an EXIF rotation the mask does not)" if transposed else ""
            mismatched.append(f"{entry['mask']} is {mw}x{mh}, image {entry['image']} is {iw}x{ih}{note}")
        if entry.get("gray_rgb_mask"):
            gray_rgb.append(entry["mask"])
        raw_values.update(entry.get("raw_values", []))
        if "counts" not in entry:
            continue
        ignored += entry["ignored"]
        counts = {int(c): n for c, n in entry["counts"].items()}
        labelled = sum(counts.values())
        if not labelled and not entry["outside"]:
            unlabelled.append(entry["mask"])
        for c, n in counts.items():
            class_pixels[c] += n
            class_image_pixels[c] += labelled
        for value in entry["outside"]:
            outside[int(value)].append(entry["mask"])

    problems: list[Problem] = []

    def add(kind: str, severity: str, message: str, paths: Sequence[str]) -> None:
        problems.append(Problem(kind, severity, message, list(paths[:20]), len(paths)))

    if files.listed_without_image:
        add(
            "listed_without_image",
            "error",
            stale_list_message(
                files.split_list,
                files.listed_without_image,
                files.images_folder,
                layout.get("split_file") == DEFAULT_SPLIT_FILE,
            ),
            files.listed_without_image,
        )
    if files.refreshed:
        add("default_split_refreshed", "warning", files.refreshed, [])
    if files.images_without_mask and files.alternative is not None:
        add(
            "masks_under_other_suffix",
            "error",
            f"{len(files.images_without_mask)} images in {files.images_folder}: "
            + files.alternative.message()
            + (
                f" (the checks below read them as '<name>{files.alternative.readable_suffix}')"
                if files.alternative.readable_suffix and not files.pairs
                else ""
            ),
            files.images_without_mask,
        )
    elif files.images_without_mask:
        add(
            "image_without_mask",
            "error",
            f"{len(files.images_without_mask)} images in {files.images_folder} have no mask in {files.masks_folder}; "
            "check data.mask_dir and data.mask_suffix, or remove the images",
            files.images_without_mask,
        )
    for note in files.list_notes:
        add("split_list_format", "warning", f"split list {files.split_list} {note}", [])
    for written_split, path in files.default_lists.items():
        add(
            "default_split_written",
            "warning",
            f"no split lists: wrote the default {written_split!r} list {path} "
            "(seeded 80/20 train/val split of the images; edit it to choose your own)",
            [str(path)],
        )
    if files.masks_without_image:
        add(
            "mask_without_image",
            "error",
            f"{len(files.masks_without_image)} masks in {files.masks_folder} have no image in {files.images_folder}; "
            "check data.image_dir and data.image_suffix, or remove the masks",
            files.masks_without_image,
        )
    if by_kind["float_image"]:
        bad = by_kind["float_image"]
        add("float_image", "error", f"{len(bad)} images refused: {details['float_image']}", bad)
    if by_kind["corrupt_image"]:
        bad = by_kind["corrupt_image"]
        add(
            "corrupt_image",
            "error",
            f"{len(bad)} images cannot be decoded (corrupt or truncated: "
            f"{details['corrupt_image']}); replace them, or remove them and their masks",
            bad,
        )
    huge = by_kind["too_many_pixels_image"] + by_kind["too_many_pixels_mask"]
    if huge:
        first = details.get("too_many_pixels_image") or details["too_many_pixels_mask"]
        add("too_many_pixels", "error", f"{len(huge)} files are larger than Pillow allows: {first}", huge)
    if by_kind["corrupt_mask"]:
        bad = by_kind["corrupt_mask"]
        add(
            "corrupt_mask",
            "error",
            f"{len(bad)} masks cannot be decoded ({details['corrupt_mask']}); replace them",
            bad,
        )
    for kind in ("rgb_mask_no_palette", "unknown_colours", "bad_mask"):
        if by_kind[kind]:
            add(kind, "error", f"{len(by_kind[kind])} masks: {details[kind]}", by_kind[kind])
    if lossy:
        add(
            "lossy_mask",
            "error",
            f"{len(lossy)} masks are JPEG files: lossy compression blurs label values along "
            "every edge into values of other classes; save masks as PNG from the original labels",
            lossy,
        )
    dark = [e["image"] for e in entries if 0 < e.get("wide_max", 65535) <= 4095]
    if dark:
        add(
            "dark_16_bit_images",
            "warning",
            f"{len(dark)} 16-bit images use at most 12 bits (maximum <= 4095): "
            "scaled by 1/257 they are nearly black; rescale them to the 16-bit range (or to 8 bits) first",
            dark,
        )
    shifted = decoder.ignore_index + 1
    if decoder.reduce_zero_label and shifted in raw_values and shifted not in decoder.label_map:
        masks = [e["mask"] for e in entries if shifted in e.get("raw_values", [])]
        add(
            "reduce_zero_label_collision",
            "error",
            f"stored value {shifted} becomes data.ignore_index="
            f"{decoder.ignore_index} after reduce_zero_label and would be silently ignored; choose another "
            "data.ignore_index or map it with data.label_map",
            masks,
        )
    if mismatched:
        add(
            "size_mismatch",
            "error",
            f"{len(mismatched)} masks differ in size from their image, e.g. {mismatched[0]}; "
            "masks must have the size of their image",
            mismatched,
        )
    problems.extend(_encoding_problems(entries, raw_values, outside, decoder))
    for how, paths in sorted(converted.items()):  # each conversion described as it is done (labels.CONVERSIONS)
        add("converted_images", "warning", f"{len(paths)} images are converted to RGB: {how}", paths)
    if rotated:
        add(
            "exif_orientation",
            "warning",
            f"{len(rotated)} images carry an EXIF orientation tag, which is ignored: "
            "pixels are used as stored, like their masks. If the masks were drawn on the rotated view, save the "
            "images rotated (PIL.ImageOps.exif_transpose)",
            rotated,
        )
    if unlabelled:
        add(
            "no_labelled_pixel",
            "warning",
            f"{len(unlabelled)} masks are entirely data.ignore_index={ignore_index}: they teach nothing and a batch "
            "of only such crops trains on loss 0; check their export, or leave them out of the split list",
            unlabelled,
        )
    if alpha_only:
        add(
            "alpha_channel_labels",
            "error",
            f"{len(alpha_only)} RGBA masks are one colour and keep their differences in the alpha channel "
            f"(values {_alpha_values(entries)}), which is dropped: every "
            "pixel would get one label. Save the labels as index PNGs (mode L or P, pixel value = class): take "
            "the alpha channel (Image.getchannel('A')) and map its values to class indices",
            alpha_only,
        )
    if alpha_too:
        add(
            "alpha_channel_dropped",
            "warning",
            f"{len(alpha_too)} RGBA masks have an alpha channel that varies; it is dropped and only the colours "
            "are read: check that no labels are in it",
            alpha_too,
        )
    if gray_rgb:
        add(
            "rgb_index_masks",
            "warning",
            f"{len(gray_rgb)} masks are RGB with three equal channels; they are read "
            "as index masks (the first channel)",
            gray_rgb,
        )
    absent = [str(c) for c in range(num_classes) if class_pixels[c] == 0]
    if entries and absent:
        add("absent_classes", "warning", f"classes {', '.join(absent)} have no pixels in split {split!r}", [])
    return SplitReport(
        split=split,
        images_folder=str(files.images_folder),
        masks_folder=str(files.masks_folder),
        pairs=len(files.pairs),
        image_sizes=dict(sizes.most_common()),
        image_modes=dict(modes.most_common()),
        mask_values=sorted(raw_values),
        class_pixels=class_pixels,
        class_image_pixels=class_image_pixels,
        ignored_pixels=ignored,
        problems=problems,
        seconds=0.0,
        rescanned=0,
    )


def _encoding_problems(entries: list[dict], raw_values: set[int], outside: dict, decoder: MaskDecoder) -> list[Problem]:
    """Mask encodings that contradict the label settings (see :func:`fcn.data.doctor.diagnose.diagnose_values`)."""
    histogram: Counter | None = None
    if decoder.identity and not decoder.palette:  # stored value = decoded class: the counts are the histogram
        histogram = Counter()
        for entry in entries:
            if "counts" in entry:
                histogram.update({int(c): n for c, n in entry["counts"].items()})
                histogram.update({int(c): n for c, n in entry["outside"].items()})
                histogram[decoder.ignore_index] += entry["ignored"]
    names = [e["mask"] for e in entries[:50]]
    problems = []
    for found in diagnose_values(
        raw_values,
        sorted(outside),
        decoder.num_classes,
        decoder.ignore_index,
        histogram=histogram,
        label_map=decoder.label_map,
        reduce_zero_label=decoder.reduce_zero_label,
        palette=decoder.palette,
        mask_names=names,
        lossy=_only_in_jpeg_masks(outside, entries),
    ):
        message = found.message
        if found.kind == "values_out_of_range":
            values = sorted(outside)
            listing = "; ".join(f"{v} in {len(outside[v])} masks (e.g. {outside[v][0]})" for v in values[:8])
            message = (
                f"mask values outside [0, {decoder.num_classes}) that are not data.ignore_index="
                f"{decoder.ignore_index}: {listing}. {message}"
            )
            paths = sorted({p for v in values for p in outside[v]})
        else:
            paths = [e["mask"] for e in entries if "raw_values" in e]
        problems.append(Problem(found.kind, found.severity, message, paths[:20], len(paths)))
    if decoder.palette and not decoder.label_map:
        problems.extend(_palette_order_problems(entries, raw_values, decoder))
    index_masks = [e["mask"] for e in entries if "raw_values" in e]
    if decoder.ignore_colors and index_masks and len(index_masks) == len(entries):
        problems.append(
            Problem(
                "ignore_colors_unused",
                "warning",
                "data.ignore_colors is set, but the masks are "
                "index masks (a value per pixel, no colours): it changes nothing; to ignore a value "
                f"use data.label_map={{value:{decoder.ignore_index}}}",
                index_masks[:20],
                len(index_masks),
            )
        )
    return problems


def _only_in_jpeg_masks(outside: dict, entries: list[dict]) -> bool:
    """Whether every mask holding a value outside the classes is a JPEG file (the values are its noise)."""
    jpeg = {e["mask"] for e in entries if e.get("mask_format") == "JPEG"}
    return bool(outside) and all(path in jpeg for paths in outside.values() for path in paths)


def _palette_order_problems(entries: list[dict], raw_values: set[int], decoder: MaskDecoder) -> list[Problem]:
    """Palette masks whose colour table puts data.palette's colours at other indices (a few masks'
    headers are read: the table is in the header, no pixel is decoded)."""
    paths = [e["mask"] for e in entries if e.get("mask_mode") == "P"][:5]
    tables = []
    for path in paths:
        try:
            with Image.open(path) as mask:
                tables.append(mask.getpalette() or [])
        except OSError:
            continue  # the scan reports unreadable masks already
    moved = palette_order(tables, raw_values, decoder.palette)
    return [Problem("palette_order", "warning", palette_order_message(moved), paths, len(paths))] if moved else []


def split_overlap_problem(root: str | Path, layout: dict, train_split: str, val_split: str) -> Problem | None:
    """A warning when splits ``train_split`` and ``val_split`` share images (``None`` when they
    do not, or when either cannot be listed: the scan reports that)."""
    try:
        train = list_split(root, train_split, **layout)
        val = train if val_split == train_split else list_split(root, val_split, **layout)
    except UserError:
        return None
    train_images = [str(path.resolve()) for path in train.images]
    val_images = [str(path.resolve()) for path in val.images]
    shared, identical = split_overlap(train_images, val_images)
    if not shared:
        return None
    message = overlap_message(train_split, val_split, shared, identical, len(set(val_images)))
    files = sorted(set(train_images) & set(val_images))
    return Problem("split_overlap", "warning", message, files[:20], shared)


def median_frequency_weights(report: SplitReport) -> list[float]:
    """Class weights by median frequency balancing (Eigen and Fergus, 2015), as used for CamVid.

    A class's frequency is its pixel count over the labelled pixels of the images it appears
    in; its weight is the median frequency over its own, so rare classes weigh more and a class
    of median frequency weighs 1. Classes with no pixels get 1.
    """
    freqs = [p / t if t else 0.0 for p, t in zip(report.class_pixels, report.class_image_pixels)]
    present = [f for f in freqs if f > 0]
    if not present:
        raise UserError(f"split {report.split!r} has no labelled pixels: class weights cannot be computed")
    median = float(np.median(present))
    return [round(median / f, 4) if f > 0 else 1.0 for f in freqs]


def format_errors(reports: Sequence[SplitReport], limit: int = 5) -> str:
    """One message for every error found, naming the first ``limit`` files of each."""
    lines = []
    for report in reports:
        for problem in report.errors:
            shown = ", ".join(map(shown_name, problem.files[:limit]))
            more = f" ... ({problem.count} in all)" if problem.count > limit else ""
            lines.append(f"[{report.split}] {problem.message}" + (f"\n    files: {shown}{more}" if shown else ""))
    return "\n  ".join(lines)


def cache_dir() -> Path:
    """Where scan results are cached: ``$FCN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fcn`` (``~/.cache/fcn``)."""
    if os.environ.get("FCN_CACHE_DIR"):
        return Path(os.environ["FCN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcn"


def _cache_path(root: str | Path, split: str, decoder: MaskDecoder, folder: str | Path | None = None) -> Path:
    key = json.dumps([SCAN_VERSION, str(Path(root).resolve()), split, decoder.settings], sort_keys=True)
    return Path(folder or cache_dir()) / "scans" / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.json"


def _relative(path: Path, root: Path) -> str:
    # Cache keys relative to the root: the same files reached as ../data or /abs/data share entries.
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def _signature(image: Path, mask: Path) -> tuple[int, int, int, int]:
    a, b = image.stat(), mask.stat()
    return a.st_mtime_ns, a.st_size, b.st_mtime_ns, b.st_size


def _readable(path: Path) -> bool:
    """Whether ``path`` opens for reading and yields its first bytes."""
    try:
        with open(path, "rb") as f:
            f.read(16)
    except OSError:
        return False
    return True


def _unreadable(entry: dict) -> bool:
    # A file that could not be opened: not cached, so it is read again once it is fixed.
    return any(text.startswith(_UNREADABLE) for _, text in entry["result"].get("errors", []))


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is only a slower scan


def _write_cache(path: Path | None, entries: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({key: entry for key, entry in entries.items() if not _unreadable(entry)}))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old cache or the new one
    except OSError as exc:
        log.debug("scan cache not written (%s): %s", path, exc)
