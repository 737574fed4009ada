"""Behaviours of the reference study's code that are bugs or accidents, reproducible on request.

Each is a switch, off by default, so that the paper's numbers can be compared like for like
(docs/transfer.md lists them with file and line in github.com/donglao/DepthToSemantic). Those that
live in the segmentation task's forward pass are there; this module holds the one that reaches
into the optimisation: the KITTI loop that never zeroes its gradients.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from trainer.config import ParallelConfig


class GradientCarry:
    """``KITTI/train_semantic.py`` calls ``loss.backward(); optimizer.step()`` with no
    ``optimizer.zero_grad()`` (lines 172-174), so the gradient of step t is the sum of every
    step's gradient so far. Our engine zeroes after each step; :meth:`apply`, called after the
    backward pass and before the step, adds back the running sum (a parameter with no fresh
    gradient steps on the sum alone, as there). Its state is checkpointed per rank (DDP's
    gradients are averaged, so every rank holds the same sum)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    @staticmethod
    def check_supported(parallel: Optional[ParallelConfig]) -> None:
        """Plain gradients only: FSDP shards them, DeepSpeed owns them, fp16 scales them (None: a
        single process, fp32)."""
        strategy = str(getattr(parallel, "strategy", "single"))
        precision = str(getattr(parallel, "precision", "fp32"))
        if strategy not in ("single", "ddp") or precision == "fp16":
            raise ValueError(f"task.quirk_no_zero_grad needs parallel.strategy single or ddp and precision fp32 or "
                             f"bf16 (got {strategy}, {precision})")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            carried = self.sums.get(name)
            if carried is not None and carried.device != p.device:
                carried = carried.to(p.device)
            if p.grad is None:
                if carried is None:
                    continue
                p.grad = carried.clone()
            elif carried is not None:
                p.grad.add_(carried)
            self.sums[name] = p.grad.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state["sums"])
