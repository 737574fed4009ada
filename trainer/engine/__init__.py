"""The training engine: the ONLY package that knows DDP, FSDP2 and DeepSpeed.

==========================  ================================================================
``facade.py``               :class:`Engine`, the verbs the loop speaks; picks a backend by strategy
``core.py``                 process group + collectives, device, root module, rank buffers, the
                            :class:`~trainer.engine.core.Backend` contract
``native.py``               single / DDP / FSDP2: ``parallelize``, grad scalers, DCP save / load
``deepspeed_backend.py``    ZeRO 1 / 2 / 3: config generation, init, universal conversion, save / load
==========================  ================================================================

Model state: single / ddp / fsdp save model + optimizer with ``torch.distributed.checkpoint``
(sharded, reshardable to another world size); DeepSpeed with its own ``save_checkpoint``.
"""
from trainer.engine.core import PRECISIONS, STRATEGIES, TaskModule, log
from trainer.engine.core import quiet_single_process as _quiet_single_process
from trainer.engine.deepspeed_backend import DS_FP16_REFUSED, DS_TAG, DS_UNIVERSAL_TAG, deepspeed_config
from trainer.engine.facade import BACKENDS, Engine
from trainer.engine.native import DCP_DIR, ENGINE_STATE_FILE, parallelize

__all__ = ["BACKENDS", "DCP_DIR", "DS_FP16_REFUSED", "DS_TAG", "DS_UNIVERSAL_TAG", "ENGINE_STATE_FILE", "Engine",
           "PRECISIONS", "STRATEGIES", "TaskModule", "deepspeed_config", "log", "parallelize",
           "_quiet_single_process"]
