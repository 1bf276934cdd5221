"""One training epoch and one evaluation pass: plain functions over a model and a loader."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fcn.data.transforms import normalize
from fcn.errors import UserError
from fcn.metrics import confusion_matrix

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """What one training epoch reports back."""

    step: int  # global step after the epoch (every batch drawn counts, skipped or not)
    loss: float  # mean training loss over the epoch's finite steps
    batches: int  # batches drawn in this call


class NonFiniteLossError(Exception):
    """The loss was NaN or inf more times in a row than allowed; weights were not updated with it."""

    def __init__(self, step: int, value: float, consecutive: int) -> None:
        super().__init__(f"loss {value} at step {step} ({consecutive} non-finite in a row)")
        self.step, self.value, self.consecutive = step, value, consecutive


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    step: int,
    epoch: int,
    max_steps: int | None = None,
    channels_last: bool = False,
    skip_nonfinite: int = 0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip_norm: float | None = None,
    should_stop: Callable[[int], bool] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> EpochResult:
    """Train for one pass over ``loader`` (or ``max_steps`` batches), stepping the lr every batch.

    A NaN or inf loss is never back-propagated: the batch is skipped with a warning, up to
    ``skip_nonfinite`` times in a row, after which :class:`NonFiniteLossError` is raised.
    ``should_stop(step)`` is polled after every step; when it says yes the epoch ends there.
    ``on_step(step, loss, lr)`` is called after every optimisation step (for logging).
    ``channels_last`` feeds the batch in NHWC memory order (pair it with a channels-last model).
    ``amp_dtype`` (bfloat16 or float16) runs the forward pass under autocast; float16 needs a
    ``scaler`` to keep small gradients from underflowing. ``grad_clip_norm`` clips the global
    gradient norm before each update.
    """
    model.train()
    total, count, batches, bad_in_a_row = 0.0, 0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", total=_num_batches(loader, max_steps), leave=False, disable=None)
    if max_steps is not None and max_steps <= 0:
        return EpochResult(step=step, loss=0.0, batches=0)
    for images, masks in bar:
        images = to_model_input(images, device, mean, std, channels_last)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), masks)
        value = loss.item()
        lr = optimizer.param_groups[0]["lr"]
        step += 1
        batches += 1
        finite = math.isfinite(value)
        if finite:
            bad_in_a_row = 0
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if grad_clip_norm:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    _clip(optimizer, grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if grad_clip_norm:
                    _clip(optimizer, grad_clip_norm)
                optimizer.step()
            total += value
            count += 1
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)  # drawn at tqdm's own pace
        else:
            bad_in_a_row += 1
            if bad_in_a_row > skip_nonfinite:
                raise NonFiniteLossError(step, value, bad_in_a_row)
            log.warning("loss %s at step %d: batch skipped (%d/%d in a row)", value, step, bad_in_a_row, skip_nonfinite)
        scheduler.step()
        # after the scheduler: a checkpoint written by on_step holds the state of the next step
        if finite and on_step is not None:
            on_step(step, value, lr)
        stop = should_stop is not None and should_stop(step)  # polled every step, also the epoch's last
        if stop or (max_steps is not None and batches >= max_steps):
            break
    return EpochResult(step=step, loss=total / max(1, count), batches=batches)


@dataclass
class EvalResult:
    """What an evaluation pass reports back."""

    confusion: torch.Tensor  # num_classes x num_classes counts, rows = ground truth
    loss: float  # mean loss per batch (nan when no loss function was given)
    images: int  # images scored


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_batches: int | None = None,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    infer: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    desc: str = "eval",
) -> EvalResult:
    """Score ``model`` on ``loader`` at each image's own resolution.

    Batches padded by :func:`fcn.data.loader.pad_collate` carry ``ignore_index`` in the padding,
    so only real pixels count. ``infer(model, images)`` replaces the plain forward pass (sliding
    windows, test-time augmentation: see :mod:`fcn.inference`); ``on_batch(images, masks,
    predictions)`` sees every batch (uint8 images as loaded, on the CPU), for saving or ranking
    predictions.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    total, count, images_seen = 0.0, 0, 0
    if max_batches is not None and max_batches <= 0:
        return EvalResult(confusion=confusion.cpu(), loss=math.nan, images=0)
    bar = tqdm(loader, desc=desc, total=_num_batches(loader, max_batches), leave=False, disable=None)
    for i, (images, masks) in enumerate(bar):
        images_seen += images.shape[0]
        raw = images
        images = to_model_input(images, device, mean, std, channels_last)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images) if infer is None else infer(model, images)
        if loss_fn is not None:
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
    return EvalResult(confusion=confusion.cpu(), loss=total / count if count else math.nan, images=images_seen)


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


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
