"""Images read as the file says: the scan reads bit depth and sample format from each file's header,
names each conversion as it is done, and refuses floating-point images up front with the fix."""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fcn.data.build import scan_data
from fcn.data.folder import read_image
from fcn.errors import UserError
from tests.conftest import compose_config
from tests.layouts import write_folder

H, W = 24, 32  # write_folder's image size


def _data(root):
    overrides = ["data=folder", f"data.root={root}", "data.num_classes=3", "data.class_names=[a,b,c]"]
    return compose_config("train", [*overrides, "data.split_file=null"]).data


def _replace(root, stem, write):
    """Put ``write(path)``'s image in place of ``stem``'s JPEG (its mask stays)."""
    (root / "images" / f"{stem}.jpg").unlink()
    write(root)


def float_tiff(path, array: np.ndarray) -> None:
    """A baseline little-endian TIFF of float32 samples (SampleFormat 3), one strip, as GDAL or
    tifffile write them; Pillow cannot write one of several bands."""
    sample_tiff(path, np.asarray(array, dtype=np.float32), sample_format=3)


def sample_tiff(path, array: np.ndarray, sample_format: int = 1, deflate: bool = False, order: str = "<") -> None:
    """A baseline TIFF of ``array`` (H x W or H x W x bands) as stored, one strip: its dtype's bits
    per sample, ``sample_format`` (1 unsigned, 2 signed, 3 float), ``order`` "<" (II) or ">" (MM),
    uncompressed or ``deflate``-compressed (as cameras and tifffile write them; Pillow then decodes
    through libtiff). Pillow writes none of 16-bit RGB, signed or float multi-band TIFFs."""
    height, width = array.shape[:2]
    bands = 1 if array.ndim == 2 else array.shape[2]
    bits = array.dtype.itemsize * 8
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(order)).tobytes()
    data = zlib.compress(data) if deflate else data
    entries = 11
    extra = 8 + 2 + 12 * entries + 4  # offsets of the arrays after the directory
    bits_at, fmt_at = extra, extra + 2 * bands
    data_at = fmt_at + 2 * bands

    def short(tag, values, at):
        if len(values) <= 2:
            return struct.pack(f"{order}HHI", tag, 3, len(values)) + struct.pack(
                f"{order}2H", *(list(values) + [0])[:2]
            )
        return struct.pack(f"{order}HHII", tag, 3, len(values), at)

    def long(tag, value):
        return struct.pack(f"{order}HHII", tag, 4, 1, value)

    ifd = [
        long(256, width),
        long(257, height),
        short(258, [bits] * bands, bits_at),
        short(259, [8 if deflate else 1], 0),
        short(262, [2 if bands >= 3 else 1], 0),
        long(273, data_at),
        short(277, [bands], 0),
        long(278, height),
        long(279, len(data)),
        short(284, [1], 0),
        short(339, [sample_format] * bands, fmt_at),
    ]
    arrays = struct.pack(f"{order}{bands}H", *[bits] * bands) + struct.pack(
        f"{order}{bands}H", *[sample_format] * bands
    )
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(f"{order}I", 8)
    with open(path, "wb") as f:
        f.write(head + struct.pack(f"{order}H", entries) + b"".join(ifd) + b"\0\0\0\0")
        f.write(arrays + data)


def png16_rgb(path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow reads these but cannot write them)."""
    height, width, _ = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("bands", [1, 3])
def test_a_float32_tiff_is_refused_by_the_scan_with_the_fix_not_called_corrupt(tmp_path, bands):
    write_folder(tmp_path, values=(0, 1))
    shape = (H, W) if bands == 1 else (H, W, 3)
    _replace(tmp_path, "b", lambda root: float_tiff(root / "images" / "b.tif", np.random.rand(*shape)))
    with pytest.raises(UserError) as info:
        scan_data(_data(tmp_path), ["train"])
    message = str(info.value)
    assert "b.tif" in message and f"32-bit floating-point TIFF with {bands} band(s)" in message
    assert "scale them to 0-255" in message and "corrupt" not in message


def test_a_float_image_is_refused_when_read_too(tmp_path):
    float_tiff(tmp_path / "f.tif", np.random.rand(H, W))
    with pytest.raises(UserError, match="floating-point"):
        read_image(tmp_path / "f.tif")


def _writers():
    gray = np.full((H, W), 90, np.uint8)
    rgb = np.full((H, W, 3), 90, np.uint8)
    wide = np.full((H, W), 25700, np.uint16)

    def palette_transparent(p):
        image = Image.fromarray(gray, "L").convert("P")
        image.info["transparency"] = 0
        image.save(p, transparency=0)

    def multi_frame(p):
        frames = [Image.fromarray(rgb), Image.fromarray(rgb)]
        frames[0].save(p, save_all=True, append_images=frames[1:])

    return {
        "L.png": (lambda p: Image.fromarray(gray).save(p), "8-bit grayscale: each value copied"),
        "LA.png": (lambda p: Image.fromarray(np.dstack([gray, gray])).save(p), "grayscale with alpha"),
        "P.png": (lambda p: Image.fromarray(gray).convert("P").save(p), "palette: each index replaced"),
        "Pt.png": (palette_transparent, "palette with a transparent colour"),
        "RGBA.png": (lambda p: Image.fromarray(np.dstack([rgb, gray])).save(p), "RGBA: the alpha channel dropped"),
        "CMYK.jpg": (lambda p: Image.fromarray(rgb).convert("CMYK").save(p), "CMYK: converted by Pillow's formula"),
        "one.png": (lambda p: Image.fromarray(gray > 50).save(p), "1-bit: 0 becomes black"),
        "w16.png": (lambda p: Image.fromarray(wide).save(p), "16-bit grayscale: value/257"),
        "w16.tif": (lambda p: Image.fromarray(wide).save(p), "16-bit grayscale: value/257"),
        "i32.tif": (lambda p: Image.fromarray(wide.astype(np.int32)).save(p), "32-bit integer grayscale"),
        "rgb16.png": (lambda p: png16_rgb(p, np.full((H, W, 3), 25700, np.uint16)), "16-bit RGB: Pillow keeps"),
        "frames.tif": (multi_frame, "2 frames: only the first is used"),
    }


def test_each_conversion_warning_describes_that_conversion(tmp_path, caplog):
    writers = _writers()
    stems = [f"s{i}" for i in range(len(writers))]
    write_folder(tmp_path, names=tuple(stems), values=(0, 1))
    for stem, (name, (write, _)) in zip(stems, writers.items()):
        (tmp_path / "images" / f"{stem}.jpg").unlink()
        write(tmp_path / "images" / f"{stem}{name[name.index('.') :]}")
    with caplog.at_level(logging.WARNING):
        scan_data(_data(tmp_path), ["train"])
    warnings = [r.getMessage() for r in caplog.records if "converted to RGB" in r.getMessage()]
    for name, (_, words) in writers.items():
        assert any(words in w for w in warnings), (name, warnings)
    for w in warnings:  # the 16-bit note only where 16 bits are scaled
        assert ("value/257" in w) == ("16-bit grayscale" in w or "32-bit integer" in w), w


def test_16_bit_images_are_read_as_their_warning_says(tmp_path):
    Image.fromarray(np.full((H, W), 25700, np.uint16)).save(tmp_path / "g.png")
    png16_rgb(tmp_path / "c.png", np.full((H, W, 3), 25700, np.uint16))
    assert read_image(tmp_path / "g.png")[0, 0, 0] == 100  # 25700 / 257
    assert read_image(tmp_path / "c.png")[0, 0, 0] == 100  # 25700 >> 8


def test_a_float_tiff_mask_is_refused_as_such_not_called_corrupt(tmp_path):
    write_folder(tmp_path, values=(0, 1))
    (tmp_path / "masks" / "b.png").unlink()
    float_tiff(tmp_path / "masks" / "b.tif", np.zeros((H, W, 3)))
    data = compose_config(
        "train",
        [
            "data=folder",
            f"data.root={tmp_path}",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            "data.split_file=null",
            "data.mask_suffix=.tif",
        ],
    ).data
    (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "a.tif")
    (tmp_path / "masks" / "c.png").rename(tmp_path / "masks" / "c.tif")
    with pytest.raises(UserError) as info:
        scan_data(data, ["train"])
    assert "b.tif is a 32-bit floating-point TIFF with 3 band(s)" in str(info.value)
    assert "corrupt" not in str(info.value)


def _scan_warnings(tmp_path, caplog, writers: dict) -> list[str]:
    """The scan's conversion warnings for a folder whose images are ``{suffix-named file: write(path)}``."""
    stems = [f"s{i}" for i in range(len(writers))]
    write_folder(tmp_path, names=tuple(stems), values=(0, 1))
    for stem, (name, write) in zip(stems, writers.items()):
        (tmp_path / "images" / f"{stem}.jpg").unlink()
        write(tmp_path / "images" / f"{stem}{name[name.index('.') :]}")
    with caplog.at_level(logging.WARNING):
        scan_data(_data(tmp_path), ["train"])
    return [r.getMessage() for r in caplog.records if "converted to RGB" in r.getMessage()]


@pytest.mark.parametrize(
    ("order", "deflate"), [("<", False), (">", False), ("<", True)], ids=["II", "MM", "deflate-libtiff"]
)
def test_a_16_bit_rgb_tiff_is_warned_and_read_as_a_16_bit_rgb_png_is(tmp_path, caplog, order, deflate):
    camera = np.random.default_rng(0).integers(0, 4096, (H, W, 3)).astype(np.uint16)  # 12-bit data, 16-bit samples
    tiff = tmp_path / "camera.tif"
    sample_tiff(tiff, camera, order=order, deflate=deflate)
    png16_rgb(tmp_path / "camera.png", camera)
    with Image.open(tiff) as image:
        assert image.mode == "RGB"  # what Pillow says; the header says 16 bits per sample
    assert np.array_equal(read_image(tiff), read_image(tmp_path / "camera.png"))
    assert np.array_equal(read_image(tiff), (camera >> 8).astype(np.uint8))  # the high byte: near black
    warnings = _scan_warnings(
        tmp_path / "data",
        caplog,
        {
            "c.tif": lambda p: sample_tiff(p, camera, order=order, deflate=deflate),
            "c.png": lambda p: png16_rgb(p, camera),
        },
    )
    said = "16-bit RGB: Pillow keeps each value's high byte (value/256 rounded down, never clipped)"
    assert len(warnings) == 1 and f"2 images are converted to RGB: {said}" in warnings[0], warnings  # one word for both


def test_tiff_headers_name_what_pillow_does_with_their_samples(tmp_path, caplog):
    rng = np.random.default_rng(0)
    writers = {
        "rgba16.tif": lambda p: sample_tiff(p, rng.integers(0, 65535, (H, W, 4)).astype(np.uint16)),
        "signed16.tif": lambda p: sample_tiff(p, rng.integers(0, 30000, (H, W)).astype(np.int16), sample_format=2),
        "signed8.tif": lambda p: sample_tiff(p, rng.integers(0, 100, (H, W)).astype(np.int8), sample_format=2),
        "rgb8.tif": lambda p: sample_tiff(p, rng.integers(0, 255, (H, W, 3)).astype(np.uint8)),
    }
    found = _scan_warnings(tmp_path, caplog, writers)
    assert len(found) == 3, found  # 8-bit unsigned RGB: read as stored, nothing to say
    warnings = " | ".join(found)
    assert "16-bit RGBA: Pillow keeps each value's high byte" in warnings
    assert "16-bit integer grayscale (signed): values must lie in 0-65535, then value/257" in warnings
    assert "signed 8-bit samples (TIFF SampleFormat=2) read as unsigned (-1 becomes 255)" in warnings
