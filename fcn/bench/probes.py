"""Throughput and efficiency probes behind ``scripts/benchmark.py`` (:mod:`fcn.bench.run`) and the model table.

Every figure is a median over repeats, with warm-up excluded. Throughputs are measured through
the same functions training uses (:func:`fcn.engine.train_one_epoch`, :func:`fcn.engine.evaluate`),
so a speed-up measured here is a speed-up of training.
"""

from __future__ import annotations

import multiprocessing as mp
import os
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
from fcn.data.doctor.scan import scan_split
from fcn.data.transforms import normalize
from fcn.engine import Bar, Settings, evaluate, train_one_epoch
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
    probes: dict[str, Callable[[], float]] | None = None,
) -> dict[str, float]:
    """Images per second of full training steps drawing batches from each of ``sources`` (a list
    in memory, a data loader). The sources take turns within every repeat, so a slow spell of a
    shared machine slows all of them alike and their ratio stays meaningful.

    ``probes`` (name: a callable returning a rate, e.g. a peak FLOP/s from :func:`matmul_probe`
    or :func:`conv_probe`) take their turn in every repeat too; their medians come back under
    their names, next to the sources'.
    """
    probes = probes or {}
    scheduler = constant(optimizer, total_steps=0)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def run(batches: Iterable, n: int) -> int:
        result = train_one_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            loss_fn,
            Settings(
                device=device, mean=mean, std=std, channels_last=channels_last, amp_dtype=amp_dtype, scaler=scaler
            ),
            step=0,
            max_steps=n,
            bar=Bar("epoch 0"),
        )
        return result.batches * batch_size  # fewer than n when the loader runs out

    rates: dict[str, list[float]] = {name: [] for name in [*sources, *probes]}
    for batches in sources.values():
        run(batches, warmup)
    for probe in probes.values():
        probe()  # warm-up: oneDNN primitive creation, first-touch of the buffers
    for _ in range(repeats):
        for name, batches in sources.items():
            rates[name].append(_median_rate(lambda b=batches: run(b, steps), device, 1))
        for name, probe in probes.items():
            rates[name].append(probe())
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
    model: nn.Module, loader: Iterable, *, batches: int, repeats: int, device: torch.device, infer=None, **settings
) -> float:  # settings: the fields of fcn.engine.Settings but the device; infer= for sliding windows or TTA
    """Images per second of :func:`fcn.engine.evaluate`, confusion matrix included."""
    settings = Settings(device=device, **settings)

    def run() -> int:
        result = evaluate(model, loader, settings, max_batches=batches, infer=infer)
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
    """The machine's measured peak: FLOP/s of a large square matmul in ``dtype`` (median of
    ``repeats``; :func:`matmul_probe` is one repeat, for interleaving)."""
    probe = matmul_probe(device, dtype, size)
    probe()
    return statistics.median(probe() for _ in range(repeats))


def matmul_probe(device: torch.device, dtype: torch.dtype, size: int = 2048) -> Callable[[], float]:
    """A callable that times a few ``size`` x ``size`` matmuls in ``dtype`` and returns FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    calls = 4 if device.type == "cpu" else 50

    def run() -> int:
        for _ in range(calls):
            torch.mm(a, b)
        return 2 * size**3 * calls

    return lambda: _median_rate(run, device, 1)


def _bare_input(images, device, mean_t, std_t, channels_last: bool) -> torch.Tensor:
    """A uint8 batch normalised as a bare loop would: float on the device, then NHWC if asked."""
    x = (images.to(device).float() / 255 - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def bare_training_probe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[], float]:
    """A callable that runs ``steps`` training steps as a bare PyTorch loop (no schedule, no
    gradient-norm, no non-finite checks, no bookkeeping) on ``batches`` (uint8 images, masks) kept
    in memory and returns images per second: the yardstick for ``train_one_epoch``'s overhead.
    Same model, optimiser, loss, precision and memory format as the measured training."""
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def run() -> int:
        model.train()
        images_seen = 0
        for i in range(steps):
            images, masks = batches[i % len(batches)]
            x = _bare_input(images, device, mean_t, std_t, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), masks.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images_seen += images.shape[0]
        return images_seen

    return lambda: _median_rate(run, device, 1)


def evaluation_rates_against_bare(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    repeats: int,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Images per second of :func:`fcn.engine.evaluate` and of a bare PyTorch evaluation loop
    (normalise, forward, argmax, one ``bincount`` confusion matrix per batch with ignored pixels
    in a spare row, the arithmetic of :func:`fcn.metrics.confusion_matrix` without its checks; no
    loss, no progress bar) on the same ``batches`` (uint8 images, masks) in memory, timed in
    turns, medians of ``repeats``: the yardstick for ``evaluate``'s overhead."""
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    @torch.no_grad()
    def bare() -> int:
        model.eval()
        confusion = torch.zeros((num_classes + 1) * num_classes, dtype=torch.int64, device=device)
        for images, masks in batches:
            x = _bare_input(images, device, mean_t, std_t, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                preds = model(x).argmax(1)
            masks = masks.to(device)  # one copy, as evaluate makes
            rows = torch.where(masks == ignore_index, num_classes, masks).flatten()  # ignored: the spare row
            confusion += torch.bincount(rows * num_classes + preds.flatten(), minlength=confusion.numel())
        return sum(images.shape[0] for images, _ in batches)

    def ours() -> int:
        result = evaluate(
            model,
            batches,
            Settings(
                num_classes=num_classes,
                ignore_index=ignore_index,
                device=device,
                mean=mean,
                std=std,
                channels_last=channels_last,
                amp_dtype=amp_dtype,
            ),
            desc=None,
        )
        return int(result.images)

    ours(), bare()  # warm-up
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(repeats):
        rates["ours"].append(_median_rate(ours, device, 1))
        rates["bare"].append(_median_rate(bare, device, 1))
    return statistics.median(rates["ours"]), statistics.median(rates["bare"])


def dominant_convolutions(model: nn.Module, images: torch.Tensor, top: int = 2) -> list[dict]:
    """The ``top`` convolution shapes of ``model`` that take the most forward FLOPs on ``images``
    (N, 3, H, W): each a dict with ``input`` (N, C, H, W), ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``groups`` and ``flops`` (of one forward call, all
    layers of that shape together). Transposed convolutions are left out (a few percent of FCN's
    FLOPs); so is everything that is not a convolution."""
    shapes: dict[tuple, dict] = {}

    def hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        key = (
            tuple(x.shape),
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )
        kh, kw = module.kernel_size
        flops = 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        entry = shapes.setdefault(
            key,
            {
                "input": list(x.shape),
                "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": list(module.padding),
                "dilation": list(module.dilation),
                "groups": module.groups,
                "flops": 0,
            },
        )
        entry["flops"] += flops

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) is nn.Conv2d]
    was_training = model.training
    model.eval()  # leaves batch-norm statistics as they are
    try:
        with torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return sorted(shapes.values(), key=lambda e: e["flops"], reverse=True)[:top]


def conv_probe(
    shape: dict, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, calls: int = 3
) -> Callable[[], float]:
    """A callable that times ``calls`` forward passes of one convolution of ``shape`` (from
    :func:`dominant_convolutions`) in the model's precision (``amp_dtype`` under autocast, else
    float32) and memory format, and returns FLOP/s."""
    conv = nn.Conv2d(
        shape["input"][1],
        shape["out_channels"],
        shape["kernel_size"],
        shape["stride"],
        shape["padding"],
        shape["dilation"],
        shape["groups"],
        bias=True,
    ).to(device)
    x = torch.randn(shape["input"], device=device)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out_elems = conv(x).numel()
    kh, kw = shape["kernel_size"]
    flops = 2 * out_elems * (shape["input"][1] // shape["groups"]) * kh * kw

    def run() -> int:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for _ in range(calls):
                conv(x)
        return flops * calls

    return lambda: _median_rate(run, device, 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def checkpoint_times(
    state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int
) -> tuple[float, float, float]:
    """Median seconds to save ``state`` (atomically, fsynced, with its digest), to load it back
    into ``model`` and ``optimizer`` with the digest verified (what a resume adds to start-up), and
    the same load without verifying (timed in turns with it: the integrity check's cost)."""
    saves, loads, unverified = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        for _ in range(repeats):
            start = time.perf_counter()
            save_checkpoint(state, path, keep_previous=True)
            saves.append(time.perf_counter() - start)
            for verify, times in ((True, loads), (False, unverified)):
                start = time.perf_counter()
                loaded = load_checkpoint(path, verify=verify)
                model.load_state_dict(loaded["model"])
                optimizer.load_state_dict(loaded["optimizer"])
                times.append(time.perf_counter() - start)
    return statistics.median(saves), statistics.median(loads), statistics.median(unverified)


def confusion_seconds_per_image(
    preds: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore_index: int, repeats: int
) -> float:
    """Median seconds per image of the confusion-matrix update of one batch (to set against
    evaluation time: the metric overhead)."""
    device = preds.device

    def run() -> int:
        for _ in range(20):
            confusion_matrix(preds, masks, num_classes, ignore_index)
        return 20 * preds.shape[0]

    run()
    return 1 / _median_rate(run, device, repeats)


def _sliding_window_child(
    model_kwargs: dict, size: Sequence[int], window: Sequence[int], stride: Sequence[int], queue
) -> None:
    model = FCN(**model_kwargs).eval()
    image = torch.randn(1, 3, *size)
    start = time.perf_counter()
    with torch.no_grad():
        logits = predict_logits(model, image, num_classes=model_kwargs["num_classes"], window=window, stride=stride)
    seconds = time.perf_counter() - start
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds, list(logits.shape)))


def sliding_window_peak(model_kwargs: dict, size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> dict:
    """Peak resident memory (MB) and seconds of sliding-window inference on one ``size`` image on
    the CPU, measured in a fresh process so nothing else this process did counts."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=_sliding_window_child, args=(model_kwargs, list(size), list(window), list(stride), queue)
    )
    child.start()
    peak_mb, seconds, shape = queue.get(timeout=600)
    child.join()
    return {
        "image": list(size),
        "window": list(window),
        "stride": list(stride),
        "peak_mem_mb": round(peak_mb, 1),
        "seconds": round(seconds, 2),
        "output": shape,
    }


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
