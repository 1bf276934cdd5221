"""The commands the doctor prints (full report, repair, training on a repaired copy), carrying the user's data settings.

A printed command must run as printed: ``data=folder data.root=...`` alone fails where the user
also gave ``data.num_classes`` and ``data.class_names``. The settings to carry are found by
difference, not from the command line: every key of the ``data`` node whose value differs from
the data option's own file (``configs/data/<name>.yaml``), so that settings an experiment overlay
made travel too. Each is written back as one shell word that Hydra reads as the value
(:mod:`fcn.overrides`).
"""

from __future__ import annotations

import copy
import functools
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fcn.overrides import hydra_value

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
# Label settings a repaired copy no longer needs: its masks hold class indices (fcn.data.doctor.fix).
LABEL_KEYS = {"label_map": None, "reduce_zero_label": False, "ignore_colors": []}


def data_defaults(name: str) -> dict:
    """The ``data`` node of the data option ``name`` as its file gives it (``???`` where a value is required).

    Raises Hydra's ``MissingConfigException`` when there is no such option."""
    return copy.deepcopy(_data_defaults(name))


@functools.lru_cache(maxsize=16)  # the config files do not change while a process runs
def _data_defaults(name: str) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"data={name}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is this config folder
        cfg = compose(config_name="check_data", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="check_data", overrides=overrides)
    return OmegaConf.to_container(cfg.data, resolve=False)


def changed_settings(data: DictConfig | Mapping) -> dict[str, Any]:
    """``{key: value}`` of the ``data`` settings that differ from the data option's file (``data.name``),
    in the file's order, keys the file lacks last. Interpolations are compared as written."""
    now = OmegaConf.to_container(data, resolve=False) if isinstance(data, DictConfig) else dict(data)
    try:
        default = data_defaults(str(now["name"]))
    except Exception:  # noqa: BLE001 - an unknown option name: every setting is carried
        default = {}
    changed = {k: v for k, v in now.items() if k in default and v != default[k]}
    changed.update({k: v for k, v in now.items() if k not in default and k != "name"})
    return changed


def literal(value: Any) -> str:
    """``value`` in Hydra's override grammar: ``null``, ``true``, ``3``, ``[a,b]``, ``{255:1}``, quoted strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{literal(k)}:{literal(v)}" for k, v in value.items()) + "}"
    return hydra_value(str(value))


def data_words(
    data: DictConfig | Mapping, *, replace: Mapping[str, Any] | None = None, drop: Iterable[str] = ()
) -> list:
    """``data=<name>`` and one ``data.key=value`` override per changed setting (not yet shell-quoted);
    ``replace`` sets keys (left out where they equal the option's own value), ``drop`` leaves keys out."""
    name = data["name"]
    known = data_defaults_or_empty(str(name))
    settings = {k: v for k, v in changed_settings(data).items() if k not in set(drop)}
    for key, value in (replace or {}).items():
        if key == "root" or key not in known or value != known[key]:
            settings[key] = value
        else:
            settings.pop(key, None)  # the option's own value: nothing to say
    first = ("root", "num_classes", "class_names")  # what a reader looks for first
    settings = {k: settings[k] for k in sorted(settings, key=lambda k: first.index(k) if k in first else len(first))}
    words = [f"data={name}"]
    for key, value in settings.items():
        plus = "" if key in known or not known else "+"
        words.append(f"{plus}data.{key}={literal(value)}")
    return words


def data_defaults_or_empty(name: str) -> dict:
    try:
        return data_defaults(name)
    except Exception:  # noqa: BLE001 - an unknown option: no key is known to it
        return {}


def script_command(script: str, words: Iterable[str]) -> str:
    """``python scripts/<script>.py`` and ``words``, each a shell word (quoted where the shell needs it)."""
    return " ".join(["python", f"scripts/{script}.py", *(shlex.quote(w) for w in words)])


def check_data_command(data: DictConfig | Mapping) -> str:
    """The doctor's full report on the data ``data`` describes, with every setting the user gave."""
    return script_command("check_data", data_words(data))


def fix_data_command(data: DictConfig | Mapping, out: str | Path | None = None) -> str:
    """The repair of the data ``data`` describes into ``out`` (a placeholder when None)."""
    target = str(out) if out is not None else f"{Path(str(data['root'])).resolve()}_fixed"
    return script_command("fix_data", [*data_words(data), f"out={hydra_value(target)}"])


def train_command(data: DictConfig | Mapping, root: str | Path, replace: Mapping[str, Any] | None = None) -> str:
    """Training on a repaired copy at ``root``: the user's data settings, the label settings neutral
    (the copy's masks hold class indices) and ``replace`` on top."""
    replace = {"root": str(root), **LABEL_KEYS, **(replace or {})}  # label settings at their neutral values
    return script_command("train", data_words(data, replace=replace, drop=LABEL_KEYS))


def doctor_lines(data: DictConfig | Mapping, kinds: Iterable[str]) -> str:
    """What follows a data error: the full report's command and, when a repaired copy takes away one of the
    problems ``kinds``, the repair's (:func:`repair_line`)."""
    text = f"Full report: {check_data_command(data)}"
    if repair := repair_line(data, kinds):
        text += f"\n{repair}"
    return text


def repair_line(data: DictConfig | Mapping, kinds: Iterable[str]) -> str | None:
    """The repair's command when a repaired copy takes away one of the problems ``kinds``
    (:data:`fcn.data.doctor.fix.FIXABLE`); None when it cannot run yet (colour masks need
    ``data.palette`` first, which only the user can give in class order) or nothing is fixable."""
    from fcn.data.doctor.fix import FIXABLE

    kinds = set(kinds)
    if "rgb_mask_no_palette" in kinds:
        return (
            "Repair: the masks are colour masks; give their colours in class order as data.palette=[[r,g,b],...] "
            "(the full report lists them), then fix_data.py can map them to class indices"
        )
    if FIXABLE & kinds:
        return f"Repair into a copy (the original is not changed): {fix_data_command(data)}"
    return None
