"""Large CPU tensors reuse freed heap memory instead of fresh pages every step (fcn/malloc.py),
never over a user's own malloc choice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcn.malloc import _glibc, keep_freed_memory, user_malloc_setting
from tests.conftest import START_AS_THE_TRAIN_SCRIPT

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64 * 2**20
glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")

# A child process that allocates and frees a 64 MB tensor, then reports how many bytes glibc holds
# in separately mmapped blocks while a second one is alive. glibc maps any block above 32 MB anew
# by default; kept memory serves it from the heap.
PROBE = """
{setup}
import torch
from fcn.malloc import mmapped_bytes
torch.empty(16 * 2**20).fill_(1)  # 64 MB, allocated and freed
x = torch.empty(16 * 2**20).fill_(1)
print(mmapped_bytes())
"""


def _run(setup: str, **env_changes: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "FCN_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=str(ROOT), **env_changes)
    code = PROBE.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout)


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
    from fcn import malloc
    from fcn.device import resolve_device

    for value in ("0", "off", "1", "yes", ""):
        assert malloc.setting_warning({"FCN_KEEP_FREED_MEMORY": value}) is None
    assert malloc.setting_warning({}) is None
    warning = malloc.setting_warning({"FCN_KEEP_FREED_MEMORY": "maybe"})
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
    assert _run("from fcn.malloc import keep_freed_memory; assert keep_freed_memory()") < BLOCK


@glibc_only
@pytest.mark.slow
@pytest.mark.parametrize(
    ("env_changes", "heap"),
    [({}, True), ({"FCN_KEEP_FREED_MEMORY": "0"}, False), ({"MALLOC_MMAP_MAX_": "65536"}, False)],
)
def test_entry_points_keep_freed_memory_unless_the_user_chose(env_changes, heap):
    mmapped = _run(START_AS_THE_TRAIN_SCRIPT, **env_changes)  # what every entry point does first
    assert (mmapped < BLOCK) is heap
