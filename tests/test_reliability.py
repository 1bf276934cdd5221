"""Training you can trust: every fault scenario of docs/reliability.md.

Each test injects one fault (a kill mid-save, a signal, an interruption at a chosen step, a NaN,
an out-of-memory error, a full disk, a corrupt or mismatched or unsafe checkpoint) and checks
that no work is lost and the user is told what happened and what to do.
"""

import builtins
import errno
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fcn.checkpoint
from fcn.checkpoint import load_checkpoint, previous_path, save_checkpoint
from fcn.cli.exit import exit_on_user_error
from fcn.data.build import scan_data
from fcn.data.doctor.scan import scan_split
from fcn.data.labels import MaskDecoder
from fcn.engine import NonFiniteLossError, Settings, train_one_epoch
from fcn.errors import UserError
from fcn.signals import GracefulStop
from fcn.train import TrainingInterrupted, train
from tests.conftest import StopAtStep, compose_config, tiny_train_overrides
from tests.layouts import write_folder

REPO = Path(__file__).resolve().parents[1]


class NaNAtSteps(torch.nn.CrossEntropyLoss):
    """Cross-entropy that returns NaN on the given (1-based) training calls."""

    def __init__(self, ignore_index: int, bad: list[int], **unused) -> None:
        super().__init__(ignore_index=ignore_index)
        self.bad, self.calls = set(bad), 0

    def forward(self, logits, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad:
                return super().forward(logits, target) * float("nan")
        return super().forward(logits, target)


def _cfg(shapes_root, *extra):
    # 12 train images, batch 4: 3 steps per epoch, 2 epochs
    return compose_config("train", [*tiny_train_overrides(shapes_root), *extra])


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def _weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory):
    """Reference runs, one per worker count."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path_factory.mktemp(f"reference_w{workers}")
        train(_cfg(shapes_root, f"trainer.num_workers={workers}"), out)
        runs[workers] = out
    return runs


@pytest.mark.slow
def test_same_seed_gives_identical_losses_whatever_the_worker_count(uninterrupted):
    a, b = _losses(uninterrupted[0]), _losses(uninterrupted[2])
    assert len(a) == 6 and a == b


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bit_exact(shapes_root, tmp_path, uninterrupted, workers, stop_at):
    cfg = _cfg(shapes_root, f"trainer.num_workers={workers}")
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path, stop=StopAtStep(stop_at))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == stop_at
    train(_cfg(shapes_root, f"trainer.num_workers={workers}", "resume=auto"), tmp_path)
    reference = uninterrupted[workers]
    # same per-step losses, each step logged once (TensorBoard purged nothing it should keep)
    assert _losses(tmp_path) == _losses(reference)
    ours, theirs = _weights(tmp_path), _weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_auto_without_checkpoint_starts_fresh_with_a_warning(shapes_root, tmp_path, caplog):
    train(_cfg(shapes_root, "resume=auto", "trainer.epochs=1", "logger=none"), tmp_path)
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(shapes_root, tmp_path, caplog):
    train(_cfg(shapes_root, "logger=none"), tmp_path)  # two epochs: last.pt and last.prev.pt
    last = tmp_path / "checkpoints" / "last.pt"
    assert load_checkpoint(previous_path(last))["step"] == 3
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match=f"{last}.*corrupt or truncated"):
        load_checkpoint(last)
    train(_cfg(shapes_root, "logger=none", "resume=auto"), tmp_path)
    assert "trying the previous checkpoint" in caplog.text and "last.prev.pt" in caplog.text
    assert load_checkpoint(last)["step"] == 6  # epoch 2 was redone from the previous checkpoint


def test_resume_with_another_architecture_explains_the_difference(shapes_root, tmp_path):
    train(_cfg(shapes_root, "trainer.epochs=1", "logger=none"), tmp_path)
    with pytest.raises(UserError, match=r"model.variant: checkpoint '8s', config '16s'.*init_from"):
        train(_cfg(shapes_root, "model=fcn16s", "resume=auto", "logger=none"), tmp_path)


@pytest.mark.slow
def test_init_from_with_other_classes_resets_only_the_class_layers(shapes_root, tmp_path, caplog):
    source = tmp_path / "source"
    train(_cfg(shapes_root, "trainer.epochs=1", "logger=none"), source)
    target = tmp_path / "target"
    init = f"init_from={source / 'checkpoints' / 'last.pt'}"
    # 7 classes instead of 6 (the masks only use 0-5, which is fine for this check)
    train(
        _cfg(
            shapes_root,
            init,
            "data.num_classes=7",
            "data.class_names=[a,b,c,d,e,f,g]",
            "data.palette=null",
            "trainer.epochs=1",
            "logger=none",
        ),
        target,
    )
    assert "start from their initialisation: score_out.bias, score_out.weight" in caplog.text
    before, after = _weights(source), load_checkpoint(target / "checkpoints" / "best.pt")["model"]
    assert after["score_out.weight"].shape[0] == 7
    assert before["encoder.stem_to_pool3.0.0.weight"].shape == after["encoder.stem_to_pool3.0.0.weight"].shape


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(shapes_root, tmp_path):
    cfg = _cfg(shapes_root, "loss._target_=tests.test_reliability.NaNAtSteps", "+loss.bad=[5]", "logger=none")
    with pytest.raises(UserError, match=r"nan at step 5 .*last good checkpoint: .*last\.pt.*skip_nonfinite"):
        train(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_skip_nonfinite_skips_bad_steps_and_finishes(shapes_root, tmp_path, caplog):
    cfg = _cfg(
        shapes_root,
        "loss._target_=tests.test_reliability.NaNAtSteps",
        "+loss.bad=[2,3]",
        "trainer.skip_nonfinite=2",
        "logger=none",
    )
    train(cfg, tmp_path)
    assert "batch skipped (2/2 in a row)" in caplog.text
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 6


def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    with pytest.raises(UserError, match="w holds NaN"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "config": {}}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_says_what_to_lower(shapes_root, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("fcn.train.train_one_epoch", oom)
    with pytest.raises(
        UserError, match=r"batch_size=4, data.crop_size=40, precision float32.*lower trainer.batch_size"
    ):
        train(_cfg(shapes_root, "logger=none"), tmp_path)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path, keep_previous=True)

    def full(state, fd, close=True):
        os.write(fd, b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fcn.checkpoint, "_dump", full)
    with pytest.raises(UserError, match=r"disk full while writing .*last.pt.*previous checkpoint .* intact"):
        save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path, keep_previous=True)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


SLOW_SAVE = """
import sys, time, torch
from fcn import checkpoint
path = sys.argv[1]
checkpoint.save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path, keep_previous=True)
def slow(obj, f):
    f.write(b"partial" * 10000)
    f.flush()
    print("saving", flush=True)
    time.sleep(60)
checkpoint.torch.save = slow
checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path, keep_previous=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    proc.kill()
    proc.wait(timeout=30)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits_with_the_conventional_code(shapes_root, tmp_path, signum, code):
    run = tmp_path / "run"
    args = [a for a in tiny_train_overrides(shapes_root) if not a.startswith("trainer=")]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            *args,
            "trainer.epochs=1000",
            "trainer.num_workers=0",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists():  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] >= 3 and state["progress"]["epoch"] < 1000
    assert "resume=auto" in (run / "train.log").read_text()


def test_second_ctrl_c_aborts_at_once():
    stop = GracefulStop()
    stop._handle(signal.SIGINT, None)
    assert stop.should_stop(1)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Payload()}, path)
    with pytest.raises(UserError, match="refused for safety"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_periodic_mid_epoch_checkpoint_resumes_exactly_after_a_crash(shapes_root, tmp_path, uninterrupted):
    # A NaN at step 5 ends the run (as a crash would); last.pt is the one saved after step 4.
    crashing = _cfg(
        shapes_root,
        "trainer.checkpoint_every_n_steps=1",
        "trainer.num_workers=0",
        "loss._target_=tests.test_reliability.NaNAtSteps",
        "+loss.bad=[5]",
    )
    with pytest.raises(UserError, match="at step 5"):
        train(crashing, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    # the same settings (a changed loss is refused on resume); its calls count afresh, so step 5 is not bad again
    train(
        _cfg(
            shapes_root,
            "trainer.checkpoint_every_n_steps=1",
            "trainer.num_workers=0",
            "resume=auto",
            "loss._target_=tests.test_reliability.NaNAtSteps",
            "+loss.bad=[5]",
        ),
        tmp_path,
    )
    assert _losses(tmp_path) == _losses(uninterrupted[0])
    ours, theirs = _weights(tmp_path), _weights(uninterrupted[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_resume_with_another_schedule_or_batch_size_is_refused(shapes_root, tmp_path):
    train(_cfg(shapes_root, "logger=none"), tmp_path)
    with pytest.raises(
        UserError,
        match=r"schedule length in optimisation steps \(trainer.epochs x steps per epoch\): "
        r"checkpoint 6, now 9.*init_from",
    ):
        train(_cfg(shapes_root, "logger=none", "resume=auto", "trainer.epochs=3"), tmp_path)
    with pytest.raises(UserError, match="trainer.batch_size: checkpoint 4, now 3"):
        train(_cfg(shapes_root, "logger=none", "resume=auto", "trainer.batch_size=3"), tmp_path)


@pytest.mark.slow
def test_resume_from_another_run_reports_where_the_best_checkpoint_is(shapes_root, tmp_path, caplog):
    first = tmp_path / "first"
    train(_cfg(shapes_root, "logger=none"), first)
    with caplog.at_level(logging.WARNING):
        report = train(
            _cfg(shapes_root, "logger=none", f"resume={first / 'checkpoints' / 'last.pt'}"), tmp_path / "second"
        )
    assert Path(report["checkpoint"]).is_file()
    assert "is a finished run" in caplog.text and "nothing to train" in caplog.text  # not silently a "run"


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_with_workers_still_saves(shapes_root, tmp_path):
    run = tmp_path / "run"
    args = [a for a in tiny_train_overrides(shapes_root) if not a.startswith("trainer=")]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            *args,
            "trainer.epochs=1000",
            "trainer.num_workers=2",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: main process and workers
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] >= 3


# --- silent corruption: every checkpoint carries a digest of its bytes ---------------------------


def _tensor_offset(path: Path, index: int = 0) -> int:
    """Where the bytes of the checkpoint's ``index``-th tensor storage start in the file."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(f"/data/{index}"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def _flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _small_checkpoint(path: Path) -> Path:
    weight = torch.full((2000,), -0.00112)
    save_checkpoint({"model": {"w": weight}, "config": {}, "optimizer": {"m": torch.ones(2000)}}, path)
    return path


@pytest.mark.parametrize("where", ["tensor-byte", "exponent-bit", "zip-directory", "digest-record", "every-100th-byte"])
def test_a_flipped_bit_anywhere_in_a_checkpoint_is_reported_as_corrupt(tmp_path, monkeypatch, where):
    monkeypatch.setattr(fcn.checkpoint, "_CHUNK", 4096)  # several chunks, the last one partial
    path = _small_checkpoint(tmp_path / "best.pt")
    size = path.stat().st_size
    # float32 little-endian: byte 3 holds the sign and the top exponent bits (-0.00112 -> -3.8e35)
    offsets = {
        "tensor-byte": [_tensor_offset(path) + 17],
        "exponent-bit": [_tensor_offset(path) + 4 * 10 + 3],
        "zip-directory": [size - 150],
        "digest-record": [size - 30],
        "every-100th-byte": range(0, size, 97),
    }[where]
    original = path.read_bytes()
    for offset in offsets:
        path.write_bytes(original)
        _flip(path, offset, 0x40)
        with pytest.raises(UserError, match=f"checkpoint {path} is corrupt or truncated") as caught:
            load_checkpoint(path)
        assert "\n" not in str(caught.value)


def test_checkpoint_without_a_digest_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": {}}, path)  # as fcn wrote them before digests
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert fcn.checkpoint.verify_digest(path) is None
    assert fcn.checkpoint.verify_digest(_small_checkpoint(tmp_path / "new.pt")) is True


@pytest.mark.slow
def test_flipped_bit_in_last_checkpoint_falls_back_to_the_previous_one(shapes_root, tmp_path, caplog):
    train(_cfg(shapes_root, "logger=none"), tmp_path)  # two epochs: last.pt and last.prev.pt
    last = tmp_path / "checkpoints" / "last.pt"
    _flip(last, _tensor_offset(last, 3) + 5, 0x01)  # one bit in the middle of the file, in tensor data
    train(_cfg(shapes_root, "logger=none", "resume=auto"), tmp_path)
    assert "digest mismatch" in caplog.text and "trying the previous checkpoint" in caplog.text
    assert load_checkpoint(last)["step"] == 6  # epoch 2 was redone from last.prev.pt


@pytest.mark.slow
def test_evaluate_refuses_a_best_checkpoint_with_a_flipped_exponent_bit_in_one_line(shapes_root, tmp_path):
    train(_cfg(shapes_root, "trainer.epochs=1", "logger=none"), tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    _flip(best, _tensor_offset(best, 0) + 3, 0x40)
    proc = _run_script("evaluate.py", f"checkpoint={best}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {best}")
    assert "corrupt or truncated" in proc.stderr and "Traceback" not in proc.stderr


def _run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=240
    )


# --- files that are not checkpoints: say what they are ------------------------------------------


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, fmt)
    return buffer.getvalue()


def _zip_bytes() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return buffer.getvalue()


def _safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(8)


# An ONNX ModelProto starts with ir_version (field 1), producer_name (field 2), ... as torch writes it.
ONNX_HEAD = b"\x08\t\x12\x07pytorch\x1a\x062.14.1:\x94\x02\n\x83"  # torch.onnx.export's first bytes

NOT_CHECKPOINTS = {
    "random.pt": (lambda: os.urandom(4096), "not a file torch.save writes"),
    "photo.jpg": (lambda: _image_bytes("JPEG"), "a JPEG image"),
    "mask.png": (lambda: _image_bytes("PNG"), "a PNG image"),
    "model.onnx": (lambda: ONNX_HEAD + bytes(64), "an ONNX model"),
    "model_onnx.pt": (lambda: ONNX_HEAD + bytes(64), "an ONNX model"),
    "notes.txt": (lambda: b"model: fcn8s\nlr: 0.01\n", "a text file"),
    "archive.zip": (_zip_bytes, "a zip archive that torch.save did not write"),
    "model.safetensors": (_safetensors_bytes, "a safetensors file"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, name):
    make, what = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(UserError) as caught:
        load_checkpoint(path, key="init_from")
    message = str(caught.value)
    assert message.startswith(f"not a checkpoint: {path} (given as init_from=) is {what}")
    assert "\n" not in message and "weights_only" not in message and "safety" not in message


def test_empty_file_or_directory_given_as_checkpoint_is_one_line(tmp_path):
    (tmp_path / "empty.pt").touch()
    with pytest.raises(UserError, match=r"empty.pt \(given as checkpoint=\) is corrupt or truncated \(an empty"):
        load_checkpoint(tmp_path / "empty.pt", key="checkpoint")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"not a checkpoint: .*run \(given as resume=\) is a directory"):
        load_checkpoint(tmp_path / "run", key="resume")


def test_unsafe_pickle_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Payload()}, path)
    with pytest.raises(UserError, match=r"refused for safety.*GLOBAL posix.system") as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value) and "Re-running" not in str(caught.value)


@pytest.mark.slow
def test_evaluate_with_a_text_file_as_checkpoint_says_so_in_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: fcn8s\n")
    proc = _run_script("evaluate.py", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: not a checkpoint: {path}")
    assert "a text file" in proc.stderr and "Traceback" not in proc.stderr and "IndexError" not in proc.stderr


# --- disk full: one line naming the directory, the space needed and free ------------------------


def _enforce_fail(state, fd, close=True):
    os.write(fd, b"half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:  # what torch's zip writer makes of it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def _write_to_dev_full(state, fd, close=True):
    real_dump(state, os.open("/dev/full", os.O_WRONLY))  # torch's own writer meets a real ENOSPC


real_dump = fcn.checkpoint._dump


@pytest.mark.parametrize("writer", [_enforce_fail, _write_to_dev_full], ids=["torch-enforce-fail", "dev-full"])
def test_disk_full_during_a_save_names_the_directory_needed_and_free_space(tmp_path, monkeypatch, writer):
    if writer is _write_to_dev_full and not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path, keep_previous=True)
    monkeypatch.setattr(fcn.checkpoint, "_dump", writer)
    with pytest.raises(UserError) as caught:
        save_checkpoint({"model": {"w": torch.ones(1000)}, "config": {}}, path, keep_previous=True)
    message = str(caught.value)
    assert f"disk full while writing {path}: No space left on device on {tmp_path}" in message
    assert "4.0 KB needed" in message and " free" in message and "previous checkpoint (if any) is intact" in message
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_disk_full_writing_metrics_json_ends_in_one_line_with_exit_2(shapes_root, tmp_path, monkeypatch, capsys):
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith((".metrics.", "metrics.")) and self.suffix == ".json":  # a temporary, then renamed
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SystemExit) as caught:
        exit_on_user_error(train)(_cfg(shapes_root, "trainer.epochs=1", "logger=none"), tmp_path)
    assert caught.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: disk full while writing the run's files: No space left on device on ")
    assert "free" in line and "resume=auto" in line
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3  # the checkpoints are intact
    assert not (tmp_path / "metrics.json").exists()
    assert not list(tmp_path.glob(".metrics.*"))  # no temporary left either


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/x/tensorboard/events.out"),
        RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
            "file write failed, No space left on device"
        ),
    ],
    ids=["tensorboard-quota", "torch-writer-text"],
)
def test_any_write_failing_for_space_ends_in_one_line(raised, capsys):
    def task():
        try:
            raise raised
        except Exception as exc:
            raise ValueError("wrapped by a library") from exc

    with pytest.raises(SystemExit) as caught:
        exit_on_user_error(task)()
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: disk full while writing")
    assert ("Disk quota exceeded on /runs/x/tensorboard" in err) if isinstance(raised, OSError) else "free" in err


# --- non-finite gradients: checked before optimizer.step() --------------------------------------


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradientAtSteps(torch.nn.CrossEntropyLoss):
    """Cross-entropy with a finite value whose backward yields NaN gradients on the given training calls."""

    def __init__(self, ignore_index: int = 255, bad: list[int] = (), **unused) -> None:
        super().__init__(ignore_index=ignore_index)
        self.bad, self.calls = set(bad), 0

    def forward(self, logits, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad:
                logits = _NaNGradient.apply(logits)
        return super().forward(logits, target)


def _epoch(loss_fn, clip=None, skip=1, max_steps=None):
    """Five steps of SGD with momentum on a one-layer model; the model and the result (or the error)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=generator),
            torch.randint(0, 4, (2, 8, 8), generator=generator),
        )
        for _ in range(5)
    ]
    try:
        return model, train_one_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            loss_fn,
            Settings(
                device=torch.device("cpu"), mean=[0.5] * 3, std=[0.5] * 3, skip_nonfinite=skip, grad_clip_norm=clip
            ),
            step=0,
            max_steps=max_steps,
        )
    except NonFiniteLossError as exc:
        return model, exc


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip-1.0"])
def test_nan_gradients_skip_the_update_like_a_nan_loss(clip, caplog):
    model, result = _epoch(NaNGradientAtSteps(bad=[3]), clip)
    reference, _ = _epoch(NaNAtSteps(ignore_index=255, bad=[3]), clip)  # step 3 skipped by the loss check
    assert result.step == 5 and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert "gradients non-finite (norm nan, loss finite) at step 3: batch skipped (1/1 in a row)" in caplog.text


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip-1.0"])
def test_nan_gradients_without_skipping_stop_before_the_update(clip):
    model, error = _epoch(NaNGradientAtSteps(bad=[3]), clip, skip=0)
    assert isinstance(error, NonFiniteLossError)
    assert error.what == "gradients" and error.step == 3 and error.first_step == 3
    assert "gradients became non-finite" in str(error) and "at step 3" in str(error)
    after_two, _ = _epoch(NaNGradientAtSteps(bad=[]), clip, max_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), after_two.parameters()))


@pytest.mark.slow
def test_nan_gradients_in_training_name_the_step_and_the_gradients(shapes_root, tmp_path):
    cfg = _cfg(shapes_root, "loss._target_=tests.test_reliability.NaNGradientAtSteps", "+loss.bad=[5]", "logger=none")
    with pytest.raises(UserError, match=r"gradients became non-finite \(global norm nan, loss finite\) at step 5"):
        train(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --- the scan cache and files made unreadable after the scan ------------------------------------


def test_file_made_unreadable_after_a_cached_scan_is_still_caught(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = write_folder(tmp_path / "d", names=("a", "b", "c"), values=(0, 1))
    layout = {"split_file": None}
    assert scan_split(root, "train", layout, MaskDecoder(3)).rescanned == 3
    assert scan_split(root, "train", layout, MaskDecoder(3)).rescanned == 0  # warm cache
    locked = (root / "masks" / "b.png").resolve()
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # what chmod 000 does to anyone but root
        if isinstance(file, (str, Path)) and Path(file).resolve() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    report = scan_split(root, "train", layout, MaskDecoder(3))
    assert report.rescanned == 1 and report.errors and "b.png" in str(report.errors[0].files)
    assert "PermissionError" in report.errors[0].message or "Permission denied" in str(report.to_dict())
    monkeypatch.setattr(builtins, "open", real_open)  # fixed: read again, not served from the cache
    fixed = scan_split(root, "train", layout, MaskDecoder(3))
    assert fixed.rescanned == 1 and not fixed.errors


def test_training_with_a_warm_scan_cache_stops_before_the_first_step_on_an_unreadable_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = write_folder(
        tmp_path / "data",
        names=("a", "b", "c", "d"),
        values=(0, 1, 2),
        split_lists={"train": ["a", "b", "c"], "val": ["d"]},
    )
    cfg = compose_config(
        "train",
        [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            "trainer=debug",
            "data.crop_size=16",
        ],
    )
    scan_data(cfg.data, ["train", "val"])
    assert [r.rescanned for r in scan_data(cfg.data, ["train", "val"])] == [0, 0]  # the cache is warm
    locked = (root / "images" / "b.jpg").resolve()
    real_open = builtins.open

    def denied(file, *args, **kwargs):  # chmod 000, as seen by anyone but root
        if isinstance(file, (str, Path)) and Path(file).resolve() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(UserError, match=r"b\.jpg") as caught:
        train(cfg, tmp_path / "run")
    assert "has problems" in str(caught.value)  # found by the scan before training, not by a loader mid-epoch
    assert "Permission denied" in str(caught.value) or "PermissionError" in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_full_disk_while_hydra_writes_the_run_config_is_one_line_with_exit_2(capsys):
    import hydra.core.utils as hydra_utils
    from omegaconf import OmegaConf

    import fcn.cli.exit  # noqa: F401  (every entry point imports it: it guards Hydra's config writer)

    with pytest.raises(SystemExit) as stopped:  # /dev/full: every write fails with ENOSPC
        hydra_utils._save_config(OmegaConf.create({"a": 1}), "full", Path("/dev"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: disk full while writing /dev/full") and "\n" not in err


@pytest.mark.slow
def test_a_run_stopped_after_a_validation_reports_its_best_scores_and_hparams_row(shapes_root, tmp_path):
    """SIGTERM (or a time limit) after at least one validation: metrics.json with its status and the
    best scores so far, and the HPARAMS row, as a finished run writes them; the resumed run replaces both."""
    from tests.tensorboard_view import hparams_sessions

    overrides = [*tiny_train_overrides(shapes_root), "trainer.epochs=3", "trainer.val_every=1"]
    with pytest.raises(TrainingInterrupted):
        train(
            compose_config("train", overrides), tmp_path, stop=StopAtStep(5)
        )  # in epoch 2, after epoch 1's validation
    stopped = json.loads((tmp_path / "metrics.json").read_text())
    assert stopped["status"] == "stopped by signal 15" and stopped["epoch"] == 1
    assert stopped["checkpoint"] == str(tmp_path / "checkpoints" / "best.pt") and 0 <= stopped["miou"] <= 1
    assert {"seed", "epochs", "minutes", "cpu_seconds", "machine", "date", "command"} <= set(stopped)
    assert len(hparams_sessions(tmp_path)) == 1
    train(compose_config("train", [*overrides, "resume=auto"]), tmp_path)
    finished = json.loads((tmp_path / "metrics.json").read_text())
    assert finished["status"] == "finished" and len(hparams_sessions(tmp_path)) == 1


@pytest.mark.slow
def test_a_run_stopped_before_its_first_validation_writes_no_metrics(shapes_root, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(compose_config("train", tiny_train_overrides(shapes_root)), tmp_path, stop=StopAtStep(1))
    assert not (tmp_path / "metrics.json").exists()
