"""Mask encodings that disagree with the data config: found from file names and stored values.

Two questions are answered here, both before training:

- :func:`find_alternative_masks`: the masks the config names are missing, but the images' masks
  sit beside them under another name, e.g. ``*_gtFine_labelIds.png`` where Cityscapes train ids
  were expected, or ``masks/a.jpg`` where ``masks/a.png`` was. The answer names what was found and
  the setting that reads it (``data=cityscapes_labelids``, ``data.mask_suffix=.jpg``).
- :func:`diagnose_values`: the values stored in the masks tell their encoding (0/255 binary masks,
  interpolated or JPEG-blurred binary masks, Cityscapes label ids, classes 1..N, 16-bit masks
  scaled by 256 or 257, values offset from 0, grayscale renderings of colour masks), and each
  encoding has its own fix. A class count is only suggested when the values look like class ids,
  never from a stray value.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Mask files of known datasets, by the end of their name: what they hold and the config reading them.
KNOWN_MASK_SUFFIXES = {
    "_gtFine_labelTrainIds.png": ("Cityscapes train ids (0-18, 255 ignored)", "data=cityscapes"),
    "_gtFine_labelIds.png": ("Cityscapes label ids (0-33)", "data=cityscapes_labelids"),
    "_gtCoarse_labelTrainIds.png": (
        "Cityscapes coarse train ids",
        "data=cityscapes data.mask_suffix=_gtCoarse_labelTrainIds.png",
    ),
    "_gtCoarse_labelIds.png": (
        "Cityscapes coarse label ids",
        "data=cityscapes_labelids data.mask_suffix=_gtCoarse_labelIds.png",
    ),
    "_gtFine_color.png": ("Cityscapes colour renderings, for viewing only", None),
    "_gtFine_instanceIds.png": ("Cityscapes instance ids, not classes", None),
    "_gtFine_polygons.json": (
        "Cityscapes polygons (make *_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs)",
        None,
    ),
    "_seg.png": (
        "full-ADE20K colour-coded masks, not the SceneParsing index masks (use ADEChallengeData2016 with data=ade20k)",
        None,
    ),
}
# Folders of known datasets that hold something else than the class masks the config expects.
KNOWN_MASK_FOLDERS = {
    "SegmentationObject": "VOC instance masks (one value per object, not per class)",
    "SegmentationClassAug": "VOC+SBD class masks (augmented set): data.mask_dir=SegmentationClassAug",
    "SegmentationClass": "VOC class masks: data.mask_dir=SegmentationClass",
    "gtFine": "Cityscapes fine annotations: data=cityscapes",
    "annotations": "class masks: data.mask_dir=annotations",
}
# Folder names people give their masks: a missing data.mask_dir beside one of them names it.
COMMON_MASK_FOLDERS = (
    "labels",
    "label",
    "masks",
    "mask",
    "gt",
    "groundtruth",
    "ground_truth",
    "annotations",
    "annotation",
    "segmentation",
    "segmentations",
    "SegmentationClassPNG",
)
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe")
CITYSCAPES_TRAIN_CLASSES = 19
CITYSCAPES_LABEL_IDS = 34  # label ids 0..33 (-1, license plate, is never stored)


@dataclass
class AlternativeMasks:
    """Masks of unmatched images found under another suffix, counted per suffix."""

    masks_folder: Path
    suffixes: dict[str, int]  # suffix -> images whose mask has it
    checked: int  # unmatched images looked at
    readable_suffix: str | None  # a suffix whose files are class masks the config could read as is
    expected: str  # the suffix the config names
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One line: what the config expects, what is there instead, and the setting that reads it."""
        found = ", ".join(f"'<name>{s}' ({n} of {self.checked})" for s, n in self.suffixes.items())
        text = f"no mask '<name>{self.expected}' in {self.masks_folder}, but {found} are there"
        return text + ("; " + "; ".join(self.notes) if self.notes else "")


def find_alternative_masks(
    masks_folder: Path, unmatched: Mapping[str, Path], expected: str, limit: int = 200
) -> AlternativeMasks | None:
    """Look beside the missing masks of ``unmatched`` (image key -> image path) for files named
    ``<key><other suffix>``; ``None`` when there are none (or nothing is unmatched).

    Looks at the first ``limit`` unmatched images (one directory listing per folder).
    """
    if not unmatched or not masks_folder.is_dir():
        return None
    listings: dict[Path, list[str]] = {}
    suffixes: dict[str, int] = {}
    keys = list(unmatched)[:limit]
    for key in keys:
        folder = (masks_folder / key).parent
        if folder not in listings:
            listings[folder] = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        stem = Path(key).name
        for name in listings[folder]:
            if name.startswith(stem) and name != stem and (folder / name).is_file():
                suffix = name[len(stem) :]
                if suffix.startswith((".", "_", "-")):
                    suffixes[suffix] = suffixes.get(suffix, 0) + 1
    if not suffixes:
        return None
    # Known class encodings first, then the most frequent suffix.
    ordered = sorted(suffixes, key=lambda s: (KNOWN_MASK_SUFFIXES.get(s, ("", ""))[1] is None, -suffixes[s], s))
    notes: list[str] = []
    readable = None
    for suffix in ordered:
        if suffix in KNOWN_MASK_SUFFIXES:
            what, config = KNOWN_MASK_SUFFIXES[suffix]
            notes.append(f"'{suffix}' are {what}" + (f": {config} reads them" if config else ""))
        elif suffix.lower().endswith((".png", ".bmp", ".tif", ".tiff", ".webp", *LOSSY_SUFFIXES)):
            lossy = suffix.lower().endswith(LOSSY_SUFFIXES)
            notes.append(
                f"data.mask_suffix={suffix} reads them"
                + (
                    " (JPEG masks are lossy: compression blurs label values along every edge; save masks as "
                    "PNG from the original labels)"
                    if lossy
                    else ""
                )
            )
            if readable is None and suffixes[suffix] == len(keys):
                readable = suffix
    return AlternativeMasks(masks_folder, {s: suffixes[s] for s in ordered}, len(keys), readable, expected, notes)


def folder_hint(missing: Path) -> str:
    """What sits beside a missing mask folder that may be the one meant (VOC's SegmentationObject, ...)."""
    parent = missing.parent
    if not parent.is_dir():
        return ""
    hints = [f"{name}/ holds {what}" for name, what in KNOWN_MASK_FOLDERS.items() if (parent / name).is_dir()]
    known = set(KNOWN_MASK_FOLDERS) | {missing.name}
    hints += [
        f"if {n}/ holds the masks: data.mask_dir={n}"
        for n in COMMON_MASK_FOLDERS
        if n not in known and (parent / n).is_dir()
    ]
    return ("; " + "; ".join(hints)) if hints else ""


@dataclass
class Diagnosis:
    """An encoding of the mask values that contradicts the config, and its fix."""

    kind: str
    severity: str
    message: str


def diagnose_values(
    values: Collection[int],
    outside: Sequence[int],
    num_classes: int,
    ignore_index: int,
    *,
    histogram: Mapping[int, int] | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_zero_label: bool = False,
    palette: Sequence[Sequence[int]] | None = None,
    mask_names: Sequence[str] = (),
    lossy: bool = False,
) -> list[Diagnosis]:
    """The encodings ``values`` (every stored index value of a split) reveal, with their fixes.

    Args:
        values: the stored values, before any label handling.
        outside: the decoded values outside ``[0, num_classes)`` that are not ``ignore_index``.
        histogram: stored value -> pixels, when known (masks read without a label map).
        label_map, reduce_zero_label, palette: the data config's label handling.
        mask_names: some mask file names (their suffix can name the encoding).
        lossy: some masks are JPEG files: values outside the classes are its noise, so no class
            count or void value is suggested for them (that would contradict "save as PNG").

    Returns one :class:`Diagnosis` per contradiction (``error``: labels would be wrong). When
    ``outside`` is not empty, the last diagnosis is always the ``values_out_of_range`` error
    with the fixes that fit the values.
    """
    raw = set(int(v) for v in values)
    found: list[Diagnosis] = []
    mapped = bool(label_map) or reduce_zero_label
    cityscapes_ids = any(n.endswith("_labelIds.png") for n in mask_names)
    cityscapes_files = any("_gtFine_" in n or "_gtCoarse_" in n for n in mask_names)
    if num_classes == CITYSCAPES_TRAIN_CLASSES and not mapped and raw:
        in_id_range = raw - {ignore_index} <= set(range(CITYSCAPES_LABEL_IDS))
        beyond = max(raw - {ignore_index}, default=0) >= num_classes
        if cityscapes_ids or (cityscapes_files and in_id_range and beyond):
            found.append(
                Diagnosis(
                    "cityscapes_label_ids",
                    "error",
                    "masks hold Cityscapes label ids (0-33) where train ids (0-18) are expected: id 7 is road, "
                    "26 is car, and read as train ids they are other classes or dropped. Fix: data=cityscapes_labelids "
                    "(maps label ids to train ids); do not ignore these values, they are classes",
                )
            )
            return found
    lm = dict(label_map or {})
    # Values between 0 and 255 that are no class: two or more of them (one is a void value, see below).
    between = sorted(v for v in raw if 0 < v < 255 and v not in lm and v >= num_classes)
    if not reduce_zero_label and {0, 255} <= raw and len(between) >= 2:
        share = _share(histogram, between)
        if share is None or share < 0.25:
            ignored = ignore_index == 255 and 255 not in lm
            found.append(
                Diagnosis(
                    "interpolated_binary_masks",
                    "error",
                    f"masks look like 0/255 binary masks with {len(between)} in-between values ({_values(between)}"
                    + (f", {100 * share:.1f}% of pixels" if share is not None else "")
                    + ") along the edges, as bilinear resizing or JPEG compression leaves them; "
                    + (
                        f"255 is data.ignore_index={ignore_index}, so every foreground pixel would be ignored, and "
                        if ignored
                        else ""
                    )
                    + "the in-between values are no classes. Fix: re-export the masks as PNG with nearest-neighbour "
                    "resizing (or threshold them at 128), then data.label_map={255:1}",
                )
            )
            return found
    if not mapped and raw == {0, 255} and ignore_index == 255:  # (only 255: masks with no labelled pixel)
        found.append(
            Diagnosis(
                "binary_masks_ignored",
                "error",
                "masks hold only 0 and 255, and 255 is data.ignore_index: every foreground pixel would be ignored. "
                "Fix: for 0/255 binary masks data.label_map={255:1}",
            )
        )
        return found
    grey = _grey_palette(raw - {ignore_index}, palette, num_classes)
    if grey and not mapped:
        found.append(
            Diagnosis(
                "grey_colour_masks",
                "error",
                "mask values are the grey levels of data.palette's colours (colour masks converted to grayscale): "
                "re-save them as index masks, or data.label_map=" + _map_text(grey),
            )
        )
        return found
    if outside:
        found.append(
            Diagnosis(
                "values_out_of_range",
                "error",
                "Fix: "
                + (
                    "they are JPEG compression noise along the edges, not classes or void values: save the masks "
                    "as PNG (no data.num_classes or data.ignore_index fixes them)"
                    if lossy
                    else _value_fix(sorted(outside), raw, num_classes, ignore_index, mapped, histogram)
                ),
            )
        )
    return found


def _share(histogram: Mapping[int, int] | None, between: list[int]) -> float | None:
    if not histogram:
        return None
    total = sum(histogram.values())
    return sum(histogram.get(v, 0) for v in between) / total if total else None


def _values(values: list[int], n: int = 8) -> str:
    return ", ".join(map(str, values[:n])) + (", ..." if len(values) > n else "")


def _map_text(mapping: Mapping[int, int], n: int = 12) -> str:
    items = list(mapping.items())
    text = ",".join(f"{k}:{v}" for k, v in items[:n])
    return "{" + text + ("" if len(items) <= n else ",...") + "}"


def _grey_palette(values: set[int], palette, num_classes: int) -> dict[int, int] | None:
    """``{grey level: class}`` when every value is the ITU-R 601 luma of a palette colour and the
    values are not plain class indices."""
    if not palette or not values or values <= set(range(num_classes)):
        return None
    luma = {}
    for i, (r, g, b) in enumerate(palette):
        luma.setdefault((r * 299 + g * 587 + b * 114) // 1000, i)
    if len(luma) < len(palette) or not values <= set(luma):
        return None
    return {v: luma[v] for v in sorted(values)}


def _value_fix(
    values: list[int],
    raw: set[int],
    num_classes: int,
    ignore_index: int,
    mapped: bool,
    histogram: Mapping[int, int] | None = None,
) -> str:
    """How to make the stored values fit, from what they look like (never a class count from a stray value),
    the likeliest fix first, each saying what it does to the labels."""
    hints = []
    stored = sorted(raw - {ignore_index})
    shift = f"1..{num_classes} become classes 0..{num_classes - 1}"
    # reduce_zero_label keeps num_classes classes: suggested only where that leaves at least two
    if num_classes >= 2 and not mapped and stored and stored[0] == 1 and stored[-1] == num_classes and 0 not in raw:
        hints.append(f"classes are stored as 1..N: data.reduce_zero_label=true ({shift})")
    elif num_classes >= 2 and values == [num_classes] and 0 in raw and not mapped:
        # 0..N are plainly N+1 class ids; dropping 0 is the second reading, and says what it drops
        hints.append(f"if the values 0..{num_classes} are all classes: data.num_classes={num_classes + 1}")
        share = _share(histogram, [0])
        dropped = f"0 holds {100 * share:.0f}% of the pixels" if share is not None else ""
        if share is not None and share > 0.5:
            dropped = f"0 holds most pixels ({100 * share:.0f}%), which would never be trained or scored"
        hints.append(
            "if 0 means 'unlabelled' and classes start at 1: data.reduce_zero_label=true "
            f"(pixels of 0 become data.ignore_index={ignore_index}, never trained or scored, and {shift}"
            + (f"; {dropped}" if dropped else "")
            + ")"
        )
    for factor in (257, 256):
        nonzero = [v for v in stored if v]
        if not mapped and nonzero and max(nonzero) > 255 and all(v % factor == 0 for v in nonzero):
            if max(nonzero) // factor < num_classes:
                scaled = {v: v // factor for v in nonzero}
                hints.append(
                    f"16-bit masks with each class stored as class x {factor}: save them as 8-bit index PNGs, or "
                    f"data.label_map={_map_text(scaled)}"
                )
                break
    if not mapped and 0 < len(stored) <= num_classes and stored[0] >= num_classes:
        hints.append(
            f"the {len(stored)} stored values are not class indices 0..{num_classes - 1}: map them, e.g. "
            f"data.label_map={_map_text({v: i for i, v in enumerate(stored)})} (check the order)"
        )
    binary = sorted(raw - {0})
    if not mapped and num_classes == 2 and 0 in raw and len(binary) == 1 and binary[0] >= 2:
        hints.append(f"binary masks stored as 0/{binary[0]}: data.label_map={{{binary[0]}:1}}")
    structural = bool(hints)  # the values have a known shape: a class count would be wrong
    if len(values) == 1 and not structural:
        v = values[0]
        hints.append(f"if {v} marks void pixels: data.ignore_index={v} or data.label_map={{{v}:{ignore_index}}}")
    dense = stored and len(stored) >= 0.5 * (stored[-1] + 1) and stored[-1] < 1024
    if dense and not structural:
        # with a label map the offending values are the mapped ones, not those stored in the files
        top = max(values) if mapped and values else stored[-1]
        hints.append(f"if they are real classes: data.num_classes={max(top + 1, 2)}")
    if not hints:
        hints.append(
            f"the values are sparse ({len(stored)} values up to {stored[-1] if stored else '?'}), so they are no "
            "class count: map them to classes with data.label_map={value:class} and to "
            f"data.ignore_index={ignore_index} what must be ignored"
        )
    return "; or ".join(hints)


def palette_order(
    mask_palettes: Sequence[Sequence[int]], values: Collection[int], palette: Sequence[Sequence[int]]
) -> dict[int, int]:
    """``{stored index: class}`` for the indices of palette masks whose colour is another class's
    colour in ``palette`` (the config's); empty when every used index has its class's colour or a
    colour of none (an unrelated viewing palette is fine: the indices are the classes).

    ``mask_palettes``: flat ``[r, g, b, r, g, b, ...]`` tables of some palette-mode masks.
    """
    classes = {tuple(int(c) for c in colour): i for i, colour in enumerate(palette)}
    moved: dict[int, int] = {}
    for table in mask_palettes:
        for v in sorted(int(v) for v in values):
            if 3 * v + 2 >= len(table) or v >= len(palette):
                continue
            colour = tuple(table[3 * v : 3 * v + 3])
            target = classes.get(colour)
            if target is not None and target != v:
                moved.setdefault(v, target)
    return moved


def palette_order_message(moved: Mapping[int, int], names: Sequence[str] | None = None) -> str:
    """The warning for :func:`palette_order`'s result."""
    named = (lambda c: f"{c} ({names[c]})") if names else str
    first = ", ".join(f"index {v} has the colour of class {named(c)}" for v, c in list(moved.items())[:4])
    return (
        f"palette masks colour their indices as other classes of data.palette: {first}. Indices are read as the "
        "classes (the colours are only for viewing); if the colours are right and the indices are not, "
        f"data.label_map={_map_text(dict(moved))}"
    )
