"""The warning, during training, that a stretch of steps ran far slower than this run's best, with
what was measured and the fix."""

from fcn.throughput import ThroughputWatch


class FakeClocks:
    """Wall and CPU clocks the test advances by hand."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def advance(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


def _watch(clocks: FakeClocks, load: float = 0.5, environ=None, device_type="cpu") -> ThroughputWatch:
    return ThroughputWatch(
        2,
        device_type,
        window_s=10.0,
        min_steps=2,
        environ={"GOMP_SPINCOUNT": "1000"} if environ is None else environ,
        clock=lambda: clocks.wall,
        cpu_clock=lambda: clocks.cpu,
        loadavg=lambda: (load, load, load),
        cpus=lambda: 2,
    )


def _window(watch: ThroughputWatch, clocks: FakeClocks, seconds_per_step: float, cpu_share: float = 1.0):
    """Ten steps of 8 images at ``seconds_per_step``; the warnings the window's steps returned."""
    warnings = []
    for _ in range(10):
        clocks.advance(seconds_per_step, seconds_per_step * 2 * cpu_share)
        warnings.append(watch.step(8))
    return [w for w in warnings if w]


def test_steady_training_is_never_warned_and_warm_up_is_not_the_best():
    clocks = FakeClocks()
    watch = _watch(clocks)
    assert _window(watch, clocks, 5.0) == []  # a very slow first window (warm-up) sets no expectation
    for _ in range(5):
        assert _window(watch, clocks, 1.0) == []
    assert watch.best == 8.0


def test_a_slowdown_on_a_busy_machine_is_warned_once_with_the_fix():
    clocks = FakeClocks()
    watch = _watch(clocks, load=4.0)
    for _ in range(3):
        _window(watch, clocks, 1.0)  # warm-up, then 8 img/s
    [warning] = _window(watch, clocks, 4.0, cpu_share=0.3)  # 2 img/s, a quarter of the best
    assert "slowed to 2.0 img/s, 0.25 of this run's best window (8.0 img/s)" in warning
    assert "got 0.30 of its 2 threads' CPU time; load average 4.0 on 2 CPUs, up to 3.4 of it from other" in warning
    assert "trainer.threads=1" in warning
    assert _window(watch, clocks, 4.0, cpu_share=0.3) == []  # the same slow spell: said once
    for _ in range(2):
        _window(watch, clocks, 1.0)  # recovered
    assert len(_window(watch, clocks, 4.0, cpu_share=0.3)) == 1  # a new slow spell is reported again


def test_a_mild_slowdown_is_not_warned():
    clocks = FakeClocks()
    watch = _watch(clocks, load=4.0)
    for _ in range(3):
        _window(watch, clocks, 1.0)
    assert _window(watch, clocks, 1.6, cpu_share=0.6) == []  # 0.62 of the best: above one half


def test_the_diagnosis_follows_what_was_measured():
    def first_warning(load: float, cpu_share: float, environ: dict) -> str:
        clocks = FakeClocks()
        watch = _watch(clocks, load=load, environ=environ)
        for _ in range(3):
            _window(watch, clocks, 1.0)
        [warning] = _window(watch, clocks, 3.0, cpu_share=cpu_share)
        return warning

    # threads allowed to spin long on a busy machine: spinning, whatever share the process got
    assert "export GOMP_SPINCOUNT=1000" in first_warning(4.0, 1.0, {})
    assert "export GOMP_SPINCOUNT=1000" in first_warning(4.0, 0.3, {"OMP_WAIT_POLICY": "ACTIVE"})
    # short spins, a small share, and load beyond this process's own threads: other work
    assert "other work is taking the CPU" in first_warning(4.0, 0.3, {"GOMP_SPINCOUNT": "1000"})
    # the load is this process's own threads (2 threads at 0.6 on a quiet 2-CPU machine): not "other work"
    assert "other work" not in first_warning(1.4, 0.6, {"GOMP_SPINCOUNT": "1000"})
    # threads that spin long on a quiet machine while the process waited: data, not spinning
    warning = first_warning(0.5, 0.2, {"OMP_WAIT_POLICY": "active"})
    assert "trainer.num_workers" in warning and "spin-wait" not in warning
    # a quiet machine and a process that waited: data
    assert "trainer.num_workers" in first_warning(0.3, 0.2, {"OMP_WAIT_POLICY": "PASSIVE"})
    # threads that barely spin, with their full share and still slower: something else
    assert "swapping or throttled" in first_warning(1.0, 1.0, {"GOMP_SPINCOUNT": "1000"})
    assert "swapping or throttled" in first_warning(1.0, 1.0, {"OMP_WAIT_POLICY": "passive"})


def test_on_a_gpu_the_warning_points_at_data_and_sharing():
    clocks = FakeClocks()
    watch = _watch(clocks, device_type="cuda")
    for _ in range(3):
        _window(watch, clocks, 1.0)
    [warning] = _window(watch, clocks, 3.0)
    assert "trainer.num_workers" in warning and "nvidia-smi" in warning
    clocks = FakeClocks()
    watch = _watch(clocks, device_type="mps")
    for _ in range(3):
        _window(watch, clocks, 1.0)
    [warning] = _window(watch, clocks, 3.0)
    assert "mps device" in warning and "nvidia-smi" not in warning


def test_time_spent_outside_training_does_not_count_as_slowness_and_windows_go_on():
    clocks = FakeClocks()
    watch = _watch(clocks)
    for _ in range(3):
        _window(watch, clocks, 1.0)
    windows = watch.windows
    for _ in range(3):  # several short stretches of training between checkpoint saves or validations
        for _ in range(4):
            clocks.advance(1.0, 2.0)
            assert watch.step(8) is None
        watch.pause()
        clocks.advance(60.0, 10.0)  # a validation pass or a checkpoint save
        watch.resume()
    assert watch.windows == windows + 1  # 12 s of training across the pauses closed a window
    assert watch.best == 8.0 and not watch.slow


def test_a_step_counted_while_paused_measures_up_to_the_pause():
    clocks = FakeClocks()
    watch = _watch(clocks)
    for _ in range(3):
        _window(watch, clocks, 1.0)
    for _ in range(9):
        clocks.advance(1.0, 2.0)
        watch.step(8)
    watch.pause()
    clocks.advance(60.0, 10.0)
    assert watch.step(8) is None  # closes the window at the pause: 80 images in 9 s, not a slowdown
    watch.resume()
    assert _window(watch, clocks, 1.0) == [] and watch.best < 9.0  # and the next windows stay honest
