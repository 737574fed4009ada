"""The training engine: the ONLY module that knows DDP, FSDP2 and DeepSpeed.

The loop speaks only the verbs of :class:`Engine` (forward, accumulate, backward, step,
collectives, save/load/export), so one loop runs unchanged under every strategy:

* ``single``    one process, plain module.
* ``ddp``       ``DistributedDataParallel``; ``no_sync`` on accumulation micro-steps.
* ``fsdp``      FSDP2 ``fully_shard`` on each top-level part of the task's ``ModuleDict``,
                then on the root; gradient sync switched off on accumulation micro-steps.
* ``deepspeed`` ZeRO stage 1 / 2 / 3 (optional CPU offload) with a JSON config generated from
                our config; optimizer and scheduler are the objects ``trainer.optim`` and
                ``trainer.schedules`` build, so every strategy optimises identically.

Model state: single / ddp / fsdp save model + optimizer with ``torch.distributed.checkpoint``
(sharded, reshardable to another world size); DeepSpeed with its own ``save_checkpoint``.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.distributed import DistEnv, dist_env
from trainer.optim import build_optimizer
from trainer.safe_dcp import SafeFileSystemReader, check_metadata
from trainer.schedules import build_scheduler

log = logging.getLogger("geoprime.engine")

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: name of the DeepSpeed checkpoint tag inside a checkpoint directory
DS_TAG = "deepspeed"
#: DS_TAG converted to DeepSpeed's universal format (made on demand, to resume on another world size)
DS_UNIVERSAL_TAG = "deepspeed_universal"
#: name of the torch.distributed.checkpoint folder inside a checkpoint directory
DCP_DIR = "dcp"
#: small replicated training state (scheduler, scaler) written by rank 0
ENGINE_STATE_FILE = "engine_state.pt"
DS_FP16_REFUSED = (
    "parallel.precision=fp16 is not supported with DeepSpeed: its fp16 mode makes the parameters fp16 while "
    "the tasks build fp32 tensors (the mismatch that broke its bf16 mode, found on CPU), and its torch-autocast "
    "mode has no loss scaling under ZeRO. Use parallel.precision=bf16, or parallel=fsdp with fp16 "
    "(autocast + ShardedGradScaler)")


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
        self.strategy = str(parallel.strategy)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy={self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if parallel.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision={parallel.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if int(optim.grad_accum) < 1:
            raise ValueError(f"optim.grad_accum={optim.grad_accum}: must be >= 1")
        self.grad_accum = int(optim.grad_accum)
        self.device = self._pick_device()
        if parallel.precision == "fp16" and self.strategy == "deepspeed":
            raise ValueError(DS_FP16_REFUSED)
        if self.strategy == "single" and self.env.world_size > 1:
            raise ValueError(f"parallel.strategy=single but WORLD_SIZE={self.env.world_size}: "
                             "pick ddp, fsdp or a zero stage for multi-process runs")
        self.autocast_dtype = PRECISIONS[parallel.precision]
        self._owns_group = False
        self._init_process_group()
        self.model: Optional[nn.Module] = None
        self.root: Optional[TaskModule] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self._ds = None
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

    def _pick_device(self) -> torch.device:
        backend = self.pcfg.backend
        if backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend={backend!r}: expected auto, nccl or gloo")
        if torch.cuda.is_available() and backend != "gloo":
            torch.cuda.set_device(self.env.local_rank)
            return torch.device("cuda", self.env.local_rank)
        if backend == "nccl":
            raise ValueError("parallel.backend=nccl needs CUDA GPUs; none is visible (use gloo on CPU)")
        return torch.device("cpu")

    def _init_process_group(self) -> None:
        if dist.is_initialized():
            return
        if self.strategy == "single" and not self.env.distributed:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.env.restart_count and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
            log.warning("elastic restart %d with torchrun's shared rendezvous store: if the process group "
                        "fails to connect, launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                        "(pytorch/pytorch#135712)", self.env.restart_count)
        if self.env.distributed:
            dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        else:  # a strategy run as one plain process: a private one-rank group
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self._owns_group = True
        log.info("process group %s: rank %d of %d on %s", backend, self.rank, self.world_size, self.device)

    def setup(self, model: nn.ModuleDict,
              param_groups: Optional[Callable[[nn.Module], list[dict[str, Any]]]] = None) -> nn.Module:
        """Move, convert and wrap the task's plain model; build optimizer + scheduler (+ scaler).

        ``param_groups(parts)`` is called after sharding (FSDP2 replaces the parameters);
        default: every trainable parameter. Returns the module to call (see :meth:`forward`).
        """
        if not isinstance(model, nn.ModuleDict):
            raise TypeError(f"engine.setup expects the task's nn.ModuleDict, got {type(model).__name__}")
        groups_fn = param_groups or (lambda m: [{"params": [p for p in m.parameters() if p.requires_grad]}])
        model = model.to(self.device)
        if self.pcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.pcfg.compile:
            for part in model.values():
                part.compile()
        root = TaskModule(model)
        self.root = root
        if self.strategy == "deepspeed":
            return self._setup_deepspeed(root, groups_fn)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
            for part in model.values():
                if any(True for _ in part.parameters()):
                    fully_shard(part, mp_policy=mp)
            fully_shard(root, mp_policy=mp)
            wrapped: nn.Module = root
        elif self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(root, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                          find_unused_parameters=bool(self.pcfg.find_unused_parameters))
        else:
            wrapped = root
        self.model = wrapped
        self.optimizer = build_optimizer(groups_fn(model), self.ocfg)
        self.scheduler = build_scheduler(self.optimizer, self.scfg, self.total_steps)
        if self.pcfg.precision == "fp16":
            if self.strategy == "fsdp":  # all-reduces found-inf so every shard skips the same steps
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        return wrapped

    def _setup_deepspeed(self, root: TaskModule, groups_fn: Callable) -> nn.Module:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed insists on LOCAL_RANK, which only a launcher sets; a plain one-process run has none
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        import deepspeed

        optimizer = build_optimizer(groups_fn(root.parts), self.ocfg)
        scheduler = build_scheduler(optimizer, self.scfg, self.total_steps)
        cfg = deepspeed_config(self.pcfg, self.ocfg, self.micro_batch_size)
        ds, opt, _, sched = deepspeed.initialize(model=root, optimizer=optimizer, lr_scheduler=scheduler,
                                                 config=cfg, dist_init_required=False)
        self._ds, self.model, self.optimizer, self.scheduler = ds, ds, opt, sched
        return ds

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
        if self.autocast_dtype == torch.float32 or self.strategy == "deepspeed":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(parts, *args)`` through the wrapped model, under autocast (e.g. a training step)."""
        assert self.model is not None, "engine.setup() has not been called"
        with self.autocast():
            return self.model(fn, *args)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch's tensors to this rank's device (channels_last for 4-D float images)."""
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if self.pcfg.channels_last and v.dim() == 4 and v.is_floating_point():
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    @contextlib.contextmanager
    def accumulate(self, micro_step: int) -> Iterator[None]:
        """Context for micro-batch ``micro_step`` of ``grad_accum``: gradients are synchronised
        across ranks only on the last one (DDP ``no_sync``, FSDP2 requires_gradient_sync)."""
        last = (micro_step % self.grad_accum) == self.grad_accum - 1
        self._micro_last = last
        if self.strategy == "ddp" and not last:
            with self.model.no_sync():  # type: ignore[union-attr]
                yield
            return
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)  # type: ignore[union-attr]
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (averaged over ``grad_accum`` micro-batches)."""
        if self._ds is not None:
            self._ds.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
            if not self._micro_last:
                self._ds.step()  # only advances DeepSpeed's micro-step counter off the boundary
            return
        loss = loss / self.grad_accum
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> float:
        """Clip, optimizer step, scheduler step, zero grads; returns the pre-clip global grad norm."""
        if self._ds is not None:
            self._ds.step()
            norm = self._ds.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        assert self.optimizer is not None and self.scheduler is not None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = float(self.ocfg.clip_grad_norm) or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ collectives
    @property
    def _dist(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (returned on its original device and dtype)."""
        if not self._dist:
            return tensor
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = tensor.detach().to(dev).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable Python objects of our own making)."""
        if not self._dist:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self._dist:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self._dist:
            dist.barrier()

    # ------------------------------------------------------------------ state
    def save_state(self, directory: str | Path) -> None:
        """Write model + optimizer + scheduler (+ scaler) into ``directory`` (collective; the
        directory must be visible to every rank, e.g. a shared file system)."""
        directory = Path(directory)
        if self._ds is not None:
            self._ds.save_checkpoint(str(directory), tag=DS_TAG, client_state={}, save_latest=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        self._rank0_buffers_into(msd)
        with _quiet_single_process():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory / DCP_DIR))
        if self.is_logging_rank:
            extra = {"scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            torch.save(extra, directory / ENGINE_STATE_FILE)

    def _rank0_buffers_into(self, msd: dict[str, Any]) -> None:
        """Put rank 0's copy of every plain buffer into ``msd``. Buffers such as BatchNorm running
        statistics are per rank (each sees its own batches) but look replicated to DCP, which
        saves one copy picked from any rank: without this, a checkpoint mixes ranks' statistics
        while ``weights.pt`` is rank 0's. (Each rank's own copy goes into its rank file:
        :meth:`rank_buffers`.)"""
        if not self._dist or self.world_size == 1:
            return
        for name, _ in self.root.named_buffers():
            value = msd.get(name)
            if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:  # not a DTensor shard
                value = value.detach().clone()
                dist.broadcast(value, src=0)
                msd[name] = value

    def rank_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's own module buffers (BatchNorm running statistics...) on CPU, for its rank
        file: restoring each rank's own is what makes a resumed run bit-equal to an uninterrupted
        one (DDP broadcasts rank 0's at each forward; FSDP2 and DeepSpeed never sync them)."""
        return {name: b.detach().to("cpu", copy=True) for name, b in self.root.named_buffers()}

    def load_rank_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`rank_buffers` (after :meth:`load_state`, same world size only)."""
        own = dict(self.root.named_buffers())
        if own.keys() != buffers.keys():
            raise ValueError(f"rank buffers do not match the model: missing {sorted(own.keys() - buffers.keys())}, "
                             f"unexpected {sorted(buffers.keys() - own.keys())}")
        with torch.no_grad():
            for name, b in own.items():
                b.copy_(buffers[name].to(b.device))

    def load_state(self, directory: str | Path, saved_world_size: Optional[int] = None) -> None:
        """Restore what :meth:`save_state` wrote by ``saved_world_size`` ranks (None: this many).
        DCP reshards to this world size; DeepSpeed's per-rank ZeRO shards are first converted to
        its universal format (once, by rank 0, kept beside them), which any world size loads."""
        directory = Path(directory)
        if self._ds is not None:
            tag = DS_TAG
            universal = saved_world_size is not None and int(saved_world_size) != self.world_size
            if universal:
                tag = self._deepspeed_universal(directory, int(saved_world_size))
            config = self._ds._config  # load_universal is read at load time; no public setter
            config.load_universal_checkpoint = universal
            try:
                path, _ = self._ds.load_checkpoint(str(directory), tag=tag)
            finally:
                config.load_universal_checkpoint = False
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}/{tag}")
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        with _quiet_single_process():
            check_metadata(directory / DCP_DIR)  # before DCP unpickles it (a checkpoint folder is data)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(directory / DCP_DIR)))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(directory / ENGINE_STATE_FILE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra.get("scaler") is not None:
            self.scaler.load_state_dict(extra["scaler"])

    def _deepspeed_universal(self, directory: Path, saved_world_size: int) -> str:
        """Rank 0 converts ``directory/DS_TAG`` into ``directory/DS_UNIVERSAL_TAG`` with DeepSpeed's
        ds_to_universal (atomically: a temporary folder, then a rename; reused if already there).
        Collective; returns the tag to load."""
        target = directory / DS_UNIVERSAL_TAG
        err: Optional[str] = None
        if self.is_logging_rank and not target.is_dir():
            from deepspeed.checkpoint import ds_to_universal

            tmp = directory / f".{DS_UNIVERSAL_TAG}.tmp{os.getpid()}"
            args = SimpleNamespace(input_folder=str(directory / DS_TAG), output_folder=str(tmp),
                                   num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                   strict=True, inject_missing_state=True)
            log.info("converting %s (%d ranks) to DeepSpeed's universal format for %d ranks",
                     directory / DS_TAG, saved_world_size, self.world_size)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    ds_to_universal.main(args)
                os.replace(tmp, target)
            except Exception as e:  # every rank must hear of it, or the others wait forever
                shutil.rmtree(tmp, ignore_errors=True)
                err = (f"converting DeepSpeed checkpoint {directory / DS_TAG} ({saved_world_size} ranks) to the "
                       f"universal format for {self.world_size} ranks failed: {type(e).__name__}: {e}")
        err = self.broadcast_object(err)
        if err:
            raise RuntimeError(err)
        return DS_UNIVERSAL_TAG

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The task ``ModuleDict``'s full state_dict on CPU, gathered from shards; complete on
        rank 0 (other ranks may get an empty dict). Collective: call on every rank."""
        prefix = "parts."
        if self._ds is not None:
            import deepspeed

            root = self._ds.module
            params = list(root.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                full = {k: v.detach().to("cpu", copy=True) for k, v in root.state_dict().items()}
        elif self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full = {k: v.detach().to("cpu", copy=True) for k, v in self.root.state_dict().items()}
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def export_weights(self, path: str | Path) -> Optional[Path]:
        """Write the plain model state_dict (``torch.load(path, weights_only=True)``-loadable
        into the task's ``build_model()``) atomically from rank 0. Collective."""
        sd = self.full_state_dict()
        out = None
        if self.is_logging_rank:
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            torch.save(sd, tmp)
            os.replace(tmp, out)
        self.barrier()
        return out

    def describe(self) -> dict[str, Any]:
        """Flat summary for logs / tracking params."""
        d = {"strategy": self.strategy, "world_size": self.world_size, "device": str(self.device),
             "precision": self.pcfg.precision, "grad_accum": self.grad_accum}
        if self.strategy == "deepspeed":
            d["deepspeed_config"] = json.dumps(deepspeed_config(self.pcfg, self.ocfg, self.micro_batch_size))
        return d

    def abandon_group(self) -> None:
        """After a failure on this rank: do not wait for peers at :meth:`close` (they may never
        reach the barrier); the process group is left to process exit."""
        self._owns_group = False

    def close(self) -> None:
        """Release DeepSpeed's engine (its ZeRO-3 hooks and threads) and tear down the process
        group if this engine created it."""
        if self._ds is not None:
            self._ds.destroy()
            self._ds = None
        # Drop our references to the wrapped model and optimizer (FSDP2's mesh keeps the gloo
        # group and its worker threads alive) and collect them while the interpreter is whole:
        # otherwise the group's threads can be torn down during interpreter finalisation and
        # abort the process ("terminate called without an active exception") after a good run.
        self.model = self.root = self.optimizer = self.scheduler = self.scaler = None
        gc.collect()
        if self._owns_group and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
                gc.collect()
        self._owns_group = False
