"""Write the results tables of the README and docs from their result files, docs/results/*.json:
``python scripts/results_tables.py`` (``--check`` exits 1 when a page and its result file disagree;
``add TABLE RUN_DIR [field=value ...]`` appends a finished run's ``metrics.json`` to a table's file).

Each result file holds one table: ``pages`` (where it stands, between ``<!-- results: NAME -->``
and ``<!-- /results -->``), ``columns`` (``[header, field, format]``) and ``rows``, one record per
measured run (or per variant of an ablation, as ``scripts/upsampling_ablation.py`` summarised it):
its scores, seed, epochs, minutes, CPU seconds, machine, date and command. A number is typed once,
in its result file; every page that shows it is generated.

Formats: ``miou`` (3 decimals; a list of values, one per seed, is shown as mean ± sample std),
``pct`` and ``minutes`` (1 decimal), ``drift`` (2), ``signed`` (3 decimals with a sign), ``classes``
(a ``{class: IoU %}`` record as "Sky 92.0, ..."), ``code`` (in backticks),
``text``. A missing value is "not measured yet"; a string is shown as written; ``{"mean", "std"}``
is a summary kept as it was printed (the runs behind it were not kept).
"""

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
RUN_FIELDS = ("seed", "epochs", "minutes", "cpu_seconds", "machine", "date", "command")


def _number(value: float, digits: int, sign: bool = False) -> str:
    return f"{value:+.{digits}f}" if sign and round(value, digits) else f"{value:.{digits}f}"


def cell(value, fmt: str) -> str:
    """One table cell: ``value`` (a number, a list of per-seed numbers, a string or None) as ``fmt`` says."""
    if value is None:
        return "not measured yet"
    if isinstance(value, str):
        return f"`{value}`" if fmt == "code" else value
    if fmt == "classes":  # per-class IoU in %, in class order
        return ", ".join(f"{name} {iou:.1f}" for name, iou in value.items())
    digits = {"miou": 3, "signed": 3, "drift": 2, "pct": 1, "minutes": 1}.get(fmt)
    if digits is None:
        return str(value)
    if isinstance(value, list):  # one value per seed: mean ± sample standard deviation
        value = {"mean": statistics.fmean(value), "std": statistics.stdev(value) if len(value) > 1 else None}
    if isinstance(value, dict):  # a summary as an ablation printed it
        mean = _number(value["mean"], digits, fmt == "signed")
        return mean if value.get("std") is None else f"{mean} ± {value['std']:.{digits}f}"
    return _number(value, digits, fmt == "signed")


def field(row: dict, path: str):
    """``row``'s value at a dotted ``path`` (``per_class_iou.Pole``), or None."""
    for part in path.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def render(table: dict, found: dict[str, dict]) -> str:
    """The markdown table of one result file; a row ``{"same_as": "TABLE/N", ...}`` is row N of
    another result file (the same run, typed once), with the fields it gives on top."""
    columns = table["columns"]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table["rows"]:
        if "same_as" in row:
            name, _, index = row["same_as"].partition("/")
            row = found[name]["rows"][int(index)] | row
        lines.append("| " + " | ".join(cell(field(row, c[1]), c[2]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def tables() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("*.json"))}


def write_pages(check: bool) -> list[str]:
    """Regenerate every results block of every page; with ``check``, only list the pages that differ."""
    found, stale = tables(), []
    pages = sorted({page for t in found.values() for page in t["pages"]})
    for page in pages:
        path = ROOT / page
        text = path.read_text(encoding="utf-8")

        def fill(match: re.Match, page: str = page) -> str:
            name = match["name"]
            if name not in found or page not in found[name]["pages"]:
                raise SystemExit(f"{page}: no result file docs/results/{name}.json lists this page")
            return match.group(1) + "\n" + render(found[name], found) + "\n" + match.group(4)

        new = BLOCK.sub(fill, text)
        missing = [n for n, t in found.items() if page in t["pages"] and f"<!-- results: {n} -->" not in text]
        if missing:
            raise SystemExit(f"{page}: no <!-- results: {missing[0]} --> block for docs/results/{missing[0]}.json")
        if new != text:
            stale.append(page)
            if not check:
                path.write_text(new, encoding="utf-8")
    return stale


def add(name: str, run_dir: Path, extra: list[str]) -> None:
    """Append the run in ``run_dir`` (its ``metrics.json``) to table ``name``; ``extra`` fields as ``key=value``."""
    path = RESULTS / f"{name}.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    per_class = metrics["per_class_iou"]  # {class name: IoU}, null for a class absent from val
    row = {"val_miou": round(metrics["miou"], 4)}
    row["per_class_iou"] = {n: round(100 * v, 1) for n, v in per_class.items() if v is not None}
    row |= {k: metrics[k] for k in RUN_FIELDS if k in metrics}
    for item in extra:
        key, _, value = item.partition("=")
        row[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("null", "true") else value
    table["rows"].append(row)
    path.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"added to {path}; now run: python scripts/results_tables.py")


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["add"] and len(argv) >= 3:
        add(argv[1], Path(argv[2]), argv[3:])
        return 0
    if argv not in ([], ["--check"]):
        print("usage: scripts/results_tables.py [--check] | add TABLE RUN_DIR [field=value ...]", file=sys.stderr)
        return 2
    stale = write_pages(check=bool(argv))
    if stale and argv:
        print(f"out of date: {', '.join(stale)}; run: python scripts/results_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
