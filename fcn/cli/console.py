"""What a run says about its configuration at the start: the command line's overrides and every
value they changed from the defaults, and where the full resolved config was written. Also the
run's name for tables of several runs (TensorBoard's HPARAMS tab): its overrides."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MAX_CHANGES = 25  # more than this (an experiment overlay, a dataset switch) is summarised


def command_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (``hydra.*`` ones left out); ``[]`` when
    the config was not composed by Hydra's command line (tests, notebooks)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra.")]


def run_name() -> str:
    """This run's name among others: its overrides, comma-separated (``""`` for the defaults)."""
    return ",".join(command_overrides())


def config_changes(cfg: DictConfig, defaults: DictConfig) -> list[str]:
    """One ``key: default -> value`` line per value of ``cfg`` that differs from ``defaults``
    (``key: (absent) -> value`` and ``key: value -> (removed)`` for keys only in one), sorted by key."""
    now, before = _flat(cfg), _flat(defaults)
    lines = []
    for key in sorted(now.keys() | before.keys()):
        if key not in before:
            lines.append(f"{key}: (absent) -> {now[key]}")
        elif key not in now:
            lines.append(f"{key}: {before[key]} -> (removed)")
        elif now[key] != before[key]:
            lines.append(f"{key}: {before[key]} -> {now[key]}")
    return lines


def log_config_changes(cfg: DictConfig) -> None:
    """Log the overrides, what they changed from the defaults and the path of the full resolved
    config (``.hydra/config.yaml``). Nothing outside a Hydra command line run."""
    if not HydraConfig.initialized():
        return
    from hydra import compose

    hydra_cfg = HydraConfig.get()
    overrides = command_overrides()
    if hydra_cfg.output_subdir is not None:
        where = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / "config.yaml"
        log.info("full config: %s", where)
    if not overrides:
        log.info("config: the defaults of %s.yaml (no overrides)", hydra_cfg.job.config_name)
        return
    changes = config_changes(cfg, compose(hydra_cfg.job.config_name, overrides=[]))
    log.info("config: overrides %s change %d value(s) from the defaults:", " ".join(overrides), len(changes))
    for line in changes[:MAX_CHANGES]:
        log.info("  %s", line)
    if len(changes) > MAX_CHANGES:
        log.info("  ... and %d more (see the full config)", len(changes) - MAX_CHANGES)


def _flat(cfg: DictConfig) -> dict[str, object]:
    """Every leaf of ``cfg`` by dotted key, interpolations resolved where they can be."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation to a missing value: compare as written
        container = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    container.pop("hydra", None)  # Hydra's own settings say where and how, not what: not compared
    walk(container, "")
    return out
