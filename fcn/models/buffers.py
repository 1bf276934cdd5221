"""Undoing what a forward pass changed in a model's buffers, for a skipped non-finite step.

A training-mode forward pass updates state besides the weights: batch norm's running mean and
variance and its ``num_batches_tracked`` counter. When the step is skipped because the loss or
the gradients are not finite (``trainer.skip_nonfinite``), the optimizer leaves the weights
alone, but those buffers have already absorbed the bad batch (a NaN input makes the running
statistics NaN for good). :func:`snapshot_buffers` before the window and
:func:`restore_buffers` on a skip put every buffer back as it was.
"""

from __future__ import annotations

import torch


def snapshot_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every buffer of ``model`` (each module's, registered with ``register_buffer``),
    paired with the live tensor: a few KB for an FCN (batch norm statistics only)."""
    return [(buffer, buffer.detach().clone()) for buffer in model.buffers()]


def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """Copy the values :func:`snapshot_buffers` took back into the live buffers, in place (so
    DistributedDataParallel's and torch.compile's views of them stay the same tensors)."""
    with torch.no_grad():
        for live, saved in snapshot or ():
            live.copy_(saved)
