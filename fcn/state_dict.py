"""Weights from files written by other tools: unwrap the usual containers, strip wrapper prefixes,
and say exactly what does not fit.

Files met in the field: a plain state dict; one wrapped as ``{"state_dict": ..., "epoch": 90}``
(Lightning, mmcv, timm training scripts), ``{"model": ...}`` (torchvision references, this
project's checkpoints), ``{"model_state": ...}`` / ``{"model_state_dict": ...}``; keys prefixed
``module.`` (saved from ``DataParallel`` / ``DistributedDataParallel``) or ``_orig_mod.`` (saved
from a ``torch.compile``'d model). :func:`load_into` handles all of them, saying in a log line what
it unwrapped or stripped; anything else ends in one line with counts and the first keys missing,
unexpected or of another shape, never torch's bare "Error(s) in loading state_dict for ResNet:".
Used by backbone weights (``model.backbone_weights``), ``init_from`` and checkpoint loading.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from fcn.errors import UserError

log = logging.getLogger(__name__)

# Keys under which training scripts store the weights, most common first.
CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network", "weights")
# Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: ``obj`` itself when its values are tensors, else the first of
    :data:`CONTAINER_KEYS` that holds one (searched again inside, for nested wrappers).

    Raises:
        UserError: no mapping of names to tensors is found (``source`` names the file and key).
    """
    seen = []
    while isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if seen:
                log.info("%s: weights taken from %s", source, " -> ".join(repr(k) for k in seen))
            return dict(obj)
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        seen.append(inner)
        obj = obj[inner]
    keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else []
    what = f"a dict with keys {keys}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise UserError(
        f"{source} holds {what}, not a state dict (names -> tensors, possibly under one of "
        f"{list(CONTAINER_KEYS)}); save it with torch.save(model.state_dict(), PATH)"
    )


def strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: set[str], source: str) -> dict[str, torch.Tensor]:
    """``state`` with every wrapper prefix (``module.``, ``_orig_mod.``, in any order and repeated)
    that all of its keys share, and that ``expected`` keys do not carry, removed (said in a log line)."""
    removed = []
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None or any(k.startswith(prefix) for k in expected):
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
        removed.append(prefix)
    if removed:
        log.info("%s: removed the key prefix %s (saved from a wrapped model)", source, " + ".join(map(repr, removed)))
    return state


def mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], show: int = 3) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``expected``: counts and the
    first ``show`` keys missing, unexpected and of another shape; "" when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs model)", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > show else ""
            parts.append(f"{len(items)} keys {name}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)


def match_keys(state: object, model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The state dict in ``state`` (see :func:`unwrap`), keyed as ``model`` names its parameters
    (see :func:`strip_wrapper_prefixes`); nothing is checked beyond that."""
    return strip_wrapper_prefixes(unwrap(state, source), set(model.state_dict()), source)


def load_into(model: nn.Module, state: object, source: str, fix: str = "") -> None:
    """Load the weights in ``state`` (a state dict, wrapped or prefixed as training tools save them)
    into ``model``, strictly.

    Args:
        model: the module to fill.
        state: what ``torch.load`` returned.
        source: names the file and the setting in messages, e.g. ``"backbone weights w.pt (model.backbone_weights)"``.
        fix: appended to the mismatch message (what to do about it).

    Raises:
        UserError: no state dict inside, or keys / shapes that do not fit (counts and first keys).
    """
    weights = match_keys(state, model, source)
    problem = mismatch(model.state_dict(), weights)
    if problem:
        raise UserError(
            f"{source}: cannot be loaded into this {type(model).__name__}: {problem}" + (f"; {fix}" if fix else "")
        )
    model.load_state_dict(weights)
