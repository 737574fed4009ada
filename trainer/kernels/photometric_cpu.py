"""The min-reprojection photometric loss for the CPU: plain torch ops, hand-written backward.

Same semantics as the reference (``trainer.losses.photometric``: 0.85 * (1 - SSIM)/2 + 0.15 * L1,
SSIM on 3x3 windows of reflection-padded images, per-pixel minimum over [identity..., warped...]
with ties to the lowest index), computed the way a CPU likes it:

* the 3x3 window mean is separable: three shifted adds along W, three along H (4x faster than
  ``avg_pool2d`` on this machine, which does not vectorise 3x3 stride-1 pooling);
* the target's window statistics (mean, E[y²]) are computed once and shared by every candidate
  (the reference recomputes them for each);
* all candidates go through one call on a stacked tensor (e.g. 2 sources x 4 scales), so every op
  runs once on a large tensor instead of 8 times on small ones;
* :class:`PhotometricError` saves only its input and recomputes the window statistics in
  backward, whose gradient is written out (the adjoint of "reflection pad + 3x3 mean" is a 3x3
  sum over the zero-padded gradient with the padded border folded back), instead of autograd
  keeping ~20 full-size temporaries per candidate and replaying ~40 ops.

Only the candidates (``x``) get gradients; the target is data (a training frame). Callers that
need a target gradient use the reference (:func:`multiscale_min_reprojection` does so itself).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.photometric import SSIM_C1, SSIM_C2


def box3(padded: Tensor) -> Tensor:
    """Mean over each 3x3 window of ``padded`` (..., H+2, W+2) -> (..., H, W) (valid windows)."""
    rows = padded[..., :, :-2] + padded[..., :, 1:-1] + padded[..., :, 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) * (1.0 / 9.0)


def reflect_pad(x: Tensor) -> Tensor:
    """Reflection padding by 1 on the last two dims of a tensor with any leading dims."""
    lead = x.shape[:-2]
    out = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="reflect")
    return out.reshape(*lead, *out.shape[-2:])


def box3_reflect_adjoint(g: Tensor) -> Tensor:
    """Adjoint of ``x -> box3(reflect_pad(x))``: (..., H, W) -> (..., H, W).

    box3's adjoint is the 3x3 mean over ``g`` zero-padded by 2 (each padded pixel collects the
    windows that contain it); reflect_pad's adjoint folds padded row 0 onto row 1, row H+1 onto
    row H-2, and the same for the columns (corners fold twice, once per axis)."""
    h, w = g.shape[-2:]
    full = box3(F.pad(g.reshape(-1, 1, h, w), (2, 2, 2, 2)))  # (.., H+2, W+2)
    rows = full[..., 1:-1, :].clone()
    rows[..., 1, :] += full[..., 0, :]
    rows[..., h - 2, :] += full[..., h + 1, :]
    out = rows[..., 1:-1].clone()
    out[..., 1] += rows[..., 0]
    out[..., w - 2] += rows[..., w + 1]
    return out.reshape(g.shape)


def _ssim_terms(x: Tensor, y: Tensor, mu_y: Tensor, sig_y: Tensor) -> tuple[Tensor, ...]:
    """Window statistics of ``x`` against the target and the SSIM numerator / denominator
    factors: (mu_x, n1, n2, d1, d2). ``y``, ``mu_y``, ``sig_y`` broadcast against ``x``."""
    xp = reflect_pad(x)
    mu_x = box3(xp)
    sig_x = box3(xp * xp) - mu_x * mu_x
    sig_xy = box3(xp * reflect_pad(y)) - mu_x * mu_y
    n1 = 2 * mu_x * mu_y + SSIM_C1
    n2 = 2 * sig_xy + SSIM_C2
    d1 = mu_x * mu_x + mu_y * mu_y + SSIM_C1
    d2 = sig_x + sig_y + SSIM_C2
    return mu_x, n1, n2, d1, d2


def _error(x: Tensor, y: Tensor, mu_y: Tensor, sig_y: Tensor, w: float) -> Tensor:
    """Forward of :class:`PhotometricError` on one chunk."""
    l1 = (x - y).abs().mean(-3, keepdim=True)
    if w == 0:
        return l1
    _, n1, n2, d1, d2 = _ssim_terms(x, y, mu_y, sig_y)
    ssim = torch.clamp((1 - (n1 * n2) / (d1 * d2)) / 2, 0, 1).mean(-3, keepdim=True)
    return w * ssim + (1 - w) * l1


def _error_grad(g: Tensor, x: Tensor, y: Tensor, mu_y: Tensor, sig_y: Tensor, w: float) -> Tensor:
    """Gradient of :func:`_error` w.r.t. ``x`` on one chunk, given the upstream gradient ``g``."""
    c = x.shape[-3]
    grad = ((1 - w) / c) * g * torch.sign(x - y)
    if w == 0:
        return grad
    mu_x, n1, n2, d1, d2 = _ssim_terms(x, y, mu_y, sig_y)
    d = d1 * d2
    r = (n1 * n2) / d
    v = (1 - r) / 2
    # d err / d r = -w / (2C) where the clamp passes the gradient (bounds included, as torch)
    gr = (g * (-w / (2 * c))) * ((v >= 0) & (v <= 1)) / d
    g_mu = gr * (2 * mu_y * (n2 - n1) - 2 * r * mu_x * (d2 - d1))  # d / d mean(x)
    g_xx = gr * (-r * d1)                                          # d / d E[x^2]
    g_xy = gr * (2 * n1)                                           # d / d E[xy]
    adj = box3_reflect_adjoint(torch.stack(torch.broadcast_tensors(g_mu, g_xx, g_xy)))
    return grad + adj[0] + 2 * x * adj[1] + y * adj[2]


def _chunks(m: int, b: int, step: int):
    """(m index, batch slice) pairs covering (M, B) in chunks of ``step`` images."""
    for i in range(m):
        for j in range(0, b, step):
            yield i, slice(j, min(b, j + step))


class PhotometricError(torch.autograd.Function):
    """Per-pixel ``w * mean_c clamp((1 - SSIM)/2, 0, 1) + (1 - w) * mean_c |x - y|`` of
    candidates ``x`` (M, B, C, H, W) against a target ``y`` (B, C, H, W) with its window mean and
    variance. Returns (M, B, 1, H, W); gradient to ``x`` only.

    Runs ``chunk`` images at a time: each op's inputs then stay in cache (one 3x96x320 fp32 image
    is 369 KB), where one op over the whole stack streams tens of MB through memory per op.
    ``fns``: the per-chunk (error, error_grad) pair to run, e.g. compiled ones
    (``trainer.kernels.compiled_cpu``); None = this module's eager functions."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, mu_y: Tensor, sig_y: Tensor, w: float, chunk: int,
                fns: tuple | None = None) -> Tensor:
        ctx.w, ctx.chunk = float(w), int(chunk)
        ctx.error, ctx.error_grad = fns or (_error, _error_grad)
        ctx.save_for_backward(x, y, mu_y, sig_y)
        out = x.new_empty(*x.shape[:2], 1, *x.shape[3:])
        for i, b in _chunks(x.shape[0], x.shape[1], ctx.chunk):
            out[i, b] = ctx.error(x[i, b], y[b], mu_y[b], sig_y[b], ctx.w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, y, mu_y, sig_y = ctx.saved_tensors
        grad = torch.empty_like(x)
        for i, b in _chunks(x.shape[0], x.shape[1], ctx.chunk):
            grad[i, b] = ctx.error_grad(g[i, b], x[i, b], y[b], mu_y[b], sig_y[b], ctx.w)
        return grad, None, None, None, None, None, None


def target_stats(target: Tensor) -> tuple[Tensor, Tensor]:
    """(window mean, window variance) of the target, shared by every candidate."""
    tp = reflect_pad(target)
    mu = box3(tp)
    return mu, box3(tp * tp) - mu * mu


CHUNK = 2
"""Images per chunk in :class:`PhotometricError` (measured fastest on a 2-core EPYC, docs/kernels.md)."""


def photometric_errors(target: Tensor, candidates: Tensor, ssim_weight: float, chunk: int = 0) -> Tensor:
    """Errors (M, B, 1, H, W) of stacked candidates (M, B, C, H, W) against target (B, C, H, W)."""
    mu_y, sig_y = target_stats(target)
    return PhotometricError.apply(candidates, target, mu_y, sig_y, float(ssim_weight), chunk or CHUNK)


def _running_min(errors: Sequence[Tensor], best: Tensor | None = None, index: Tensor | None = None,
                 offset: int = 0) -> tuple[Tensor, Tensor]:
    """Per-pixel minimum over ``errors`` in order (strict <: ties keep the lowest index),
    continuing from (best, index) whose candidates came first; broadcasts."""
    for i, err in enumerate(errors):
        if best is None:
            best, index = err, torch.full(err.shape, offset + i, dtype=torch.int64, device=err.device)
            continue
        better = err < best
        best = torch.where(better, err, best)
        index = torch.where(better, torch.full_like(better, offset + i, dtype=torch.int64), index)
    return best, index


def multiscale_min_reprojection(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor],
                                ssim_weight: float = 0.85, fns: tuple | None = None) -> tuple[Tensor, Tensor]:
    """Min-reprojection at S scales at once. ``target`` (B, C, H, W); ``warped``: one (S*B, C, H, W)
    tensor per source (scale-major: rows s*B..(s+1)*B-1 are scale s); ``identity``: unwarped
    sources (B, C, H, W), the same at every scale, so their errors are computed once.

    Returns (loss per scale (S,), argmin (S, B, 1, H, W) int64 over [identity..., warped...]),
    equal to :func:`trainer.losses.photometric.min_reprojection` at each scale up to float
    rounding (different summation order of the window means). ``fns``: see :class:`PhotometricError`."""
    b = target.shape[0]
    s = warped[0].shape[0] // b
    stacked = torch.stack([w.reshape(s, *target.shape) for w in warped])  # (N, S, B, C, H, W)
    if target.requires_grad:  # the hand-written backward has no target gradient: use autograd
        from trainer.losses.photometric import photometric_error

        errs = [photometric_error(w.reshape(-1, *target.shape[1:]), target.repeat(s, 1, 1, 1), ssim_weight)
                .reshape(s, b, 1, *target.shape[2:]) for w in stacked]
        id_errs = [photometric_error(i, target, ssim_weight) for i in identity]
    else:
        stats = target_stats(target)
        chunk = CHUNK if target.device.type == "cpu" else b  # on a GPU, big launches are what is cheap
        errs = list(PhotometricError.apply(stacked.reshape(-1, *target.shape), target, *stats, ssim_weight, chunk, fns)
                    .reshape(*stacked.shape[:3], 1, *target.shape[2:]))
        id_errs = []
        if identity:
            id_errs = list(PhotometricError.apply(torch.stack(list(identity)), target, *stats, ssim_weight, chunk,
                                                          fns))
    best, index = _running_min(id_errs)
    best, index = _running_min(errs, best, index, offset=len(id_errs))
    return best.mean(dim=(1, 2, 3, 4)), index.expand(s, *index.shape[-4:])
