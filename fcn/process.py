"""Where a process starts: the settings that must be made before torch loads, and the console scripts.

Importing any ``fcn`` module changes nothing in the process; :func:`start_process` does, and it is
called first by :func:`launch`, which every ``scripts/*.py`` and the console scripts below
(``fcn-evaluate`` ..., see ``pyproject.toml``) call, before the entry point's module imports torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import os
import sys
from collections.abc import Mapping, MutableMapping

# Spin iterations before a waiting GNU OpenMP (libgomp, the torch wheel's) thread sleeps; libgomp's
# default is 300,000. Measured (docs/performance.md, "A busy CPU", tiny model, 2-core CPU): 2.0-2.1x
# libgomp's training speed with two busy processes beside it (5.5-6.8x at load average 9-10, re-checked
# 2026-12-08), 0.90-0.94 of it on a quiet machine.
SPIN_COUNT = "1000"
# FCN_KEEP_FREED_MEMORY values that give glibc's own malloc behaviour back, and those that keep it on (so does unset).
OFF_VALUES = ("0", "false", "no", "n", "off", "disable", "disabled")
ON_VALUES = ("", "1", "true", "yes", "y", "on", "enable", "enabled")
# Environment variables through which a user has already chosen how memory is allocated.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def start_process(environ: MutableMapping[str, str] | None = None) -> None:
    """OpenMP threads that spin only briefly at a barrier, then sleep, and large tensors that reuse
    freed heap memory instead of fresh, zero-filled pages every step (the comments say why). A value
    the user exported wins; calling it twice changes nothing more. The spin count does nothing in a
    process that has already imported torch (libgomp reads its variables once)."""
    environ = os.environ if environ is None else environ
    # A user's OMP_WAIT_POLICY (ACTIVE or PASSIVE) acts alone: libgomp lets a spin count override it.
    # An exported empty GOMP_SPINCOUNT is ignored by libgomp, so it gets the default too.
    if environ.get("OMP_WAIT_POLICY", "").strip().upper() not in ("ACTIVE", "PASSIVE"):
        if not environ.get("GOMP_SPINCOUNT", "").strip():
            environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    keep_freed_memory(environ)


def user_malloc_setting(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable through which the user already chose how memory is allocated, or None:
    ``FCN_KEEP_FREED_MEMORY`` off, a glibc ``MALLOC_*`` variable, a ``glibc.malloc`` tunable, or
    jemalloc/TCMalloc/mimalloc in ``LD_PRELOAD``."""
    environ = os.environ if environ is None else environ
    if environ.get("FCN_KEEP_FREED_MEMORY", "1").strip().lower() in OFF_VALUES:
        return "FCN_KEEP_FREED_MEMORY"
    if chosen := [name for name in MALLOC_VARIABLES if name in environ]:
        return chosen[0]
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(name in environ.get("LD_PRELOAD", "").lower() for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Make glibc serve large blocks from its heaps, not fresh ``mmap`` s, and keep freed heap memory
    for the next step (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GB - 1)``), what
    PyTorch's CPU guide gets from jemalloc. Otherwise every step's activations over 32 MB arrive as
    pages the kernel zero-fills. Measured (docs/performance.md, "Crop size"): training 1.15x (128 px),
    1.28x (256 px), 1.61x (512 px) faster; peak memory 1-3% higher, 28-36% at 512 px. Re-checked
    2026-12-08: 0.68x the CPU time per step at 512 px, 0.87x at 128 px.

    Returns True when applied; False when the user chose (:func:`user_malloc_setting`) or the C
    library is not glibc (macOS, musl).
    """
    if user_malloc_setting(environ) is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: raises AttributeError on musl
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def malloc_setting_warning(environ: Mapping[str, str] | None = None) -> str | None:
    """A warning naming ``FCN_KEEP_FREED_MEMORY`` when its value is neither an on nor an off value
    (it is then taken as on, which may not be what was meant); None otherwise."""
    environ = os.environ if environ is None else environ
    value = environ.get("FCN_KEEP_FREED_MEMORY")
    if value is None or value.strip().lower() in OFF_VALUES + ON_VALUES:
        return None
    return (
        f"FCN_KEEP_FREED_MEMORY={value!r} is not understood: freed memory is kept for reuse as by default; "
        "set FCN_KEEP_FREED_MEMORY=0 to give glibc its own behaviour back (or 1 to silence this)"
    )


# Each entry point's Hydra config and the module whose ``main`` runs it.
ENTRY_POINTS = {
    "train": "fcn.cli.train",
    "evaluate": "fcn.cli.evaluate",
    "predict": "fcn.cli.predict",
    "export": "fcn.cli.export",
    "check_data": "fcn.cli.check_data",
    "fix_data": "fcn.cli.fix_data",
    "model_table": "fcn.bench.model_table",
    "benchmark": "fcn.bench.run",
    "search": "fcn.cli.search",
    "upsampling_ablation": "fcn.bench.upsampling_ablation",
}


def launch(name: str) -> None:
    """Start the process and run entry point ``name`` (a key of :data:`ENTRY_POINTS`) on ``sys.argv``.
    ``--help``, ``--cfg job`` and Hydra's other information flags are answered from the config
    alone (:mod:`fcn.cli.info`), before the entry point's module imports torch."""
    start_process()
    from fcn.cli import hydra_run_dir  # ${fcn.claim_dir:...}, the run directory of every config built on train
    from fcn.cli.info import answer, asks_for_info

    if name != "train" and asks_for_info(sys.argv[1:]):  # fcn.cli.train loads torch only once a run starts
        with hydra_run_dir.print_only():  # names the run directory without making it
            answer(name)
    else:
        importlib.import_module(ENTRY_POINTS[name]).main()


def search() -> None:
    """``fcn-search``."""
    launch("search")


def evaluate() -> None:
    """``fcn-evaluate``."""
    launch("evaluate")


def predict() -> None:
    """``fcn-predict``."""
    launch("predict")


def export() -> None:
    """``fcn-export``."""
    launch("export")


def check_data() -> None:
    """``fcn-check-data``."""
    launch("check_data")


def fix_data() -> None:
    """``fcn-fix-data``."""
    launch("fix_data")


def model_table() -> None:
    """``fcn-model-table``."""
    launch("model_table")


def benchmark() -> None:
    """``fcn-benchmark``."""
    launch("benchmark")


def upsampling_ablation() -> None:
    """``fcn-upsampling-ablation``."""
    launch("upsampling_ablation")
