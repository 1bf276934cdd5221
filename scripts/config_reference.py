"""Write the configuration reference, docs/reference/configuration.md, from configs/:
``python scripts/config_reference.py`` (``--check`` exits 1 when the page is out of date).

Every YAML file of every config group becomes a table of its keys (dotted paths), their values
as written and their comments. The files are read line by line, so the comments the YAML parser
throws away are kept; a comment on lines of its own below a key continues that key's comment."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PAGE = ROOT / "docs" / "reference" / "configuration.md"
KEY = re.compile(
    r"^(?P<indent> *)(?P<key>[^\s#:\-][^:#]*?|'[^']*'|\"[^\"]*\"):"
    r"(?:\s+(?P<value>[^#]*?))?\s*(?:#\s?(?P<comment>.*))?$"
)
ITEM = re.compile(r"^(?P<indent> *)- (?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def _split_value_comment(value: str | None, comment: str | None) -> tuple[str, str]:
    """A `#` inside quotes is part of the value: the regex split at the first `#`, so re-join if quotes are open."""
    value = (value or "").strip()
    if value.count("'") % 2 or value.count('"') % 2:
        value, comment = f"{value} #{comment or ''}", None
    return value, (comment or "").strip()


def rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The file's header comment lines and its rows ``[key, value, comment]``, in file order."""
    header, table, stack = [], [], []  # stack: (indent, key) of the open mappings
    block = None  # indent of the key whose block scalar (| or >) is being read: its lines are its value
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if block is not None:
            if len(line) - len(line.lstrip()) > block:
                continue
            block = None
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not table:
                header.append(text)
            elif line.startswith(" ") and text:
                table[-1][2] = f"{table[-1][2]} {text}".strip()  # a continued comment
            continue
        match = KEY.match(line) or ITEM.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent and "key" in match.groupdict():
            stack.pop()
        value, comment = _split_value_comment(match["value"], match["comment"])
        if "key" in match.groupdict() and value in ("|", ">"):
            block, value = indent, "(text)"
        if "key" in match.groupdict():
            key = ".".join([k for _, k in stack] + [match["key"].strip("'\"")])
            if not value:
                stack.append((indent, match["key"].strip("'\"")))
        else:  # a list item belongs to the key above it
            key = ".".join(k for _, k in stack) + "[]"
        table.append([key, value, comment])
    return header, table


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole page, one section per config group and one table per option (file)."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `configs/` by `python scripts/config_reference.py`; do not edit by hand (a test fails",
        "when this page is out of date). Values are the defaults as written in the YAML files; `${...}` are",
        "interpolations resolved when the config is composed. How the groups fit together:",
        "[Configuration](../configuration.md).",
        "",
    ]
    # by folder, then file: a group's options stay together before its subfolders (data, then data/base)
    files = sorted(CONFIGS.rglob("*.yaml"), key=lambda p: (p.parent != CONFIGS, str(p.parent), p.name))
    group = None
    for path in files:
        rel = path.relative_to(CONFIGS)
        this_group = str(rel.parent) if rel.parent != Path(".") else "entry points"
        if this_group != group:
            group = this_group
            out += [f"## {group}", ""]
        header, table = rows(path)
        option = rel.stem if rel.parent != Path(".") else rel.name
        out += [f"### `{option}`" if rel.parent == Path(".") else f"### `{rel.parent}={rel.stem}`", ""]
        out += [f"`configs/{rel.as_posix()}`" + (": " + " ".join(header) if header else ""), ""]
        if table:
            out += ["| key | default | comment |", "|---|---|---|"]
            out += [f"| `{_cell(k)}` | {'`' + _cell(v) + '`' if v else ''} | {_cell(c)} |" for k, v, c in table]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="scripts/config_reference.py")
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is out of date; write nothing")
    args = parser.parse_args(argv)  # --help prints the usage, an unknown flag exits 2: neither writes the page
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
