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
from trainer.engine.deepspeed_backend import deepspeed_config
from trainer.engine.facade import Engine

__all__ = ["Engine", "deepspeed_config"]
