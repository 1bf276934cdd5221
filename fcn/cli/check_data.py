"""``fcn-check-data`` / ``python scripts/check_data.py``: the dataset doctor.

Scans every split with the same checks training runs before its first step, then prints counts,
image sizes, mask values, per-class pixel frequencies, every problem with its files, and
suggestions (a label map, the ignore index, median-frequency class weights). Writes the whole
report as JSON; exits 0 when the data is usable and 1 when it is not.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fcn.cli import CONFIG_DIR
from fcn.cli.exit import exit_on_user_error
from fcn.cli.suggest import suggest_keys
from fcn.config import check_classes, check_settings
from fcn.data.build import checked_splits, data_layout, mask_decoder, prepare_data_root
from fcn.data.doctor.commands import repair_line
from fcn.data.doctor.crop import folder_crop_warning
from fcn.data.doctor.scan import SplitReport, median_frequency_weights, scan_split, split_overlap_problem
from fcn.data.pixel_limit import PILLOW_DEFAULT, set_max_image_pixels
from fcn.data.splits import shown
from fcn.errors import UserError
from fcn.report import to_json

log = logging.getLogger(__name__)


def run_check(cfg: DictConfig, out_dir: str | Path) -> tuple[dict, bool]:
    """Scan the splits ``cfg`` names; write the JSON report and return it with whether the data is usable."""
    data = cfg.data
    check_classes(data.num_classes, list(data.class_names), data.get("palette"), data.ignore_index)
    set_max_image_pixels(data.get("max_image_pixels", PILLOW_DEFAULT))  # before any image is opened
    prepare_data_root(data)  # as training would: generate the built-in set, or download when asked
    splits = list(cfg.splits) if cfg.splits else checked_splits(data)
    decoder = mask_decoder(data)
    report: dict = {
        "dataset": data.name,
        "root": str(Path(data.root).resolve()),
        "num_classes": data.num_classes,
        "ignore_index": data.ignore_index,
        "splits": {},
        "skipped": {},
        "suggestions": [],
    }
    reports: list[SplitReport] = []
    layout_errors = []
    for split in splits:
        try:
            found = scan_split(data.root, split, data_layout(data), decoder, workers=cfg.workers, cache=cfg.cache)
        except UserError as exc:
            if split == data.get("test_split") and split not in (data.train_split, data.val_split):
                report["skipped"][split] = str(exc)  # the test split is optional
                continue
            layout_errors.append(f"[{split}] {exc}")
            report["splits"][split] = {"layout_error": str(exc)}
            continue
        reports.append(found)
        report["splits"][split] = found.to_dict() | {"class_frequency": _frequencies(found)}
    val = next((r for r in reports if r.split == data.val_split), None)
    overlap = split_overlap_problem(data.root, data_layout(data), data.train_split, data.val_split)
    if overlap is not None and val is not None:
        val.problems.insert(0, overlap)  # first: every score the val split gives depends on it
        report["splits"][val.split] = val.to_dict() | {"class_frequency": _frequencies(val)}
    train = next((r for r in reports if r.split == data.train_split), None)
    if train is not None and any(train.class_pixels) and not train.errors:  # weights of wrong labels mislead
        weights = median_frequency_weights(train)
        report["class_weights_median_frequency"] = weights
        if max(weights) >= 2 * min(weights):  # classes this even train well unweighted: no advice
            report["suggestions"].append(
                f"class imbalance: loss.class_weights=auto (median frequency on {train.split}: {weights})"
            )
    if train is not None and (advice := folder_crop_warning(data, train.image_sizes)):
        report["suggestions"].append(advice)
    usable = not layout_errors and not any(r.errors for r in reports)
    report["usable"] = usable
    path = Path(cfg.report) if cfg.report else Path(out_dir) / "data_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(report))
    _print_summary(data, reports, layout_errors, report, path)
    return report, usable


def _frequencies(report: SplitReport) -> list[float]:
    total = sum(report.class_pixels)
    return [round(p / total, 6) if total else 0.0 for p in report.class_pixels]


def _print_summary(data, reports: list[SplitReport], layout_errors: list[str], report: dict, path: Path) -> None:
    names = list(data.class_names)
    print(f"\n{data.name} at {report['root']}: {data.num_classes} classes, ignore_index {data.ignore_index}")
    for r in reports:
        sizes = ", ".join(f"{s} x{n}" for s, n in list(r.image_sizes.items())[:4])
        more = f" (+{len(r.image_sizes) - 4} more sizes)" if len(r.image_sizes) > 4 else ""
        print(f"\n[{r.split}] {r.pairs} pairs, scanned in {r.seconds:.1f} s ({r.rescanned} files read, rest cached)")
        print(f"  image sizes: {sizes}{more}; modes: {r.image_modes}")
        values = r.mask_values if len(r.mask_values) <= 40 else [*r.mask_values[:40], "..."]
        print(f"  mask values in the files: {values}; ignored pixels: {r.ignored_pixels}")
        freqs = _frequencies(r)
        print("  class pixel frequency: " + ", ".join(f"{n} {100 * f:.2f}%" for n, f in zip(names, freqs)))
        for problem in r.problems:
            listed = ", ".join(map(shown, problem.files[:5])) + (" ..." if problem.count > 5 else "")
            files = f": {listed}" if problem.files else ""
            print(f"  {problem.severity.upper()} {problem.message}{files}")
    for split, why in report["skipped"].items():
        print(f"\n[{split}] not present, skipped ({why.split(' (')[0]})")
    for error in layout_errors:
        print(f"\nERROR {error}")
    for suggestion in report["suggestions"]:
        print(f"\nsuggestion: {suggestion}")
    if repair := repair_line(data, {p.kind for r in reports for p in r.problems}):
        print(f"\n{repair}")
    verdict = "usable" if report["usable"] else "NOT usable: fix the errors above"
    if any(p.kind == "split_overlap" for r in reports for p in r.problems):
        verdict += " (but the validation split shares images with the training split: see the WARNING above)"
    print(f"\nverdict: {verdict}\nreport: {path}")


@suggest_keys("check_data")  # a mistyped key: "did you mean ...?"
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="check_data")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Hydra entry point: exit code 0 when the data is usable, 1 when it is not."""
    check_settings(cfg)  # each value's type and range, before any file is read
    _, usable = run_check(cfg, HydraConfig.get().runtime.output_dir)
    if not usable:
        sys.exit(1)


if __name__ == "__main__":
    main()
