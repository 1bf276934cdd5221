"""CPU thread settings that must be in place before torch starts its OpenMP thread pool.

The torch wheel runs its CPU kernels on GNU OpenMP (libgomp). By default a libgomp thread that
reaches a barrier spins for a while (GOMP_SPINCOUNT, about 300k iterations) before it sleeps.
On a quiet machine that saves a wake-up; on a shared one the spinning threads burn the CPU time
that the thread they wait for needs, and training collapses: on the 2-core CPU with other jobs
running, the benchmark's training rate (tiny model, medians) went from 5.5 to 31.8 img/s with
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once), and from 5.4 to 18.1 img/s with two extra
busy processes (README, Performance, "A busy CPU", with the commands and load averages).

So the entry points call :func:`set_openmp_defaults` before torch is imported. Every variable is
only a default: a value the user exported wins. This module must not import torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# Names set_openmp_defaults set in os.environ after torch had been imported: too late to take effect.
_set_after_torch: set[str] = set()

# Defaults for variables read once, when libgomp / Intel OpenMP initialise (at `import torch`).
OPENMP_DEFAULTS = {
    "OMP_WAIT_POLICY": "PASSIVE",  # GNU and Intel OpenMP: waiting threads sleep instead of spinning
    "KMP_BLOCKTIME": "0",  # Intel OpenMP (builds linked with libiomp): the same, in its own words
}


def set_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OPENMP_DEFAULTS` in ``environ`` (``os.environ`` by default) where unset.

    Returns the variables it set (empty when the user had set them all). It has no effect on a
    process that has already imported torch, so call it first thing in an entry point.
    """
    real = environ is None
    environ = os.environ if environ is None else environ
    added = {}
    for name, value in OPENMP_DEFAULTS.items():
        if name not in environ:
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


def spin_wait_warning(threads: int, environ: MutableMapping[str, str] | None = None) -> str | None:
    """A warning with the fix when ``threads`` OpenMP threads will spin-wait on a machine that is
    already busy: the 1-minute load average is at least the usable CPUs while OpenMP's wait policy
    is not passive (the user exported another one, or torch was imported before the entry point
    could set it). None when all is well. Cheap: reads the environment and ``os.getloadavg``."""
    environ = os.environ if environ is None else environ
    passive = environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if threads < 2 or (passive and "OMP_WAIT_POLICY" not in _set_after_torch):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = usable_cpus()
    if load < cpus:
        return None
    policy = environ.get("OMP_WAIT_POLICY", "unset")
    if "OMP_WAIT_POLICY" in _set_after_torch:
        policy = "libgomp's default (torch was imported before the entry point set it)"
    return (
        f"the machine is busy (load average {load:.1f} on {cpus} CPUs) and OpenMP's wait policy is {policy}: "
        f"{threads} threads that spin-wait can train several times slower; "
        "export OMP_WAIT_POLICY=PASSIVE before starting, or set trainer.threads=1"
    )
