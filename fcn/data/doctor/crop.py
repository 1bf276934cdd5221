"""The training crop against the images of a folder: a crop larger than most images is mostly padding.

``data=folder`` starts from ``crop_size: 512``, larger than most photos of a typical photo dataset
once they are not camera originals (500x375 and the like); a padded crop costs the compute of the
crop and teaches only the image's part of it. :func:`crop_advice` says so in one line, with the
crop that fits most of the images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FIT_SHARE = 0.8  # the crop suggested is filled by this share of the images
STEP = 32  # FCN-8s downsamples by 32: a crop of a multiple of 32 upsamples back without a remainder


def crop_advice(crop: tuple[int, int], image_sizes: Mapping[str, int]) -> str | None:
    """One line when the crop ``(height, width)`` is larger than more than half of the images
    (``image_sizes``: the scan's ``"WxH" -> count``), naming the crop that fits :data:`FIT_SHARE` of
    them (a multiple of 32, the largest whose square fits inside their shorter side); None otherwise."""
    h, w = crop
    sizes = [(tuple(int(v) for v in key.split("x")), n) for key, n in image_sizes.items()]
    total = sum(n for _, n in sizes)
    small = sum(n for (iw, ih), n in sizes if iw < w or ih < h)
    if not total or small * 2 <= total:
        return None
    shorter = np.repeat([min(iw, ih) for (iw, ih), _ in sizes], [n for _, n in sizes])
    side = int(np.percentile(shorter, 100 * (1 - FIT_SHARE), method="lower"))
    value = side // STEP * STEP if side >= STEP else side
    fits = int((shorter >= value).sum())
    (mw, mh), _ = max(sizes, key=lambda item: item[1])
    shown = h if h == w else [h, w]
    return (
        f"data.crop_size={shown} is larger than {small} of the {total} training images (most are {mw}x{mh}): "
        f"their crops are padded, which costs compute and teaches nothing; data.crop_size={value} fits "
        f"{round(100 * fits / total)}% of them"
    )


def folder_crop_warning(data: Mapping, image_sizes: Mapping[str, int]) -> str | None:
    """:func:`crop_advice` for ``data=folder`` left at the option's own ``crop_size`` (a crop the user chose
    is theirs); None for every other data option."""
    from fcn.data.doctor.commands import data_defaults

    if data.get("name") != "folder" or data.get("crop_size") != data_defaults("folder").get("crop_size"):
        return None
    size = data["crop_size"]
    return crop_advice((size, size) if isinstance(size, int) else (int(size[0]), int(size[1])), image_sizes)
