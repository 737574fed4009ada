"""Fused Triton kernels for the min-reprojection photometric loss (Monodepth2 SSIM + L1).

Three kernels, each one pass over memory on (B, C, H, W) contiguous images:

* ``fwd_kernel``: per pixel and per candidate source (identity sources first, then warped),
  the error ``w * mean_c (1 - SSIM)/2 + (1 - w) * mean_c |x - y|`` with SSIM's 3x3
  reflection-padded window statistics computed in-kernel, the per-pixel minimum (strict ``<``,
  so ties go to the lowest index) and a per-tile partial sum of the minimum. It writes only
  the argmin (uint8 per pixel) and the partial sums.
* ``bwd_coef_kernel``: per pixel p, the derivative of the loss w.r.t. the SSIM window
  statistics of the *selected* source at p (mu_x, mu_y, E[x^2] (= E[y^2] coefficient), E[xy]),
  already multiplied by the upstream gradient / (B*H*W): 4 floats per channel.
* ``bwd_grad_kernel``: per pixel q, gathers those coefficients from the 3x3 neighbours p whose
  (reflection-padded) window contains q, with the exact reflection multiplicity at the image
  border, plus the L1 term, and writes the gradients of every source (and the target) that
  needs one.

Import this module with ``TRITON_INTERPRET=1`` already set to run the kernels on CPU tensors
(Triton decides interpreted vs compiled when the ``@triton.jit`` decorators run). The kernels
call only triton.language builtins (``tl.full``, ``tl.reduce`` with our own combine function,
never ``tl.zeros``/``tl.sum``, which are themselves ``@jit`` functions fixed when ``triton`` is
first imported), so the interpreter works even if ``triton`` was imported earlier without it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from trainer.losses.photometric import SSIM_C1, SSIM_C2

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""True when these kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""

MAX_SOURCES = 255
"""The argmin is stored as uint8, so at most 255 candidate sources (identity + warped)."""

BLOCK_H = 8
"""Tile height (pixels) of one program."""
BLOCK_W = 32
"""Tile width (pixels) of one program; rows of a tile are contiguous in memory (coalesced)."""
NUM_WARPS = 8
"""Warps per program on the GPU: 8 warps = one pixel per thread on an 8x32 tile. With 4 warps (two
pixels per thread) ptxas needs 255 registers and spills in the bf16 gradient kernel on sm_90
(see ``trainer.kernels.aot``); with 8 it needs at most 166 registers and 8 bytes of stack."""


@triton.jit
def _reflect(i, n):
    """Index with reflection padding of 1 (-1 -> 1, n -> n-2), clamped into [0, n-1] for lanes
    outside the image (their loads are masked; the clamp only keeps the address in bounds)."""
    i = tl.where(i < 0, -i, i)
    i = tl.where(i > n - 1, 2 * (n - 1) - i, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _window_stats(x_ptr, y_ptr, r0, r1, r2, c0, c1, c2, mask, CDT: tl.constexpr):
    """Sums over the 3x3 window (rows r0..r2, columns c0..c2 are element offsets) of x, y, x^2,
    y^2 and x*y, plus the centre values x and y, all in the compute dtype CDT."""
    sx = tl.full(mask.shape, 0, CDT)
    sy = tl.full(mask.shape, 0, CDT)
    sxx = tl.full(mask.shape, 0, CDT)
    syy = tl.full(mask.shape, 0, CDT)
    sxy = tl.full(mask.shape, 0, CDT)
    xc = tl.full(mask.shape, 0, CDT)
    yc = tl.full(mask.shape, 0, CDT)
    for i in tl.static_range(3):
        if i == 0:
            r = r0
        elif i == 1:
            r = r1
        else:
            r = r2
        for j in tl.static_range(3):
            if j == 0:
                c = c0
            elif j == 1:
                c = c1
            else:
                c = c2
            off = r + c
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(CDT)
            y = tl.load(y_ptr + off, mask=mask, other=0.0).to(CDT)
            sx += x
            sy += y
            sxx += x * x
            syy += y * y
            sxy += x * y
            if i == 1 and j == 1:
                xc = x
                yc = y
    return sx, sy, sxx, syy, sxy, xc, yc


@triton.jit
def _add(a, b):
    """Sum combine function for tl.reduce (ours, not tl.sum: triton.language's own @jit helpers
    are fixed as compiled or interpreted when triton is imported, ours when this module is)."""
    return a + b


@triton.jit
def _tile_offsets(pid_h, pid_w, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row/column indices of a tile, its in-image mask and the element offsets of the
    reflection-padded rows (h-1, h, h+1) and columns (w-1, w, w+1) of every pixel's window."""
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    mask = (h < H) & (w < W)
    r0 = _reflect(h - 1, H) * W
    r1 = _reflect(h, H) * W
    r2 = _reflect(h + 1, H) * W
    c0 = _reflect(w - 1, W)
    c1 = _reflect(w, W)
    c2 = _reflect(w + 1, W)
    return h, w, mask, r0, r1, r2, c0, c1, c2


@triton.jit
def fwd_kernel(tgt_ptr, src_ptrs, argmin_ptr, partial_ptr, H, W, ssim_weight,
                N_SRC: tl.constexpr, C: tl.constexpr, CDT: tl.constexpr,
                C1: tl.constexpr, C2: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Per-pixel min over sources of the SSIM+L1 error; writes argmin (uint8) and the tile sum."""
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h, w, mask, r0, r1, r2, c0, c1, c2 = _tile_offsets(pid_h, pid_w, H, W, BLOCK_H, BLOCK_W)
    plane = H * W
    best = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
    best_idx = tl.full((BLOCK_H, BLOCK_W), 0, tl.int32)
    for s in tl.static_range(N_SRC):
        ssim_acc = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        l1_acc = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        for c in tl.static_range(C):
            base = (b * C + c) * plane
            sx, sy, sxx, syy, sxy, xc, yc = _window_stats(
                src_ptrs[s] + base, tgt_ptr + base, r0, r1, r2, c0, c1, c2, mask, CDT)
            mu_x = sx / 9.0
            mu_y = sy / 9.0
            sigma_x = sxx / 9.0 - mu_x * mu_x
            sigma_y = syy / 9.0 - mu_y * mu_y
            sigma_xy = sxy / 9.0 - mu_x * mu_y
            num = (2 * mu_x * mu_y + C1) * (2 * sigma_xy + C2)
            den = (mu_x * mu_x + mu_y * mu_y + C1) * (sigma_x + sigma_y + C2)
            d = (1 - num / den) / 2
            ssim_acc += tl.minimum(tl.maximum(d, 0.0), 1.0)
            l1_acc += tl.abs(xc - yc)
        err = ssim_weight * (ssim_acc / C) + (1 - ssim_weight) * (l1_acc / C)
        if s == 0:
            best = err
        else:
            better = err < best
            best = tl.where(better, err, best)
            best_idx = tl.where(better, s, best_idx)
    pix = b * plane + h * W + w
    tl.store(argmin_ptr + pix, best_idx.to(tl.uint8), mask=mask)
    tile_sum = tl.reduce(tl.reduce(tl.where(mask, best, 0.0), 1, _add), 0, _add)
    tile_id = (b * tl.num_programs(1) + pid_h) * tl.num_programs(0) + pid_w
    tl.store(partial_ptr + tile_id, tile_sum)


@triton.jit
def bwd_coef_kernel(tgt_ptr, src_ptrs, argmin_ptr, coef_ptr, gscale_ptr, H, W, ssim_weight,
                     inv_count, N_SRC: tl.constexpr, C: tl.constexpr, CDT: tl.constexpr,
                     C1: tl.constexpr, C2: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """d loss / d (mu_x, mu_y, E[x^2] = E[y^2] coefficient, E[xy]) at each pixel, for the source
    selected there, scaled by upstream grad / (B*H*W); stored as coef[b, c, 0..3, h, w]."""
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h, w, mask, r0, r1, r2, c0, c1, c2 = _tile_offsets(pid_h, pid_w, H, W, BLOCK_H, BLOCK_W)
    plane = H * W
    pix = h * W + w
    k = tl.load(argmin_ptr + b * plane + pix, mask=mask, other=0).to(tl.int32)
    g = tl.load(gscale_ptr).to(CDT) * inv_count
    # d loss / d SSIM for each channel: -w / (2C) inside the clamp's range, 0 outside.
    g_s = -g * ssim_weight / (2.0 * C)
    for c in tl.static_range(C):
        base = (b * C + c) * plane
        sx = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        sy = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        sxx = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        syy = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        sxy = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        for s in tl.static_range(N_SRC):
            sel = mask & (k == s)
            s_sx, s_sy, s_sxx, s_syy, s_sxy, _xc, _yc = _window_stats(
                src_ptrs[s] + base, tgt_ptr + base, r0, r1, r2, c0, c1, c2, sel, CDT)
            # Masked lanes load 0, and exactly one source is selected per pixel.
            sx += s_sx
            sy += s_sy
            sxx += s_sxx
            syy += s_syy
            sxy += s_sxy
        mu_x = sx / 9.0
        mu_y = sy / 9.0
        sigma_x = sxx / 9.0 - mu_x * mu_x
        sigma_y = syy / 9.0 - mu_y * mu_y
        sigma_xy = sxy / 9.0 - mu_x * mu_y
        a1 = 2 * mu_x * mu_y + C1
        a2 = 2 * sigma_xy + C2
        b1 = mu_x * mu_x + mu_y * mu_y + C1
        b2 = sigma_x + sigma_y + C2
        den = b1 * b2
        ssim = (a1 * a2) / den
        d = (1 - ssim) / 2
        gs = tl.where(mask & (d >= 0.0) & (d <= 1.0), g_s, 0.0) / den
        coef_mu_x = gs * (2 * mu_y * (a2 - a1) - ssim * 2 * mu_x * (b2 - b1))
        coef_mu_y = gs * (2 * mu_x * (a2 - a1) - ssim * 2 * mu_y * (b2 - b1))
        coef_sq = gs * (-ssim * b1)
        coef_xy = gs * (2 * a1)
        cbase = ((b * C + c) * 4) * plane + pix
        tl.store(coef_ptr + cbase, coef_mu_x, mask=mask)
        tl.store(coef_ptr + cbase + plane, coef_mu_y, mask=mask)
        tl.store(coef_ptr + cbase + 2 * plane, coef_sq, mask=mask)
        tl.store(coef_ptr + cbase + 3 * plane, coef_xy, mask=mask)


@triton.jit
def _reflect_weight(p, q, n):
    """How many of p's three padded window taps (p-1, p, p+1, reflected) land on q, for |p-q|<=1."""
    return 1 + ((p == 0) & (q == 1)).to(tl.int32) + ((p == n - 1) & (q == n - 2)).to(tl.int32)


@triton.jit
def bwd_grad_kernel(tgt_ptr, src_ptrs, argmin_ptr, coef_ptr, gscale_ptr, gtgt_ptr, gsrc_ptrs,
                     H, W, ssim_weight, inv_count,
                     N_SRC: tl.constexpr, C: tl.constexpr, CDT: tl.constexpr,
                     GRAD_MASK: tl.constexpr, GRAD_TGT: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Gradient at each pixel q: sum over the 3x3 neighbours p (with reflection multiplicity) of
    the selected source's window-statistic coefficients, plus the L1 term at q itself."""
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    mask = (h < H) & (w < W)
    plane = H * W
    pix = h * W + w
    k_q = tl.load(argmin_ptr + b * plane + pix, mask=mask, other=255).to(tl.int32)
    g = tl.load(gscale_ptr).to(CDT) * inv_count
    g_l1 = g * (1 - ssim_weight) / C
    for c in tl.static_range(C):
        base = (b * C + c) * plane
        cbase = ((b * C + c) * 4) * plane
        y = tl.load(tgt_ptr + base + pix, mask=mask, other=0.0).to(CDT)
        g_y = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
        if GRAD_TGT:
            # Target terms that do not depend on which source a neighbour selected.
            sum_mu_y = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
            sum_sq = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
            for di in tl.static_range(3):
                for dj in tl.static_range(3):
                    ph = h + (di - 1)
                    pw = w + (dj - 1)
                    pm = mask & (ph >= 0) & (ph < H) & (pw >= 0) & (pw < W)
                    wt = (_reflect_weight(ph, h, H) * _reflect_weight(pw, w, W)).to(CDT)
                    poff = ph * W + pw
                    sum_mu_y += wt * tl.load(coef_ptr + cbase + plane + poff, mask=pm, other=0.0)
                    sum_sq += wt * tl.load(coef_ptr + cbase + 2 * plane + poff, mask=pm, other=0.0)
            g_y = (sum_mu_y + 2 * y * sum_sq) / 9.0
        for s in tl.static_range(N_SRC):
            if GRAD_TGT or ((GRAD_MASK >> s) & 1):
                x = tl.load(src_ptrs[s] + base + pix, mask=mask, other=0.0).to(CDT)
                sum_mu_x = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
                sum_sq_s = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
                sum_xy = tl.full((BLOCK_H, BLOCK_W), 0, CDT)
                for di in tl.static_range(3):
                    for dj in tl.static_range(3):
                        ph = h + (di - 1)
                        pw = w + (dj - 1)
                        pm = mask & (ph >= 0) & (ph < H) & (pw >= 0) & (pw < W)
                        poff = ph * W + pw
                        k_p = tl.load(argmin_ptr + b * plane + poff, mask=pm, other=255)
                        pm = pm & (k_p.to(tl.int32) == s)
                        wt = (_reflect_weight(ph, h, H) * _reflect_weight(pw, w, W)).to(CDT)
                        sum_xy += wt * tl.load(coef_ptr + cbase + 3 * plane + poff, mask=pm,
                                               other=0.0)
                        if (GRAD_MASK >> s) & 1:
                            sum_mu_x += wt * tl.load(coef_ptr + cbase + poff, mask=pm, other=0.0)
                            sum_sq_s += wt * tl.load(coef_ptr + cbase + 2 * plane + poff, mask=pm,
                                                     other=0.0)
                diff = x - y
                sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(CDT)
                l1 = tl.where(k_q == s, g_l1 * sign, 0.0)
                if GRAD_TGT:
                    g_y += x * sum_xy / 9.0 - l1
                if (GRAD_MASK >> s) & 1:
                    g_x = (sum_mu_x + 2 * x * sum_sq_s + y * sum_xy) / 9.0 + l1
                    tl.store(gsrc_ptrs[s] + base + pix, g_x.to(gsrc_ptrs[s].dtype.element_ty),
                             mask=mask)
        if GRAD_TGT:
            tl.store(gtgt_ptr + base + pix, g_y.to(gtgt_ptr.dtype.element_ty), mask=mask)


def compute_dtype(dtype: torch.dtype):
    """fp64 inputs compute in fp64 (for gradcheck); fp32 / bf16 / fp16 accumulate in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(B: int, H: int, W: int) -> tuple[int, int, int]:
    return (triton.cdiv(W, BLOCK_W), triton.cdiv(H, BLOCK_H), B)


def forward(target: Tensor, sources: Sequence[Tensor], ssim_weight: float) -> tuple[Tensor, Tensor]:
    """Run the fused forward. ``sources``: identity sources first, then warped; all contiguous
    (B, C, H, W) of target's dtype/device. Returns (loss 0-dim in the compute dtype, argmin
    (B, H, W) uint8)."""
    B, C, H, W = target.shape
    cdt = compute_dtype(target.dtype)
    grid = _grid(B, H, W)
    argmin = torch.empty((B, H, W), dtype=torch.uint8, device=target.device)
    acc_dtype = torch.float64 if cdt == tl.float64 else torch.float32
    partial = torch.empty(grid[0] * grid[1] * grid[2], dtype=acc_dtype, device=target.device)
    fwd_kernel[grid](target, tuple(sources), argmin, partial, H, W, float(ssim_weight),
                      N_SRC=len(sources), C=C, CDT=cdt, C1=SSIM_C1, C2=SSIM_C2,
                      BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, num_warps=NUM_WARPS)
    loss = partial.sum() / (B * H * W)
    return loss, argmin


def backward(grad_loss: Tensor, target: Tensor, sources: Sequence[Tensor], argmin: Tensor,
             ssim_weight: float, need_target: bool, need_sources: Sequence[bool]
             ) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of the fused loss w.r.t. the target (if ``need_target``) and each source whose
    ``need_sources`` flag is set (others get None). ``grad_loss`` is the 0-dim upstream gradient."""
    B, C, H, W = target.shape
    cdt = compute_dtype(target.dtype)
    acc_dtype = torch.float64 if cdt == tl.float64 else torch.float32
    grid = _grid(B, H, W)
    gscale = grad_loss.detach().reshape(1).to(device=target.device, dtype=acc_dtype)
    inv_count = 1.0 / (B * H * W)
    coef = torch.empty((B, C, 4, H, W), dtype=acc_dtype, device=target.device)
    srcs = tuple(sources)
    bwd_coef_kernel[grid](target, srcs, argmin, coef, gscale, H, W, float(ssim_weight), inv_count,
                           N_SRC=len(srcs), C=C, CDT=cdt, C1=SSIM_C1, C2=SSIM_C2,
                           BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, num_warps=NUM_WARPS)
    g_target = torch.empty_like(target) if need_target else None
    g_sources = [torch.empty_like(s) if need else None for s, need in zip(srcs, need_sources)]
    # Sources without a gradient get a placeholder pointer the kernel never writes.
    placeholder = coef
    grad_mask = sum(1 << i for i, need in enumerate(need_sources) if need)
    bwd_grad_kernel[grid](target, srcs, argmin, coef, gscale,
                           g_target if g_target is not None else placeholder,
                           tuple(g if g is not None else placeholder for g in g_sources),
                           H, W, float(ssim_weight), inv_count,
                           N_SRC=len(srcs), C=C, CDT=cdt, GRAD_MASK=grad_mask,
                           GRAD_TGT=need_target, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
                           num_warps=NUM_WARPS)
    return g_target, g_sources
