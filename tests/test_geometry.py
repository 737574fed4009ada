"""Geometry: warping with known depth and pose reproduces the other view; identity pose is the
identity warp; pose/rotation algebra; stereo and flip conventions; colour jitter consistency."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.tasks.augment import apply_jitter, hflip_sample, jitter_frames, sample_jitter
from trainer.geometry import (
    backproject, bilinear_warp, depth_to_disp, disp_to_depth, pixel_grid, pose_vec_to_mat, project,
    rot_from_axisangle, stereo_pose, transform, warp_frame,
)

H, W = 48, 64
K64 = torch.tensor([[40.0, 0.0, 31.2], [0.0, 40.0, 23.7], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _texture(X: torch.Tensor) -> torch.Tensor:
    """Smooth 3-channel texture of world points (3, N) -> (3, N) in [0, 1]."""
    x, y, z = X
    return torch.stack([
        0.5 + 0.25 * torch.sin(1.3 * x) + 0.2 * torch.cos(0.9 * y),
        0.5 + 0.3 * torch.sin(0.7 * x + 1.1 * y),
        0.5 + 0.2 * torch.cos(1.7 * y - 0.3 * z) + 0.2 * torch.sin(0.5 * x),
    ])


def _render(T_wc: torch.Tensor, K: torch.Tensor, normal=(0.1, -0.25, 1.0), offset=8.0):
    """Ray-cast a textured plane n.X = offset (world frame) from a camera with pose T_wc
    (camera-to-world). Returns (image (1, 3, H, W), z-depth (1, 1, H, W)), float64."""
    n = torch.tensor(normal, dtype=torch.float64)
    rays_c = torch.linalg.inv(K) @ pixel_grid(1, H, W, torch.float64)[0]  # (3, N), z = 1
    rays_w = T_wc[:3, :3] @ rays_c
    origin = T_wc[:3, 3:4]
    s = (offset - n @ origin) / (n @ rays_w)  # (N,) distance along the ray, in camera-z units
    assert (s > 0).all()
    X = origin + s * rays_w
    return _texture(X).reshape(1, 3, H, W), s.reshape(1, 1, H, W)


def _pose(axisangle, translation) -> torch.Tensor:
    return pose_vec_to_mat(torch.tensor([axisangle], dtype=torch.float64),
                           torch.tensor([translation], dtype=torch.float64))[0]


def test_identity_pose_is_identity_warp():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, H, W, generator=g)
    depth = 1 + 10 * torch.rand(2, 1, H, W, generator=g)
    K = K64.float().repeat(2, 1, 1)
    warped, valid = warp_frame(img, depth, torch.eye(4).repeat(2, 1, 1), K)
    assert valid.all()
    torch.testing.assert_close(warped, img, atol=1e-4, rtol=0)  # float32 round-off of K^-1 K
    warped64, _ = warp_frame(img.double(), depth.double(), torch.eye(4).repeat(2, 1, 1), K.double())
    torch.testing.assert_close(warped64, img.double(), atol=1e-10, rtol=0)


def test_backproject_project_round_trip():
    depth = 2 + torch.rand(1, 1, H, W, dtype=torch.float64)
    pts = backproject(depth, torch.linalg.inv(K64)[None])
    torch.testing.assert_close(pts[:, 2], depth.reshape(1, -1))  # z-depth, not ray length
    pix = project(pts, K64[None], H, W)
    grid = pixel_grid(1, H, W, torch.float64)[0, :2].T.reshape(1, H, W, 2)
    torch.testing.assert_close(pix, grid)


def test_known_depth_and_pose_warp_next_frame_onto_current():
    T_w0 = torch.eye(4, dtype=torch.float64)
    T_w1 = _pose((0.02, -0.03, 0.01), (0.3, -0.1, 0.6))  # camera t+1 in the world
    img0, depth0 = _render(T_w0, K64)
    img1, _ = _render(T_w1, K64)
    T_1_from_0 = torch.linalg.inv(T_w1) @ T_w0
    warped, valid = warp_frame(img1, depth0, T_1_from_0[None], K64[None])
    assert valid.float().mean() > 0.6
    err = (warped - img0).abs().amax(1, keepdim=True)[valid]
    assert err.max() < 0.02, err.max()  # bilinear interpolation of a smooth texture only
    # the wrong depth or the wrong direction of motion gives a clearly worse warp
    bad, _ = warp_frame(img1, depth0 * 1.5, T_1_from_0[None], K64[None])
    assert (bad - img0).abs().amax(1, keepdim=True)[valid].mean() > 5 * err.mean()
    bad, _ = warp_frame(img1, depth0, torch.linalg.inv(T_1_from_0)[None], K64[None])
    assert (bad - img0).abs().amax(1, keepdim=True)[valid].mean() > 5 * err.mean()


def test_stereo_baseline_convention_and_flip():
    b = 0.54
    T_wl = torch.eye(4, dtype=torch.float64)
    T_wr = T_wl.clone()
    T_wr[0, 3] = b  # right camera at +baseline along the left camera's x axis
    left, depth_l = _render(T_wl, K64)
    right, _ = _render(T_wr, K64)
    T = stereo_pose(torch.tensor([b], dtype=torch.float64))
    torch.testing.assert_close(T[0], torch.linalg.inv(T_wr) @ T_wl)
    warped, valid = warp_frame(right, depth_l, T, K64[None])
    assert valid.float().mean() > 0.7
    assert (warped - left).abs()[valid.expand_as(left)].max() < 0.02

    # flipping the whole sample (images, depth, K, baseline) keeps the geometry consistent
    sample = {"rgb": left[0], "rgb_right": right[0], "depth": depth_l[0], "K": K64.clone(),
              "baseline": torch.tensor(b, dtype=torch.float64)}
    f = hflip_sample(sample)
    assert float(f["baseline"]) == -b and float(f["K"][0, 2]) == pytest.approx(W - 1 - 31.2)
    warped_f, valid_f = warp_frame(f["rgb_right"][None], f["depth"][None],
                                   stereo_pose(f["baseline"][None]), f["K"][None])
    assert valid_f.float().mean() > 0.7
    assert (warped_f[0] - f["rgb"]).abs()[valid_f[0].expand(3, -1, -1)].max() < 0.02
    torch.testing.assert_close(warped_f[0], warped[0].flip(-1), atol=1e-9, rtol=0)


def test_rotation_matches_matrix_exponential_and_inverse():
    aa = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.0, math.pi / 2]], dtype=torch.float64)
    skew = torch.zeros(2, 3, 3, dtype=torch.float64)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -aa[:, 2], aa[:, 1], -aa[:, 0]
    skew = skew - skew.transpose(1, 2)
    torch.testing.assert_close(rot_from_axisangle(aa), torch.linalg.matrix_exp(skew))
    t = torch.tensor([[1.0, 2.0, 3.0], [-0.5, 0.1, 0.2]], dtype=torch.float64)
    T, Tinv = pose_vec_to_mat(aa, t), pose_vec_to_mat(aa, t, invert=True)
    torch.testing.assert_close(T @ Tinv, torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    pts = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(transform(pts, T), T[:, :3, :3] @ pts + t[..., None])
    # zero rotation is exactly the identity (no NaN from the axis normalisation)
    R0 = rot_from_axisangle(torch.zeros(1, 3))
    torch.testing.assert_close(R0, torch.eye(3)[None])


def test_disp_to_depth_range_and_inverse():
    disp = torch.tensor([0.0, 0.5, 1.0])
    scaled, depth = disp_to_depth(disp, 0.1, 100.0)
    torch.testing.assert_close(depth[[0, 2]], torch.tensor([100.0, 0.1]))
    torch.testing.assert_close(scaled, 1 / depth)
    torch.testing.assert_close(depth_to_disp(depth, 0.1, 100.0), disp)
    with pytest.raises(ValueError, match="min_depth"):
        disp_to_depth(disp, 1.0, 0.5)


def test_bilinear_warp_border_and_half_pixel():
    img = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    pix = torch.tensor([[[[0.5, 0.0], [10.0, 1.0], [1.0, 1.5]]]])  # (1, 1, 3, 2)
    out = bilinear_warp(img, pix)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.5, 7.0, 7.0]))


def test_jitter_is_identical_across_frames_and_seeded():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
    sample = {"rgb": a, "rgb_prev": a.clone(), "rgb_next": torch.zeros_like(a)}
    p1 = sample_jitter(torch.Generator().manual_seed(7))
    p2 = sample_jitter(torch.Generator().manual_seed(7))
    assert p1 == p2 and sorted(p1.order) == [0, 1, 2, 3]
    assert 0.8 <= p1.brightness <= 1.2 and -0.1 <= p1.hue <= 0.1
    out = jitter_frames(sample, ["rgb", "rgb_prev"], p1)
    assert torch.equal(out["aug_rgb"], out["aug_rgb_prev"]) and not torch.equal(out["aug_rgb"], a)
    assert torch.equal(out["rgb"], a)  # originals untouched for the loss
    torch.testing.assert_close(apply_jitter(a, p1), out["aug_rgb"])
    with pytest.raises(KeyError, match="rgb_right"):
        jitter_frames(sample, ["rgb_right"], p1)


@pytest.fixture(scope="module")
def synthetic_sample():
    from data_shards.sources.synthetic import SyntheticConfig, iter_samples

    cfg = SyntheticConfig(height=96, width=320, sequences={"test": 1}, frames_per_sequence=3)
    s = next(iter_samples("test", cfg))
    img = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].double() / 255
    meta = s["meta"]
    return {
        "rgb": img(s["rgb"]), "rgb_next": img(s["rgb_next"]), "rgb_right": img(s["rgb_right"]),
        "depth": torch.from_numpy(s["depth"]).double()[None, None],
        "flow": torch.from_numpy(s["flow"]).double().permute(2, 0, 1),
        "K": torch.tensor(meta["K"], dtype=torch.float64)[None],
        "baseline": torch.tensor([meta["baseline_m"]], dtype=torch.float64),
        "T_wc": torch.tensor(meta["T_wc"], dtype=torch.float64),
        "T_wc_next": torch.tensor(meta["T_wc_next"], dtype=torch.float64),
    }


def test_synthetic_world_known_depth_and_pose_warp_t_plus_1_onto_t(synthetic_sample):
    s = synthetic_sample
    depth, K = s["depth"], s["K"]
    h, w = depth.shape[-2:]
    T = (torch.linalg.inv(s["T_wc_next"]) @ s["T_wc"])[None]  # T_{t+1 <- t}
    # the projection agrees with the synthetic world's own forward flow (computed independently)
    pix = project(transform(backproject(depth, torch.linalg.inv(K)), T), K, h, w)[0]
    visible = (s["flow"][2] > 0) & (depth[0, 0] > 0)
    assert visible.float().mean() > 0.6
    u, v = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy")
    flow = pix - torch.stack([u, v], -1)
    assert (flow[visible] - s["flow"][:2].permute(1, 2, 0)[visible]).abs().max() < 1e-4
    # and the warped frame t+1 reproduces frame t where visible (up to 8-bit + bilinear resampling)
    warped, valid = warp_frame(s["rgb_next"], depth, T, K)
    m = visible & valid[0, 0]
    err = (warped - s["rgb"]).abs().amax(1)[0][m]
    identity_err = (s["rgb_next"] - s["rgb"]).abs().amax(1)[0][m]
    assert err.median() < 2.5 / 255 and err.quantile(0.9) < 0.05, (err.median(), err.quantile(0.9))
    assert err.mean() < 0.35 * identity_err.mean()


def test_synthetic_world_stereo_warp(synthetic_sample):
    s = synthetic_sample
    depth, K = s["depth"], s["K"]
    warped, valid = warp_frame(s["rgb_right"], depth, stereo_pose(s["baseline"]), K)
    m = valid[0, 0] & (depth[0, 0] > 0)
    err = (warped - s["rgb"]).abs().amax(1)[0][m]
    assert m.float().mean() > 0.8 and err.median() < 2.5 / 255, err.median()
    wrong, _ = warp_frame(s["rgb_right"], depth, stereo_pose(-s["baseline"]), K)
    assert (wrong - s["rgb"]).abs().amax(1)[0][m].mean() > 3 * err.mean()
