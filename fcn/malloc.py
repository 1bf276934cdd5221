"""Keep freed memory in the process for the next training step instead of new pages each step (glibc).

torch's CPU allocator takes its tensors from the C library's ``malloc``. glibc serves a request
above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when
the tensor is freed, and gives the top of its heap back to the OS whenever more than the trim
threshold is free there. So every training step maps its large activations and gradients anew,
and the kernel zero-fills every 4 KB page of them on first touch: at 512 x 512 px (tiny model,
batch 8) 1.8 GB of page faults per step, a third of the process's CPU time spent in the kernel,
and the pixel rate fell to 0.7-0.8 of the 128 px rate (issue 17's "512 px cliff").

:func:`keep_freed_memory` makes glibc serve blocks from its heaps instead of separate mappings
(``mallopt(M_MMAP_MAX, 0)``; a block too large for a secondary thread's heap still gets its own
mapping, but torch allocates its tensors on the thread that runs the step) and keep freed heap
memory (``mallopt(M_TRIM_THRESHOLD, 2 GB - 1)``), so the next step reuses pages already mapped. That
is what PyTorch's CPU performance guide gets by swapping in jemalloc or TCMalloc, without a new
dependency. The price is memory: the process keeps its high water mark, and blocks of different
sizes fragment the heap, so peak resident memory is higher (docs/performance.md, "Crop size: page faults": the
numbers, with the command). Transparent huge pages (torch's ``THP_MEM_ALLOC_ENABLE=1``) were
measured too: 30x fewer faults but still a quarter of the CPU time in the kernel, and gains that
came and went between runs, so they are not used.

The entry points call it at start-up (``fcn/cli/__init__.py``). A user's own choice wins: glibc's
variables (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TOP_PAD_``, a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``), another allocator in
``LD_PRELOAD`` (jemalloc, TCMalloc, mimalloc), or ``FCN_KEEP_FREED_MEMORY=0`` (or any of
:data:`OFF_VALUES`; glibc as it comes, for a machine short of memory) leave ``malloc`` alone. It
applies to the whole process, so a notebook that imports ``fcn.cli`` gets it too. Elsewhere (macOS,
musl) it does nothing. This module must not import torch."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

# mallopt(3) parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (an int): the heap's free top is returned only above 2 GB.
TRIM_THRESHOLD = 2**31 - 1

# Environment variables through which a user has already chosen how memory is allocated.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# FCN_KEEP_FREED_MEMORY values that turn it off, and those that leave it on (so does unset).
OFF_VALUES = ("0", "false", "no", "n", "off", "disable", "disabled")
ON_VALUES = ("", "1", "true", "yes", "y", "on", "enable", "enabled")


def user_malloc_setting(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable through which the user already chose how memory is allocated, or None."""
    environ = os.environ if environ is None else environ
    if environ.get("FCN_KEEP_FREED_MEMORY", "1").strip().lower() in OFF_VALUES:
        return "FCN_KEEP_FREED_MEMORY"
    for name in MALLOC_VARIABLES:
        if name in environ:
            return name
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "").lower()
    if any(name in preload for name in OTHER_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def setting_warning(environ: Mapping[str, str] | None = None) -> str | None:
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


def _glibc() -> ctypes.CDLL | None:
    """The running process's C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: raises AttributeError on musl
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Make glibc serve blocks from its heaps and keep freed heap memory for reuse (the module
    docstring says why). Applies to allocations made after the call; safe to call again.

    Returns True when the settings were applied; False when the user chose their own malloc
    settings (:func:`user_malloc_setting`) or the C library is not glibc.
    """
    if user_malloc_setting(environ) is not None:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def mmapped_bytes() -> int | None:
    """Bytes glibc currently holds in separately mmapped blocks (``mallinfo2().hblkhd``), or None
    where that cannot be read (not glibc, or glibc older than 2.33)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
            + ("fordblks", "keepcost")
        ]

    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().hblkhd)
