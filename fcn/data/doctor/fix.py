"""Repairs of what the dataset doctor diagnoses, written to a copy (``scripts/fix_data.py``).

The original files are only read. Each pair is copied byte for byte when nothing is wrong with it,
and rewritten when the doctor's diagnoses (:mod:`fcn.data.doctor.scan`, :mod:`fcn.data.doctor.diagnose`)
name a repair:

- masks saved as JPEG, or 0/255 masks with anti-aliased edges (``interpolated_binary_masks``): every
  value snapped to the nearest class value (the stored values that decode to a class or to
  ``ignore_index``), saved as PNG;
- 0/255 binary masks (``binary_masks_ignored``, ``interpolated_binary_masks``): 255 becomes class 1;
- RGB colour masks: mapped to class indices through ``data.palette`` (colours off the palette by
  JPEG noise or anti-aliasing, at most 5% of a PNG mask's pixels, snapped to the nearest colour);
- every mask written holds class indices (``data.label_map`` / ``reduce_zero_label`` applied), so the
  copy trains with the label settings at their defaults;
- an image and its mask of different sizes: the image resized to its mask (bilinear, the labels stay
  exact) or the mask to its image (nearest neighbour), as asked;
- EXIF orientation: the image rotated as viewers show it, unless its mask matches the stored pixels
  and not the rotated ones (then the tag alone goes);
- 16-bit images to 8 bits (value / 257, or stretched to the full range when they use at most 12
  bits, as the doctor's ``dark_16_bit_images`` warning says), floating-point images in 0-1 or 0-255;
- a pair that cannot be read is left out, with the reason.

Everything here takes plain values; ``fcn/cli/fix_data.py`` is the plumbing.
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.data.labels import (
    RGB_MASK_MODES,
    WIDE_MODES,
    MaskDecoder,
    exif_orientation,
    float_image_error,
    wide_colour_values,
)
from fcn.data.splits import is_tool_list, write_split_list
from fcn.errors import UserError

RESIZE_CHOICES = ("image_to_mask", "mask_to_image")
LOSSLESS_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
COLOUR_NOISE_SHARE = 0.05  # off-palette pixels of a PNG colour mask that are edge noise, not a missing colour
# The doctor's problems (fcn.data.doctor.scan's kinds) a repaired copy takes away: a report naming one of
# them names the fix_data.py command too.
FIXABLE = frozenset(
    {
        "lossy_mask",
        "interpolated_binary_masks",
        "binary_masks_ignored",
        "size_mismatch",
        "exif_orientation",
        "dark_16_bit_images",
        "float_image",
        "corrupt_image",
        "corrupt_mask",
        "unknown_colours",
        "rgb_index_masks",
        "masks_under_other_suffix",
    }
)
# EXIF orientation -> the transpose that shows the image as viewers do (as PIL.ImageOps.exif_transpose)
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class Change:
    """One thing done to one file: ``file`` (relative to the copy; the original for a pair left out),
    ``change`` (a kind, e.g. ``mask_snapped``) and ``reason`` (in words)."""

    file: str
    change: str
    reason: str


@dataclass(frozen=True)
class MaskRule:
    """How every mask of a dataset is repaired, decided once from the doctor's diagnoses.

    ``snap_values``: the stored values (0-255) a noisy value is snapped to; ``snap_every_mask``:
    snap PNG masks too (anti-aliased edges), not only JPEG ones; ``binary``: 0/255 masks, 255 is class 1.
    """

    snap_values: tuple[int, ...]
    snap_every_mask: bool = False
    binary: bool = False

    def lut(self) -> np.ndarray:
        """``uint8[256]``: each stored value's nearest snap value (the lower one on a tie)."""
        targets = np.array(self.snap_values, dtype=np.int32)
        nearest = np.abs(np.arange(256)[:, None] - targets[None, :]).argmin(axis=1)
        return targets[nearest].astype(np.uint8)


def mask_rule(kinds: Collection[str], raw_values: Collection[int], decoder: MaskDecoder) -> MaskRule:
    """The :class:`MaskRule` of a dataset: its scan found problems of ``kinds`` and stored values ``raw_values``."""
    raw = {int(v) for v in raw_values}
    plain = 255 not in decoder.label_map and not decoder.reduce_zero_label
    binary = plain and (
        bool({"interpolated_binary_masks", "binary_masks_ignored"} & set(kinds))
        or (decoder.num_classes == 2 and {0, 255} <= raw and decoder.ignore_index != 255)
    )
    if binary:
        return MaskRule((0, 255), "interpolated_binary_masks" in kinds, True)
    lut = decoder.lut8.astype(np.int64)
    by_target: dict[int, list[int]] = {}
    for v in range(256):
        if 0 <= lut[v] < decoder.num_classes or lut[v] == decoder.ignore_index:
            by_target.setdefault(int(lut[v]), []).append(v)
    # a class data.label_map reaches is stored as its key(s): the value that maps to it by itself is noise
    values = sorted(v for vs in by_target.values() for v in ([k for k in vs if k in decoder.label_map] or vs))
    return MaskRule(tuple(values) or (0,), False, False)


class LeftOut(Exception):
    """A pair that cannot be repaired (unreadable, or a defect with no safe repair); the message says why."""


@dataclass(frozen=True)
class Job:
    """One pair to copy: the originals and where their copies go (the image's name may turn to ``.png``)."""

    image: Path
    mask: Path
    image_out: Path
    mask_out: Path
    keep_name: bool = False  # a repaired JPEG image keeps its name (data.image_suffix names it) instead of .png


@dataclass
class FixResult:
    """What :func:`repair` did: every change, the pairs left out, and the images written (original -> copy)."""

    changes: list[Change] = field(default_factory=list)
    left_out: list[Change] = field(default_factory=list)
    written: dict[Path, Path] = field(default_factory=dict)

    def counts(self) -> Counter:
        """Changes per kind (the pairs left out as ``left_out``)."""
        return Counter(c.change for c in [*self.changes, *self.left_out])


def repair(jobs: Sequence[Job], out: Path, rule: MaskRule, decoder: MaskDecoder, *, resize: str, workers: int = 4):
    """Copy or repair every pair of ``jobs`` under ``out`` (threads: Pillow decodes without the GIL).

    Returns a :class:`FixResult`; raises ``ValueError`` for an unknown ``resize``.
    """
    if resize not in RESIZE_CHOICES:
        raise ValueError(f"resize must be one of {RESIZE_CHOICES}, not {resize!r}")
    result = FixResult()
    one = functools.partial(_fix_or_leave_out, out=out, rule=rule, decoder=decoder, resize=resize)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for job, changes, image_out, why in pool.map(one, jobs):
            if why is not None:
                result.left_out.append(Change(str(job.image), "left_out", why))
                continue
            result.changes.extend(changes)
            result.written[job.image] = image_out
    return result


def _fix_or_leave_out(job: Job, **kwargs) -> tuple[Job, list[Change], Path | None, str | None]:
    try:
        return job, *fix_pair(job, **kwargs), None
    except LeftOut as exc:
        return job, [], None, str(exc)


def fix_pair(job: Job, *, out: Path, rule: MaskRule, decoder: MaskDecoder, resize: str) -> tuple[list[Change], Path]:
    """Write the copy of one pair; the changes made (files relative to ``out``) and the image's copy.
    Raises :class:`LeftOut`."""
    image, orientation, image_changes = _read_image(job.image)
    classes, mask_format, mask_changes = _read_mask(job.mask, rule, decoder)
    mask_size = (classes.shape[1], classes.shape[0])
    if orientation in EXIF_TRANSPOSE:
        turned = image.transpose(EXIF_TRANSPOSE[orientation])
        if mask_size == image.size and turned.size != image.size:
            image_changes.append(
                ("exif_tag_dropped", f"EXIF orientation {orientation} not applied: the mask matches the stored pixels")
            )
        else:
            image = turned
            image_changes.append(
                ("exif_rotation_applied", f"EXIF orientation {orientation}: pixels turned as viewers show them")
            )
    if image.size != mask_size:
        (iw, ih), (mw, mh) = image.size, mask_size
        if resize == "image_to_mask":
            image = _plain_mode(image).resize(mask_size, Image.Resampling.BILINEAR)
            image_changes.append(("image_resized", f"image {iw}x{ih} resized (bilinear) to its mask's {mw}x{mh}"))
        else:
            resized = Image.fromarray(classes.astype(np.int32)).resize(image.size, Image.Resampling.NEAREST)
            classes = np.asarray(resized).astype(classes.dtype)
            mask_changes.append(("mask_resized", f"mask {mw}x{mh} resized (nearest) to its image's {iw}x{ih}"))
    changes = []
    image_out = job.image_out
    if image_changes:
        if job.image.suffix.lower() not in LOSSLESS_SUFFIXES and not job.keep_name:
            image_out = job.image_out.with_suffix(".png")  # a repaired image is not compressed again
        _save(_plain_mode(image), image_out)
        changes += [Change(_rel(image_out, out), kind, why) for kind, why in image_changes]
    else:
        _copy(job.image, image_out)
    if mask_changes or mask_format != "PNG":
        if mask_format != "PNG":
            mask_changes.append(("mask_saved_as_png", f"{mask_format} mask saved as PNG (lossless)"))
        _save(Image.fromarray(classes.astype(np.uint8 if classes.max(initial=0) <= 255 else np.uint16)), job.mask_out)
        changes += [Change(_rel(job.mask_out, out), kind, why) for kind, why in mask_changes]
    else:
        _copy(job.mask, job.mask_out)
    return changes, image_out


def _read_image(path: Path) -> tuple[Image.Image, int, list[tuple[str, str]]]:
    """The image (decoded, 8-bit where it was wider), its EXIF orientation, and the conversions made."""
    refused = float_image_error(path)
    try:
        with Image.open(path) as opened:
            colour = wide_colour_values(opened, path)  # before the EXIF block is read: it moves the tile list
            orientation = exif_orientation(opened)
            opened.load()
            image = opened.copy()
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, ...: any failure is an unreadable file
        raise LeftOut(refused or f"image cannot be decoded ({exc.__class__.__name__}: {exc})") from exc
    changes = []  # a 16-bit colour image (colour): Pillow kept each sample's high byte only
    if image.mode in WIDE_MODES or colour is not None:
        values = np.asarray(image) if colour is None else colour
        if values.min() < 0 or values.max() > 65535:
            raise LeftOut(f"{image.mode} image with values outside 0-65535")
        top, what = int(values.max()), image.mode if colour is None else "16-bit RGB"
        full = 65535 if top > 4095 else next(2**bits - 1 for bits in (8, 10, 12) if top < 2**bits)
        image = Image.fromarray(np.round(values.astype(np.float32) * 255 / full).astype(np.uint8))
        how = "value / 257" if full == 65535 else f"it uses at most {full.bit_length()} bits: value x 255 / {full}"
        changes.append(("image_16_bit_to_8_bit", f"{what} image (maximum {top}) to 8 bits ({how})"))
    elif image.mode == "F":
        values = np.asarray(image)
        low, high = (float(values.min()), float(values.max())) if np.isfinite(values).all() else (-1.0, -1.0)
        if low < 0 or high > 255:
            raise LeftOut(
                f"floating-point image with values from {low:g} to {high:g}: no known range; scale it to 0-255"
            )
        scale = 255.0 if high <= 1 else 1.0
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
        changes.append(
            ("image_float_to_8_bit", f"floating-point image (values {low:g}-{high:g}) to 8 bits (x {scale:g})")
        )
    return image, orientation, changes


def _read_mask(path: Path, rule: MaskRule, decoder: MaskDecoder) -> tuple[np.ndarray, str, list[tuple[str, str]]]:
    """The mask's class indices (``H x W``), its file format, and the repairs made."""
    try:
        with Image.open(path) as opened:
            opened.load()
            mask, file_format = opened.copy(), opened.format or "?"
    except Exception as exc:  # noqa: BLE001 - as for images
        raise LeftOut(f"mask cannot be decoded ({exc.__class__.__name__}: {exc})") from exc
    lossy = file_format in ("JPEG", "MPO")
    changes = []
    if mask.mode in RGB_MASK_MODES:
        rgb = np.asarray(mask.convert("RGB"))
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        if not gray or decoder._all_in_palette(rgb):  # as the decoder reads it
            if not decoder.palette:
                raise LeftOut("RGB colour mask and data.palette is not set: list the colours in class order")
            rgb, snapped = _snap_colours(rgb, decoder, lossy)
            if snapped:
                why = "JPEG compression noise" if lossy else "anti-aliased edges"
                changes.append(
                    ("mask_colours_snapped", f"{why}: {snapped} pixels set to the nearest colour of data.palette")
                )
            changes.append(("mask_colours_to_classes", "RGB colour mask mapped to class indices through data.palette"))
            return decoder.decode(Image.fromarray(rgb), path), file_format, changes
        changes.append(("mask_rgb_to_index", "RGB mask with three equal channels saved as a one-channel index mask"))
        mask = Image.fromarray(np.ascontiguousarray(rgb[..., 0]))
    try:
        values, _ = decoder.raw_values(mask, path)
    except Exception as exc:  # noqa: BLE001 - a mode no mask can have
        raise LeftOut(str(exc)) from exc
    if values.dtype == np.uint8 and (lossy or rule.snap_every_mask):
        snapped = rule.lut()[values]
        moved = int((snapped != values).sum())
        if moved:
            why = "JPEG compression noise" if lossy else "anti-aliased edges"
            shown = ", ".join(map(str, rule.snap_values[:8])) + (", ..." if len(rule.snap_values) > 8 else "")
            changes.append(("mask_snapped", f"{why}: {moved} pixels snapped to the nearest class value ({shown})"))
        values = snapped
    if rule.binary and values.dtype == np.uint8 and (values == 255).any():
        values = np.where(values == 255, np.uint8(1), values)
        changes.append(("mask_binary_255_to_1", "0/255 binary mask: 255 became class 1"))
    try:
        classes = decoder.map_values(values, path)
    except Exception as exc:  # noqa: BLE001 - 32-bit values no table covers
        raise LeftOut(str(exc)) from exc
    if not decoder.identity and (classes != values).any():
        changes.append(
            ("mask_labels_applied", "data.label_map / data.reduce_zero_label applied: it holds class indices")
        )
    return classes, file_format, changes


def _snap_colours(rgb: np.ndarray, decoder: MaskDecoder, lossy: bool) -> tuple[np.ndarray, int]:
    """``rgb`` with every colour off the palette (and off ``ignore_colors``) set to the nearest one, and how many
    pixels moved. Raises :class:`LeftOut` when a PNG mask has more off-palette pixels than edge noise leaves."""
    known = np.array([*decoder.palette, *decoder.ignore_colors], dtype=np.int32)
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    distance = ((colours[:, None, :].astype(np.int32) - known[None, :, :]) ** 2).sum(axis=2)
    nearest = distance.argmin(axis=1)
    off = distance.min(axis=1) > 0
    moved = int(off[inverse.ravel()].sum())
    if moved and not lossy and moved > COLOUR_NOISE_SHARE * inverse.size:
        shown = ", ".join(str(c.tolist()) for c in colours[off][:4])
        raise LeftOut(
            f"{moved / inverse.size:.0%} of the pixels have colours not in data.palette ({shown}): more than edge "
            "noise; add them to data.palette (a class) or data.ignore_colors (ignored)"
        )
    fixed = known[nearest].astype(np.uint8)[inverse.ravel()].reshape(rgb.shape)
    return fixed, moved


def _plain_mode(image: Image.Image) -> Image.Image:
    """``image`` in a mode PNG keeps and bilinear resizing reads (L or RGB; RGBA keeps its alpha)."""
    return image if image.mode in ("L", "RGB", "RGBA") else image.convert("RGB")


def _save(image: Image.Image, path: Path) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    options = {}
    if path.suffix.lower() in (".jpg", ".jpeg"):  # a name data.image_suffix fixes: JPEG again, at high quality
        options, image = {"quality": 95}, image if image.mode in ("L", "RGB") else image.convert("RGB")
    image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"), **options)
    os.replace(tmp, path)


def _copy(source: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def refuse_target(root: Path, out: Path) -> None:
    """Raise :class:`UserError` unless ``out`` is a new or empty folder outside ``root``: the original is never
    written to, and nothing already in ``out`` is written over."""
    real_root, real_out = root.resolve(), out.resolve()
    if real_out == real_root or real_root in real_out.parents:
        raise UserError(
            f"out={out} is inside data.root={root}: the repaired copy goes to a folder of its own (the original is "
            f"never changed), e.g. out={real_root}_fixed"
        )
    if real_out.exists() and (not real_out.is_dir() or any(real_out.iterdir())):
        raise UserError(f"out={out} exists and is not empty: name a new or empty folder (fix_data writes over nothing)")


def destination(path: Path, root: Path, out: Path, suffix: str | None = None, new_suffix: str | None = None) -> Path:
    """Where the copy of ``path`` (under ``root``) goes under ``out``: the same relative path, with the
    name's ending ``suffix`` replaced by ``new_suffix`` when both are given."""
    try:
        relative = path.relative_to(root).as_posix()
    except ValueError:  # reached through a link out of the root: keep its name under the root
        relative = path.name
    if suffix and new_suffix and relative.lower().endswith(suffix.lower()):
        relative = relative[: len(relative) - len(suffix)] + new_suffix
    return out / relative


def png_suffix(mask_suffix: str) -> str:
    """``mask_suffix`` with its file extension made ``.png`` (``.jpg`` -> ``.png``, ``_mask.jpg`` -> ``_mask.png``)."""
    stem, dot, extension = mask_suffix.rpartition(".")
    return (stem if dot else mask_suffix) + ".png" if extension.lower() != "png" or not dot else mask_suffix


def write_report(path: Path, result: FixResult) -> None:
    """``fix_report.csv``: one row per change (file, change, reason), the pairs left out last."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "change", "reason"])
        for change in sorted(result.changes, key=lambda c: (c.file, c.change)) + result.left_out:
            writer.writerow([change.file, change.change, change.reason])


def no_mask(found, key: str) -> Change:
    """The record of an image left out for want of a mask."""
    return Change(str(found.images_folder / key), "left_out", f"no mask in {found.masks_folder}")


def write_lists(files: dict, result: FixResult, out: Path, split_file: str, image_suffix: str | None) -> dict:
    """The split lists of the copy: each split's names whose pair was written, in the list's order.
    Returns the ``data.split_file`` to use when the original lists lay outside the data root."""
    relative = not Path(split_file).is_absolute()
    target = split_file if relative else "splits/{split}.txt"
    for split, found in files.items():
        if found.split_list is None:
            continue
        kept = [_key(image, found.images_folder, image_suffix) for image, _ in found.pairs if image in result.written]
        write_split_list(out / target.format(split=split), kept, tool=is_tool_list(found.split_list))
    return {} if relative else {"split_file": target}


def _key(image: Path, folder: Path, image_suffix: str | None) -> str:
    relative = image.relative_to(folder).as_posix()
    if image_suffix and relative.lower().endswith(image_suffix.lower()):
        return relative[: len(relative) - len(image_suffix)]
    return relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
