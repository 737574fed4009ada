""":class:`Engine`: the one small interface the loop speaks, identical for every strategy.

The loop uses only these verbs (setup, train, to_device, accumulate, forward, backward, step,
collectives, save/load/export), so one loop runs unchanged under every strategy:

* ``single``    one process, plain module.
* ``ddp``       ``DistributedDataParallel``; ``no_sync`` on accumulation micro-steps.
* ``fsdp``      FSDP2 ``fully_shard`` on each top-level part of the task's ``ModuleDict``,
                then on the root; gradient sync switched off on accumulation micro-steps.
* ``deepspeed`` ZeRO stage 1 / 2 / 3 (optional CPU offload) with a JSON config generated from
                our config; optimizer and scheduler are the objects ``trainer.optim`` and
                ``trainer.schedules`` build, so every strategy optimises identically.

The engine holds the process group (:class:`~trainer.engine.core.ProcessGroup`) and one
backend chosen by strategy (:mod:`~trainer.engine.native` or
:mod:`~trainer.engine.deepspeed_backend`), and delegates every strategy-dependent verb to it.
"""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from trainer.distributed import DistEnv, dist_env
from data_shards.atomic import atomic_save
from trainer.engine import core
from trainer.engine.core import PRECISIONS, STRATEGIES, Backend, ProcessGroup, Setting, TaskModule
from trainer.engine.deepspeed_backend import DeepSpeedBackend, deepspeed_config
from trainer.engine.native import NativeBackend

#: the backend class of each ``parallel.strategy``
BACKENDS: dict[str, type[Backend]] = {"single": NativeBackend, "ddp": NativeBackend, "fsdp": NativeBackend,
                                      "deepspeed": DeepSpeedBackend}


def check_settings(parallel: Any, optim: Any, micro_batch_size: int, env: DistEnv) -> str:
    """The strategy, after refusing what the engine cannot run: an unknown strategy, precision or
    process-group backend, an accumulation count < 1, the strategy family's own limits (DeepSpeed:
    ZeRO stage, fp16). Touches no device and starts no process group, so ``python -m launch run``
    calls it before torchrun (preflight) with the job's world size."""
    strategy = str(parallel.strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if parallel.precision not in PRECISIONS:
        raise ValueError(f"parallel.precision={parallel.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if int(optim.grad_accum) < 1:
        raise ValueError(f"optim.grad_accum={optim.grad_accum}: must be >= 1")
    core.check_backend(str(parallel.backend))
    BACKENDS[strategy].check(parallel, env)
    if strategy == "deepspeed":
        deepspeed_config(parallel, optim, micro_batch_size)  # refuses a ZeRO stage it has not
    return strategy


class Engine:
    """Process group, device, precision and strategy for one rank; see the module docstring.

    ``total_steps`` sizes the lr schedule; ``micro_batch_size`` is the per-rank batch (DeepSpeed
    needs it in its config).
    """

    def __init__(self, parallel: Any, optim: Any, schedule: Any, total_steps: int, *,
                 micro_batch_size: int = 1, env: Optional[DistEnv] = None) -> None:
        self.pcfg, self.ocfg, self.scfg = parallel, optim, schedule
        self.total_steps = int(total_steps)
        self.micro_batch_size = int(micro_batch_size)
        self.env = env or dist_env()
        self.strategy = check_settings(parallel, optim, self.micro_batch_size, self.env)
        self.grad_accum = int(optim.grad_accum)
        self.device = core.pick_device(parallel.backend, self.env)
        backend_cls = BACKENDS[self.strategy]
        self.autocast_dtype = PRECISIONS[parallel.precision]
        self.group = ProcessGroup(self.env, self.device)
        self.group.start(needed=self.strategy != "single")
        self._backend = backend_cls(Setting(parallel, optim, schedule, self.total_steps, self.micro_batch_size,
                                            self.env, self.device, self.group))
        self.root: Optional[TaskModule] = None
        self._micro_last = True

    # ------------------------------------------------------------------ set-up
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_logging_rank(self) -> bool:
        return self.env.is_logging_rank

    @property
    def model(self) -> Optional[nn.Module]:
        """The module to call: the root, or its DDP / DeepSpeed wrapper."""
        return self._backend.model

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self._backend.optimizer

    @property
    def scheduler(self) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        return self._backend.scheduler

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The fp16 grad scaler of the native strategies (None otherwise)."""
        return self._backend.scaler

    def setup(self, model: nn.ModuleDict,
              param_groups: Optional[Callable[[nn.Module], list[dict[str, Any]]]] = None) -> nn.Module:
        """Move, convert and wrap the task's plain model; build optimizer + scheduler (+ scaler).

        ``param_groups(parts)`` is called after sharding (FSDP2 replaces the parameters);
        default: every trainable parameter. Returns the module to call (see :meth:`forward`).
        """
        self.root = core.prepare_root(model, self.pcfg, self.device)
        return self._backend.setup(self.root, param_groups or core.all_trainable)

    @property
    def parts(self) -> nn.ModuleDict:
        """The task's plain ``ModuleDict`` (parameters may be sharded) for ``on_train_mode`` etc."""
        assert self.root is not None, "engine.setup() has not been called"
        return self.root.parts

    # ------------------------------------------------------------------ step verbs
    def train(self, mode: bool = True) -> None:
        """Train / eval mode on the wrapped model."""
        assert self.model is not None
        self.model.train(mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32 and under DeepSpeed,
        which applies its own precision)."""
        return self._backend.autocast()

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(parts, *args)`` through the wrapped model, under autocast (e.g. a training step)."""
        assert self.model is not None, "engine.setup() has not been called"
        with self.autocast():
            return self.model(fn, *args)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch's tensors to this rank's device (channels_last for 4-D float images)."""
        return core.batch_to_device(batch, self.device, core.wants_channels_last(self.pcfg))

    @contextlib.contextmanager
    def accumulate(self, micro_step: int) -> Iterator[None]:
        """Context for micro-batch ``micro_step`` of ``grad_accum``: gradients are synchronised
        across ranks only on the last one (DDP ``no_sync``, FSDP2 requires_gradient_sync)."""
        last = (micro_step % self.grad_accum) == self.grad_accum - 1
        self._micro_last = last
        with self._backend.accumulate(last):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (averaged over ``grad_accum`` micro-batches)."""
        self._backend.backward(loss, self._micro_last)

    def step(self, want_norm: bool = True) -> float | None:
        """Clip, optimizer step, scheduler step, zero grads; returns the pre-clip global grad norm, or
        None when ``want_norm`` is False (the loop asks on log steps only: the norm is a pass over every
        gradient and, on a GPU, a host sync). Collective under FSDP: every rank passes the same value."""
        return self._backend.step(want_norm)

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (returned on its original device and dtype)."""
        return self.group.all_reduce_sum(tensor)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable Python objects of our own making)."""
        return self.group.broadcast_object(obj, src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return self.group.all_gather_object(obj)

    def barrier(self) -> None:
        """Wait for every rank."""
        self.group.barrier()

    # ------------------------------------------------------------------ state
    def save_state(self, directory: str | Path) -> None:
        """Write model + optimizer + scheduler (+ scaler) into ``directory`` (collective; the
        directory must be visible to every rank, e.g. a shared file system)."""
        self._backend.save(Path(directory))

    def stage_state(self, directory: str | Path) -> Callable[[], None]:
        """What :meth:`save_state` writes, copied now into CPU memory (a snapshot: later steps do not
        change it); the function returned writes it into ``directory`` and may run on a background
        thread while training goes on: its collectives use :meth:`background_group`. Collective."""
        return self._backend.stage(Path(directory))

    @property
    def stage_times(self) -> dict[str, float]:
        """The last :meth:`stage_state`'s parts: seconds (``state_s``, ``copy_s``...) and ``bytes`` this rank copied."""
        return dict(self._backend.stage_times)

    def background_group(self) -> ProcessGroup:
        """Collectives for a background thread (the asynchronous checkpoint): a second group over the
        same ranks, made on first use (collective)."""
        return self.group.background()

    def load_state(self, directory: str | Path, saved_world_size: Optional[int] = None) -> None:
        """Restore what :meth:`save_state` wrote by ``saved_world_size`` ranks (None: this many).
        DCP reshards to this world size; DeepSpeed's per-rank ZeRO shards are first converted to
        its universal format (once, by rank 0, kept beside them), which any world size loads."""
        self._backend.load(Path(directory), saved_world_size)

    def rank_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's own module buffers on CPU, for its rank file (see :func:`core.rank_buffers`)."""
        return core.rank_buffers(self.root)

    def load_rank_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`rank_buffers` (after :meth:`load_state`, same world size only)."""
        core.load_rank_buffers(self.root, buffers)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The task ``ModuleDict``'s full state_dict on CPU, gathered from shards; complete on
        rank 0 (other ranks may get an empty dict). Collective: call on every rank."""
        prefix = "parts."
        full = self._backend.full_state_dict()
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def export_weights(self, path: str | Path) -> Optional[Path]:
        """Write the plain model state_dict (``torch.load(path, weights_only=True)``-loadable
        into the task's ``build_model()``) atomically from rank 0. Collective."""
        sd = self.full_state_dict()
        out = None
        if self.is_logging_rank:
            out = atomic_save(path, lambda tmp: torch.save(sd, tmp), mkdir=True)
        self.barrier()
        return out

    def describe(self) -> dict[str, Any]:
        """Flat summary for logs / tracking params."""
        return {"strategy": self.strategy, "world_size": self.world_size, "device": str(self.device),
                "precision": self.pcfg.precision, "grad_accum": self.grad_accum, **self._backend.describe()}

    def abandon_group(self) -> None:
        """After a failure on this rank: do not wait for peers at :meth:`close` (they may never
        reach the barrier); the process group is left to process exit."""
        self.group.abandon()

    def close(self) -> None:
        """Release the backend (DeepSpeed's engine, its ZeRO-3 hooks and threads) and tear down
        the process group if this engine created it."""
        # Drop every reference to the wrapped model and optimizer (FSDP2's mesh keeps the gloo
        # group and its worker threads alive) and collect them while the interpreter is whole:
        # otherwise the group's threads can be torn down during interpreter finalisation and
        # abort the process ("terminate called without an active exception") after a good run.
        self._backend.close()
        self.root = None
        gc.collect()
        self.group.close()
