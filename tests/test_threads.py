"""OpenMP defaults set before torch starts (a short spin), never over a user's own setting, and
torch's thread count capped at the CPUs the process may use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcn import device as device_module
from fcn.threads import OPENMP_DEFAULTS, set_openmp_defaults, usable_cpus
from tests.conftest import START_AS_THE_TRAIN_SCRIPT

ROOT = Path(__file__).resolve().parents[1]


def test_openmp_defaults_fill_only_unset_variables():
    empty: dict[str, str] = {}
    assert set_openmp_defaults(empty) == OPENMP_DEFAULTS and empty["GOMP_SPINCOUNT"] == "1000"
    environ = {"GOMP_SPINCOUNT": "50000"}
    assert set_openmp_defaults(environ) == {"KMP_BLOCKTIME": "0"} and environ["GOMP_SPINCOUNT"] == "50000"


@pytest.mark.parametrize("policy", ["ACTIVE", "PASSIVE", "passive"])
def test_a_users_wait_policy_is_not_overridden_by_a_spin_count_or_block_time(policy):
    # libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY (LLVM's OpenMP a KMP_BLOCKTIME): a default
    # would undo the user's policy
    environ = {"OMP_WAIT_POLICY": policy}
    assert set_openmp_defaults(environ) == {} and environ == {"OMP_WAIT_POLICY": policy}


def test_an_empty_or_unknown_wait_policy_gets_the_defaults():
    # libgomp ignores such a value and spins 300,000 times
    for value in ("", "sometimes"):
        environ = {"OMP_WAIT_POLICY": value}
        assert set_openmp_defaults(environ) == OPENMP_DEFAULTS
    environ = {"GOMP_SPINCOUNT": " "}  # exported empty: libgomp ignores it too
    assert set_openmp_defaults(environ)["GOMP_SPINCOUNT"] == "1000"


def test_spin_count_reads_the_environment_as_libgomp_does():
    from fcn.threads import spin_count

    assert spin_count({}) == 300_000  # libgomp's default
    assert spin_count({"OMP_WAIT_POLICY": "passive"}) == 0
    assert spin_count({"OMP_WAIT_POLICY": "ACTIVE"}) == float("inf")
    assert spin_count({"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": "ACTIVE"}) == 1000  # the count wins
    assert spin_count({"GOMP_SPINCOUNT": "2k"}) == 2000 and spin_count({"GOMP_SPINCOUNT": "3M"}) == 3e6
    assert spin_count({"GOMP_SPINCOUNT": "infinite"}) == float("inf")
    assert spin_count({"GOMP_SPINCOUNT": "lots"}) == 300_000  # unreadable: libgomp ignores it
    for unreadable in ("1e3", "1.5k", "inf", "nan"):  # libgomp's "Invalid value": its default
        assert spin_count({"GOMP_SPINCOUNT": unreadable}) == 300_000, unreadable
    assert spin_count({"GOMP_SPINCOUNT": "-5"}) == float("inf")  # read unsigned: wraps to nearly 2**64
    assert spin_count({"GOMP_SPINCOUNT": " 2 k "}) == 2000 and spin_count({"GOMP_SPINCOUNT": "+1000"}) == 1000
    too_large = {"GOMP_SPINCOUNT": "99999999999999999999"}  # over 64 bits: rejected, the policy decides
    assert spin_count(too_large) == 300_000 and spin_count({**too_large, "OMP_WAIT_POLICY": "PASSIVE"}) == 0


@pytest.mark.slow
@pytest.mark.parametrize("user_value", [None, "20000"])
def test_entry_points_set_a_short_spin_before_torch_unless_the_user_chose(user_value):
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_DEFAULTS and k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if user_value:
        env["GOMP_SPINCOUNT"] = user_value
    # scripts/train.py --cfg=job imports no torch
    probe = START_AS_THE_TRAIN_SCRIPT + "import os\nprint('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", user_value or "1000"]


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
    assert "load average 5.0 on 2 CPUs" in warning and "export GOMP_SPINCOUNT=1000" in warning
    assert "OMP_WAIT_POLICY=ACTIVE" in warning and "trainer.threads=1" in warning
    assert threads.spin_wait_warning(2, {}) is not None  # unset: libgomp spins 300,000 times by default
    assert threads.spin_wait_warning(2, {"GOMP_SPINCOUNT": "300000"}) is not None
    assert threads.spin_wait_warning(2, {"OMP_WAIT_POLICY": "passive"}) is None
    assert threads.spin_wait_warning(2, {"GOMP_SPINCOUNT": "1000"}) is None  # the default: a short spin
    assert threads.spin_wait_warning(1, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # one thread waits for no one
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert threads.spin_wait_warning(2, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # a quiet machine
