"""Learning-rate schedules, stepped once per optimisation step."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class PolyWithWarmup:
    """Factor on the base lr: linear warm-up from ``warmup_factor``, then ``(1 - t)^power``.

    A callable object rather than a closure so its settings land in the scheduler's state dict.
    """

    def __init__(self, total_steps: int, power: float, warmup_steps: int, warmup_factor: float) -> None:
        self.total_steps = max(1, total_steps)
        self.power = power
        self.warmup_steps = min(warmup_steps, self.total_steps - 1)
        self.warmup_factor = warmup_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor + (1 - self.warmup_factor) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 1 - progress) ** self.power


def poly(
    optimizer: Optimizer,
    total_steps: int,
    *,
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_factor: float = 0.1,
) -> LambdaLR:
    """The "poly" schedule of FCN/DeepLab with an optional linear warm-up."""
    return LambdaLR(optimizer, PolyWithWarmup(total_steps, power, warmup_steps, warmup_factor))


def constant(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """Keep the base learning rate throughout (``total_steps`` is accepted and unused)."""
    del total_steps
    return LambdaLR(optimizer, lambda step: 1.0)
