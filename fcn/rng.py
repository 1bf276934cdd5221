"""Random state: seeding, and capturing/restoring every generator a run draws from.

A checkpoint must hold only tensors and plain Python values (it is loaded with
``weights_only=True``), so the states are stored as tensors and lists, never as pickled objects.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator, as tensors and lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current GPU's only: in a torchrun job each process owns one GPU and must not create
        # a context on the others (a CPU run never initialises CUDA and saves none).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: the same whichever worker loads it,
    and whether or not the run was interrupted and resumed."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive Python's and NumPy's seeds from the worker's torch seed
    (torch seeds each worker differently, but leaves the other generators as forked copies)."""
    del worker_id
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
