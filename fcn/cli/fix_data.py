"""``fcn-fix-data`` / ``python scripts/fix_data.py``: a repaired copy of a dataset (plumbing).

Scans the splits as the doctor does, turns its diagnoses into a :class:`fcn.data.doctor.fix.MaskRule`,
copies or repairs every pair into ``out`` (:func:`fcn.data.doctor.fix.repair`), writes the split
lists of the pairs kept and ``out/fix_report.csv``, scans the copy, and prints a summary and the
command that trains on it. Exit code 0 when the copy is usable, 1 when problems remain that no copy
repairs (named as the doctor names them).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_classes, check_settings
from fcn.data.build import checked_splits, data_layout, mask_decoder, prepare_data_root
from fcn.data.doctor.commands import train_command
from fcn.data.doctor.fix import (
    FixResult,
    Job,
    destination,
    mask_rule,
    no_mask,
    png_suffix,
    refuse_target,
    repair,
    write_lists,
    write_report,
)
from fcn.data.doctor.scan import format_errors, scan_split
from fcn.data.folder import list_split
from fcn.data.labels import MaskDecoder
from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.data.splits import default_split_applies
from fcn.errors import UserError

log = logging.getLogger(__name__)


def run_fix(cfg: DictConfig) -> tuple[FixResult, bool]:
    """Write the repaired copy ``cfg`` asks for; the result and whether the copy is usable."""
    data = cfg.data
    check_classes(data.num_classes, list(data.class_names), data.get("palette"), data.ignore_index)
    if not cfg.out:
        raise UserError("out= is not set: name a new or empty folder for the repaired copy, e.g. out=my_data_fixed")
    root, out = Path(data.root), Path(cfg.out)
    set_max_image_pixels(data.get("max_image_pixels", PILLOW_DEFAULT))
    prepare_data_root(data)
    refuse_target(root, out)
    decoder = mask_decoder(data)
    layout = data_layout(data)
    splits = list(cfg.splits) if cfg.splits else checked_splits(data)
    made_up = bool(layout["split_file"]) and default_split_applies(
        data.train_split, layout["split_file"], layout["image_dir"], root
    )
    if made_up:  # no lists yet: every image, and the copy gets the same seeded default split when it trains
        layout, splits = {**layout, "split_file": None}, [data.train_split]
    files, kinds, raw = {}, set(), set()
    for split in splits:
        try:
            found = list_split(root, split, **layout)
        except UserError:
            if split == data.get("test_split") and split not in (data.train_split, data.val_split):
                continue  # the test split is optional, as for the doctor
            raise
        if not found.pairs and found.alternative is not None and found.alternative.readable_suffix:
            layout = {**layout, "mask_suffix": found.alternative.readable_suffix}  # the masks the doctor found
            found = list_split(root, split, **layout)
        report = scan_split(root, split, layout, decoder, workers=cfg.workers, cache=cfg.cache)
        files[split] = found
        kinds |= {p.kind for p in report.problems}
        raw |= set(report.mask_values)
    if "rgb_mask_no_palette" in kinds:
        raise UserError(
            "the masks are RGB colour masks and data.palette is not set: list their colours in class order as "
            "data.palette=[[r,g,b],...] (python scripts/check_data.py lists them), then run fix_data again"
        )
    rule = mask_rule(kinds, raw, decoder)
    mask_suffix = layout["mask_suffix"]
    new_suffix = png_suffix(mask_suffix)
    jobs: dict[Path, Job] = {}
    for found in files.values():
        for image, mask in found.pairs:
            jobs.setdefault(
                image,
                Job(
                    image,
                    mask,
                    destination(image, root, out),
                    destination(mask, root, out, mask_suffix, new_suffix),
                    keep_name=bool(data.get("image_suffix")),
                ),
            )
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or min(16, 2 * (os.cpu_count() or 1))
    result = repair(list(jobs.values()), out, rule, decoder, resize=cfg.resize, workers=workers)
    for found in files.values():
        for key in found.images_without_mask:
            result.left_out.append(no_mask(found, key))
    changed = {"mask_suffix": new_suffix} if new_suffix != data.mask_suffix else {}
    if not made_up and layout["split_file"]:
        changed |= write_lists(files, result, out, layout["split_file"], data.get("image_suffix"))
    write_report(out / "fix_report.csv", result)
    usable = _print_summary(cfg, result, out, changed, splits if not made_up else [data.train_split, data.val_split])
    return result, usable


def _print_summary(cfg: DictConfig, result: FixResult, out: Path, changed: dict, splits: list[str]) -> bool:
    """The per-change counts, the pairs left out, the copy's own scan and the command that trains on it."""
    data = cfg.data
    counts = result.counts()
    print(f"\nrepaired copy of {Path(data.root).resolve()} in {out.resolve()}: {len(result.written)} pairs written")
    for kind, n in sorted(counts.items()):
        example = next(c for c in [*result.changes, *result.left_out] if c.change == kind)
        print(f"  {kind}: {n} (e.g. {example.file}: {example.reason})")
    if not counts:
        print("  nothing to repair: every file copied as it is")
    for left in result.left_out[:10]:
        print(f"  left out: {left.file}: {left.reason}")
    if len(result.left_out) > 10:
        print(f"  ... ({len(result.left_out)} pairs left out in all)")
    print(f"every change: {out / 'fix_report.csv'}")
    copy_layout = {**data_layout(data), **changed}
    decoder = MaskDecoder(data.num_classes, data.ignore_index, palette=mask_decoder(data).palette)
    reports = []
    for split in dict.fromkeys(splits):
        try:
            reports.append(scan_split(out, split, copy_layout, decoder, workers=cfg.workers, cache=False))
        except UserError as exc:
            if split == data.get("test_split") and split not in (data.train_split, data.val_split):
                continue
            print(f"\nthe copy cannot be read: {exc}")
            return False
    if any(r.errors for r in reports):
        print(f"\nthe copy still has problems no repair can decide:\n  {format_errors(reports)}")
        return False
    print("\nTrain on the repaired copy:\n  " + train_command(data, out.resolve(), changed))
    return True


@suggest_keys("fix_data")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fix_data")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point: exit code 0 when the copy is usable, 1 when problems remain."""
    check_settings(cfg)  # each value's type and range, before any file is read
    _, usable = run_fix(cfg)
    if not usable:
        sys.exit(1)


if __name__ == "__main__":
    main()
