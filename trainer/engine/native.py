"""The native PyTorch family: ``single`` (plain module), ``ddp`` (``DistributedDataParallel``)
and ``fsdp`` (FSDP2 ``fully_shard``), with torch autocast + grad scaler for mixed precision and
``torch.distributed.checkpoint`` (DCP) for model + optimizer state.

:func:`parallelize` is applied to the root that :func:`trainer.engine.core.prepare_root` made
(device, channels_last, compile, already in that order), so the whole order is fixed:
device -> layout -> compile -> data parallelism (FSDP2: each part, then the root; DDP: the root).
"""
from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from trainer.distributed import DistEnv
from trainer.checkpointing import slow_storage
from trainer.engine.dcp_share import local_bytes, own_share, rewrap_shards, unwrap_shards
from trainer.engine.core import (PRECISIONS, Backend, GroupsFn, ProcessGroup, TaskModule, cpu_stager,
                                 quiet_single_process, silence_single_process_warning)
from trainer.optim import build_optimizer
from trainer.checkpointing.safe_dcp import SafeFileSystemReader, check_metadata
from trainer.schedules import build_scheduler

#: name of the torch.distributed.checkpoint folder inside a checkpoint directory
DCP_DIR = "dcp"
#: small replicated training state (scheduler, scaler) written by rank 0
ENGINE_STATE_FILE = "engine_state.pt"


def _fully_shard(root: TaskModule) -> nn.Module:
    """FSDP2: each top-level part with parameters, then the root; fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for part in root.parts.values():
        if any(True for _ in part.parameters()):
            fully_shard(part, mp_policy=mp)
    fully_shard(root, mp_policy=mp)
    return root


def _replicate(root: TaskModule, pcfg: Any, device: torch.device) -> nn.Module:
    """DDP around the root (gradient all-reduce in backward)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(root, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=bool(pcfg.find_unused_parameters))


def parallelize(root: TaskModule, pcfg: Any, device: torch.device) -> nn.Module:
    """The data-parallel step of the fixed order for ``pcfg.strategy``; returns the module to call
    (the root itself for ``single`` and FSDP2, which shards in place; a DDP wrapper for ``ddp``)."""
    strategy = str(pcfg.strategy)
    if strategy == "fsdp":
        return _fully_shard(root)
    if strategy == "ddp":
        return _replicate(root, pcfg, device)
    if strategy == "single":
        return root
    raise ValueError(f"parallel.strategy={strategy!r} is not a native strategy (single, ddp, fsdp)")


def is_fsdp(model: Optional[nn.Module]) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_ddp(model: Optional[nn.Module]) -> bool:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(model, DDP)


def grad_scaler(pcfg: Any, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 only: FSDP2 gets a ShardedGradScaler (all-reduces found-inf so every shard skips the
    same steps), the others torch's GradScaler; None for fp32 / bf16."""
    if pcfg.precision != "fp16":
        return None
    if str(pcfg.strategy) == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


class NativeBackend(Backend):
    """single / DDP / FSDP2: our optimizer, scheduler and scaler driven directly."""

    @staticmethod
    def check(pcfg: Any, env: DistEnv) -> None:
        if str(pcfg.strategy) == "single" and env.world_size > 1:
            raise ValueError(f"parallel.strategy=single but WORLD_SIZE={env.world_size}: "
                             "pick ddp, fsdp or a zero stage for multi-process runs")

    def __init__(self, setting: Any) -> None:
        super().__init__(setting)
        self._stager: Any = None

    def setup(self, root: TaskModule, groups_fn: GroupsFn) -> nn.Module:
        s = self.s
        self.root = root
        self.model = parallelize(root, s.pcfg, s.device)
        self.optimizer = build_optimizer(groups_fn(root.parts), s.ocfg)
        self.scheduler = build_scheduler(self.optimizer, s.scfg, s.total_steps)
        self.scaler = grad_scaler(s.pcfg, s.device)
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.s.pcfg.precision]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.s.device.type, dtype=dtype)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP: ``no_sync`` off the last micro-batch; FSDP2: ``set_requires_gradient_sync(last)``."""
        if is_ddp(self.model) and not last:
            return self.model.no_sync()  # type: ignore[union-attr]
        if is_fsdp(self.model):
            self.model.set_requires_gradient_sync(last)  # type: ignore[union-attr]
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss = loss / int(self.s.ocfg.grad_accum)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, want_norm: bool = True) -> float | None:
        assert self.optimizer is not None and self.scheduler is not None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # the norm is a pass over every gradient (memory-bound: ~11 ms for 27 M parameters on one CPU core)
        # and float() a host sync on a GPU: computed only when clipping needs it or the caller logs it
        norm = None
        if params and (want_norm or self.s.ocfg.clip_grad_norm):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if self.s.ocfg.clip_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(params, float(self.s.ocfg.clip_grad_norm), norm)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not want_norm:
            return None
        return float(norm) if norm is not None else 0.0

    # ------------------------------------------------------------------ state
    def save(self, directory: Path) -> None:
        """Model + optimizer through DCP (sharded, reshardable); scheduler + scaler by rank 0."""
        with quiet_single_process():
            self._write(self._state(), self._extra(), directory, self.s.group)

    def stage(self, directory: Path) -> Callable[[], None]:
        """:meth:`save`'s state copied now into CPU memory by DCP's stager (buffers reused from one
        checkpoint to the next); the function returned writes the copy with DCP on the background group."""
        t0 = time.perf_counter()
        if self._stager is None:
            self._stager = cpu_stager()
            if not self.s.group.active:
                silence_single_process_warning()
        state, shards = unwrap_shards(self._state())
        t1 = time.perf_counter()
        staged, extra = self._stager.stage(state), copy.deepcopy(self._extra())
        t2 = time.perf_counter()
        group = self.s.group.background()
        self.stage_times = {"state_s": t1 - t0, "copy_s": t2 - t1, "group_s": time.perf_counter() - t2,
                            "bytes": float(local_bytes(state))}
        return lambda: self._write(rewrap_shards(staged, shards), extra, directory, group)

    def _state(self) -> dict[str, Any]:
        """This rank's share of the model and optimizer state (:mod:`trainer.engine.dcp_share`): what it
        writes, so what it stages; rank 0's module buffers, without a collective."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        buffers = {("model", name) for name, _ in self.root.named_buffers()}
        world = self.s.env.world_size if self.s.group.active else 1
        return own_share({"model": msd, "optim": osd}, self.s.env.rank, world, buffers)

    def _extra(self) -> Optional[dict[str, Any]]:
        """Scheduler and scaler state, on rank 0 (None elsewhere)."""
        if not self.s.env.is_logging_rank:
            return None
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    @staticmethod
    def _write(state: dict[str, Any], extra: Optional[dict[str, Any]], directory: Path, group: ProcessGroup) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=slow_storage.dcp_writer(directory / DCP_DIR), process_group=group.handle)
        if extra is not None:
            slow_storage.torch_save(extra, directory / ENGINE_STATE_FILE)

    def load(self, directory: Path, saved_world_size: Optional[int]) -> None:
        """DCP reshards to this world size by itself, so ``saved_world_size`` is not needed. The
        metadata is checked before DCP unpickles it (a checkpoint folder is data)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        with quiet_single_process():
            check_metadata(directory / DCP_DIR)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(directory / DCP_DIR)))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(directory / ENGINE_STATE_FILE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra.get("scaler") is not None:
            self.scaler.load_state_dict(extra["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """FSDP2 gathers the shards (rank 0 complete, CPU); otherwise the root's own copy."""
        if is_fsdp(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().to("cpu", copy=True) for k, v in self.root.state_dict().items()}

    def close(self) -> None:
        """Release the stager's CPU copies too."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        super().close()

    def __repr__(self) -> str:
        return f"NativeBackend({self.s.pcfg.strategy})"

