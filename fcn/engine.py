"""One training epoch and one evaluation pass: plain functions over a model and a loader."""

from __future__ import annotations

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


@dataclass
class EpochResult:
    """What one training epoch reports back."""

    step: int  # global optimisation step after the epoch
    loss: float  # mean training loss over the epoch's steps


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
    on_step: Callable[[int, float, float], None] | None = None,
) -> EpochResult:
    """Train for one pass over ``loader`` (or ``max_steps`` batches), stepping the lr every batch.

    ``on_step(step, loss, lr)`` is called after every optimisation step (for logging).
    """
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", total=_num_batches(loader, max_steps), leave=False, disable=None)
    for i, (images, masks) in enumerate(bar):
        if max_steps is not None and i >= max_steps:
            break
        images = normalize(images.to(device, non_blocking=True), mean, std)
        masks = masks.to(device, non_blocking=True)
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step += 1
        value = loss.item()
        if not math.isfinite(value):
            raise UserError(
                f"training loss became {value} at step {step} (epoch {epoch}); lower optim.lr "
                "or check the data (mask values beyond num_classes)"
            )
        total += value
        count += 1
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(step, value, lr)
    return EpochResult(step=step, loss=total / max(1, count))


@dataclass
class EvalResult:
    """What an evaluation pass reports back."""

    confusion: torch.Tensor  # num_classes x num_classes counts, rows = ground truth
    loss: float  # mean loss per batch (nan when no loss function was given)


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
    desc: str = "eval",
) -> EvalResult:
    """Score ``model`` on ``loader`` at each image's own resolution.

    Batches padded by :func:`fcn.data.loader.pad_collate` carry ``ignore_index`` in the padding,
    so only real pixels count.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, total=_num_batches(loader, max_batches), leave=False, disable=None)
    for i, (images, masks) in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        images = normalize(images.to(device, non_blocking=True), mean, std)
        masks = masks.to(device, non_blocking=True)
        logits = model(images)
        if loss_fn is not None:
            total += loss_fn(logits, masks).item()
            count += 1
        try:
            confusion += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
        except ValueError as exc:
            raise UserError(f"{exc}: fix the masks or set data.num_classes / data.ignore_index") from exc
    return EvalResult(confusion=confusion.cpu(), loss=total / count if count else math.nan)


def _num_batches(loader: DataLoader, limit: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)
