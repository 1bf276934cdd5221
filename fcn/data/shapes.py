"""The built-in ``shapes`` dataset: generated from a seed, written as ordinary files.

Each image holds a few filled shapes (circle, square, triangle, star, cross) of varied size and
rotation, overlapping one another, on a textured background. Every region gets a random colour
and texture, so colour says nothing about the class: only shape does. Images and masks are
written in the generic folder layout user datasets use (``images/``, ``masks/`` with
single-channel index PNGs of the same stem, ``splits/{train,val}.txt``), so the default run goes
through the same file-loading code as any other dataset.

Generation is deterministic: image ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fcn.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "circle", "square", "triangle", "star", "cross")
PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
)
# Bump when the drawing code changes, so an old copy on disk is regenerated, not reused.
GENERATOR_VERSION = 3
META_FILE = "shapes_meta.json"


def _texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    """A ``size x size x 3`` float texture around colour ``base``: flat, noise, stripes or checks."""
    kind = rng.integers(4)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == 0:
        return image
    if kind == 1:
        return image + rng.normal(0, 18, (size, size, 3)).astype(np.float32)
    other = np.clip(base + rng.uniform(-70, 70, 3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 14)
    if kind == 2:
        angle = rng.uniform(0, math.pi)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        pattern = (np.floor(phase) % 2).astype(bool)
    else:
        pattern = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(bool)
    return np.where(pattern[..., None], other, image)


def _distinct_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    # Keep objects visible: at least 90 apart (RGB distance) from the background colour.
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - avoid) > 90:
            return colour
    return 255 - avoid


def _polygon(rng: np.random.Generator, cls: str, cx: float, cy: float, r: float) -> list[tuple]:
    angle = rng.uniform(0, 2 * math.pi)

    def ring(radii: list[float], n: int) -> list[tuple]:
        return [
            (cx + rad * math.cos(angle + 2 * math.pi * k / n), cy + rad * math.sin(angle + 2 * math.pi * k / n))
            for k, rad in zip(range(n), radii * (n // len(radii)))
        ]

    if cls == "square":
        return ring([r], 4)
    if cls == "triangle":
        return ring([r], 3)
    if cls == "star":
        return ring([r, 0.5 * r], 10)
    # cross: a plus sign whose arms are a third of its size wide, then rotated
    a, b = r, r / 3
    corners = [
        (b, a),
        (b, b),
        (a, b),
        (a, -b),
        (b, -b),
        (b, -a),
        (-b, -a),
        (-b, -b),
        (-a, -b),
        (-a, b),
        (-b, b),
        (-b, a),
    ]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]


def render_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw sample ``index``: an ``size x size x 3`` uint8 image and its ``size x size`` mask."""
    rng = np.random.default_rng([seed, index])
    background = rng.uniform(0, 255, 3)
    image = _texture(rng, size, background)
    mask = Image.new("L", (size, size), 0)
    for _ in range(rng.integers(1, 5)):
        cls_id = int(rng.integers(1, len(CLASS_NAMES)))
        r = rng.uniform(0.12, 0.3) * size  # radius: at least two stride-8 cells at 128px
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        shape = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(shape)
        if CLASS_NAMES[cls_id] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        else:
            draw.polygon(_polygon(rng, CLASS_NAMES[cls_id], cx, cy, r), fill=1)
        inside = np.asarray(shape, dtype=bool)
        texture = _texture(rng, size, _distinct_colour(rng, background))
        image = np.where(inside[..., None], texture, image)
        mask.paste(cls_id, mask=shape.point(lambda v: 255 * v))  # later shapes occlude earlier ones
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(mask, dtype=np.uint8)


def ensure_shapes(root: str | Path, num_train: int, num_val: int, size: int, seed: int) -> Path:
    """Generate the dataset into ``root`` unless an identical copy is already there.

    Writes into a temporary sibling folder and renames it into place when complete, so an
    interrupted generation never leaves a half-written dataset that looks finished. A copy made
    with other settings is replaced; a folder at ``root`` that this generator did not make is
    never touched.
    """
    root = Path(root)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
    }
    if root.exists():
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise UserError(
                f"data.root {root.resolve()} exists but is not a generated shapes dataset "
                f"(no {META_FILE}); point data.root at an empty or new folder"
            )
        if json.loads(meta_path.read_text()) == meta:
            return root
        log.info("shapes dataset at %s was made with other settings; regenerating", root)
    log.info("generating shapes dataset (%d train, %d val, %dpx) into %s", num_train, num_val, size, root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "masks", "splits"):
        (tmp / sub).mkdir(parents=True)
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    for split, indices in splits.items():
        stems = []
        for index in indices:
            image, mask = render_sample(seed, index, size)
            stem = f"{index:06d}"
            # Uncompressed PNG: about 4x the bytes of compress_level=1, but decoding (every sample,
            # every epoch, in the training loop) takes a third less time (measured, 128 px).
            Image.fromarray(image).save(tmp / "images" / f"{stem}.png", compress_level=0)
            Image.fromarray(mask).save(tmp / "masks" / f"{stem}.png", compress_level=0)
            stems.append(stem)
        (tmp / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)  # only reached for a generated copy with other settings
    os.replace(tmp, root)
    return root
