"""The DeepSpeed family: ZeRO stage 1 / 2 / 3 (optional CPU offload) with a JSON config generated
from our config (never hand-kept); the optimizer and scheduler are the objects ``trainer.optim``
and ``trainer.schedules`` build, so every strategy optimises identically.

State goes through DeepSpeed's own ``save_checkpoint`` under the tag :data:`DS_TAG`; resuming on
another world size first converts it to DeepSpeed's universal format (:data:`DS_UNIVERSAL_TAG`).
``deepspeed`` itself is imported only when a DeepSpeed engine is built, converted or gathered.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import nn

from trainer.checkpointing import slow_storage
from trainer.distributed import DistEnv
from trainer.engine.core import Backend, GroupsFn, TaskModule, cpu_stager, log
from trainer.optim import build_optimizer
from trainer.schedules import build_scheduler

#: name of the DeepSpeed checkpoint tag inside a checkpoint directory
DS_TAG = "deepspeed"
#: DS_TAG converted to DeepSpeed's universal format (made on demand, to resume on another world size)
DS_UNIVERSAL_TAG = "deepspeed_universal"
DS_FP16_REFUSED = (
    "parallel.precision=fp16 is not supported with DeepSpeed: its fp16 mode makes the parameters fp16 while "
    "the tasks build fp32 tensors (the mismatch that broke its bf16 mode, found on CPU), and its torch-autocast "
    "mode has no loss scaling under ZeRO. Use parallel.precision=bf16, or parallel=fsdp with fp16 "
    "(autocast + ShardedGradScaler)")


def deepspeed_config(pcfg: Any, ocfg: Any, micro_batch_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config generated from our parallel / optim config (never hand-kept)."""
    if pcfg.precision == "fp16":
        raise ValueError(DS_FP16_REFUSED)
    stage = int(pcfg.zero_stage)
    if stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={stage}: DeepSpeed needs a ZeRO stage of 1, 2 or 3")
    zero: dict[str, Any] = {"stage": stage}
    if pcfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(ocfg.grad_accum),
        "gradient_clipping": float(ocfg.clip_grad_norm),
        "zero_optimization": zero,
        # our optimizer object (AdamW / Adam / SGD from trainer.optim) is used as given
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if pcfg.precision == "bf16":
        # torch autocast inside DeepSpeed's forward, fp32 parameters and optimizer state: the same
        # numerics as the other strategies (DeepSpeed's "bf16" mode would make the parameters
        # bf16 and feed them our fp32 batches). Conv / linear gradients are reduced in bf16.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


def to_universal(directory: Path, saved_world_size: int, world_size: int) -> None:
    """Convert ``directory/DS_TAG`` into ``directory/DS_UNIVERSAL_TAG`` with DeepSpeed's
    ds_to_universal, atomically (a temporary folder, then a rename). One process; raises on failure."""
    from deepspeed.checkpoint import ds_to_universal

    target = directory / DS_UNIVERSAL_TAG
    tmp = directory / f".{DS_UNIVERSAL_TAG}.tmp{os.getpid()}"
    args = SimpleNamespace(input_folder=str(directory / DS_TAG), output_folder=str(tmp),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                           strict=True, inject_missing_state=True)
    log.info("converting %s (%d ranks) to DeepSpeed's universal format for %d ranks",
             directory / DS_TAG, saved_world_size, world_size)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("universal checkpoint ready: %s", target)


class _StagingEngine:
    """A DeepSpeed checkpoint engine that stages: ``save(state_dict, path)`` keeps a CPU copy of the
    state dict for :meth:`write` (DeepSpeed's other calls: directories now, nothing to commit)."""

    name = "GeoprimeStagingEngine"

    def __init__(self, stager: Any, zipfile_serialization: bool) -> None:
        self.stager, self.zipfile_serialization = stager, bool(zipfile_serialization)
        self.staged: list[tuple[str, Any]] = []

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.staged.append((path, self.stager.stage(state_dict)))

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return True

    def write(self) -> None:
        """Every staged file, as DeepSpeed's torch engine writes it (``torch.save``), at the hook's rate."""
        for path, state in self.staged:
            slow_storage.torch_save(state, Path(path), zipfile=self.zipfile_serialization)
        self.staged.clear()


class DeepSpeedBackend(Backend):
    """ZeRO 1 / 2 / 3 through ``deepspeed.initialize``; DeepSpeed applies its own precision
    (torch autocast inside its forward for bf16), accumulation and clipping."""

    def __init__(self, setting: Any) -> None:
        super().__init__(setting)
        self.ds: Any = None
        self._stager: Any = None

    @staticmethod
    def check(pcfg: Any, env: DistEnv) -> None:
        if pcfg.precision == "fp16":
            raise ValueError(DS_FP16_REFUSED)

    def config(self) -> dict[str, Any]:
        return deepspeed_config(self.s.pcfg, self.s.ocfg, self.s.micro_batch_size)

    def setup(self, root: TaskModule, groups_fn: GroupsFn) -> nn.Module:
        s = self.s
        if s.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed insists on LOCAL_RANK, which only a launcher sets; a plain one-process run has none
        os.environ.setdefault("LOCAL_RANK", str(s.env.local_rank))
        import deepspeed

        optimizer = build_optimizer(groups_fn(root.parts), s.ocfg, allow_fused=False)
        scheduler = build_scheduler(optimizer, s.scfg, s.total_steps)
        ds, opt, _, sched = deepspeed.initialize(model=root, optimizer=optimizer, lr_scheduler=scheduler,
                                                 config=self.config(), dist_init_required=False)
        self.root, self.ds, self.model, self.optimizer, self.scheduler = root, ds, ds, opt, sched
        return ds

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.ds.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
        if not last:
            self.ds.step()  # only advances DeepSpeed's micro-step counter off the boundary

    def step(self, want_norm: bool = True) -> float | None:
        self.ds.step()
        if not want_norm:
            return None
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ state
    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state={}, save_latest=False)

    def stage(self, directory: Path) -> Callable[[], None]:
        """DeepSpeed's own ``save_checkpoint`` with its checkpoint engine swapped, for this one call, for
        :class:`_StagingEngine`, which keeps a CPU copy of each file's state dict instead of writing it;
        the function returned writes those copies. (DeepSpeed's asynchronous engines need its NVMe
        async-I/O op or an external package; its engine attribute is the hook it offers.)"""
        t0 = time.perf_counter()
        if self._stager is None:
            self._stager = cpu_stager()
        real = self.ds.checkpoint_engine
        staging = _StagingEngine(self._stager, getattr(real, "zipfile_serialization", True))
        self.ds.checkpoint_engine = staging
        try:
            self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state={}, save_latest=False)
        finally:
            self.ds.checkpoint_engine = real
        self.stage_times = {"copy_s": time.perf_counter() - t0}  # DeepSpeed's clones and the stager's copies
        return staging.write

    def load(self, directory: Path, saved_world_size: Optional[int]) -> None:
        """DeepSpeed's per-rank ZeRO shards load only on the world size that wrote them; from
        another one they are first converted to the universal format (:meth:`_universal_tag`)."""
        tag = DS_TAG
        universal = saved_world_size is not None and int(saved_world_size) != self.s.env.world_size
        if universal:
            tag = self._universal_tag(directory, int(saved_world_size))
        config = self.ds._config  # load_universal is read at load time; no public setter
        config.load_universal_checkpoint = universal
        try:
            path, _ = self.ds.load_checkpoint(str(directory), tag=tag)
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}/{tag}")

    def _universal_tag(self, directory: Path, saved_world_size: int) -> str:
        """Rank 0 converts once (reused if already there) and every rank hears of a failure, or
        the others would wait forever. Collective; returns the tag to load."""
        env = self.s.env
        err: Optional[str] = None
        if env.is_logging_rank and not (directory / DS_UNIVERSAL_TAG).is_dir():
            try:
                to_universal(directory, saved_world_size, env.world_size)
            except Exception as e:
                err = (f"converting DeepSpeed checkpoint {directory / DS_TAG} ({saved_world_size} ranks) to the "
                       f"universal format for {env.world_size} ranks failed: {type(e).__name__}: {e}")
        err = self.s.group.broadcast_object(err)
        if err:
            raise RuntimeError(err)
        return DS_UNIVERSAL_TAG

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """ZeRO-3 parameters gathered on every rank for the copy (a no-op for stages 1 / 2)."""
        import deepspeed

        root = self.ds.module
        with deepspeed.zero.GatheredParameters(list(root.parameters()), modifier_rank=None):
            return {k: v.detach().to("cpu", copy=True) for k, v in root.state_dict().items()}

    def describe(self) -> dict[str, Any]:
        return {"deepspeed_config": json.dumps(self.config())}

    def close(self) -> None:
        """Release DeepSpeed's engine (its ZeRO-3 hooks and threads)."""
        if self.ds is not None:
            self.ds.destroy()
            self.ds = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        super().close()
