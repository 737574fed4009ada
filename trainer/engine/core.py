"""What every backend shares: the process group and its collectives, the device, precision,
the task's root module and its per-rank buffers, and the :class:`Backend` contract.

Nothing here knows a parallel strategy: :mod:`trainer.engine.native` (single / DDP / FSDP2)
and :mod:`trainer.engine.deepspeed_backend` implement :class:`Backend`, and
:class:`trainer.engine.facade.Engine` picks one by ``parallel.strategy`` and delegates.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.distributed import DistEnv

log = logging.getLogger("geoprime.engine")

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: ``param_groups(parts)`` -> optimizer parameter groups (called after sharding)
GroupsFn = Callable[[nn.Module], list[dict[str, Any]]]


def all_trainable(parts: nn.Module) -> list[dict[str, Any]]:
    """The default parameter groups: one group with every trainable parameter."""
    return [{"params": [p for p in parts.parameters() if p.requires_grad]}]


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def silence_single_process_warning() -> None:
    """Ignore DCP's "assuming the intent is to save in a single process" for good: a background
    thread cannot use :func:`quiet_single_process` (``warnings.catch_warnings`` swaps the process's
    filters under the other threads)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def cpu_stager() -> Any:
    """DCP's stager: deep copies of state dicts with every tensor in CPU memory (pinned, and copied
    without blocking, where a GPU is), reusing its buffers from one checkpoint to the next."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    gpu = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=gpu))


class TaskModule(nn.Module):
    """Root module wrapping the task's ``ModuleDict``: ``forward(fn, *args) = fn(parts, *args)``.

    Tasks call their parts directly (``model["encoder"](x)``); routing every call through this
    root's ``forward`` is what lets DDP prepare gradient sync, FSDP2 gather the root and
    DeepSpeed run its hooks, without the task knowing any of them.
    """

    def __init__(self, parts: nn.ModuleDict) -> None:
        super().__init__()
        self.parts = parts

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.parts, *args)


def check_backend(backend: str) -> None:
    """Refuse an unknown ``parallel.backend``, or nccl where no CUDA GPU is visible."""
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.backend={backend!r}: expected auto, nccl or gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl needs CUDA GPUs; none is visible (use gloo on CPU)")


def pick_device(backend: str, env: DistEnv) -> torch.device:
    """This rank's device for ``parallel.backend`` (auto / nccl / gloo); selects the CUDA device."""
    check_backend(backend)
    if torch.cuda.is_available() and backend != "gloo":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def wants_channels_last(pcfg: Any) -> bool:
    """``parallel.channels_last``, its auto value (None) resolved: on for single and DDP only."""
    value = getattr(pcfg, "channels_last", None)
    return bool(value) if value is not None else pcfg.strategy in ("single", "ddp")


def prepare_root(model: nn.ModuleDict, pcfg: Any, device: torch.device) -> TaskModule:
    """The first, strategy-independent steps, always in this order: move to ``device``, convert
    to channels_last (``parallel.channels_last``), compile each part (``parallel.compile``), wrap
    the parts in a :class:`TaskModule`. A backend then parallelizes the returned root."""
    if not isinstance(model, nn.ModuleDict):
        raise TypeError(f"engine.setup expects the task's nn.ModuleDict, got {type(model).__name__}")
    model = model.to(device)
    if wants_channels_last(pcfg):
        model = model.to(memory_format=torch.channels_last)
    if pcfg.compile:
        for part in model.values():
            part.compile()
    return TaskModule(model)


def batch_to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """A batch's tensors on ``device`` (channels_last for 4-D float images when asked)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def rank_buffers(root: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's own module buffers (BatchNorm running statistics...) on CPU, for its rank
    file: restoring each rank's own is what makes a resumed run bit-equal to an uninterrupted
    one (DDP broadcasts rank 0's at each forward; FSDP2 and DeepSpeed never sync them)."""
    return {name: b.detach().to("cpu", copy=True) for name, b in root.named_buffers()}


def load_rank_buffers(root: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Restore :func:`rank_buffers` into ``root`` (same module structure required)."""
    own = dict(root.named_buffers())
    if own.keys() != buffers.keys():
        raise ValueError(f"rank buffers do not match the model: missing {sorted(own.keys() - buffers.keys())}, "
                         f"unexpected {sorted(buffers.keys() - own.keys())}")
    with torch.no_grad():
        for name, b in own.items():
            b.copy_(buffers[name].to(b.device))


class ProcessGroup:
    """The default ``torch.distributed`` group as this engine sees it: created here when needed
    (and then destroyed at :meth:`close`), and the collectives the loop and the backends use.
    Every collective is the identity when no group exists (a plain single-process run)."""

    def __init__(self, env: DistEnv, device: torch.device, handle: Any = None) -> None:
        self.env, self.device = env, device
        self.owned = False
        self.handle = handle
        """None: the default group; else the group :meth:`background` made (every collective passes it)."""
        self._background: Optional[ProcessGroup] = None

    def start(self, needed: bool) -> None:
        """Join (or create) the process group: torchrun's when distributed, else, if ``needed``
        (a strategy other than single run as one plain process), a private one-rank group."""
        if dist.is_initialized() or not (needed or self.env.distributed):
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.env.restart_count and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
            log.warning("elastic restart %d with torchrun's shared rendezvous store: if the process group "
                        "fails to connect, launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                        "(pytorch/pytorch#135712)", self.env.restart_count)
        if self.env.distributed:
            dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.owned = True
        log.info("process group %s: rank %d of %d on %s", backend, self.env.rank, self.env.world_size, self.device)

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def background(self) -> "ProcessGroup":
        """A second gloo group over the same ranks, for collectives made on a background thread (the
        asynchronous checkpoint's): on their own group they never interleave with the training
        thread's. Made on first use: collective, every rank calls it at the same point."""
        if self._background is None:
            handle = dist.new_group(backend="gloo") if self.active else None
            self._background = ProcessGroup(self.env, torch.device("cpu"), handle)
        return self._background

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (returned on its original device and dtype)."""
        if not self.active:
            return tensor
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = tensor.detach().to(dev).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.handle)
        return t.to(tensor.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable Python objects of our own making)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.handle)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj, group=self.handle)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier(group=self.handle)

    def abandon(self) -> None:
        """Do not wait for peers at :meth:`close` (after a failure on this rank they may never
        reach the barrier); the group is left to process exit."""
        self.owned = False

    def close(self) -> None:
        """Barrier, then destroy the group, if this object created it."""
        if self.owned and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
                gc.collect()
        self.owned = False
        self._background = None


@dataclass
class Setting:
    """What a backend is built from: the configs, run size and this rank's place."""
    pcfg: Any
    ocfg: Any
    scfg: Any
    total_steps: int
    micro_batch_size: int
    env: DistEnv
    device: torch.device
    group: ProcessGroup


class Backend:
    """The contract of one strategy family. :meth:`setup` fills ``model`` (what to call),
    ``optimizer``, ``scheduler`` and, for fp16 under native strategies, ``scaler``."""

    def __init__(self, setting: Setting) -> None:
        self.s = setting
        self.root: Optional[TaskModule] = None
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.stage_times: dict[str, float] = {}
        """The last :meth:`stage`'s parts, what the training thread waited for (``*_s``: seconds; ``bytes``:
        what this rank copied), by the backend's names."""

    @staticmethod
    def check(pcfg: Any, env: DistEnv) -> None:
        """Refuse a configuration this family cannot run (before any process group exists)."""

    def setup(self, root: TaskModule, groups_fn: GroupsFn) -> nn.Module:
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch; ``last``: gradients are synchronised after it."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def step(self, want_norm: bool = True) -> float | None:
        """Optimizer step; the pre-clip global grad norm when ``want_norm`` (else None)."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def stage(self, directory: Path) -> Callable[[], None]:
        """Snapshot what :meth:`save` writes, now, into CPU memory; the function returned writes that
        snapshot into ``directory`` later, on a background thread, while training goes on (its
        collectives on ``group.background()``). Collective."""
        raise NotImplementedError

    def load(self, directory: Path, saved_world_size: Optional[int]) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The root's full state_dict on CPU (complete on rank 0); keys start with ``parts.``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Backend-specific entries for :meth:`Engine.describe`."""
        return {}

    def close(self) -> None:
        """Release what the backend holds (the facade then collects and closes the group)."""
        self.model = self.root = self.optimizer = self.scheduler = self.scaler = None
