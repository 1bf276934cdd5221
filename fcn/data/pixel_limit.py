"""Pillow's decompression-bomb guard: the largest image it opens, and the message when a file exceeds it.

Pillow refuses to open an image of more than ``2 x PIL.Image.MAX_IMAGE_PIXELS`` pixels (89,478,485
by default, so about 179 million: a 14000 x 13000 aerial tile is refused) to protect servers from
small files that decode into huge ones. That is no corruption: the file is fine and the limit is a
setting (``data.max_image_pixels`` in every tool). The limit is global to a process, so the entry
points set it once with :func:`set_max_image_pixels`, and DataLoader workers take the value the
main process had when their loader was made (:func:`fcn.data.loader.make_loader`).
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

# Pillow's own default, kept so that "the default" can be named and restored.
PILLOW_DEFAULT = Image.MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: int | None) -> None:
    """Let Pillow open images of up to ``limit`` pixels in this process (None: no limit).

    Pillow warns above ``limit`` and refuses above twice ``limit``; here the setting means what it
    says, so Pillow's own limit is set to ``limit`` and images of up to ``2 x limit`` open with a warning.
    """
    Image.MAX_IMAGE_PIXELS = limit


def too_many_pixels_message(path: str | Path, exc: Exception) -> str:
    """One line for a file Pillow refused as a possible decompression bomb, with the setting that opens it.

    ``exc`` is the ``PIL.Image.DecompressionBombError``; its text carries the pixel count.
    """
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(found.group(1)) if found else None
    size = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS
    allowed = f"{2 * limit:,}" if limit else "any number of"
    suggestion = f"data.max_image_pixels={pixels}" if pixels is not None else "a larger data.max_image_pixels"
    return (
        f"{path} has {size}, more than the {allowed} pixels Pillow's decompression-bomb guard allows "
        f"(PIL.Image.MAX_IMAGE_PIXELS={limit}); the file is not corrupt: if you trust it, set "
        f"{suggestion} (or null for no limit)"
    )
