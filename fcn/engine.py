"""One training epoch and one evaluation pass: plain functions over a model and a loader."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fcn.data.transforms import normalize
from fcn.distributed import mean_across_ranks, sum_across_ranks, world_size
from fcn.errors import UserError
from fcn.metrics import confusion_matrix
from fcn.models.buffers import restore_buffers, snapshot_buffers

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """What one training epoch reports back."""

    step: int  # global optimisation step after the epoch (skipped steps count too)
    loss: float  # mean training loss over the epoch's finite steps
    batches: int  # batches drawn in this call


@dataclass(frozen=True)
class Settings:
    """How batches are fed to the model and scored: the same for every pass of one run.

    ``mean`` / ``std`` normalise the uint8 images on the device (per channel, 0-255 scale);
    ``channels_last`` feeds NHWC batches (pair it with a channels-last model); ``amp_dtype``
    (bfloat16 or float16) runs the forward pass under autocast, and float16 needs a ``scaler`` to
    keep small gradients from underflowing. ``num_classes`` and ``ignore_index`` are the data's
    (evaluation scores with them). Training only: ``accumulate`` batches per optimisation step,
    ``grad_clip_norm`` (global L2 norm, None = off), ``skip_nonfinite`` (bad steps skipped in a
    row before :class:`NonFiniteLossError`), ``grad_norm_every`` (measure the gradient norm every
    N steps for logging, 0 = only when clipping).
    """

    device: torch.device
    mean: Sequence[float]
    std: Sequence[float]
    num_classes: int = 0
    ignore_index: int = 255
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    accumulate: int = 1
    grad_clip_norm: float | None = None
    skip_nonfinite: int = 0
    grad_norm_every: int = 0


@dataclass(frozen=True)
class Bar:
    """The progress bar of one pass: its label and, for training, ``postfix(step)``'s extra items."""

    desc: str
    postfix: Callable[[int], dict] | None = None


class NonFiniteLossError(Exception):
    """The loss or the gradients were NaN or inf more times in a row than allowed; the weights were
    not updated with them. ``what`` is ``"loss"`` or ``"gradients"`` (of the step that stopped the
    run), ``first_step`` the first bad step of the run of bad steps, ``value`` the loss (or the
    gradients' global norm)."""

    def __init__(self, step: int, value: float, consecutive: int, what: str = "loss", first_step: int | None = None):
        first_step = step if first_step is None else first_step
        self.step, self.value, self.consecutive, self.what, self.first_step = step, value, consecutive, what, first_step
        super().__init__(self.summary())

    def summary(self) -> str:
        """What went wrong, for the user: "training loss became nan at step 5 (1 in a row)", or
        "gradients became non-finite (global norm nan, loss finite) at step 3 (...)"."""
        if self.what == "gradients":
            head = f"gradients became non-finite (global norm {self.value}, loss finite) at step {self.step}"
        else:
            head = f"training loss became {self.value} at step {self.step}"
        since = f", the first at step {self.first_step}" if self.first_step != self.step else ""
        return f"{head} ({self.consecutive} in a row{since}); the weights were not updated with it"


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    settings: Settings,
    *,
    step: int,
    max_steps: int | None = None,
    on_step: Callable[[int, float | None, float, float | None], bool | None] | None = None,
    bar: Bar | None = None,
) -> EpochResult:
    """Train for one pass over ``loader`` (or ``max_steps`` optimisation steps), stepping the lr every step.

    Each optimisation step accumulates the gradients of ``accumulate`` batches, each loss scaled
    by ``1 / accumulate``: with a mean-reduced loss, k batches of b give the gradient of one
    batch of k x b. A model in ``DistributedDataParallel`` averages gradients over ranks once per
    step, on the step's last batch (``no_sync`` on the others). The step's loss stays on the
    device until the step ends: the host reads it once per optimisation step, together with the
    gradient norm (one synchronisation, not one per batch), averaged over ranks first, so every
    rank logs, skips or stops on the same value.

    A step whose loss is NaN or inf, or whose gradients have a NaN or inf anywhere, never reaches
    ``optimizer.step()`` (gradients checked on their global norm: the norm clipping computes anyway
    when ``grad_clip_norm`` is set, else one fused ``torch._foreach_norm`` reduction; with a
    ``scaler``, its own inf check skips the step and lowers the scale instead, as float16 overflow
    is expected there). The step (its whole accumulation window) is skipped with a warning naming
    the loss or the gradients, and batch norm's running statistics are put back as they were, up
    to ``skip_nonfinite`` times in a row, after which :class:`NonFiniteLossError` is raised before
    any update.
    ``on_step(step, loss, lr, grad_norm)`` is called after every optimisation step, after the
    scheduler's (``loss`` is None for a skipped step); when it returns True the epoch ends there,
    so a stop never falls inside a window. ``grad_norm`` is the global gradient norm before
    clipping, computed on steps that clip (``grad_clip_norm``) and every ``grad_norm_every``
    steps, else None. ``bar=None`` hides the progress bar (ranks other than 0).
    """
    device, mean, std, channels_last = settings.device, settings.mean, settings.std, settings.channels_last
    amp_dtype, scaler, accumulate = settings.amp_dtype, settings.scaler, settings.accumulate
    grad_clip_norm, grad_norm_every = settings.grad_clip_norm, settings.grad_norm_every
    model.train()
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel only
    total, count, batches, steps, bad_in_a_row, first_bad = 0.0, 0, 0, 0, 0, 0
    limit = None if max_steps is None else max_steps * accumulate
    postfix = bar.postfix if bar is not None else None
    bar = tqdm(
        loader,
        desc=bar.desc if bar is not None else None,
        total=_num_batches(loader, limit),
        leave=False,
        disable=None if bar is not None else True,
    )
    if max_steps is not None and max_steps <= 0:
        return EpochResult(step=step, loss=0.0, batches=0)
    for images, masks in bar:
        first, last = batches % accumulate == 0, (batches + 1) % accumulate == 0
        batches += 1
        if first:
            optimizer.zero_grad(set_to_none=True)
            window = torch.zeros((), device=device)  # the step's loss, summed on the device
            buffers = snapshot_buffers(model) if settings.skip_nonfinite else None  # a skipped step leaves no trace
        images = to_model_input(images, device, mean, std, channels_last)
        masks = masks.to(device, non_blocking=True)
        # no gradient all-reduce until the window's last batch: one per optimisation step
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(images), masks)
            loss = loss / accumulate if accumulate > 1 else loss
            window += loss.detach().float()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if not last:
            continue
        lr = optimizer.param_groups[0]["lr"]
        step += 1
        steps += 1
        measure = bool(grad_clip_norm) or (grad_norm_every > 0 and step % grad_norm_every == 0)
        if scaler is not None and measure:
            scaler.unscale_(optimizer)  # clip and measure the true gradients, not the scaled ones
        if grad_clip_norm:
            norm = _clip(optimizer, grad_clip_norm)
        else:  # without a scaler the norm is the non-finite check; with one, its own check does that
            norm = _grad_norm(optimizer) if scaler is None or measure else torch.zeros((), device=device)
        window_loss, norm = mean_across_ranks(torch.stack([window, norm.to(window)])).tolist()  # the one host read
        grad_norm = norm if measure else None
        finite, what, bad_value = math.isfinite(window_loss), "loss", window_loss
        if finite and not math.isfinite(norm) and scaler is None:
            finite, what, bad_value = False, "gradients", norm
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and measure:
                scaler.update()  # unscale_ found the infs: the scale goes down, and the next unscale_ may run
        if finite:
            bad_in_a_row = 0
            _optimizer_step(optimizer, scaler)
            total += window_loss
            count += 1
            extra = postfix(step) if postfix is not None and bar.disable is not True else {}
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr:.2e}", **extra, refresh=False)  # drawn at tqdm's pace
        else:
            restore_buffers(buffers)  # batch norm's running statistics as before the bad batch
            bad_in_a_row += 1
            first_bad = step if bad_in_a_row == 1 else first_bad
            if bad_in_a_row > settings.skip_nonfinite:
                raise NonFiniteLossError(step, bad_value, bad_in_a_row, what, first_bad)
            skipped = "batch" if accumulate == 1 else f"step ({accumulate} batches)"
            bad = f"loss {bad_value}" if what == "loss" else f"gradients non-finite (norm {bad_value}, loss finite)"
            log.warning(
                "%s at step %d: %s skipped (%d/%d in a row)", bad, step, skipped, bad_in_a_row, settings.skip_nonfinite
            )
        scheduler.step()
        # after the scheduler: a checkpoint written by on_step holds the state of the next step;
        # called every step, also the epoch's last, so a stop is seen after the same step on every rank
        stop = on_step is not None and on_step(step, window_loss if finite else None, lr, grad_norm)
        if stop or (max_steps is not None and steps >= max_steps):
            break
    return EpochResult(step=step, loss=total / max(1, count), batches=batches)


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Update the weights; with a float16 ``scaler``, through it (it skips a step whose gradients overflowed)."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@dataclass
class EvalResult:
    """What an evaluation pass reports back."""

    confusion: torch.Tensor  # num_classes x num_classes counts, rows = ground truth
    loss: float  # mean loss per batch with a labelled pixel (nan without a loss function or such a batch)
    images: int  # images scored
    loss_batches: int = 0  # batches the loss is the mean of (to combine the shares of several ranks)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    settings: Settings,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_batches: int | None = None,
    infer: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    desc: str | None = "eval",
) -> EvalResult:
    """Score ``model`` on ``loader`` at each image's own resolution.

    Batches padded by :func:`fcn.data.loader.pad_collate` carry ``ignore_index`` in the padding,
    so only real pixels count. The loss is the mean over batches that hold at least one labelled
    pixel (a batch entirely ``ignore_index`` is left out of it, and is NaN only when no batch has
    one). ``infer(model, images)`` replaces the plain forward pass (sliding
    windows, test-time augmentation: see :mod:`fcn.inference`); ``on_batch(images, masks,
    predictions)`` sees every batch (uint8 images as loaded, on the CPU), for saving or ranking
    predictions. ``desc`` labels the bar; None hides it (ranks other than 0).
    """
    device, mean, std, channels_last = settings.device, settings.mean, settings.std, settings.channels_last
    num_classes, ignore_index, amp_dtype = settings.num_classes, settings.ignore_index, settings.amp_dtype
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    total, count, images_seen = 0.0, 0, 0
    if max_batches is not None and max_batches <= 0:
        return EvalResult(confusion=confusion.cpu(), loss=math.nan, images=0)
    bar = tqdm(
        loader,
        desc=desc,
        total=_num_batches(loader, max_batches),
        leave=False,
        disable=None if desc is not None else True,
    )
    for i, (images, masks) in enumerate(bar):
        images_seen += images.shape[0]
        raw = images
        images = to_model_input(images, device, mean, std, channels_last)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images) if infer is None else infer(model, images)
        # the loss averages over batches that hold a labelled pixel: one entirely void (which every
        # loss scores 0) says nothing about the model and would pull the mean towards 0
        if loss_fn is not None and bool((masks != ignore_index).any()):
            total += loss_fn(logits.float(), masks).item()
            count += 1
        preds = logits.argmax(1)
        if on_batch is not None:
            on_batch(raw, masks.cpu(), preds.cpu())
        try:
            confusion += confusion_matrix(preds, masks, num_classes, ignore_index)
        except ValueError as exc:
            raise UserError(f"{exc}: fix the masks or set data.num_classes / data.ignore_index") from exc
        if max_batches is not None and i + 1 >= max_batches:
            break  # checked last, so no batch is loaded only to be dropped
    return EvalResult(
        confusion=confusion.cpu(), loss=total / count if count else math.nan, images=images_seen, loss_batches=count
    )


def combine_ranks(result: EvalResult) -> EvalResult:
    """The evaluation of a whole split from each rank's share of it (see :func:`fcn.distributed.shard`):
    confusion matrices, image and batch counts summed, the loss averaged over every batch.

    Summing integer counts is exact, so the scores equal those of a single process over the
    whole split. Every rank must call it; outside a job it returns ``result`` unchanged.
    """
    if world_size() == 1:
        return result
    confusion = sum_across_ranks(result.confusion.clone())
    loss_sum = result.loss * result.loss_batches if result.loss_batches else 0.0
    totals = sum_across_ranks(torch.tensor([loss_sum, result.loss_batches, result.images], dtype=torch.float64))
    loss_sum, batches, images = totals.tolist()
    return EvalResult(
        confusion=confusion,
        loss=loss_sum / batches if batches else math.nan,
        images=int(images),
        loss_batches=int(batches),
    )


def _gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm``; the norm before clipping, which clipping
    computes anyway, is returned as a 0-d tensor (for logging, and NaN or inf when any gradient is)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The global L2 norm of the gradients (one fused reduction), a 0-d tensor on their device."""
    grads = _gradients(optimizer)
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def to_model_input(images: torch.Tensor, device, mean, std, channels_last: bool) -> torch.Tensor:
    """A uint8 batch as the model takes it: copied to the device as uint8 (4x fewer bytes than
    float), normalised there, and in NHWC order when the model is channels-last."""
    images = normalize(images.to(device, non_blocking=True), mean, std)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _num_batches(loader: DataLoader, limit: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)
