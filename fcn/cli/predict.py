"""``python scripts/predict.py checkpoint=PATH input=DIR_OR_GLOB_OR_FILE output=DIR``: masks for your images.

A file that cannot be read is reported and skipped; the others are still written, and the exit
code (1) says that some failed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image, ImageOps

from fcn.atomic import atomic_path
from fcn.checkpoint import load_model
from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import validate_eval_config
from fcn.data.folder import IMAGE_EXTENSIONS, read_image
from fcn.data.labels import exif_orientation, image_to_rgb
from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.device import resolve_device, resolve_precision
from fcn.engine import to_model_input
from fcn.errors import UserError
from fcn.inference import bands_fn, eval_config
from fcn.models.fold import fold_batch_norm
from fcn.report import output_names, save_prediction

log = logging.getLogger(__name__)


def find_inputs(spec: str) -> list[Path]:
    """The images named by a folder, a glob pattern or a single file."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"input={spec}: no image files found (a folder, a glob such as 'photos/*.jpg', or a file)")
    return files


def read_oriented(path: Path, apply_exif: bool) -> np.ndarray:
    """``path`` as an ``H x W x 3`` uint8 array, as stored, or turned upright by its EXIF orientation
    tag when ``apply_exif``. A tag left unapplied is warned about, once per file: the mask then
    matches the stored pixels, not the picture a photo viewer shows."""
    array = read_image(path)  # raises UserError for unreadable files
    with Image.open(path) as image:
        orientation = exif_orientation(image)
        if orientation == 1:
            return array
        if apply_exif:
            return image_to_rgb(ImageOps.exif_transpose(image), path)
    log.warning(
        "%s carries EXIF orientation %d (a viewer shows it turned); predicted as stored, so the mask "
        "is aligned with the stored pixels: set apply_exif_orientation=true to predict the upright "
        "picture",
        path,
        orientation,
    )
    return array


@contextlib.contextmanager
def probability_file(path: Path, shape: tuple[int, int, int]) -> Iterator[Callable[[int, np.ndarray], None]]:
    """Yield ``write(top, rows)`` filling the ``.npy`` file ``path`` of ``shape`` (C x H x W float16
    class probabilities, as ``np.save`` writes it) band by band: ``rows`` is C x r x W, from row
    ``top``. Nothing larger than a band is held; the file appears under ``path`` when the block
    ends (:func:`fcn.atomic.atomic_path`)."""
    channels, height, width = shape
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": tuple(shape)})
        start = f.tell()
        f.truncate(start + channels * height * width * 2)

        def write(top: int, rows: np.ndarray) -> None:
            for c in range(channels):  # class c's rows top.. are one run of bytes in the file
                f.seek(start + (c * height + top) * width * 2)
                f.write(np.ascontiguousarray(rows[c], dtype="<f2").data)

        yield write


def run_prediction(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Predict every input; returns the images written and the ``(file, reason)`` of those skipped.

    Inference follows the checkpoint's own ``eval`` settings with ``overrides`` on top
    (:func:`fcn.inference.eval_config`)."""
    validate_eval_config(cfg)  # values checked before any checkpoint or image is read
    if cfg.checkpoint is None:
        raise UserError("no checkpoint given: pass checkpoint=PATH (predict never runs with random weights)")
    if cfg.input is None or cfg.output is None:
        raise UserError("pass input=DIR_OR_GLOB_OR_FILE and output=DIR")
    set_max_image_pixels(cfg.data.get("max_image_pixels", PILLOW_DEFAULT) if "data" in cfg else PILLOW_DEFAULT)
    device = resolve_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, device, cfg.channels_last)
    model = fold_batch_norm(model)  # the same outputs (to float rounding), one pass fewer per batch norm
    # band by band: sliding windows never hold the whole image's class scores (fcn/inference.py)
    bands = bands_fn(eval_config(ckpt["config"], cfg, overrides or []), ckpt["num_classes"])
    amp_dtype = resolve_precision(cfg.precision, device)
    files = find_inputs(str(cfg.input))
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    batch: list[tuple[Path, np.ndarray]] = []
    # outputs mirror the inputs' subfolders, so files of one name in two folders never overwrite each other
    names = dict(zip(files, output_names(files)))

    @torch.no_grad()
    def flush() -> None:
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) for _, a in batch])
        x = to_model_input(images, device, ckpt["mean"], ckpt["std"], cfg.channels_last)
        preds = torch.empty(x.shape[0], *x.shape[2:], dtype=torch.long)
        with contextlib.ExitStack() as npy_files:
            shape = (ckpt["num_classes"], *x.shape[2:])
            opened = (probability_file(out_dir / f"{names[p]}.npy", shape) for p, _ in batch)
            probs = [npy_files.enter_context(f) for f in opened] if cfg.save_probs else []
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # full-width bands when the probabilities are written (one run of bytes per class and band)
                for top, bottom, left, right, logits in bands(model, x, tiles=not cfg.save_probs):
                    logits = logits.float()
                    preds[:, top:bottom, left:right] = logits.argmax(1).cpu()
                    if cfg.save_probs:
                        with torch.autocast(device.type, enabled=False):  # as before: softmax in float32
                            rows = logits.softmax(1).half().cpu().numpy()
                        for k, write in enumerate(probs):
                            write(top, rows[k])  # written where they belong in the C x H x W file
                        del rows
                    del logits  # freed before the next band is summed
        for k, (path, _) in enumerate(batch):
            save_prediction(out_dir, names[path], images[k], preds[k], ckpt["palette"])
            written.append(path)
        batch.clear()

    for path in files:
        try:
            array = read_oriented(path, bool(cfg.get("apply_exif_orientation", False)))
        except UserError as exc:
            log.error("skipped %s", exc)
            failed.append((path, str(exc)))
            continue
        if batch and (array.shape != batch[0][1].shape or len(batch) == cfg.batch_size):
            flush()  # a batch holds images of one size
        batch.append((path, array))
    if batch:
        flush()
    print(f"wrote {len(written)} predictions to {out_dir}" + (f"; {len(failed)} files failed:" if failed else ""))
    for path, reason in failed:
        print(f"  {path}: {reason}")
    return written, failed


@suggest_keys("predict")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    _, failed = run_prediction(cfg, list(HydraConfig.get().overrides.task))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
