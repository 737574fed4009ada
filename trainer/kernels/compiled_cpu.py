"""The CPU loss's per-chunk functions, compiled by ``torch.compile`` (inductor's C++/OpenMP loops).

Eager, one chunk of :class:`trainer.kernels.photometric_cpu.PhotometricError` is ~25 separate
element-wise ops forward and ~50 backward, each reading and writing whole images; inductor fuses
them into a few loops (2.3x on the chunk on this machine, docs/depth.md "Speed against
Monodepth2"). Same math in the same order: the outputs match the eager functions to float
rounding (bit-equal where measured).

Inductor needs a C++ compiler at run time. :func:`available` says whether one is there; under
``impl="auto"`` a failed compilation warns once and the eager functions take over, under
``impl="compiled"`` it raises.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable

import torch

from trainer.kernels import photometric_cpu as eager

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when inductor finds a C++ compiler (it compiles CPU kernels with one)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 -- any failure means "no usable compiler"
        return False
    return True


class CompileFailed(RuntimeError):
    """torch.compile could not compile the CPU loss (no compiler, a compiler error, ...)."""


MAX_VARIANTS = 6
"""Input signatures (shapes, dtypes, the SSIM weight) compiled per function and process; further
ones run eagerly. Dynamo allows 8 compilations per code object (``recompile_limit``) and fails
hard beyond them under ``fullgraph``; a training run needs 1-2 (its chunk, a shorter last chunk)."""

_COMPILED: dict[str, set[tuple]] = {}
"""Function name -> the input signatures compiled for it in this process (shared by the strict and
the lenient wrapper: dynamo's limit is per code object)."""
_EAGER: set[tuple] = set()
"""Signatures that run eagerly: beyond the limit, or refused by dynamo's own limit."""


def _signature(args: tuple) -> tuple:
    """What dynamo's guards of a static compilation look at: each tensor's shape, strides, dtype
    and device, the other arguments' values, and the intra-op thread count."""
    return (torch.get_num_threads(), *((tuple(a.shape), a.stride(), a.dtype, a.device.type)
                                       if isinstance(a, torch.Tensor) else a for a in args))


class _Compiled:
    """A function compiled on first call. ``strict`` False: if compiling fails, warn once and
    run the eager function from then on; True: raise :class:`CompileFailed`. Signatures beyond
    :data:`MAX_VARIANTS` run eagerly (each logged once)."""

    def __init__(self, fn: Callable, strict: bool) -> None:
        self.eager, self.strict = fn, strict
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)  # static: 1.5x the dynamic kernels' speed
        self.failed = False
        self.done = _COMPILED.setdefault(fn.__name__, set())

    def _run_eagerly(self, key: tuple, why: str, args: tuple):
        if key not in _EAGER:
            _EAGER.add(key)
            log.info("photometric loss: %s %s; %s runs eagerly", self.eager.__name__, why, key)
        return self.eager(*args)

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        # detached: the caller's autograd.Function owns the gradient (and requires_grad is a guard)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        key = _signature(args)
        if key in _EAGER or (key not in self.done and len(self.done) >= MAX_VARIANTS):
            return self._run_eagerly(key, f"already compiled for {MAX_VARIANTS} input signatures", args)
        self.done.add(key)
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # a guard not in _signature: not a failure
            self.done.discard(key)
            return self._run_eagerly(key, "hit dynamo's recompile limit", args)
        except Exception as e:  # noqa: BLE001 -- inductor raises many kinds; all mean "not compiled"
            if self.strict:
                raise CompileFailed(f"photometric impl 'compiled': torch.compile of {self.eager.__name__} "
                                    f"failed ({type(e).__name__}: {e}); use impl='handwritten'") from e
            self.failed = True
            warnings.warn(f"photometric loss: torch.compile of {self.eager.__name__} failed "
                          f"({type(e).__name__}: {e}); running it eagerly", RuntimeWarning, stacklevel=2)
            return self.eager(*args)


@functools.lru_cache(maxsize=2)
def chunk_functions(strict: bool) -> tuple[Callable, Callable]:
    """(error, error_grad) for one chunk, compiled; one pair per process and strictness (the
    compiled code is cached on disk by inductor, ``TORCHINDUCTOR_CACHE_DIR``)."""
    return _Compiled(eager._error, strict), _Compiled(eager._error_grad, strict)
