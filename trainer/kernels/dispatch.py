"""Dispatch for the min-reprojection photometric loss: fused Triton kernels, the CPU path, or the reference.

``multiscale_reprojection_loss`` is the entry point the depth task calls (all scales at once),
``fused_reprojection_loss`` the one-scale entry. ``impl`` is the config switch:

* ``"triton"``: the fused kernels (on CPU tensors only under ``TRITON_INTERPRET=1``, set before
  the kernel module is imported); a ``torch.autograd.Function`` whose backward is fused too;
* ``"handwritten"``: ``trainer.kernels.photometric_cpu`` (plain torch ops in cache-sized chunks,
  a hand-written backward); ``"compiled"``: the same with its per-chunk functions compiled by
  inductor (``trainer.kernels.compiled_cpu``; needs a C++ compiler);
* ``"reference"``: plain autograd on ``trainer.losses.photometric``;
* ``"auto"``: Triton for CUDA tensors. Otherwise the multi-scale entry takes ``compiled`` where a
  C++ compiler is found and ``handwritten`` where not, and the one-scale entry the reference.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import Tensor

from trainer.geometry import pad_image
from trainer.kernels.photometric_cpu import PAD, crop
from trainer.losses import photometric as reference
from trainer.losses.smoothness import multiscale_smoothness

IMPLS = ("auto", "triton", "reference", "handwritten", "compiled")
"""Accepted values of ``impl`` (the depth task's ``photometric_impl`` config field)."""

KERNEL_MODULE = "trainer.kernels.photometric_triton"
"""Imported lazily, so that the reference path needs neither Triton nor a GPU."""

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Input dtypes the kernels accept (bf16/fp16/fp32 accumulate in fp32; fp64 computes in fp64)."""


def _kernels():
    """The Triton kernel module (imported on first use)."""
    return importlib.import_module(KERNEL_MODULE)


def triton_available() -> bool:
    """True when Triton can be imported (the kernel module itself imports it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FusedReprojectionLoss(torch.autograd.Function):
    """Autograd wrapper of the fused kernels: forward returns (loss, argmin uint8 (B,H,W)); only
    the argmin is saved for backward (plus the inputs, which the caller holds anyway). The
    backward is not itself differentiable: double backward raises instead of silently giving 0."""

    @staticmethod
    def forward(ctx, ssim_weight: float, target: Tensor, *sources: Tensor):
        loss, argmin = _kernels().forward(target, sources, ssim_weight)
        ctx.ssim_weight = ssim_weight
        ctx.save_for_backward(target, argmin, *sources)
        ctx.mark_non_differentiable(argmin)
        return loss, argmin

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_argmin):
        target, argmin, *sources = ctx.saved_tensors
        need_target = ctx.needs_input_grad[1]
        need_sources = list(ctx.needs_input_grad[2:])
        if grad_loss is None or not (need_target or any(need_sources)):
            return (None, None, *([None] * len(sources)))
        g_target, g_sources = _kernels().backward(grad_loss, target, sources, argmin,
                                                  ctx.ssim_weight, need_target, need_sources)
        return (None, g_target, *g_sources)


def _validate(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor],
              impl: str) -> None:
    """Clear errors for a bad impl name, shapes, dtypes or devices (naming the argument)."""
    if impl not in IMPLS:
        raise ValueError(f"photometric impl {impl!r} is not one of {', '.join(IMPLS)}")
    if not isinstance(target, Tensor) or target.dim() != 4:
        raise ValueError(f"target: expected a (B, C, H, W) tensor, got "
                         f"{getattr(target, 'shape', type(target))}")
    if len(warped) == 0:
        raise ValueError("warped: need at least one warped source frame")
    if target.dtype not in FLOAT_DTYPES:
        raise ValueError(f"target: dtype {target.dtype} is not a floating image dtype "
                         f"({', '.join(map(str, FLOAT_DTYPES))})")
    if target.shape[2] < 2 or target.shape[3] < 2:
        raise ValueError(f"target: SSIM's reflection padding needs H, W >= 2, got "
                         f"{tuple(target.shape)}")
    for name, group in (("identity", identity), ("warped", warped)):
        for i, t in enumerate(group):
            if not isinstance(t, Tensor) or t.shape != target.shape:
                raise ValueError(f"{name}[{i}]: expected shape {tuple(target.shape)} like the "
                                 f"target, got {getattr(t, 'shape', type(t))}")
            if t.device != target.device:
                raise ValueError(f"{name}[{i}]: device {t.device} differs from the target's "
                                 f"{target.device}")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}[{i}]: dtype {t.dtype} is not a floating image dtype")


def resolve_impl(impl: str, target: Tensor) -> str:
    """What ``impl`` means for tensors on ``target``'s device in the one-scale entry: ``"triton"``,
    ``"reference"``, ``"handwritten"`` or ``"compiled"`` (``auto``: Triton or the reference)."""
    if impl in ("reference", "handwritten"):
        return impl
    if impl == "compiled":
        return _check_compiled(target)
    if impl == "auto":
        return "triton" if target.is_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("photometric impl 'triton' needs the triton package; install it or "
                           "use impl='reference'")
    if not target.is_cuda and not _kernels().INTERPRETED:
        raise RuntimeError(
            "photometric impl 'triton' got CPU tensors, but the Triton kernels were compiled for "
            f"the GPU: set TRITON_INTERPRET=1 before {KERNEL_MODULE} is imported to run them on "
            "the CPU (slow; for tests), or use impl='auto'/'reference'")
    return "triton"


def _check_compiled(target: Tensor) -> str:
    """``"compiled"``, or a clear error where inductor cannot compile for ``target``'s device."""
    from trainer.kernels import compiled_cpu

    if target.is_cuda and not triton_available():
        raise RuntimeError("photometric impl 'compiled' on CUDA tensors needs the triton package "
                           "(inductor's GPU code); use impl='handwritten'")
    if not target.is_cuda and not compiled_cpu.available():
        raise RuntimeError("photometric impl 'compiled' needs a C++ compiler for inductor's CPU code "
                           "(none found: install g++ or set CXX); use impl='handwritten'")
    return "compiled"


def resolve_multiscale_impl(impl: str, target: Tensor) -> str:
    """What ``impl`` means in the multi-scale entry: as :func:`resolve_impl`, except that ``auto``
    without Triton kernels takes the CPU path, compiled where a C++ compiler is found."""
    if impl != "auto":
        return resolve_impl(impl, target)
    if target.is_cuda:
        return "triton" if triton_available() else "handwritten"
    from trainer.kernels import compiled_cpu

    return "compiled" if compiled_cpu.available() else "handwritten"


def depth_functions(impl: str, like: Tensor) -> SimpleNamespace:
    """The depth task's other CPU kernels, compiled where ``impl`` resolves to the compiled CPU path:
    ``grid`` (the warp's projection and its gradient, ``trainer.geometry.GRID_EAGER``; None = eager)
    and ``smoothness`` (``trainer.losses.smoothness.multiscale_smoothness``)."""
    if resolve_multiscale_impl(impl, like) != "compiled":
        return SimpleNamespace(grid=None, smoothness=multiscale_smoothness)
    from trainer.kernels import compiled_cpu

    strict = impl == "compiled"
    return SimpleNamespace(grid=compiled_cpu.grid_functions(strict), smoothness=compiled_cpu.smoothness(strict))


def _promoted(target: Tensor, warped: list[Tensor], identity: list[Tensor]
              ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """All inputs in their common dtype: mixed dtypes (e.g. fp32 warps of bf16 frames) promote
    like torch ops do, autograd-tracked (tensors already in it are returned as they are)."""
    dtype = target.dtype
    for t in identity + warped:
        dtype = torch.promote_types(dtype, t.dtype)
    return target.to(dtype), [w.to(dtype) for w in warped], [t.to(dtype) for t in identity]


def _cpu_path(target: Tensor, warped: list[Tensor], identity: list[Tensor], ssim_weight: float,
              kind: str, strict: bool) -> tuple[Tensor, Tensor]:
    """``trainer.kernels.photometric_cpu`` on inputs promoted to one dtype, eager or compiled
    (``strict``: a failed compilation raises instead of falling back to eager); ``warped`` in its
    padded multi-scale layout (B, C, S, H+2P, W+2P)."""
    from trainer.kernels.photometric_cpu import multiscale_min_reprojection

    fns = None
    if kind == "compiled":
        from trainer.kernels.compiled_cpu import chunk_functions

        fns = chunk_functions(strict)
    target, warped, identity = _promoted(target, warped, identity)
    losses, argmin = multiscale_min_reprojection(target, warped, identity, ssim_weight, fns)
    return losses.to(torch.promote_types(target.dtype, torch.float32)), argmin


@torch.compiler.disable
def _fused(target: Tensor, sources: list[Tensor], ssim_weight: float) -> tuple[Tensor, Tensor]:
    """Apply the autograd Function outside torch.compile graphs (the kernels are opaque to it)."""
    return FusedReprojectionLoss.apply(float(ssim_weight), target.contiguous(),
                                       *(s.contiguous() for s in sources))


def fused_reprojection_loss(target: Tensor, warped: Sequence[Tensor],
                            identity: Sequence[Tensor] | None = None, ssim_weight: float = 0.85,
                            impl: str = "auto", return_argmin: bool = False
                            ) -> Tensor | tuple[Tensor, Tensor]:
    """Mean over all pixels of the per-pixel min over [identity..., warped...] photometric errors
    (same semantics as ``trainer.losses.photometric.reprojection_loss``).

    Inputs of different float dtypes are promoted to a common one first. Returns the scalar loss
    in float32 (float64 for float64 inputs), and with ``return_argmin``
    also the argmin (B, 1, H, W) over [identity..., warped...] (int32 on the CPU paths, int64
    otherwise; ``argmin >= len(identity)`` is Monodepth2's auto-mask).
    """
    identity = list(identity) if identity is not None else []
    warped = list(warped)
    _validate(target, warped, identity, impl)
    target, warped, identity = _promoted(target, warped, identity)
    n_sources = len(identity) + len(warped)
    out_dtype = torch.promote_types(target.dtype, torch.float32)
    kind = resolve_impl(impl, target)
    if kind == "reference":
        best, index, _ = reference.min_reprojection(target, warped, identity or None, ssim_weight)
        loss = best.mean().to(out_dtype)
        return (loss, index) if return_argmin else loss
    if kind in ("handwritten", "compiled"):
        padded = [pad_image(w, PAD).unsqueeze(2) for w in warped]  # one scale in the multi-scale layout
        losses, argmin = _cpu_path(target, padded, identity, ssim_weight, kind, strict=True)
        return (losses[0], argmin[0]) if return_argmin else losses[0]
    if n_sources > _kernels().MAX_SOURCES:
        raise ValueError(f"fused photometric loss: {n_sources} sources exceed the kernel's "
                         f"maximum of {_kernels().MAX_SOURCES}; use impl='reference'")
    loss, argmin = _fused(target, identity + warped, ssim_weight)
    loss = loss.to(out_dtype)
    if return_argmin:
        return loss, argmin.to(torch.int64).unsqueeze(1)
    return loss


def multiscale_reprojection_loss(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor] | None,
                                 ssim_weight: float = 0.85, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """The min-reprojection loss at S scales in one call (the depth task's training loss).

    ``target`` (B, C, H, W); ``warped``: one (B, C, S, H+2P, W+2P) tensor per source frame, its warps
    at every scale padded by P = :data:`PAD` (``trainer.geometry.warp_scales(..., pad=PAD)``; the
    layout of ``trainer.kernels.photometric_cpu``);
    ``identity``: the unwarped sources (B, C, H, W) or None. Returns (per-scale mean of the
    per-pixel minimum (S,), argmin (S, B, 1, H, W) over [identity..., warped...]: int32 on the CPU paths,
    int64 otherwise). Which
    code runs:

    * ``triton`` (or ``auto`` on CUDA with Triton): the fused kernels, one call per scale (on the
      unpadded warps, copied contiguous);
    * ``handwritten``: ``trainer.kernels.photometric_cpu`` (identity and target statistics
      computed once for all scales, hand-written backward, cache-sized chunks); ``compiled``: the
      same with inductor-compiled chunks; ``auto`` without Triton: compiled where a C++ compiler
      is found, handwritten otherwise;
    * ``reference``: ``trainer.losses.photometric.min_reprojection`` at each scale.
    """
    identity = list(identity) if identity is not None else []
    warped = list(warped)
    if not isinstance(target, Tensor) or target.dim() != 4:
        _validate(target, warped, identity, impl)  # raises, naming the target
    b, c, h, w = target.shape
    if not warped or any(x.dim() != 5 or (x.shape[0], x.shape[1]) != (b, c) or x.shape[2] != warped[0].shape[2]
                         or x.shape[-2:] != (h + 2 * PAD, w + 2 * PAD) for x in warped):
        raise ValueError(f"warped: expected one (B, C, S, H+{2 * PAD}, W+{2 * PAD}) tensor per source (warps padded "
                         f"by {PAD}) with B, C, H, W of the target {tuple(target.shape)}, got "
                         f"{[tuple(x.shape) for x in warped]}")
    per_scale = [[crop(x[:, :, i], PAD) for x in warped] for i in range(warped[0].shape[2])]
    _validate(target, per_scale[0], identity, impl)
    kind = resolve_multiscale_impl(impl, target)
    if kind in ("triton", "reference"):
        losses, argmins = zip(*(fused_reprojection_loss(target, ws, identity, ssim_weight, kind, return_argmin=True)
                                for ws in per_scale))
        return torch.stack(losses), torch.stack(argmins)
    return _cpu_path(target, warped, identity, ssim_weight, kind, strict=impl == "compiled")
