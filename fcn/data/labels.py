"""From the pixels of a file to what the model sees: RGB images and class-index masks.

Images of any common mode become ``H x W x 3`` uint8 RGB: grayscale and palette images are
expanded, the alpha channel of RGBA images is dropped, 16-bit images are scaled to 8 bits as
value / 257 (65535 becomes 255), never clipped. EXIF orientation tags are ignored: pixels are used
in the order they are stored, which is the order annotation tools label and masks are saved in
(applying the tag to the image alone would turn it against its mask). The dataset scan
(:mod:`fcn.data.doctor.scan`) reports every conversion and every orientation tag once per dataset.

Masks become class indices through :class:`MaskDecoder`: index values pass through a
``label_map`` and then ``reduce_zero_label``; RGB colour masks are mapped through the palette.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.errors import UserError

# Modes Pillow opens 16- and 32-bit integer images in.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
RGB_MASK_MODES = ("RGB", "RGBA")
EXIF_ORIENTATION = 0x0112


# What becomes of each mode on the way to 8-bit RGB (image_to_rgb), in the words of the scan's warning.
CONVERSIONS = {
    "L": "8-bit grayscale: each value copied to R, G and B",
    "LA": "grayscale with alpha: the grey copied to R, G and B, the alpha channel dropped",
    "P": "palette: each index replaced by its palette colour",
    "PA": "palette with alpha: each index replaced by its colour, the alpha dropped",
    "RGBA": "RGBA: the alpha channel dropped (transparent pixels keep their stored colour)",
    "RGBX": "RGBX: the padding channel dropped",
    "CMYK": "CMYK: converted by Pillow's formula without a colour profile (colours may shift)",
    "YCbCr": "YCbCr: converted to RGB",
    "LAB": "CIELAB: converted to RGB",
    "HSV": "HSV: converted to RGB",
    "1": "1-bit: 0 becomes black and 1 white (255)",
    "I;16": "16-bit grayscale: value/257 (65535 becomes 255, never clipped), copied to R, G and B",
    "I": "32-bit integer grayscale: values must lie in 0-65535, then value/257, copied to R, G and B",
}
for _mode in ("I;16L", "I;16B", "I;16N"):
    CONVERSIONS[_mode] = CONVERSIONS["I;16"]
FLOAT_FIX = (
    "floating-point pixels have no fixed range to map to 8 bits; scale them to 0-255 (or 0-65535) and save "
    "as 8- or 16-bit PNG/TIFF, e.g. Image.fromarray(np.clip(x * 255, 0, 255).astype(np.uint8))"
)


def conversion(image: Image.Image) -> str | None:
    """How ``image`` (opened, not decoded) becomes RGB, in words; None when it is RGB already.
    The bits and sample format are those the file's header gives (:func:`sample_layout`), not
    Pillow's mode: a 16-bit RGB PNG or TIFF opens as mode RGB. A palette image with a transparent
    colour and a multi-frame file say so too."""
    if image.mode == "RGB":
        text = None
    else:
        text = CONVERSIONS.get(image.mode, f"mode {image.mode}: converted to RGB by Pillow")
    bits, signed = sample_layout(image)
    if image.mode == "I" and getattr(image, "tag_v2", None) is not None:  # a TIFF: say what it stores
        text = CONVERSIONS["I"].replace(
            "32-bit integer grayscale", f"{bits}-bit integer grayscale" + signed * " (signed)"
        )
    elif image.mode in ("RGB", "RGBA") and bits > 8:  # as the file stores it
        text = f"{bits}-bit {image.mode}: Pillow keeps each value's high byte (value/256 rounded down, never clipped)"
        text += "; the alpha channel dropped" if image.mode == "RGBA" else ""
    elif bits > 8 and image.mode not in (*WIDE_MODES, "F"):
        text = f"{text}; {bits}-bit samples: Pillow keeps each value's high byte (value/256 rounded down)"
    elif signed and image.mode not in (*WIDE_MODES, "F"):
        text = (
            (f"{text}; " if text else "")
            + f"signed {bits}-bit samples (TIFF SampleFormat=2) read as unsigned (-1 becomes 255): "
            "save the image with unsigned samples"
        )
    if image.mode == "P" and "transparency" in image.info:
        text = "palette with a transparent colour: each index replaced by its colour, the transparency dropped"
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        text = (f"{text}; " if text else "") + f"{frames} frames: only the first is used"
    return text


def float_image_error(path: Path | str, image: Image.Image | None = None, what: str = "image") -> str | None:
    """One line refusing a floating-point image (Pillow's mode F, or a TIFF whose SampleFormat tag
    339 says IEEE float, which Pillow may not open at all when it has several bands), with the fix;
    None for any other image. Reads only the header (``image``: already opened, or None to read
    the TIFF directory of ``path`` directly)."""
    if image is not None and image.mode == "F":
        return f"{what} {path} is a 32-bit floating-point image (mode F); {_fix(what)}"
    tags = tiff_tags(path) if image is None else getattr(image, "tag_v2", None)
    if not tags or 3 not in _as_tuple(tags.get(339, 1)):  # SampleFormat 3: IEEE floating point
        return None
    bits = _as_tuple(tags.get(258, 32))[0]  # BitsPerSample
    bands = int(tags.get(277, 1))  # SamplesPerPixel
    return f"{what} {path} is a {bits}-bit floating-point TIFF with {bands} band(s) (SampleFormat=3); {_fix(what)}"


def _fix(what: str) -> str:
    if what == "mask":
        return "masks must be index PNGs (pixel value = class index, 8- or 16-bit): save np.rint(x).astype(np.uint16)"
    return FLOAT_FIX


def tiff_tags(path: Path | str) -> dict | None:
    """The first image directory of a TIFF file (tag number -> value), read with Pillow's own TIFF
    directory reader without decoding any pixel; None when ``path`` is not a TIFF."""
    from PIL import TiffImagePlugin

    try:
        with open(path, "rb") as fp:
            head = fp.read(8)
            if head[:4] not in TiffImagePlugin.PREFIXES:
                return None
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head)
            fp.seek(ifd.next)
            ifd.load(fp)
            return dict(ifd)
    except Exception:  # noqa: BLE001 - a damaged header: the decoder's own error says it
        return None


def sample_layout(image: Image.Image) -> tuple[int, bool]:
    """``(bits per sample, signed)`` as the file stores them: from a TIFF's header (BitsPerSample
    and SampleFormat, tags 258 and 339, the widest band), else from the pixel layout Pillow decodes
    (``RGB;16B`` of a 16-bit RGB PNG: 16), else 8 bits, unsigned. Reads no pixel."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        return max(_as_tuple(tags[258])), 2 in _as_tuple(tags.get(339, 1))
    rawmode = _rawmode(image)
    return (16 if rawmode.endswith(("16", "16B", "16L", "16N")) else 8), False


def wide_colour_values(image: Image.Image, path: Path | str) -> np.ndarray | None:
    """The full 16-bit samples (``H x W x 3``, uint16, RGB) of a colour image stored with 16 bits per
    sample, which Pillow decodes to its high byte only; None for every other image. Read with
    OpenCV (installed with albumentations), which decodes 16-bit PNG and TIFF at full depth."""
    if image.mode not in ("RGB", "RGBA") or sample_layout(image) != (16, False):
        return None
    import cv2  # only for these files: Pillow has no 16-bit colour mode

    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if values is None or values.dtype != np.uint16 or values.ndim != 3 or values.shape[2] < 3:
        return None
    return np.ascontiguousarray(values[..., 2::-1])  # OpenCV's BGR(A) -> RGB


def _rawmode(image: Image.Image) -> str:
    """The pixel layout the file stores (``RGB;16B`` for a 16-bit RGB PNG that Pillow opens as RGB)."""
    try:
        args = image.tile[0].args
    except (IndexError, AttributeError):
        return ""
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def image_to_rgb(image: Image.Image, path: Path | str) -> np.ndarray:
    """``image`` (any Pillow mode) as an ``H x W x 3`` uint8 RGB array; see the module notes."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in WIDE_MODES:
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(f"image {path} has {mode} pixel values outside 0-65535; save it as 8- or 16-bit")
        gray = np.round(values.astype(np.float32) / 257).astype(np.uint8)  # 65535 -> 255, no clipping
        return np.repeat(gray[..., None], 3, axis=2)
    if (refused := float_image_error(path, image)) is not None:
        raise UserError(refused)
    return np.asarray(image.convert("RGB"))


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of ``image`` (1, "as stored", when absent)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block is the same as none for us
        return 1


class MaskDecoder:
    """Turns the pixels of a mask file into class indices.

    Args:
        num_classes: classes are ``0 .. num_classes - 1``.
        ignore_index: the value of pixels that count nowhere (void, borders, padding).
        label_map: ``{file value: class}`` for index masks, e.g. ``{255: 1}`` for 0/255 binary
            masks or ``{11: 255}`` to ignore a void class; values not listed stay as they are.
        reduce_zero_label: after ``label_map``, 0 becomes ``ignore_index`` and every other value
            (but ``ignore_index``) moves down by one: ADE20K's "0 = other" convention.
        palette: ``[[r, g, b], ...]`` in class order; RGB masks map colour ``palette[i]`` to class i.
        ignore_colors: colours of RGB masks that become ``ignore_index`` (e.g. ``[[0, 0, 0]]``).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        label_map: Mapping[int, int] | None = None,
        reduce_zero_label: bool = False,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_colors: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.reduce_zero_label = reduce_zero_label
        self.palette = [tuple(int(c) for c in colour) for colour in palette] if palette else None
        self.ignore_colors = [tuple(int(c) for c in colour) for colour in ignore_colors or []]
        # Index masks go through a lookup table (label_map, then reduce_zero_label): one
        # vectorised gather per mask.
        lut = np.arange(65536, dtype=np.int64)
        for raw, target in self.label_map.items():
            if 0 <= raw < 65536:
                lut[raw] = target
        if reduce_zero_label:
            keep = lut == ignore_index
            lut = np.where(lut == 0, ignore_index, lut - 1)
            lut[keep] = ignore_index
        # Classes decoded from colours fit in uint8 unless the classes or ignore_index do not.
        self.dtype = np.uint8 if 0 <= ignore_index <= 255 and num_classes <= 256 else np.int32
        self.lut = lut.astype(np.int32)  # 16-bit masks: int32, so no value is ever truncated
        head = lut[:256]  # 8-bit masks (nearly all): a 256-entry table, uint8 when the targets fit
        self.lut8 = head.astype(np.uint8) if head.min() >= 0 and head.max() <= 255 else head.astype(np.int32)
        self.identity = not self.label_map and not reduce_zero_label

    @property
    def settings(self) -> dict:
        """Everything that changes the decoded values (part of the scan cache key)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "label_map": sorted(self.label_map.items()),
            "reduce_zero_label": self.reduce_zero_label,
            "palette": self.palette,
            "ignore_colors": self.ignore_colors,
        }

    def raw_values(self, mask: Image.Image, path: Path | str) -> tuple[np.ndarray, bool]:
        """The mask's stored values (``H x W``) and whether they are index values (still to pass
        through ``label_map`` / ``reduce_zero_label``) rather than classes decoded from colours.

        An RGB mask whose three channels are equal everywhere is an index mask saved as RGB and
        is read as one; any other RGB mask is mapped through the palette.
        """
        if mask.mode in ("L", "P"):  # a palette PNG stores class indices; its colours are for viewing
            return np.array(mask), True  # a writable copy: torch refuses to share read-only memory
        if mask.mode == "1":
            return np.asarray(mask).astype(np.uint8), True
        if mask.mode in WIDE_MODES:
            return np.asarray(mask).astype(np.int32), True
        if mask.mode in RGB_MASK_MODES:
            rgb = np.asarray(mask.convert("RGB"))
            gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            if gray and not self._all_in_palette(rgb):
                return np.ascontiguousarray(rgb[..., 0]), True
            return self._colours_to_indices(rgb, path), False
        raise UserError(
            f"mask {path} has mode {mask.mode}; masks must be index PNGs (pixel value = class index, "
            "8- or 16-bit) or RGB colour masks with data.palette set"
        )

    def map_values(self, values: np.ndarray, path: Path | str) -> np.ndarray:
        """Index values through ``label_map`` and ``reduce_zero_label``."""
        if values.dtype == np.uint8:
            return values if self.identity else self.lut8[values]
        if values.min() < 0 or values.max() > 65535:
            raise UserError(f"mask {path} has values outside 0-65535")
        return self.lut[values]

    def decode(self, mask: Image.Image, path: Path | str) -> np.ndarray:
        """Class indices (``H x W``) of a mask file, ``ignore_index`` where ignored."""
        values, is_index = self.raw_values(mask, path)
        return self.map_values(values, path) if is_index else values

    def _codes(self, rgb: np.ndarray) -> np.ndarray:
        return (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]

    def _all_in_palette(self, rgb: np.ndarray) -> bool:
        if not self.palette:
            return False
        known = {(r << 16) | (g << 8) | b for r, g, b in [*self.palette, *self.ignore_colors]}
        return all(int(c) in known for c in np.unique(self._codes(rgb)))

    def _colours_to_indices(self, rgb: np.ndarray, path: Path | str) -> np.ndarray:
        codes = self._codes(rgb)
        if not self.palette:
            found = np.unique(codes)
            listed = ",".join(f"[{c >> 16},{(c >> 8) & 255},{c & 255}]" for c in found[:12].tolist())
            more = f" ... ({len(found)} colours in all)" if len(found) > 12 else ""
            raise UserError(
                f"mask {path} is an RGB colour mask but data.palette is not set; its colours: {listed}{more}. List "
                "the mask colours in class order as data.palette=[[r,g,b],...] (or save masks as index PNGs)"
            )
        colours, inverse = np.unique(codes, return_inverse=True)
        table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(self.palette)}
        table.update({(r << 16) | (g << 8) | b: self.ignore_index for r, g, b in self.ignore_colors})
        unknown = [int(c) for c in colours if int(c) not in table]
        if unknown:
            shown = ", ".join(str([c >> 16, (c >> 8) & 255, c & 255]) for c in unknown[:8])
            raise UserError(
                f"mask {path} has colours not in data.palette: {shown}"
                + (f" ({len(unknown)} in all)" if len(unknown) > 8 else "")
                + "; add them to data.palette (a class) or data.ignore_colors (ignored)"
            )
        mapped = np.array([table[int(c)] for c in colours], dtype=self.dtype)
        return mapped[inverse.reshape(codes.shape)]


# The settings that decide which class a stored mask value is: fixed by training.
LABEL_READING_KEYS = ("reduce_zero_label", "label_map", "ignore_index")


def label_reading_changes(trained: Mapping, now: Mapping) -> str | None:
    """How the label settings ``now`` read masks differently from ``trained`` (a checkpoint's data
    config), as ``data.reduce_zero_label: false -> true, ...``, or None when they read them the same."""

    def plain(value):
        return dict(value) if isinstance(value, Mapping) else value

    changed = [
        f"data.{k}: {plain(trained.get(k))} -> {plain(now.get(k))}"
        for k in LABEL_READING_KEYS
        if plain(trained.get(k)) != plain(now.get(k))
        and not (k == "reduce_zero_label" and not trained.get(k) and not now.get(k))
    ]
    return ", ".join(changed) or None


def trained_label_reading(trained: Mapping) -> str:
    """``data.num_classes=3, data.reduce_zero_label=false, data.label_map=null``: how a checkpoint read its masks."""
    words = [f"data.num_classes={trained.get('num_classes')}"]
    words += [
        f"data.{k}={str(trained.get(k)).lower() if isinstance(trained.get(k), bool) else trained.get(k)}"
        for k in LABEL_READING_KEYS
    ]
    return ", ".join(words)
