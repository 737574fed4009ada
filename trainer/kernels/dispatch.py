"""Dispatch for the min-reprojection photometric loss: fused Triton kernels or the reference.

``fused_reprojection_loss`` is the one entry point the depth task calls. ``impl`` is the config
switch: ``"auto"`` uses the Triton kernels for CUDA tensors and the reference
(``trainer.losses.photometric``) otherwise; ``"triton"`` forces the kernels (on CPU tensors only
under ``TRITON_INTERPRET=1``, set before the kernel module is imported); ``"reference"`` forces
plain PyTorch. The Triton path is a ``torch.autograd.Function`` whose backward is fused too.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import Tensor

from trainer.losses import photometric as reference

IMPLS = ("auto", "triton", "reference")
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
    """``"triton"`` or ``"reference"``: what ``impl`` means for tensors on ``target``'s device."""
    if impl == "reference":
        return "reference"
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
    also the argmin (B, 1, H, W) int64 over [identity..., warped...] (``argmin >= len(identity)``
    is Monodepth2's auto-mask).
    """
    identity = list(identity) if identity is not None else []
    warped = list(warped)
    _validate(target, warped, identity, impl)
    # Mixed dtypes (e.g. fp32 warps of bf16 frames) promote like torch ops do, autograd-tracked.
    dtype = target.dtype
    for t in identity + warped:
        dtype = torch.promote_types(dtype, t.dtype)
    target = target.to(dtype)
    identity = [t.to(dtype) for t in identity]
    warped = [t.to(dtype) for t in warped]
    n_sources = len(identity) + len(warped)
    out_dtype = torch.promote_types(dtype, torch.float32)
    if resolve_impl(impl, target) == "reference":
        best, index, _ = reference.min_reprojection(target, warped, identity or None, ssim_weight)
        loss = best.mean().to(out_dtype)
        return (loss, index) if return_argmin else loss
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

    ``target`` (B, C, H, W); ``warped``: one (S*B, C, H, W) tensor per source frame, scale-major
    (rows s*B .. s*B+B-1 hold scale s); ``identity``: the unwarped sources (B, C, H, W) or None.
    Returns (per-scale mean of the per-pixel minimum (S,), argmin (S, B, 1, H, W) int64 over
    [identity..., warped...]). Which code runs:

    * ``triton`` (or ``auto`` on CUDA with Triton): the fused kernels, one call per scale;
    * ``auto`` otherwise: ``trainer.kernels.photometric_cpu`` (identity and target statistics
      computed once for all scales, hand-written backward, cache-sized chunks);
    * ``reference``: ``trainer.losses.photometric.min_reprojection`` at each scale.
    """
    identity = list(identity) if identity is not None else []
    warped = list(warped)
    b = target.shape[0]
    if not warped or any(w.dim() != 4 or w.shape[0] % b or w.shape[1:] != target.shape[1:] for w in warped):
        raise ValueError(f"warped: expected one (S*B, C, H, W) tensor per source with B={b} and C, H, W of the "
                         f"target {tuple(target.shape)}, got {[tuple(w.shape) for w in warped]}")
    s = warped[0].shape[0] // b
    per_scale = [[w[i * b:(i + 1) * b] for w in warped] for i in range(s)]
    _validate(target, per_scale[0], identity, impl)
    if resolve_impl(impl, target) == "triton" or impl == "reference":
        losses, argmins = zip(*(fused_reprojection_loss(target, ws, identity, ssim_weight, impl, return_argmin=True)
                                for ws in per_scale))
        return torch.stack(losses), torch.stack(argmins)
    from trainer.kernels.photometric_cpu import multiscale_min_reprojection

    dtype = target.dtype
    for t in identity + warped:
        dtype = torch.promote_types(dtype, t.dtype)
    losses, argmin = multiscale_min_reprojection(target.to(dtype), [w.to(dtype) for w in warped],
                                                 [t.to(dtype) for t in identity], ssim_weight)
    return losses.to(torch.promote_types(dtype, torch.float32)), argmin
