"""OpenMP defaults set before torch starts (passive waiting), never over a user's own setting, and
torch's thread count capped at the CPUs the process may use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcn import device as device_module
from fcn.threads import OPENMP_DEFAULTS, set_openmp_defaults, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def test_openmp_defaults_fill_only_unset_variables():
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    added = set_openmp_defaults(environ)
    assert environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's setting wins
    assert environ["KMP_BLOCKTIME"] == "0" and added == {"KMP_BLOCKTIME": "0"}
    empty: dict[str, str] = {}
    assert set_openmp_defaults(empty) == OPENMP_DEFAULTS and empty["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.slow
@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_entry_points_set_passive_waiting_before_torch_unless_the_user_chose(user_value):
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_DEFAULTS}
    env["PYTHONPATH"] = str(ROOT)
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    probe = (
        "import sys; import scripts.train; import os; "
        "print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"  # scripts/train.py imports no torch
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", user_value or "PASSIVE"]


def test_torch_threads_are_capped_at_the_usable_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(device_module, "usable_cpus", lambda: 1)
    try:
        device_module.resolve_device("cpu", None)
        assert torch.get_num_threads() == 1
        device_module.resolve_device("cpu", 2)  # an explicit trainer.threads is taken as given
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_usable_cpus_counts_the_affinity_mask():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_spin_waiting_on_a_busy_machine_is_warned_with_the_fix(monkeypatch):
    from fcn import threads

    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    warning = threads.spin_wait_warning(2, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert "load average 5.0 on 2 CPUs" in warning and "export OMP_WAIT_POLICY=PASSIVE" in warning
    assert "trainer.threads=1" in warning
    assert threads.spin_wait_warning(2, {}) is not None  # unset: libgomp spins by default
    assert threads.spin_wait_warning(2, {"OMP_WAIT_POLICY": "passive"}) is None
    assert threads.spin_wait_warning(1, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # one thread waits for no one
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert threads.spin_wait_warning(2, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # a quiet machine
