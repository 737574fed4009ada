"""Learning-rate schedules: linear warm-up followed by constant / cosine / poly / step decay.

Expressed as a multiplier of the peak lr (a ``LambdaLR``), so the scheduler state is just the
step counter and resumes exactly; DeepSpeed is handed the same scheduler object.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

SCHEDULES = ("constant", "cosine", "poly", "step")


def lr_multiplier(cfg: Any, total_steps: int) -> Callable[[int], float]:
    """``f(step) -> lr / peak_lr`` for the schedule in ``cfg`` over ``total_steps`` optimizer steps."""
    name = str(cfg.name).lower()
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={cfg.name!r}: expected one of {', '.join(SCHEDULES)}")
    warmup = int(cfg.warmup_steps)
    if warmup < 0 or total_steps <= 0:
        raise ValueError(f"schedule: warmup_steps={warmup} and train.steps={total_steps} must be >= 0 and > 0")
    decay_steps = max(1, total_steps - warmup)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / decay_steps)
        if name == "constant":
            return 1.0
        if name == "cosine":
            lo = float(cfg.min_lr_ratio)
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
        if name == "poly":  # min_lr_ratio is a floor, as the reference's PolyLR min_lr
            return max(float(cfg.min_lr_ratio), (1.0 - t) ** float(cfg.poly_power))
        return float(cfg.gamma) ** ((step - warmup) // int(cfg.step_size))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
