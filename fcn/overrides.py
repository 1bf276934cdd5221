"""Overrides and commands as a user pastes them back: every command fcn prints goes through here.

Two layers quote a value on the command line: the shell splits words, then Hydra's override
grammar reads ``key=value``. Hydra reads an unquoted value only when it is made of a few
characters (letters of ASCII, digits, ``/ - _ . : @ % * + \\`` and spaces); a non-ASCII letter,
a quote, ``= [ ] { } ( ) # ~ ! &`` or a comma (a sweep) needs Hydra's quotes, which in turn need
the shell's (https://hydra.cc/docs/advanced/override_grammar/basic/).
"""

from __future__ import annotations

import shlex


def hydra_value(value: str) -> str:
    """``value`` as Hydra's grammar reads it back unchanged: as it is where it can, else quoted.

    ``/tmp/données`` -> ``"/tmp/données"``; ``it's`` -> ``"it's"``; ``a"b`` -> ``'a"b'``.
    """
    candidates = [value, f'"{value}"', f"'{value}'", '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"']
    for candidate in candidates:
        if _reads_back(candidate, value):
            return candidate
    return candidates[-1]


def override(key: str, value: object) -> str:
    """One shell word for the override ``key=value`` that Hydra reads back as ``value``."""
    return shlex.quote(f"{key}={hydra_value(str(value))}")


def command(*words: str) -> str:
    """A command line from words that are each passed as they are (shell-quoted where needed)."""
    return " ".join(shlex.quote(w) for w in words)


def unreadable_override_hint(argv: list[str]) -> str | None:
    """The one line for the first override of ``argv`` that Hydra's grammar cannot read, naming it
    and the same override quoted so that it reads (as a shell word), or None when all read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
            continue
        except OverrideParseException:
            pass
        key, _, value = arg.partition("=")
        odd = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "/-_.:@%*+\\ $"))})
        fixed = override(key, value)
        if not _reads_back(hydra_value(value), value) or not _key_reads(key):
            return f"error: Hydra cannot read the override {arg!r}: check its key and the override syntax"
        shown = f"the character {odd[0]} needs" if len(odd) == 1 else f"the characters {' '.join(odd)} need"
        return (
            f"error: Hydra cannot read the override {arg} ({shown if odd else 'it needs'} quotes): write it as {fixed}"
        )
    return None


def _key_reads(key: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([f"{key}=x"])
        return True
    except Exception:  # noqa: BLE001 - any parse error: the key itself is wrong
        return False


def _reads_back(text: str, value: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([f"k={text}"])[0]
    except Exception:  # noqa: BLE001 - any parse error: not readable this way
        return False
    return not parsed.is_sweep_override() and parsed.value() == value
