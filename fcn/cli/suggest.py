""" "Did you mean ...?" for a mistyped key on the command line (``trainer.epoch=3``).

Hydra reports a key that is not in the config itself (``Could not override 'trainer.epoch'``)
and exits with code 1. :func:`suggest_keys` wraps an entry point's ``@hydra.main`` function: only
when Hydra has failed, it composes the config again with the compose API, finds the override
Hydra refused and adds one line naming the closest keys of the composed config, exit code 2.
Group options (``model=fcn9s``) need nothing: Hydra lists the available ones itself.

Nothing here imports torch: ``--help`` and ``--cfg`` still answer before torch loads.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

from fcn.config import RENAMED, SYNONYMS, dotted_keys, renamed

# The messages of Hydra 1.3's ConfigCompositionException that name an unknown key.
_UNKNOWN_KEY = (
    re.compile(r"Could not override '([^']+)'"),
    re.compile(r"Could not delete from config\. '([^']+)' does not exist"),
)


def suggest_keys(config_name: str) -> Callable[[Callable], Callable]:
    """Decorate the ``@hydra.main`` function of the entry point whose primary config is ``config_name``.

    When Hydra ends the command with exit code 1 and an override names a key the composed config
    does not have, prints ``error: no key 'trainer.epoch' in the config; did you mean trainer.epochs?``
    to stderr and exits with code 2. Any other exit passes through unchanged.
    """

    def decorate(hydra_main: Callable) -> Callable:
        @functools.wraps(hydra_main)
        def wrapper(*args, **kwargs):
            from fcn.overrides import unreadable_override_hint

            argv = sys.argv[1:]
            refused = unreadable_override_hint(argv) or renamed_key_hint(argv) or added_key_hint(config_name, argv)
            if refused is not None:
                print(refused, file=sys.stderr)  # before Hydra runs: no run directory is made
                sys.exit(2)
            try:
                return hydra_main(*args, **kwargs)
            except SystemExit as exc:
                if exc.code != 1:
                    raise
                hint = unknown_key_hint(config_name, sys.argv[1:])
                if hint is None:
                    raise
                print(hint, file=sys.stderr)
                sys.exit(2)

        return wrapper

    return decorate


def unknown_key_hint(config_name: str, argv: list[str]) -> str | None:
    """The one line for an override of ``argv`` whose key is not in the composed ``config_name``
    config (with the closest keys), or None when the overrides compose (Hydra failed otherwise)."""
    from hydra.errors import ConfigCompositionException

    overrides = [a for a in argv if not a.startswith("-")]  # flags (-m, --multirun) are not overrides
    try:
        _compose(config_name, overrides)
        return None
    except ConfigCompositionException as exc:
        key = next((m.group(1) for p in _UNKNOWN_KEY if (m := p.search(str(exc)))), None)
    except Exception:  # noqa: BLE001 - any other composition error: Hydra has said it already
        return None
    if key is None:
        return None
    # The keys of the config composed without the refused override (group choices kept).
    rest = [o for o in overrides if _override_key(o) != key]
    try:
        keys = dotted_keys(_compose(config_name, rest))
    except Exception:  # noqa: BLE001 - a second bad override: Hydra's own message is all there is
        return None
    return _closest_key_hint(config_name, key, keys)


def renamed_key_hint(argv: list[str]) -> str | None:
    """The one line refusing an override of ``argv`` that names a renamed setting (with or without
    ``+``/``++``/``~``: added, the old key would be taken by the model's constructor while the run
    records the new key's value), or None."""
    for override in argv:
        key = _override_key(override)
        if not override.startswith("-") and key in RENAMED:
            return "error: " + renamed(key, override.partition("=")[2] if "=" in override else None)
    return None


def added_key_hint(config_name: str, argv: list[str]) -> str | None:
    """The one line refusing a ``+key=value`` override of ``argv`` that nothing reads, or None.

    Hydra's own advice for a mistyped key is ``+trainer.epoch=3``; followed, the run would go on
    with the typo ignored. A key added with ``+``/``++`` is accepted when the config already has it,
    when it is a config group (``+experiment=camvid``), under ``hydra.``, a keyword of a node
    that is instantiated (``+optim.fused=false`` goes to the optimizer's constructor), or a
    search's dimension (``+search.space.optim.momentum={...}``: :func:`fcn.search.parse_space`
    checks it against the training config).
    """
    from omegaconf import DictConfig, OmegaConf

    from fcn.cli import CONFIG_DIR

    overrides = [a for a in argv if not a.startswith("-")]
    added = [o for o in overrides if o.startswith("+") and "=" in o]
    added = [o for o in added if not (Path(CONFIG_DIR) / _override_key(o).replace(".", "/")).is_dir()]
    if not added:
        return None  # nothing composed: the common command costs nothing
    try:
        cfg = _compose(config_name, [o for o in overrides if o not in added])
    except Exception:  # noqa: BLE001 - another bad override: Hydra reports it
        return None
    keys = dotted_keys(cfg)
    for override in added:
        key = _override_key(override)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else None
        if (
            key in keys
            or key.startswith(("hydra.", "search.space."))
            or (isinstance(node, DictConfig) and "_target_" in node)
        ):
            continue
        hint = _closest_key_hint(config_name, key, keys)
        return f"{hint} ({override.split('=', 1)[0]} adds a key that nothing reads: refused)"
    return None


def _closest_key_hint(config_name: str, key: str, keys: list[str]) -> str:
    """``error: no key 'k' in the <config> config; did you mean ...?`` from the config's ``keys``."""
    if key in RENAMED:
        return f"error: no key '{key}' in the {config_name} config; {renamed(key)}"
    candidates = keys if key.startswith("hydra.") else [k for k in keys if not k.startswith("hydra")]
    parent, _, leaf = key.rpartition(".")
    # names other tools use for the same setting: learning_rate is optim.lr here
    alias = f"{parent}.{SYNONYMS[leaf]}" if parent and leaf in SYNONYMS else None
    close = [alias] if alias in candidates else difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close and (options := _options_with_key(parent, leaf)):
        chosen = ", ".join(f"{parent}={o}" for o in options)
        return f"error: no key '{key}' in the {config_name} config; {chosen} has it (choose that option first)"
    if not close:
        parent = key.rpartition(".")[0]
        siblings = sorted(k.rpartition(".")[2] for k in candidates if k.rpartition(".")[0] == parent and parent)
        where = f"; {parent} has: {', '.join(siblings)}" if siblings else ""
        return f"error: no key '{key}' in the {config_name} config{where}"
    return f"error: no key '{key}' in the {config_name} config; did you mean {close[0]}?"


def _options_with_key(group: str, leaf: str) -> list[str]:
    """The options of config group ``group`` (``configs/<group>/*.yaml``) whose own keys include ``leaf``."""
    import yaml

    from fcn.cli import CONFIG_DIR

    folder = Path(CONFIG_DIR) / group
    if not group or "." in group or not folder.is_dir():
        return []
    found = []
    for option in sorted(folder.glob("*.yaml")):
        try:
            content = yaml.safe_load(option.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(content, dict) and leaf in content:
            found.append(option.stem)
    return found


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fcn.cli import CONFIG_DIR

    GlobalHydra.instance().clear()  # hydra.main leaves its own instance behind
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)
