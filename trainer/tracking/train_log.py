"""The training log window: loss terms averaged over steps and ranks, the log step's grad norm,
throughput, data wait, corrupt-sample count, each node's system metrics; each step sent to the tracker
once."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from trainer.tracking.tracker import RunTracker

log = logging.getLogger("geoprime.loop")


def system_metrics(engine: Any) -> dict[str, float]:
    """Each node's local-rank-0 system metrics, gathered and named ``system/node_<N>/...`` (MLflow's
    UI charts metrics under ``system/`` in a run's System metrics tab). Collective."""
    from trainer.tracking import node_metrics, sample_system_metrics

    mine = (engine.env.node_rank, sample_system_metrics()) if engine.env.is_local_leader else None
    out: dict[str, float] = {}
    for item in engine.all_gather_object(mine):
        if item is not None:
            node, metrics = item
            out.update(node_metrics(node, metrics))
    return out


def _duration(seconds: float) -> str:
    """``42 s``, ``13 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class TrainLog:
    """Accumulates a window of steps and logs it every ``log_every`` steps (collective: every rank
    calls :meth:`flush` at the same steps). A resumed run re-does the steps after its checkpoint:
    steps up to ``logged_until`` (what the tracking run already holds) are not sent again."""

    def __init__(self, engine: Any, tracker: RunTracker, *, total: int, log_every: int, samples_per_step: int,
                 sys_every_s: float, logged_until: int = 0) -> None:
        self.engine, self.tracker, self.total = engine, tracker, int(total)
        self.log_every, self.samples_per_step = max(1, int(log_every)), int(samples_per_step)
        self.sys_every_s, self.logged_until = float(sys_every_s), int(logged_until)
        self.last_sys = 0.0
        self.latest: dict[str, float] = {}
        self._reset(0.0)

    def _reset(self, wait_s: float) -> None:
        self.sums: dict[str, Any] = {}
        self.steps, self.start, self.wait_start = 0, time.perf_counter(), wait_s
        self.timed_steps = 0  # steps since ``start`` (the rate's; see restart_clock)
        self.grad_norm: float | None = None  # the window's last computed gradient norm

    def restart_clock(self) -> None:
        """Time the window's rate from now: the first step's one-off costs (data start-up,
        compilation) stay out of samples/s and the ETA."""
        self.start, self.timed_steps = time.perf_counter(), 0

    def add(self, loss: Any, terms: dict[str, Any], grad_accum: int) -> None:
        """One micro-step's loss and terms (tensors: no device sync per micro-step)."""
        for k, v in {"loss": loss, **terms}.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.as_tensor(v).detach().float() / grad_accum

    def logs_at(self, step: int) -> bool:
        """Whether the window is logged after ``step`` (1-based): every ``log_every`` steps and the last."""
        return step % self.log_every == 0 or step == self.total

    def end_step(self, grad_norm: float | None) -> None:
        """One optimizer step done; ``grad_norm``: its gradient norm, where computed (the engine computes
        it on log steps only, :meth:`logs_at`: the window logs its last step's norm, as Hugging Face's
        Trainer and torchtitan do, not a mean over the window)."""
        self.steps += 1
        self.timed_steps += 1
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)

    def send(self, metrics: dict[str, float], step: int) -> None:
        """To the tracker, unless the run already logged this step before it was resumed."""
        if step > self.logged_until:
            self.tracker.log_metrics(metrics, step=step)

    def maybe_flush(self, step: int, loader: Any, wait_s: float) -> None:
        """Every ``log_every`` steps and at the last one: average over the window and the ranks."""
        if not self.logs_at(step):
            return
        engine, keys, now = self.engine, sorted(self.sums), time.perf_counter()
        due_sys = engine.is_logging_rank and self.sys_every_s > 0 and now - self.last_sys >= self.sys_every_s
        corrupt = float(getattr(loader, "corrupt_count", 0))
        vec = torch.tensor([float(self.sums[k]) / self.steps for k in keys] + [corrupt, float(due_sys)],
                           dtype=torch.float64)
        vec = engine.all_reduce_sum(vec)
        logs = {f"train/{k}": float(vec[i]) / engine.world_size for i, k in enumerate(keys)}
        if self.grad_norm is not None:  # global: the same on every rank
            logs["train/grad_norm"] = self.grad_norm
        # samples skipped as corrupt (data.on_corrupt=skip), all ranks, since this process started
        logs["train/corrupt_skipped"] = float(vec[-2])
        timed = self.timed_steps or self.steps  # a window of only the first step: its own time
        steps_per_s = timed / max(now - self.start, 1e-9)
        logs.update({"train/lr": engine.lr,
                     "train/samples_per_s": steps_per_s * self.samples_per_step,
                     "train/data_wait_s": (wait_s - self.wait_start) / self.steps,
                     "train/epoch": float(loader.epoch)})
        metrics = dict(logs)
        if vec[-1] > 0:
            metrics.update(system_metrics(engine))
            self.last_sys = now
        self.send(metrics, step)
        self.latest = logs
        log.info("step %d/%d loss %.5f lr %.3g %.1f samples/s, ETA %s", step, self.total, logs["train/loss"],
                 engine.lr, logs["train/samples_per_s"], _duration((self.total - step) / steps_per_s))
        self._reset(wait_s)
