"""The depth task's CPU training loss (trainer/kernels/photometric_cpu.py) and the multi-depth warp
(trainer/geometry.py) equal the reference per scale: loss, argmin and gradients."""
from __future__ import annotations

import pytest
import torch

from trainer.geometry import pose_vec_to_mat, reprojection_coefficients, warp_depths, warp_frame
from trainer.kernels.dispatch import fused_reprojection_loss, multiscale_reprojection_loss
from trainer.kernels.photometric_cpu import (
    PhotometricError, box3, box3_reflect_adjoint, multiscale_min_reprojection, reflect_pad, target_stats,
)
from trainer.losses.photometric import min_reprojection, photometric_error


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny tensors gain nothing from more, and on a shared 2-core
    machine a second spinning thread makes every small op wait for a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rand(*shape, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


def _reference(target, warped, identity, s, ssim_weight=0.85):
    """Per-scale reference: (losses (S,), argmin (S, B, 1, H, W))."""
    b = target.shape[0]
    out = [min_reprojection(target, [w[i * b:(i + 1) * b] for w in warped], identity, ssim_weight)
           for i in range(s)]
    return torch.stack([best.mean() for best, _, _ in out]), torch.stack([idx for _, idx, _ in out])


def test_box3_reflect_adjoint_is_the_adjoint():
    for h, w in ((2, 2), (3, 5), (6, 9)):
        x, g = _rand(2, 3, h, w, seed=1), _rand(2, 3, h, w, seed=2)
        lhs = (box3(reflect_pad(x)) * g).sum()
        assert float(lhs) == pytest.approx(float((x * box3_reflect_adjoint(g)).sum()), rel=1e-12)


@pytest.mark.parametrize("w", [0.85, 0.0, 1.0])
def test_photometric_error_value_and_gradcheck(w):
    y = _rand(2, 3, 3, 4, seed=3)
    x = (y + 0.3 * _rand(1, 2, 3, 3, 4, seed=4)).clamp(0, 1).requires_grad_(True)
    stats = target_stats(y)
    out = PhotometricError.apply(x, y, *stats, w, 1)
    ref = photometric_error(x[0], y, w)[None]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: PhotometricError.apply(t, y, *stats, w, 1), (x,))


@pytest.mark.parametrize("n_id,ssim_weight", [(2, 0.85), (0, 0.85), (1, 0.0)])
def test_multiscale_matches_reference_per_scale(n_id, ssim_weight):
    B, S, H, W = 2, 3, 7, 11
    target = _rand(B, 3, H, W, seed=5)
    identity = [_rand(B, 3, H, W, seed=6 + i) for i in range(n_id)]
    warped = [_rand(S * B, 3, H, W, seed=10 + i, grad=True) for i in range(2)]
    losses, argmin = multiscale_min_reprojection(target, warped, identity, ssim_weight)
    ref_losses, ref_argmin = _reference(target, warped, identity or None, S, ssim_weight)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)
    assert torch.equal(argmin, ref_argmin)
    assert 0 < (argmin >= n_id).sum() < argmin.numel() or n_id == 0  # both kinds win somewhere
    grads = torch.autograd.grad(losses.sum(), warped)
    ref_grads = torch.autograd.grad(ref_losses.sum(), warped)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)


def test_float32_close_and_target_gradient_falls_back_to_autograd():
    B, S, H, W = 2, 2, 6, 9
    target = _rand(B, 3, H, W, seed=20, dtype=torch.float32, grad=True)
    identity = [_rand(B, 3, H, W, seed=21, dtype=torch.float32)]
    warped = [_rand(S * B, 3, H, W, seed=22, dtype=torch.float32, grad=True)]
    losses, argmin = multiscale_min_reprojection(target, warped, identity)
    ref_losses, ref_argmin = _reference(target, warped, identity, S)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=1e-7)
    assert torch.equal(argmin, ref_argmin)
    g = torch.autograd.grad(losses.sum(), [target, *warped])
    rg = torch.autograd.grad(ref_losses.sum(), [target, *warped])
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_dispatch_multiscale_impls_agree_and_check_shapes():
    B, S, H, W = 2, 2, 5, 8
    target = _rand(B, 3, H, W, seed=30, dtype=torch.float32)
    identity = [_rand(B, 3, H, W, seed=31, dtype=torch.float32)]
    warped = [_rand(S * B, 3, H, W, seed=32 + i, dtype=torch.float32) for i in range(2)]
    ref, ref_idx = multiscale_reprojection_loss(target, warped, identity, impl="reference")
    for i in range(S):
        single = fused_reprojection_loss(target, [w[i * B:(i + 1) * B] for w in warped], identity, impl="reference")
        assert torch.equal(ref[i], single)
    fast, idx = multiscale_reprojection_loss(target, warped, identity, impl="auto")
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(idx, ref_idx) and idx.shape == (S, B, 1, H, W)
    with pytest.raises(ValueError, match=r"one \(S\*B, C, H, W\) tensor per source with B=2"):
        multiscale_reprojection_loss(target, [warped[0][:3]], identity)
    with pytest.raises(ValueError, match="'fused' is not one of"):
        multiscale_reprojection_loss(target, warped, identity, impl="fused")


def test_warp_depths_equals_warp_frame_per_depth():
    B, H, W = 2, 10, 16
    K = torch.tensor([[0.58 * W, 0, W / 2], [0, 1.92 * H, H / 2], [0, 0, 1]]).repeat(B, 1, 1)
    g = torch.Generator().manual_seed(40)
    T = pose_vec_to_mat(0.05 * torch.randn(B, 3, generator=g), 0.3 * torch.randn(B, 3, generator=g))
    img = torch.rand(B, 3, H, W, generator=g)
    depths = 1 + 20 * torch.rand(3, B, 1, H, W, generator=g)
    out = warp_depths(img, depths, *reprojection_coefficients(T, K, H, W))
    ref = torch.cat([warp_frame(img, depths[s], T, K)[0] for s in range(3)])
    assert out.shape == (3 * B, 3, H, W)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="must share B, H, W"):
        warp_depths(img[:1], depths, *reprojection_coefficients(T, K, H, W))
