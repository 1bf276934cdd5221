"""What every entry point sets before torch starts (fcn/process.py): OpenMP threads that spin only
briefly, and large CPU tensors that reuse freed heap memory instead of fresh pages every step; never
over a user's own setting."""

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcn.process import keep_freed_memory, start_process, user_malloc_setting
from tests.conftest import START_AS_THE_TRAIN_SCRIPT

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64 * 2**20
LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
glibc_only = pytest.mark.skipif(not hasattr(LIBC, "mallinfo2"), reason="mallopt and mallinfo2 are glibc's (>= 2.33)")
# The process start with its malloc part left out: the OpenMP setting alone.
NO_MALLOC = {"FCN_KEEP_FREED_MEMORY": "0"}

# A child process that allocates and frees a 64 MB tensor, then reports how many bytes glibc holds
# in separately mmapped blocks (mallinfo2().hblkhd) while a second one is alive. glibc maps any
# block above 32 MB anew by default; kept memory serves it from the heap.
PROBE = """
{setup}
import ctypes, ctypes.util, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.empty(16 * 2**20).fill_(1)  # 64 MB, allocated and freed
x = torch.empty(16 * 2**20).fill_(1)
print(libc.mallinfo2().hblkhd)
"""


def _run(setup: str, **env_changes: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "FCN_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=str(ROOT), **env_changes)
    code = PROBE.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_short_spin_fills_only_an_unset_spin_count():
    empty: dict[str, str] = {**NO_MALLOC}
    start_process(empty)
    assert empty["GOMP_SPINCOUNT"] == "1000"
    environ = {"GOMP_SPINCOUNT": "50000", **NO_MALLOC}
    start_process(environ)
    assert environ["GOMP_SPINCOUNT"] == "50000"


@pytest.mark.parametrize("policy", ["ACTIVE", "PASSIVE", "passive"])
def test_a_users_wait_policy_is_not_overridden_by_a_spin_count(policy):
    # libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY: a default would undo the user's policy
    environ = {"OMP_WAIT_POLICY": policy, **NO_MALLOC}
    start_process(environ)
    assert environ == {"OMP_WAIT_POLICY": policy, **NO_MALLOC}


def test_an_empty_or_unknown_wait_policy_gets_the_short_spin():
    # libgomp ignores such a value and spins 300,000 times
    for value in ("", "sometimes"):
        environ = {"OMP_WAIT_POLICY": value, **NO_MALLOC}
        start_process(environ)
        assert environ["GOMP_SPINCOUNT"] == "1000"
    environ = {"GOMP_SPINCOUNT": " ", **NO_MALLOC}  # exported empty: libgomp ignores it too
    start_process(environ)
    assert environ["GOMP_SPINCOUNT"] == "1000"


@pytest.mark.slow
@pytest.mark.parametrize("user_value", [None, "20000"])
def test_entry_points_set_a_short_spin_before_torch_unless_the_user_chose(user_value):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    if user_value:
        env["GOMP_SPINCOUNT"] = user_value
    # scripts/train.py --cfg=job imports no torch
    probe = START_AS_THE_TRAIN_SCRIPT + "import os\nprint('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", user_value or "1000"]


def test_a_users_own_malloc_choice_is_recognised():
    assert user_malloc_setting({}) is None
    assert user_malloc_setting({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "MALLOC_MMAP_THRESHOLD_"
    assert user_malloc_setting({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_"
    assert user_malloc_setting({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "GLIBC_TUNABLES"
    assert user_malloc_setting({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None  # not about malloc
    assert user_malloc_setting({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}) == "LD_PRELOAD"
    assert user_malloc_setting({"LD_PRELOAD": "/opt/libtcmalloc_minimal.so"}) == "LD_PRELOAD"
    for off in ("0", "false", "no", "n", "off", " OFF ", "disable", "disabled"):
        assert user_malloc_setting({"FCN_KEEP_FREED_MEMORY": off}) == "FCN_KEEP_FREED_MEMORY"
    assert user_malloc_setting({"FCN_KEEP_FREED_MEMORY": "1"}) is None


def test_a_value_that_is_neither_on_nor_off_is_warned_about_naming_the_variable(monkeypatch, caplog):
    from fcn import process
    from fcn.device import resolve_device

    for value in ("0", "off", "1", "yes", ""):
        assert process.malloc_setting_warning({"FCN_KEEP_FREED_MEMORY": value}) is None
    assert process.malloc_setting_warning({}) is None
    warning = process.malloc_setting_warning({"FCN_KEEP_FREED_MEMORY": "maybe"})
    assert "FCN_KEEP_FREED_MEMORY='maybe' is not understood" in warning and "FCN_KEEP_FREED_MEMORY=0" in warning
    monkeypatch.setenv("FCN_KEEP_FREED_MEMORY", "sometimes")
    resolve_device("cpu", None)  # what every entry point calls at start-up
    assert "FCN_KEEP_FREED_MEMORY='sometimes' is not understood" in caplog.text


def test_keep_freed_memory_leaves_a_users_choice_alone():
    assert keep_freed_memory({"MALLOC_MMAP_MAX_": "65536"}) is False
    assert keep_freed_memory({"FCN_KEEP_FREED_MEMORY": "0"}) is False


@glibc_only
def test_without_the_setting_glibc_maps_a_large_block_afresh():
    # the control for the tests below: glibc's own behaviour maps a 16 MB block with mmap
    assert _run("") >= BLOCK


@glibc_only
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    assert _run("from fcn.process import keep_freed_memory; assert keep_freed_memory()") < BLOCK


@glibc_only
@pytest.mark.slow
@pytest.mark.parametrize(
    ("env_changes", "heap"),
    [({}, True), ({"FCN_KEEP_FREED_MEMORY": "0"}, False), ({"MALLOC_MMAP_MAX_": "65536"}, False)],
)
def test_entry_points_keep_freed_memory_unless_the_user_chose(env_changes, heap):
    mmapped = _run(START_AS_THE_TRAIN_SCRIPT, **env_changes)  # what every entry point does first
    assert (mmapped < BLOCK) is heap
