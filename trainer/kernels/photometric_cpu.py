"""The min-reprojection photometric loss for the CPU: whole-candidate passes, hand-written backward.

Same semantics as the reference (``trainer.losses.photometric``: 0.85 * (1 - SSIM)/2 + 0.15 * L1,
SSIM on 3x3 windows of reflection-padded images, per-pixel minimum over [identity..., warped...]
with ties to the lowest index), computed the way a CPU likes it:

* candidates arrive **padded by** :data:`PAD` = 3 pixels, (B, C, S, H+6, W+6) for the S scales
  of one source (``trainer.geometry.pad_image``; ``warp_scales(..., pad=PAD)`` there samples
  straight into that layout): the one-pixel reflection SSIM needs, then two pixels of filler
  (the border replicated) that the backward's extended domain reads and multiplies by zero. Every
  3x3 window is then read with plain shifted loads: with the padding folded into the index
  arithmetic instead, inductor's loops fell back to scalar code (3x slower);
* the 3x3 window mean is separable: three shifted adds along W, three along H;
* the target's window statistics (mean, E[y^2] - mean^2) are computed once and shared;
* the errors of all candidates and their per-pixel minimum come out of one pass per scale
  (:func:`min_error`); the identity candidates' minimum is computed once for every scale;
* :class:`MinReprojection` saves only its inputs and the argmin; its backward recomputes
  the window statistics of each pixel's winner only (each window load picks the winner's value)
  and writes the gradient out: d loss / d (window mean, E[x^2], E[xy]) of
  each pixel's winner, once per pixel, on the reflection-padded domain grown by two more pixels,
  where the upstream gradient is zero (:func:`error_coefficients`); per candidate, the 3x3 window
  sums (box3's adjoint) of those of the pixels it won, plus its L1 term, give its gradient on the
  reflection-padded layout (:func:`error_adjoint`). The reflection's fold onto the image happens
  in the warp's backward. The upstream gradient of a mean is one value, passed as such.

Only the warped candidates get gradients; the target and identity frames are data (training
frames). Callers that need gradients for them get the reference's autograd instead
(:func:`multiscale_min_reprojection` does so itself).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.geometry import pad_image
from trainer.losses.photometric import SSIM_C1, SSIM_C2, min_reprojection

PAD = 3
"""Padding of the candidates: one pixel of reflection (SSIM's), then two of replicated filler."""


def box3(padded: Tensor) -> Tensor:
    """Mean over each 3x3 window of ``padded`` (..., H+2, W+2) -> (..., H, W) (valid windows)."""
    rows = padded[..., :, :-2] + padded[..., :, 1:-1] + padded[..., :, 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) * (1.0 / 9.0)


def crop(padded: Tensor, n: int = 1) -> Tensor:
    """``padded`` without ``n`` pixels on each side of its last two dims (a view)."""
    return padded[..., n:-n, n:-n] if n else padded


def target_stats(yp: Tensor) -> tuple[Tensor, Tensor]:
    """(window mean, window variance) of a padded target, on its domain less one pixel per side;
    shared by every candidate."""
    mu = box3(yp)
    return mu, box3(yp * yp) - mu * mu


def _window_stats(xp: Tensor, yp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A padded candidate's window mean, E[x^2] and E[xy] against the target, on its domain less one
    pixel per side."""
    return box3(xp), box3(xp * xp), box3(xp * yp)


def _ssim_factors(mu_x: Tensor, exx: Tensor, exy: Tensor, mu_y: Tensor, sig_y: Tensor) -> tuple[Tensor, ...]:
    """SSIM's numerator / denominator factors (n1, n2, d1, d2) from a candidate's window statistics."""
    sig_x = exx - mu_x * mu_x
    sig_xy = exy - mu_x * mu_y
    n1 = 2 * mu_x * mu_y + SSIM_C1
    n2 = 2 * sig_xy + SSIM_C2
    d1 = mu_x * mu_x + mu_y * mu_y + SSIM_C1
    d2 = sig_x + sig_y + SSIM_C2
    return n1, n2, d1, d2


def _error(xp: Tensor, yp: Tensor, mu_y: Tensor, sig_y: Tensor, w: float) -> Tensor:
    """Per-pixel error (N, 1, ..., H, W) of one reflection-padded candidate; channels on dim 1."""
    l1 = (crop(xp) - crop(yp)).abs().mean(1, keepdim=True)
    if w == 0:
        return l1
    n1, n2, d1, d2 = _ssim_factors(*_window_stats(xp, yp), mu_y, sig_y)
    ssim = torch.clamp((1 - (n1 * n2) / (d1 * d2)) / 2, 0, 1).mean(1, keepdim=True)
    return w * ssim + (1 - w) * l1


def min_error(yp: Tensor, mu_y: Tensor, sig_y: Tensor, best: Tensor | None, index: Tensor | None,
              offset: int, w: float, *xps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel minimum of the errors of the candidates ``xps`` (numbered ``offset``,
    ``offset + 1``, ...; :data:`PAD`-padded like the target ``yp``, whose statistics ``mu_y``,
    ``sig_y`` come from :func:`target_stats`), continuing from (``best``, ``index``) of earlier
    candidates (None: none). Strict ``<``: ties keep the lowest index. Returns (best, index int32)."""
    yp, mu_y, sig_y = crop(yp, PAD - 1), crop(mu_y, PAD - 1), crop(sig_y, PAD - 1)
    for n, xp in enumerate(xps):
        err = _error(crop(xp, PAD - 1), yp, mu_y, sig_y, w)
        if best is None:
            best, index = err, torch.full_like(err, offset + n, dtype=torch.int32)
            continue
        better = err < best
        best = torch.where(better, err, best)
        index = torch.where(better, offset + n, index)
    return best, index


def min_error_into(out: tuple[Tensor, Tensor], yp: Tensor, mu_y: Tensor, sig_y: Tensor, best: Tensor | None,
                   index: Tensor | None, offset: int, w: float, *xps: Tensor) -> None:
    """:func:`min_error` written into ``out`` = (best, index) views of the whole batch's tensors:
    compiled, the kernel stores straight into them (no chunk result copied afterwards)."""
    b, i = min_error(yp, mu_y, sig_y, best, index, offset, w, *xps)
    out[0].copy_(b)
    out[1].copy_(i)


def _winner_window_stats(index: Tensor, yp: Tensor, offset: int, xps: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Window mean, E[x^2] and E[xy] at each pixel of the candidate that won it (``index``; candidate
    ``offset`` where none of ``xps`` did), on ``index``'s domain: each of the 9 window loads picks the
    winner's value first, so one window sum per statistic instead of one per candidate (3.3 ms of
    14.6 at 96x320, docs/depth.md)."""
    hd, wd = index.shape[-2:]
    sx = sxx = sxy = None
    for di in range(3):
        for dj in range(3):
            sl = (..., slice(di, di + hd), slice(dj, dj + wd))
            x = xps[0][sl]
            for n in range(1, len(xps)):
                x = torch.where(index == offset + n, xps[n][sl], x)
            xy = x * yp[sl]
            sx, sxx, sxy = (x, x * x, xy) if sx is None else (sx + x, sxx + x * x, sxy + xy)
    return sx * (1.0 / 9.0), sxx * (1.0 / 9.0), sxy * (1.0 / 9.0)


def error_coefficients(g: Tensor, index: Tensor, yp: Tensor, mu_y: Tensor, sig_y: Tensor, offset: int,
                       w: float, *xps: Tensor) -> Tensor:
    """Where one of the candidates ``xps`` won (``index`` in ``offset`` .. ``offset + N - 1``), the
    upstream gradient ``g`` times d error / d (window mean, E[x^2], E[xy]) of the winner:
    (3, ..., H+4, W+4). ``index`` (int32) is padded by 2 with :data:`NOBODY` and ``g`` is a scalar or
    zero-padded by 2 (the domain every term lives on here), so the two outer pixels of each side
    come out zero; the other inputs as :func:`min_error`."""
    mu_x, exx, exy = _winner_window_stats(index, yp, offset, xps)
    n1, n2, d1, d2 = _ssim_factors(mu_x, exx, exy, mu_y, sig_y)
    c = xps[0].shape[1]
    gn = torch.where((index >= offset) & (index < offset + len(xps)), g, 0.0)
    d = d1 * d2
    r = (n1 * n2) / d
    v = (1 - r) / 2
    # d err / d r = -w / (2C) where the clamp passes the gradient (bounds included, as torch)
    gr = (gn * (-w / (2 * c))) * ((v >= 0) & (v <= 1)) / d
    g_mu = gr * (2 * mu_y * (n2 - n1) - 2 * r * mu_x * (d2 - d1))  # d / d mean(x)
    g_xx = gr * (-r * d1)                                          # d / d E[x^2]
    g_xy = gr * (2 * n1)                                           # d / d E[xy]
    return torch.stack(torch.broadcast_tensors(g_mu, g_xx, g_xy))


def error_adjoint(grads: tuple[Tensor, ...], coefficients: Tensor, g: Tensor, index: Tensor, yp: Tensor,
                  offset: int, w: float, *xps: Tensor) -> None:
    """Into ``grads`` (one (..., H+2, W+2) view per candidate): the gradient on each
    reflection-padded candidate from the :func:`error_coefficients` of the pixels it won, i.e.
    their 3x3 window sums (box3's adjoint) of the window-mean, E[x^2] and E[xy] terms, chained
    through x^2 and xy, plus the L1 term. Compiled, the result is stored straight into the views."""
    yp = crop(yp, PAD - 1)
    g1 = g if g.dim() == 0 else crop(g)
    c = xps[0].shape[1]
    for n, (xp, out) in enumerate(zip(xps, grads)):
        won = index == offset + n
        a = box3(torch.where(won, coefficients, 0.0))
        x = crop(xp, PAD - 1)
        l1 = ((1 - w) / c) * torch.where(crop(won), g1, 0.0) * torch.sign(x - yp)
        out.copy_(a[0] + 2 * x * a[1] + yp * a[2] + l1)


NOBODY = -1
"""The index value of "no candidate" on the two pixels the backward adds around the image. The
index is int32 (the forward writes it so): 16 lanes like the fp32 vectors (uint8 loads of 16 lanes were
10x slower), half the bytes of int64."""


EAGER = SimpleNamespace(target_stats=target_stats, min_error=min_error, min_error_into=min_error_into,
                        error_coefficients=error_coefficients,
                        error_adjoint=error_adjoint)
"""The target's statistics and the per-chunk functions :class:`MinReprojection` runs
(``trainer.kernels.compiled_cpu`` compiles the same ones)."""


def _chunks(b: int, step: int) -> list[slice]:
    """Batch slices covering ``b`` images in chunks of ``step``."""
    return [slice(j, min(b, j + step)) for j in range(0, b, step)]


def _zero_filler(t: Tensor) -> Tensor:
    """Zero the :data:`PAD` - 1 filler pixels on each side of ``t`` (in place)."""
    n = PAD - 1
    for sl in ((..., slice(None, n), slice(None)), (..., slice(-n, None), slice(None)),
               (..., slice(None), slice(None, n)), (..., slice(None), slice(-n, None))):
        t[sl] = 0
    return t


class MinReprojection(torch.autograd.Function):
    """Per-pixel minimum (best (B, 1, S, H, W), index int32) of the photometric errors of
    candidates ``xps`` (B, C, S, H+6, W+6) against the target ``yp`` (B, C, 1, H+6, W+6), both
    ``pad_image(x, PAD)``-padded, continuing from ``first`` = (best, index) of ``offset`` earlier
    candidates (or None). Gradient to ``xps`` only (zero on the filler). One call of the ``fns``
    (:data:`EAGER` or compiled ones) per scale and ``chunk`` images, so that a call's
    intermediates stay in cache."""

    @staticmethod
    def forward(ctx, yp: Tensor, mu_y: Tensor, sig_y: Tensor, first: tuple | None, offset: int, w: float,
                chunk: int, fns: SimpleNamespace, *xps: Tensor):
        ctx.meta = (offset, float(w), int(chunk), fns)
        b, _, s, hp, wp = xps[0].shape
        best = yp.new_empty(b, 1, s, hp - 2 * PAD, wp - 2 * PAD)
        index = torch.empty(best.shape, dtype=torch.int32, device=best.device)
        for i in _chunks(b, int(chunk)):
            prev = (first[0][i], first[1][i]) if first is not None else (None, None)
            for j in range(s):
                sl = (i, slice(None), slice(j, j + 1))
                fns.min_error_into((best[sl], index[sl]), yp[i], mu_y[i], sig_y[i], *prev, offset, float(w),
                                   *(x[sl] for x in xps))
        ctx.save_for_backward(yp, mu_y, sig_y, index, *xps)
        ctx.mark_non_differentiable(index)
        return best, index

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor, _g_index):
        offset, w, chunk, fns = ctx.meta
        yp, mu_y, sig_y, index, *xps = ctx.saved_tensors
        index = F.pad(index, (PAD - 1,) * 4, value=NOBODY)  # the coefficients' domain
        uniform = all(st == 0 for st in g.stride())  # the gradient of a mean: one value
        g = g.reshape(-1)[0] if uniform else F.pad(g, (PAD - 1,) * 4)
        grads = [_zero_filler(torch.empty_like(x)) for x in xps]
        for i in _chunks(yp.shape[0], chunk):
            for j in range(xps[0].shape[2]):
                sl = (i, slice(None), slice(j, j + 1))
                xs = [x[sl] for x in xps]
                gs = g if uniform else g[sl]
                coef = fns.error_coefficients(gs, index[sl], yp[i], mu_y[i], sig_y[i], offset, w, *xs)
                fns.error_adjoint(tuple(crop(grad[sl], PAD - 1) for grad in grads), coef, gs, index[sl], yp[i],
                                  offset, w, *xs)
        return (None,) * 8 + tuple(grads)


CHUNK_PIXELS = 1 << 17
"""Pixels per chunk of :class:`MinReprojection` on the CPU at most: a chunk's intermediates stay in a
core's L2 cache (forward + backward, 8 images, 4 scales, one thread: 96x320 chunks of 2 / 4 / 8 images
80 / 77 / 79 ms, 192x640 chunks of 1 / 2 / 4 images 289 / 318 / 359 ms; docs/depth.md)."""


def cpu_chunk(height: int, width: int) -> int:
    """Images per chunk on the CPU: the largest power of two within :data:`CHUNK_PIXELS`, at least one."""
    chunk = 1
    while 2 * chunk * height * width <= CHUNK_PIXELS:
        chunk *= 2
    return chunk


def _identity_min(yp: Tensor, mu_y: Tensor, sig_y: Tensor, identity: Sequence[Tensor], w: float, chunk: int,
                  fns: SimpleNamespace) -> tuple[Tensor, Tensor] | None:
    """(best, index) over the identity candidates, computed once for every scale (no gradient)."""
    if not identity:
        return None
    padded = [pad_image(i, PAD).unsqueeze(2) for i in identity]
    parts = [fns.min_error(yp[b], mu_y[b], sig_y[b], None, None, 0, w, *(p[b] for p in padded))
             for b in _chunks(yp.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _autograd_per_scale(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor],
                        ssim_weight: float) -> tuple[Tensor, Tensor]:
    """The reference at each scale, under autograd (gradients to the target and identity too)."""
    out = [min_reprojection(target, [crop(w[:, :, s], PAD) for w in warped], identity or None, ssim_weight)
           for s in range(warped[0].shape[2])]
    return torch.stack([best.mean() for best, _, _ in out]), torch.stack([index for _, index, _ in out])


def multiscale_min_reprojection(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor],
                                ssim_weight: float = 0.85, fns: SimpleNamespace | None = None,
                                chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Min-reprojection at S scales at once. ``target`` (B, C, H, W); ``warped``: per source, its
    warps at every scale in the ``trainer.geometry.pad_image(x, PAD)`` layout, (B, C, S, H+6, W+6);
    ``identity``: the unwarped sources (B, C, H, W), the same at every scale, so their errors are computed once.

    Returns (loss per scale (S,), argmin (S, B, 1, H, W) int32 over [identity..., warped...]),
    equal to :func:`trainer.losses.photometric.min_reprojection` at each scale up to float rounding
    (a different summation order of the window means). ``fns``: see :class:`MinReprojection`."""
    identity = list(identity)
    if target.requires_grad or any(i.requires_grad for i in identity):
        return _autograd_per_scale(target, warped, identity, ssim_weight)
    fns = fns or EAGER
    if not chunk:  # a GPU likes big launches
        chunk = cpu_chunk(*target.shape[-2:]) if target.device.type == "cpu" else target.shape[0]
    yp = pad_image(target, PAD).unsqueeze(2)
    mu_y, sig_y = fns.target_stats(yp)
    first = _identity_min(yp, mu_y, sig_y, identity, float(ssim_weight), chunk, fns)
    best, index = MinReprojection.apply(yp, mu_y, sig_y, first, len(identity), float(ssim_weight), chunk, fns,
                                        *warped)
    return best.mean(dim=(0, 1, 3, 4)), index.permute(2, 0, 1, 3, 4)
