"""Reference photometric loss: SSIM against a direct float64 windowed formula, min-reprojection
and auto-mask selection on constructed cases, smoothness against a hand computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.losses.photometric import (
    SSIM_C1, SSIM_C2, min_reprojection, photometric_error, reprojection_loss, ssim_dissimilarity,
)


def _ssim_dissim_numpy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Direct per-pixel windowed SSIM in float64 with explicit reflection indexing (no pooling)."""
    C, H, W = x.shape
    out = np.zeros_like(x, dtype=np.float64)

    def refl(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    for c in range(C):
        for i in range(H):
            for j in range(W):
                xs, ys = [], []
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        ii, jj = refl(i + di, H), refl(j + dj, W)
                        xs.append(x[c, ii, jj])
                        ys.append(y[c, ii, jj])
                xs, ys = np.array(xs, np.float64), np.array(ys, np.float64)
                mx, my = xs.mean(), ys.mean()
                vx, vy = ((xs - mx) ** 2).mean(), ((ys - my) ** 2).mean()
                cxy = ((xs - mx) * (ys - my)).mean()
                s = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / (
                    (mx ** 2 + my ** 2 + SSIM_C1) * (vx + vy + SSIM_C2))
                out[c, i, j] = min(max((1 - s) / 2, 0.0), 1.0)
    return out


def test_ssim_matches_direct_windowed_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 9, generator=g)
    y = (x + 0.2 * torch.rand(2, 3, 7, 9, generator=g)).clamp(0, 1)
    got = ssim_dissimilarity(x, y)
    got64 = ssim_dissimilarity(x.double(), y.double())
    for b in range(2):
        ref = _ssim_dissim_numpy(x[b].double().numpy(), y[b].double().numpy())
        np.testing.assert_allclose(got64[b].numpy(), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[b].numpy(), ref, rtol=0, atol=2e-5)


def test_ssim_identical_images_is_zero_and_shape_checked():
    x = torch.rand(1, 3, 5, 6)
    assert torch.allclose(ssim_dissimilarity(x, x), torch.zeros_like(x), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ssim_dissimilarity(x, x[:, :, :4])


def test_photometric_error_combination():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 6, 6, generator=g), torch.rand(2, 3, 6, 6, generator=g)
    e = photometric_error(a, b, 0.85)
    ref = 0.85 * ssim_dissimilarity(a, b).mean(1, keepdim=True) + 0.15 * (a - b).abs().mean(1, keepdim=True)
    assert e.shape == (2, 1, 6, 6)
    torch.testing.assert_close(e, ref)
    torch.testing.assert_close(photometric_error(a, b, 0.0), (a - b).abs().mean(1, keepdim=True))


def _const(v: float, shape=(1, 3, 4, 4)) -> torch.Tensor:
    return torch.full(shape, v)


def test_min_reprojection_selects_per_pixel_minimum_and_automask():
    target = _const(0.5)
    # ssim_weight=0: the error is the per-pixel mean |diff|, so the winners are hand-checkable
    warped_a = _const(0.5)
    warped_a[..., 0, :] = 0.9            # row 0: warped_a is bad
    warped_b = _const(0.7)
    warped_b[..., 0, :] = 0.55           # row 0: warped_b is best
    ident_a = _const(0.6)                # identity: beats warped_b (0.7) but not warped_a (0.5)
    ident_b = _const(0.8)
    err, idx, mask = min_reprojection(target, [warped_a, warped_b], [ident_a, ident_b], 0.0)
    # candidate order: ident_a=0, ident_b=1, warped_a=2, warped_b=3
    assert idx.dtype == torch.int64 and mask.dtype == torch.bool and err.shape == (1, 1, 4, 4)
    assert (idx[..., 1:, :] == 2).all()
    assert (idx[..., 0, :] == 3).all()
    assert mask.all()
    torch.testing.assert_close(err[..., 1:, :], torch.zeros(1, 1, 3, 4))

    # a static pixel: identity equals the target exactly -> identity wins, auto-masked out
    ident_a[..., 2, 2] = 0.5
    warped_a[..., 2, 2] = 0.5  # tie with a warped frame: identity (lower index) wins
    err, idx, mask = min_reprojection(target, [warped_a, warped_b], [ident_a, ident_b], 0.0)
    assert idx[0, 0, 2, 2] == 0 and not mask[0, 0, 2, 2]
    assert mask.sum() == 15
    torch.testing.assert_close(err[0, 0, 0], torch.full((4,), 0.05))


def test_ties_go_to_lowest_index_and_no_identity_disables_mask():
    t = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    w = t.clone()
    err, idx, mask = min_reprojection(t, [w, w.clone()], None)
    assert (idx == 0).all() and mask.all()
    err, idx, mask = min_reprojection(t, [w], [w.clone()])
    assert (idx == 0).all() and not mask.any()
    with pytest.raises(ValueError):
        min_reprojection(t, [], None)


def test_reprojection_loss_is_mean_of_min_and_gradient_reaches_winner_only():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, 3, 8, 8, generator=g)
    w1 = torch.rand(2, 3, 8, 8, generator=g).requires_grad_()
    w2 = torch.rand(2, 3, 8, 8, generator=g).requires_grad_()
    loss = reprojection_loss(t, [w1, w2], None)
    e1, e2 = photometric_error(w1, t), photometric_error(w2, t)
    torch.testing.assert_close(loss, torch.minimum(e1, e2).mean())
    loss.backward()
    assert w1.grad.abs().sum() > 0 and w2.grad.abs().sum() > 0
    # with a perfect frame w1 everywhere, w2 never wins and gets no gradient
    w1 = t.clone().requires_grad_()
    w2 = torch.rand(2, 3, 8, 8, generator=g).requires_grad_()
    reprojection_loss(t, [w1, w2], None).backward()
    assert w2.grad.abs().sum() == 0
