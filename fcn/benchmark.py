"""Throughput and efficiency measurements behind ``scripts/benchmark.py``.

Every figure is a median over repeats, with warm-up excluded. Throughputs are measured through
the same functions training uses (:func:`fcn.engine.train_one_epoch`, :func:`fcn.engine.evaluate`),
so a speed-up measured here is a speed-up of training.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcn.checkpoint import load_checkpoint, save_checkpoint
from fcn.data.scan import scan_split
from fcn.data.transforms import normalize
from fcn.engine import evaluate, train_one_epoch
from fcn.inference import predict_logits
from fcn.metrics import confusion_matrix
from fcn.models import FCN
from fcn.schedule import constant


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(run: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Median of ``items / seconds`` over ``repeats`` calls of ``run`` (which returns its item count)."""
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        items = run()
        _sync(device)
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)


def training_rates(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    sources: dict[str, Iterable],
    *,
    steps: int,
    warmup: int,
    repeats: int,
    batch_size: int,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Images per second of full training steps drawing batches from each of ``sources`` (a list
    in memory, a data loader). The sources take turns within every repeat, so a slow spell of a
    shared machine slows all of them alike and their ratio stays meaningful."""
    scheduler = constant(optimizer, total_steps=0)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def run(batches: Iterable, n: int) -> int:
        result = train_one_epoch(model, batches, optimizer, scheduler, loss_fn, device=device, mean=mean,
                                 std=std, step=0, epoch=0, max_steps=n, channels_last=channels_last,
                                 amp_dtype=amp_dtype, scaler=scaler)  # fmt: skip
        return result.batches * batch_size  # fewer than n when the loader runs out

    rates: dict[str, list[float]] = {name: [] for name in sources}
    for batches in sources.values():
        run(batches, warmup)
    for _ in range(repeats):
        for name, batches in sources.items():
            rates[name].append(_median_rate(lambda b=batches: run(b, steps), device, 1))
    return {name: statistics.median(values) for name, values in rates.items()}


def loader_rate(loader: Iterable, *, batches: int, warmup: int, repeats: int) -> float:
    """Images per second the data loader delivers on its own (decode, augment, collate)."""

    def run(n: int) -> int:
        count = 0
        for i, (images, _) in enumerate(loader):
            if i >= n:
                break
            count += images.shape[0]
        return count

    run(warmup)
    return _median_rate(lambda: run(batches), torch.device("cpu"), repeats)


def evaluation_rate(
    model: nn.Module, loader: Iterable, *, batches: int, repeats: int, device: torch.device, **evaluate_kwargs
) -> float:  # evaluate_kwargs: what fcn.engine.evaluate takes (infer= for sliding windows or TTA)
    """Images per second of :func:`fcn.engine.evaluate`, confusion matrix included."""

    def run() -> int:
        result = evaluate(model, loader, device=device, max_batches=batches, **evaluate_kwargs)
        return int(result.images)

    run()
    return _median_rate(run, device, repeats)


def flops_per_image(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: Callable,
    mean: Sequence[float],
    std: Sequence[float],
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Forward + backward FLOPs of one image, counted by ``torch.utils.flop_counter``."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(normalize(images, mean, std)), masks)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int, size: int = 2048) -> float:
    """The machine's measured peak: FLOP/s of a large square matmul in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    calls = 4 if device.type == "cpu" else 50

    def run() -> int:
        for _ in range(calls):
            torch.mm(a, b)
        return 2 * size**3 * calls

    run()
    return _median_rate(run, device, repeats)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the machine the numbers belong to)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def checkpoint_times(
    state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int
) -> tuple[float, float]:
    """Median seconds to save ``state`` (atomically, fsynced) and to load it back into ``model``
    and ``optimizer`` (what a resume adds to start-up)."""
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        for _ in range(repeats):
            start = time.perf_counter()
            save_checkpoint(state, path, keep_previous=True)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = load_checkpoint(path)
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])
            loads.append(time.perf_counter() - start)
    return statistics.median(saves), statistics.median(loads)


def confusion_seconds_per_image(preds: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index: int,
                                repeats: int) -> float:  # fmt: skip
    """Median seconds per image of the confusion-matrix update of one batch (to set against
    evaluation time: the metric overhead)."""
    device = preds.device

    def run() -> int:
        for _ in range(20):
            confusion_matrix(preds, masks, num_classes, ignore_index)
        return 20 * preds.shape[0]

    run()
    return 1 / _median_rate(run, device, repeats)


def _sliding_window_child(model_kwargs: dict, size: Sequence[int], window: Sequence[int],
                          stride: Sequence[int], queue) -> None:  # fmt: skip
    model = FCN(**model_kwargs).eval()
    image = torch.randn(1, 3, *size)
    start = time.perf_counter()
    with torch.no_grad():
        logits = predict_logits(model, image, num_classes=model_kwargs["num_classes"], window=window, stride=stride)
    seconds = time.perf_counter() - start
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds, list(logits.shape)))


def sliding_window_peak(model_kwargs: dict, size: Sequence[int], window: Sequence[int],
                        stride: Sequence[int]) -> dict:  # fmt: skip
    """Peak resident memory (MB) and seconds of sliding-window inference on one ``size`` image on
    the CPU, measured in a fresh process so nothing else this process did counts."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_sliding_window_child, args=(model_kwargs, list(size), list(window),
                                                                list(stride), queue))  # fmt: skip
    child.start()
    peak_mb, seconds, shape = queue.get(timeout=600)
    child.join()
    return {"image": list(size), "window": list(window), "stride": list(stride), "peak_mem_mb": round(peak_mb, 1),
            "seconds": round(seconds, 2), "output": shape}  # fmt: skip


def scan_times(root, splits: Sequence[str], layout: dict, decoder, repeats: int) -> dict:
    """Seconds to scan ``splits`` cold (empty scan cache, files dropped from the OS page cache
    where the OS allows it) and warm (cache filled), medians of ``repeats`` each."""

    def drop_page_cache() -> None:
        for path in Path(root).rglob("*"):
            if path.is_file() and hasattr(os, "posix_fadvise"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def scan_all(cache: str) -> tuple[float, int]:
        start = time.perf_counter()
        pairs = sum(scan_split(root, split, layout, decoder, cache=cache).pairs for split in splits)
        return time.perf_counter() - start, pairs

    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            drop_page_cache()
            seconds, pairs = scan_all(cache)
            cold.append(seconds)
            warm.append(scan_all(cache)[0])
    return {"pairs": pairs, "cold_s": round(statistics.median(cold), 3), "warm_s": round(statistics.median(warm), 3)}
