"""The CPU loss's per-chunk functions and the warp's projection, compiled by ``torch.compile``
(inductor's C++/OpenMP loops).

Eager, one chunk of :class:`trainer.kernels.photometric_cpu.MinReprojection` is ~25 separate
element-wise ops per candidate forward and ~50 backward, each reading and writing whole images;
inductor fuses them into a few loops (docs/depth.md "Speed against Monodepth2"). Same math in
the same order: the outputs match the eager functions to float rounding (bit-equal where measured).

Inductor needs a C++ compiler at run time. :func:`available` says whether one is there; under
``impl="auto"`` a failed compilation warns once and the eager functions take over, under
``impl="compiled"`` it raises.
"""
from __future__ import annotations

import functools
import logging
import warnings
from types import SimpleNamespace
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


def _key(a):
    if isinstance(a, torch.Tensor):
        return tuple(a.shape), a.stride(), a.dtype, a.device.type, a.requires_grad
    return tuple(_key(x) for x in a) if isinstance(a, (tuple, list)) else a


def _signature(args: tuple) -> tuple:
    """What dynamo's guards of a static compilation look at: each tensor's shape, strides, dtype,
    device and requires_grad (in tuples too), the other arguments' values, grad mode and the
    intra-op thread count."""
    return (torch.get_num_threads(), torch.is_grad_enabled(), *(_key(a) for a in args))


def _detached(a):
    if isinstance(a, torch.Tensor):
        return a.detach()
    return tuple(_detached(x) for x in a) if isinstance(a, (tuple, list)) else a


class _Compiled:
    """A function compiled on first call. ``strict`` False: if compiling fails, warn once and
    run the eager function from then on; True: raise :class:`CompileFailed`. Signatures beyond
    :data:`MAX_VARIANTS` run eagerly (each logged once). ``autograd``: tensors keep their graph
    and inductor compiles the backward too (element-wise functions with whole-tensor reductions
    only: its reductions over parts of a tensor were slow); otherwise they are detached (the
    caller's ``autograd.Function`` owns the gradient)."""

    def __init__(self, fn: Callable, strict: bool, autograd: bool = False) -> None:
        self.eager, self.strict, self.autograd = fn, strict, autograd
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)  # static: 1.5x the dynamic kernels' speed
        self.failed = False
        self.done = _COMPILED.setdefault(fn.__name__, set())

    def _run_eagerly(self, key: tuple, why: str, args: tuple):
        if key not in _EAGER:
            _EAGER.add(key)
            log.info("compiled CPU path: %s %s; %s runs eagerly", self.eager.__name__, why, key)
        return self.eager(*args)

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        if not self.autograd:
            args = tuple(_detached(a) for a in args)
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
            warnings.warn(f"compiled CPU path: torch.compile of {self.eager.__name__} failed "
                          f"({type(e).__name__}: {e}); running it eagerly", RuntimeWarning, stacklevel=2)
            return self.eager(*args)


@functools.lru_cache(maxsize=2)
def chunk_functions(strict: bool) -> SimpleNamespace:
    """:data:`trainer.kernels.photometric_cpu.EAGER`'s per-chunk functions, compiled; one set per
    process and strictness (the compiled code is cached on disk by inductor, ``TORCHINDUCTOR_CACHE_DIR``)."""
    return SimpleNamespace(**{name: _Compiled(fn, strict) for name, fn in vars(eager.EAGER).items()})


@functools.lru_cache(maxsize=2)
def grid_functions(strict: bool) -> SimpleNamespace:
    """:data:`trainer.geometry.GRID_EAGER` (the warp's projection and its gradient), compiled; one set
    per process and strictness."""
    from trainer.geometry import GRID_EAGER

    return SimpleNamespace(**{name: _Compiled(fn, strict) for name, fn in vars(GRID_EAGER).items()})


@functools.lru_cache(maxsize=2)
def smoothness(strict: bool) -> Callable:
    """:func:`trainer.losses.smoothness.multiscale_smoothness` compiled, forward and backward."""
    from trainer.losses.smoothness import multiscale_smoothness

    return _Compiled(multiscale_smoothness, strict, autograd=True)
