"""Full-resolution inference: sliding windows, multi-scale and flip test-time augmentation.

Every path returns logits at the input's own resolution. Overlapping windows, scales and flips
are combined by averaging logits, so a setting that adds nothing (one window covering the whole
image, a single scale of 1, no flip) gives exactly the plain forward pass.

Where only the class of each pixel is wanted (predict.py without ``save_probs``),
:func:`sliding_window_labels` never holds the class scores of the whole image: it keeps the sums
of the rows some window still touches (one window's height of rows, full width) and turns each
band of rows into classes as soon as the windows have moved past it, with the same additions in
the same order as :func:`sliding_window_logits`, so the classes are bitwise the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fcn.errors import UserError


def _positions(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis covering ``[0, size)``; the last window touches the edge."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def sliding_window_logits(
    model: nn.Module,
    images: torch.Tensor,
    window: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
) -> torch.Tensor:
    """Logits of ``images`` (N x 3 x H x W) from overlapping ``window``-sized crops.

    Only one window is in the model at a time, but the N x C x H x W sums of the whole image are
    held (:func:`logit_bands` holds one row of windows). Where windows overlap their logits are
    averaged. An image no larger than the window is one window: the plain forward pass.
    """
    n, _, height, width = images.shape
    wh, ww = window
    sh, sw = stride
    if height <= wh and width <= ww:
        return model(images).float()
    total = torch.zeros(n, num_classes, height, width, device=images.device)
    count = torch.zeros(1, 1, height, width, device=images.device)
    for top in _positions(height, wh, sh):
        for left in _positions(width, ww, sw):
            crop = images[..., top : top + wh, left : left + ww]
            total[..., top : top + wh, left : left + ww] += model(crop).float()
            count[..., top : top + wh, left : left + ww] += 1
    return total / count


def logit_bands(
    model: nn.Module,
    images: torch.Tensor,
    *,
    num_classes: int,
    window: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    hflip: bool = False,
    tiles: bool = False,
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """:func:`predict_logits` of ``images`` (N x 3 x H x W) piece by piece: ``(top, bottom, left,
    right, logits)`` with the N x C x (bottom - top) x (right - left) logits of those rows and
    columns, bitwise those of :func:`predict_logits`. Pieces are full-width bands of rows, top to
    bottom; with ``tiles`` (and no ``hflip``) a band comes in tiles, left to right.

    Sliding windows at scale 1 keep memory bounded by the window and the image's width, not its
    height: class-score sums (N x C x rows x columns float32, twice with ``hflip``) exist only for
    the rows of the current row of windows, and each piece is yielded as soon as no later window
    touches it (a caller keeping memory bounded drops its reference to a piece before asking for the
    next). With ``tiles`` only the rows the next row of windows shares are held at full width; the
    others only as far as the next window. For a 150-class model and 512-pixel windows (stride 384)
    on a 6000-pixel-wide image that is 0.6 GB with ``tiles``, 1.8 GB without, where the whole
    image's sums at 6000 x 4000 would be 14 GB. Other settings (no window, other scales) yield the
    whole image as one piece.
    """
    n, _, height, width = images.shape
    if window is not None and stride is None:
        stride = [max(1, 2 * w // 3) for w in window]
    if window is None or list(scales) != [1.0] or (height <= window[0] and width <= window[1]):
        yield (
            0,
            height,
            0,
            width,
            predict_logits(
                model, images, num_classes=num_classes, window=window, stride=stride, scales=scales, hflip=hflip
            ),
        )
        return
    wh, ww = window
    tops, lefts = _positions(height, wh, stride[0]), _positions(width, ww, stride[1])
    tiles = tiles and not hflip  # the mirrored view finishes its columns right to left
    # Rows (and, with tiles, columns) split into segments at every window's edges: each tile is summed
    # by the same windows, in the same order, as sliding_window_logits sums it, and is finished (no later
    # window touches it) once the windows have moved past it.
    rows = _segments(height, tops, wh)
    columns = _segments(width, lefts, ww) if tiles else [(0, width)]
    flips = (False, True) if hflip else (False,)
    sums: dict[tuple[bool, int, int], torch.Tensor] = {}  # (flipped, top, left) -> N x C x rows x columns
    counts: dict[tuple[int, int], torch.Tensor] = {}  # (top, left) -> 1 x 1 x rows x columns (both views)
    for k, top in enumerate(tops):
        bottom = min(top + wh, height)
        band = images[..., top:bottom, :]
        touched_rows = [(a, b) for a, b in rows if a < bottom and b > top]
        next_top = tops[k + 1] if k + 1 < len(tops) else height
        for j, left in enumerate(lefts):
            right = min(left + ww, width)
            touched = [
                (a, b, c, d) for a, b in touched_rows for c, d in columns if not tiles or (c < right and d > left)
            ]
            for a, b, c, d in touched:
                if (a, c) not in counts:
                    counts[a, c] = torch.zeros(1, 1, b - a, d - c, device=images.device)
                    for flip in flips:
                        sums[flip, a, c] = torch.zeros(n, num_classes, b - a, d - c, device=images.device)
            for flip in flips:
                view = band.flip(-1) if flip else band  # the mirrored image's rows: the windows of predict_logits
                out = model(view[..., left : left + ww]).float()
                for a, b, c, d in touched:
                    x0, x1 = max(c, left), min(d, right)  # the window's columns within the tile
                    sums[flip, a, c][..., x0 - c : x1 - c] += out[..., a - top : b - top, x0 - left : x1 - left]
                del out  # before the next window's
            for a, _, c, d in touched:
                x0, x1 = max(c, left), min(d, right)
                counts[a, c][..., x0 - c : x1 - c] += 1
            if tiles or j + 1 == len(lefts):
                next_left = lefts[j + 1] if tiles and j + 1 < len(lefts) else width
                for a, b in touched_rows:
                    for c, d in columns:
                        if b <= next_top and d <= next_left and (a, c) in counts:
                            yield a, b, c, d, _average(sums, counts, a, c, flips)


def _segments(size: int, starts: list[int], window: int) -> list[tuple[int, int]]:
    """``[0, size)`` cut at every window's start and end: pieces each covered by one fixed set of windows."""
    edges = sorted({0, size, *starts, *(min(s + window, size) for s in starts)})
    return list(zip(edges[:-1], edges[1:]))


def _average(sums: dict, counts: dict, a: int, c: int, flips: tuple[bool, ...]) -> torch.Tensor:
    """The finished tile at rows ``a``, columns ``c`` removed from ``sums``/``counts`` and averaged, in
    place so no tile is held twice: the same quotients and sum as total / count, l0 + l1, / views."""
    count = counts.pop((a, c))
    views = [sums.pop((flip, a, c)).div_(count) for flip in flips]
    total = views[0].add_(views[1].flip(-1)) if len(flips) == 2 else views[0]
    return total.div_(len(flips))


def predict_labels(model: nn.Module, images: torch.Tensor, **settings) -> torch.Tensor:
    """Class indices (N x H x W, int64): ``predict_logits(model, images, **settings).argmax(1)``, bitwise,
    tile by tile (:func:`logit_bands`), so sliding windows never hold the whole image's class scores."""
    n, _, height, width = images.shape
    labels = torch.empty(n, height, width, dtype=torch.long, device=images.device)
    for top, bottom, left, right, logits in logit_bands(model, images, tiles=True, **settings):
        labels[:, top:bottom, left:right] = logits.argmax(1)
        del logits  # freed before the next tile is summed
    return labels


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    num_classes: int,
    window: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    hflip: bool = False,
) -> torch.Tensor:
    """Logits at full resolution, averaged over ``scales`` and (with ``hflip``) mirror images.

    Each scaled (and flipped) copy is inferred whole or, with ``window``, by sliding windows
    (``stride`` defaults to two thirds of the window), and its logits are resized back to the
    input's size before averaging.
    """
    height, width = images.shape[-2:]
    if window is not None and stride is None:
        stride = [max(1, 2 * w // 3) for w in window]
    total = None
    views = 0
    for scale in scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True) if hflip else (False,):
            x = scaled.flip(-1) if flip else scaled
            if window is None:
                logits = model(x).float()
            else:
                logits = sliding_window_logits(model, x, window, stride, num_classes)
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            views += 1
    return total / views


# Config -> inference settings (the ``eval`` config node of training, evaluate.py and predict.py).


def _pair_setting(value, key: str) -> list[int] | None:
    if value is None:
        return None
    items = list(value) if not isinstance(value, int) else [value, value]
    if len(items) != 2 or not all(isinstance(v, int) and v > 0 for v in items):
        raise UserError(f"{key}={value}: give two positive integers [height, width] (or one for both)")
    return items


def eval_config(checkpoint_config: dict, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """How to infer: as the run validated (its ``eval`` settings, e.g. half resolution), with each
    ``eval.KEY=VALUE`` of the command line on top (a new ``eval.window`` takes the command line's
    ``eval.stride``, not the run's; a new stride alone keeps the run's window); ``eval=NAME`` replaces
    them all (configs/eval/)."""
    named = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    trained = checkpoint_config.get("eval")
    if "eval" in named or not trained:
        return cfg.eval
    told = {n.split(".")[1] for n in named if n.startswith("eval.")}
    if "window" in told:  # a new window gets its own stride (default: two thirds of it), not the run's
        told.add("stride")
    keys = ("window", "stride", "scales", "hflip")
    return OmegaConf.merge(cfg.eval, {k: trained[k] for k in keys if k in trained and k not in told})


def inference_fn(eval_cfg: DictConfig, num_classes: int) -> Callable | None:
    """The ``infer(model, images)`` the ``eval`` settings ask for, or None for a plain forward pass."""
    settings = _inference_settings(eval_cfg)
    return None if settings is None else functools.partial(predict_logits, num_classes=num_classes, **settings)


def bands_fn(eval_cfg: DictConfig, num_classes: int) -> Callable[..., Iterator[tuple[int, int, torch.Tensor]]]:
    """``bands(model, images)``: the logits the ``eval`` settings ask for, band of rows by band of rows
    (:func:`logit_bands`): bitwise :func:`inference_fn`'s logits (the plain forward pass when it is
    None), in memory bounded by the window and a band of rows for sliding windows at scale 1."""
    settings = _inference_settings(eval_cfg) or {}
    return functools.partial(logit_bands, num_classes=num_classes, **settings)


def _inference_settings(eval_cfg: DictConfig) -> dict | None:
    """The checked ``window``, ``stride``, ``scales`` and ``hflip`` of :func:`predict_logits`; None for a plain pass."""
    window = _pair_setting(eval_cfg.window, "eval.window")
    stride = _pair_setting(eval_cfg.stride, "eval.stride")
    if window is None and stride is not None:
        raise UserError("eval.stride needs eval.window")
    if window is not None and stride is not None and any(s > w for s, w in zip(stride, window)):
        raise UserError(
            f"eval.stride={stride} is larger than eval.window={window}: pixels between windows would never be predicted"
        )
    if not eval_cfg.scales or any(s <= 0 for s in eval_cfg.scales):
        raise UserError(f"eval.scales={list(eval_cfg.scales)}: give one or more positive scales")
    plain = window is None and list(eval_cfg.scales) == [1.0] and not eval_cfg.hflip
    if plain:
        return None
    return {"window": window, "stride": stride, "scales": list(eval_cfg.scales), "hflip": bool(eval_cfg.hflip)}
