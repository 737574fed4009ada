"""The depth task's CPU training loss (trainer/kernels/photometric_cpu.py) and the multi-scale warp
(trainer/geometry.py ``warp_scales``) equal the reference per scale: loss, argmin and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.geometry import (
    GRID_EAGER, _padded, pad_image, pixel_coordinates, pose_vec_to_mat, warp_frame, warp_scales,
)
from trainer.kernels.dispatch import fused_reprojection_loss, multiscale_reprojection_loss
from trainer.kernels.photometric_cpu import PAD, box3, crop, multiscale_min_reprojection
from trainer.losses.photometric import min_reprojection


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


def _reference(target, warped, identity, ssim_weight=0.85):
    """Per-scale reference on unpadded warps (B, C, S, H, W): (losses (S,), argmin (S, B, 1, H, W))."""
    out = [min_reprojection(target, [w[:, :, s] for w in warped], identity, ssim_weight)
           for s in range(warped[0].shape[2])]
    return torch.stack([best.mean() for best, _, _ in out]), torch.stack([idx for _, idx, _ in out])


def _warps(b, s, h, w, seed, dtype=torch.float64, n=2):
    """Unpadded warps (B, C, S, H, W) that require grad, near a target so both kinds of candidate win."""
    return [_rand(b, 3, s, h, w, seed=seed + i, dtype=dtype, grad=True) for i in range(n)]


def test_box3_adjoint_is_box3_of_the_zero_padded_gradient():
    for h, w in ((2, 2), (3, 5), (6, 9)):
        x, g = _rand(2, 3, h + 2, w + 2, seed=1), _rand(2, 3, h, w, seed=2)
        lhs = (box3(x) * g).sum()
        assert float(lhs) == pytest.approx(float((x * box3(F.pad(g, (2, 2, 2, 2)))).sum()), rel=1e-12)


def test_pad_image_layout_and_its_fast_backward():
    """Reflection by one pixel, then the border replicated; the hand-written fold is the adjoint."""
    assert pixel_coordinates(5, 2, torch.int64).tolist() == [1, 1, 0, 1, 2, 3, 4, 3, 3]
    x = _rand(2, 3, 4, 6, seed=3, grad=True)
    p = pad_image(x, 3)
    ref = F.pad(F.pad(x, (1, 1, 1, 1), mode="reflect"), (2, 2, 2, 2), mode="replicate")
    assert torch.equal(p, ref) and torch.equal(_padded(x, 3), ref)
    g = _rand(*p.shape, seed=4)
    assert torch.allclose(torch.autograd.grad((p * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0],
                          rtol=1e-12, atol=1e-14)
    for h, w in ((2, 2), (2, 3)):  # the smallest images still pad (reflection needs 2)
        assert pad_image(_rand(1, 1, h, w), 3).shape == (1, 1, h + 6, w + 6)


@pytest.mark.parametrize("n_id,ssim_weight,n_warp", [(2, 0.85, 2), (0, 0.85, 2), (1, 0.0, 2), (2, 1.0, 2),
                                                     (1, 0.85, 1), (3, 0.85, 3)])  # stereo, mono + stereo
def test_multiscale_matches_reference_per_scale(n_id, ssim_weight, n_warp):
    B, S, H, W = 2, 3, 7, 11
    target = _rand(B, 3, H, W, seed=5)
    identity = [_rand(B, 3, H, W, seed=6 + i) for i in range(n_id)]
    warped = _warps(B, S, H, W, seed=10, n=n_warp)
    losses, argmin = multiscale_min_reprojection(target, [pad_image(w, PAD) for w in warped], identity,
                                                 ssim_weight)
    ref_losses, ref_argmin = _reference(target, warped, identity or None, ssim_weight)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)
    assert torch.equal(argmin, ref_argmin)
    assert 0 < (argmin >= n_id).sum() < argmin.numel() or n_id == 0  # both kinds win somewhere
    grads = torch.autograd.grad(losses.sum(), warped)
    ref_grads = torch.autograd.grad(ref_losses.sum(), warped)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)
        assert g.abs().sum() > 0


def test_gradcheck_float64():
    """The hand-written backward against finite differences (upstream gradients vary per scale)."""
    B, S, H, W = 1, 2, 4, 5
    target = _rand(B, 3, H, W, seed=50)
    identity = [(target + 0.2 * _rand(B, 3, H, W, seed=51)).clamp(0, 1)]
    warped = [(target.unsqueeze(2) + 0.2 * _rand(B, 3, S, H, W, seed=52 + i)).clamp(0, 1).requires_grad_(True)
              for i in range(2)]
    weights = torch.tensor([1.0, 0.3], dtype=torch.float64)

    def loss(*ws):
        return (multiscale_min_reprojection(target, [pad_image(w, PAD) for w in ws], identity)[0] * weights).sum()

    assert torch.autograd.gradcheck(loss, tuple(warped))


def test_float32_close_and_target_gradient_falls_back_to_autograd():
    B, S, H, W = 2, 2, 6, 9
    target = _rand(B, 3, H, W, seed=20, dtype=torch.float32, grad=True)
    identity = [_rand(B, 3, H, W, seed=21, dtype=torch.float32)]
    warped = _warps(B, S, H, W, seed=22, dtype=torch.float32, n=1)
    losses, argmin = multiscale_min_reprojection(target, [pad_image(w, PAD) for w in warped], identity)
    ref_losses, ref_argmin = _reference(target, warped, identity)
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
    unpadded = [_rand(B, 3, S, H, W, seed=32 + i, dtype=torch.float32) for i in range(2)]
    warped = [pad_image(w, PAD) for w in unpadded]
    ref, ref_idx = multiscale_reprojection_loss(target, warped, identity, impl="reference")
    for i in range(S):
        single = fused_reprojection_loss(target, [w[:, :, i] for w in unpadded], identity, impl="reference")
        assert torch.equal(ref[i], single)
    fast, idx = multiscale_reprojection_loss(target, warped, identity, impl="handwritten")  # compiled: its own tests
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(idx, ref_idx) and idx.shape == (S, B, 1, H, W)
    with pytest.raises(ValueError, match=rf"one \(B, C, S, H\+{2 * PAD}, W\+{2 * PAD}\) tensor per source "
                                         rf"\(warps padded by {PAD}\)"):
        multiscale_reprojection_loss(target, [unpadded[0]], identity)
    with pytest.raises(ValueError, match="'fused' is not one of"):
        multiscale_reprojection_loss(target, warped, identity, impl="fused")


def _camera(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[0.58 * w, 0, w / 2], [0, 1.92 * h, h / 2], [0, 0, 1]]).repeat(b, 1, 1)
    T = pose_vec_to_mat(0.05 * torch.randn(b, 3, generator=g), 0.3 * torch.randn(b, 3, generator=g))
    return K, T, torch.rand(b, 3, h, w, generator=g), 1 + 20 * torch.rand(b, 3, h, w, generator=g)


def test_warp_scales_equals_warp_frame_per_depth_values_and_gradients():
    """Each scale's warp is warp_frame's; the padded layout is the padded warp exactly; the
    hand-written projection gradient reaches depth and pose like autograd through warp_frame."""
    B, H, W = 2, 10, 16
    K, T, img, depths = (t.double() for t in _camera(B, H, W, seed=40))
    d, pose = depths.clone().requires_grad_(True), T.clone().requires_grad_(True)
    out = warp_scales(img, d, pose, K, pad=PAD)
    assert out.shape == (B, 3, 3, H + 2 * PAD, W + 2 * PAD)
    assert torch.equal(out, pad_image(crop(out, PAD), PAD))
    d_ref, pose_ref = depths.clone().requires_grad_(True), T.clone().requires_grad_(True)
    ref = torch.stack([warp_frame(img, d_ref[:, s:s + 1], pose_ref, K)[0] for s in range(3)], dim=2)
    torch.testing.assert_close(crop(out, PAD), ref, rtol=0, atol=1e-12)
    g = _rand(*out.shape, seed=41)
    grads = torch.autograd.grad((out * g).sum(), [d, pose])
    ref_grads = torch.autograd.grad((pad_image(ref, PAD) * g).sum(), [d_ref, pose_ref])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="must share B, H, W"):
        warp_scales(img[:1], depths, T, K)


def test_warp_scales_float32_unpadded_matches_warp_frame():
    B, H, W = 2, 10, 16
    K, T, img, depths = _camera(B, H, W, seed=42)
    out = warp_scales(img, depths, T, K, grid_fns=GRID_EAGER)
    ref = torch.stack([warp_frame(img, depths[:, s:s + 1], T, K)[0] for s in range(3)], dim=2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_warp_scales_from_disparity_equals_warp_of_disp_to_depth():
    """``disp_range``: the network's disparity turned into depth inside the projection, values and
    gradient as through ``disp_to_depth``."""
    from trainer.geometry import disp_to_depth

    B, H, W = 2, 10, 16
    K, T, img, _ = (t.double() for t in _camera(B, H, W, seed=43))
    disp = _rand(B, 3, H, W, seed=44)
    a, b = disp.clone().requires_grad_(True), disp.clone().requires_grad_(True)
    out = warp_scales(img, a, T, K, pad=PAD, disp_range=(1 / 100, 1 / 0.1))
    ref = warp_scales(img, disp_to_depth(b, 0.1, 100.0)[1], T, K, pad=PAD)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = _rand(*out.shape, seed=45)
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), a)[0], torch.autograd.grad((ref * g).sum(), b)[0],
                               rtol=1e-10, atol=1e-12)


def test_warp_scales_of_depths_padded_once_for_two_sources():
    """``depths_padded``: depths padded once and shared by two sources' warps give each warp exactly, and
    the one fold of the summed gradients equals the two separate pads' gradients summed."""
    B, H, W = 2, 10, 16
    K, T, img, depths = (t.double() for t in _camera(B, H, W, seed=46))
    T2, img2 = T.flip(0), img.flip(0)
    a, b = depths.clone().requires_grad_(True), depths.clone().requires_grad_(True)
    padded = pad_image(a, PAD)
    shared = [warp_scales(i, padded, t, K, pad=PAD, depths_padded=True) for i, t in ((img, T), (img2, T2))]
    separate = [warp_scales(i, b, t, K, pad=PAD) for i, t in ((img, T), (img2, T2))]
    for x, y in zip(shared, separate):
        assert torch.equal(x, y)
    g = [_rand(*x.shape, seed=47 + k) for k, x in enumerate(shared)]
    ga = torch.autograd.grad(sum((x * gi).sum() for x, gi in zip(shared, g)), a)[0]
    gb = torch.autograd.grad(sum((x * gi).sum() for x, gi in zip(separate, g)), b)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="must share B, H, W"):
        warp_scales(img, depths, T, K, pad=PAD, depths_padded=True)  # unpadded depths: 2 PAD too small
