"""CPU thread settings that must be in place before torch starts its OpenMP thread pool.

The torch wheel runs its CPU kernels on GNU OpenMP (libgomp). By default a libgomp thread that
reaches a barrier spins for a while (GOMP_SPINCOUNT, 300,000 iterations, a few milliseconds)
before it sleeps. On a quiet machine that saves a wake-up; on a shared one the spinning threads
burn the CPU time that the thread they wait for needs, and training collapses (issue 17: 4-7x
slower on the 2-core CPU with other jobs running). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``,
the default until issue 17's second round) cures that but pays a futex wake-up at every barrier,
and a training step has hundreds. A short spin, ``GOMP_SPINCOUNT=1000`` (a few microseconds), keeps
most of both: 0.90-0.94 of libgomp's speed on the quiet machine (passive: 0.77 at batch 8, 0.53
at batch 1), and with two busy processes beside it 2.1x libgomp's speed at batch 8 (as fast as
sleeping at once) and 2.0x at batch 1 (0.72 of passive there) (docs/performance.md, "A busy
CPU", with the commands).

So the entry points call :func:`set_openmp_defaults` before torch is imported. Every variable is
only a default: a value the user exported wins, and an exported ``OMP_WAIT_POLICY`` (ACTIVE or
PASSIVE) leaves both unset (libgomp lets a spin count override the policy, LLVM's OpenMP a
``KMP_BLOCKTIME``). This module must not import torch.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping

# Names set_openmp_defaults set in os.environ after torch had been imported: too late to take effect.
_set_after_torch: set[str] = set()

# Spin iterations before a waiting libgomp thread sleeps (libgomp's default: 300,000; PASSIVE: 0).
SPIN_COUNT = 1000
# Defaults for variables read once, when libgomp / Intel OpenMP initialise (at `import torch`).
OPENMP_DEFAULTS = {
    "GOMP_SPINCOUNT": str(SPIN_COUNT),  # GNU OpenMP: spin briefly at a barrier, then sleep
    "KMP_BLOCKTIME": "0",  # Intel / LLVM OpenMP builds: sleep at once (not measured: the wheel here uses libgomp)
}


def set_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OPENMP_DEFAULTS` in ``environ`` (``os.environ`` by default) where unset.

    Returns the variables it set (empty when the user had set them all). It has no effect on a
    process that has already imported torch, so call it first thing in an entry point.
    """
    real = environ is None
    environ = os.environ if environ is None else environ
    added = {}
    policy_chosen = environ.get("OMP_WAIT_POLICY", "").strip().upper() in ("ACTIVE", "PASSIVE")
    for name, value in OPENMP_DEFAULTS.items():
        if policy_chosen:
            continue  # the user chose a policy; a spin count or block time would override it
        if not environ.get(name, "").strip():  # unset, or exported empty (which libgomp ignores)
            environ[name] = value
            added[name] = value
    if real and "torch" in sys.modules:
        _set_after_torch.update(added)
    return added


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, cgroup cpusets), further
    capped by a cgroup v2 CPU quota (``docker --cpus``, Kubernetes limits) when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def spin_count(environ: Mapping[str, str]) -> float:
    """Iterations a waiting libgomp thread spins before it sleeps, as libgomp reads ``environ``:
    ``GOMP_SPINCOUNT`` (``infinite``/``infinity``, or an integer with an optional k/M/G/T suffix;
    a negative one wraps around to practically forever; anything else is ignored), else
    ``OMP_WAIT_POLICY`` (``PASSIVE``: 0, ``ACTIVE``: practically forever), else 300,000."""
    value = environ.get("GOMP_SPINCOUNT", "").strip().lower()
    if value in ("infinite", "infinity"):
        return float("inf")
    if match := re.fullmatch(r"([-+]?)([0-9]+)\s*([kmgt]?)", value):
        count = int(match.group(2)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[match.group(3)]
        if count < 2**64:  # libgomp rejects a larger one (and falls back to the wait policy)
            return float("inf") if match.group(1) == "-" and count else float(count)  # read unsigned: wraps
    policy = environ.get("OMP_WAIT_POLICY", "").strip().upper()
    return {"PASSIVE": 0.0, "ACTIVE": float("inf")}.get(policy, 300_000.0)


def spins_long(environ: Mapping[str, str] | None = None) -> bool:
    """True when waiting OpenMP threads will spin longer than :data:`SPIN_COUNT` iterations: the
    user exported such a setting, or torch was imported before the entry point set its default
    (then libgomp runs with its own 300,000 whatever the environment says now)."""
    environ = os.environ if environ is None else environ
    return spin_count(environ) > SPIN_COUNT or "GOMP_SPINCOUNT" in _set_after_torch


def spin_wait_warning(threads: int, environ: MutableMapping[str, str] | None = None) -> str | None:
    """A warning with the fix when ``threads`` OpenMP threads will spin-wait long on a machine that
    is already busy: the 1-minute load average is at least the usable CPUs while libgomp spins for
    more than :data:`SPIN_COUNT` iterations (the user exported another setting, or torch was
    imported before the entry point could set its defaults). None when all is well. Cheap: reads
    the environment and ``os.getloadavg``."""
    environ = os.environ if environ is None else environ
    too_late = "GOMP_SPINCOUNT" in _set_after_torch
    if threads < 2 or not spins_long(environ):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = usable_cpus()
    if load < cpus:
        return None
    if too_late:
        setting = "libgomp's default (torch was imported before the entry point set GOMP_SPINCOUNT)"
    else:
        chosen = {k: environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in environ}
        setting = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "libgomp's default"
    return (
        f"the machine is busy (load average {load:.1f} on {cpus} CPUs) and OpenMP threads spin-wait ({setting}): "
        f"{threads} threads that spin can train several times slower; "
        f"export GOMP_SPINCOUNT={SPIN_COUNT} (or OMP_WAIT_POLICY=PASSIVE) before starting, or set trainer.threads=1"
    )
