"""Synthetic world: determinism, disjoint splits, schema, and geometric / photometric consistency."""
from __future__ import annotations

import numpy as np
import pytest

from data_shards import schema
from data_shards.sources.synthetic import (
    SyntheticConfig, compute_flow, count_samples, intrinsics, iter_samples, make_sequence,
)

ALL_CLASSES = {0, 1, 2, 5, 8, 9, 10, 13}


def small_cfg(**kw) -> SyntheticConfig:
    """A small world: fast to render, still big enough for geometry checks."""
    base = dict(seed=3, height=64, width=208, sequences={"train": 2, "val": 1, "test": 1}, frames_per_sequence=6)
    base.update(kw)
    return SyntheticConfig(**base)


@pytest.fixture(scope="module")
def train_samples():
    return list(iter_samples("train", small_cfg()))


def bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample img (H, W, C) at float pixel coordinates (clamped at the border)."""
    H, W = img.shape[:2]
    u0 = np.clip(np.floor(u), 0, W - 2).astype(int)
    v0 = np.clip(np.floor(v), 0, H - 2).astype(int)
    fu = np.clip(u - u0, 0, 1)[..., None]
    fv = np.clip(v - v0, 0, 1)[..., None]
    im = img.astype(np.float64)
    top = im[v0, u0] * (1 - fu) + im[v0, u0 + 1] * fu
    bot = im[v0 + 1, u0] * (1 - fu) + im[v0 + 1, u0 + 1] * fu
    return top * (1 - fv) + bot * fv


def project_into(sample: dict, T_target: np.ndarray):
    """Back-project the sample's pixels with its depth and project them into the camera T_target."""
    K = np.array(sample["meta"]["K"])
    T0 = np.array(sample["meta"]["T_wc"])
    H, W = sample["depth"].shape
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    d = sample["depth"].astype(np.float64)
    pc = np.stack([(u - K[0, 2]) / K[0, 0] * d, (v - K[1, 2]) / K[1, 1] * d, d], -1)
    pw = pc @ T0[:3, :3].T + T0[:3, 3]
    p1 = (pw - T_target[:3, 3]) @ T_target[:3, :3]
    z = np.where(p1[..., 2] > 1e-6, p1[..., 2], np.nan)
    return K[0, 0] * p1[..., 0] / z + K[0, 2], K[1, 1] * p1[..., 1] / z + K[1, 2], u, v


def photometric_error(sample: dict, key: str, T_target: np.ndarray) -> np.ndarray:
    """|I_t - I_target(warp)| over pixels with depth that land inside the target image."""
    u1, v1, _, _ = project_into(sample, T_target)
    H, W = sample["depth"].shape
    ok = (sample["depth"] > 0) & (u1 >= 1) & (u1 <= W - 2) & (v1 >= 1) & (v1 <= H - 2)
    warped = bilinear(sample[key], u1[ok], v1[ok])
    return np.abs(warped - sample["rgb"][ok].astype(np.float64)).mean(-1)


def test_count_shapes_and_schema(train_samples):
    cfg = small_cfg()
    assert len(train_samples) == count_samples("train", cfg) == 2 * 4
    H, W = cfg.height, cfg.width
    keys = [s["__key__"] for s in train_samples]
    assert keys[:2] == ["seq0000_f000001", "seq0000_f000002"] and keys[-1] == "seq0001_f000004"
    s = train_samples[0]
    for k in ("rgb", "rgb_prev", "rgb_next", "rgb_right"):
        assert s[k].dtype == np.uint8 and s[k].shape == (H, W, 3), k
    assert s["depth"].dtype == np.float32 and s["depth"].shape == (H, W)
    assert s["seg"].dtype == np.uint8 and s["seg"].shape == (H, W)
    assert s["flow"].dtype == np.float32 and s["flow"].shape == (H, W, 3)
    m = s["meta"]
    assert m["baseline_m"] == 0.54
    np.testing.assert_allclose(m["K"], [[0.58 * W, 0, W / 2], [0, 1.92 * H, H / 2], [0, 0, 1]])
    assert m["source"] == {"dataset": "synthetic", "split": "train", "sequence": "seq0000", "frame": 1, "seed": 3}
    assert m["classes"] == sorted(set(np.unique(s["seg"]).tolist()) - {255})
    # Round trip through the shard schema: decoded values equal what was generated.
    dec = schema.decode_sample(schema.encode_sample(s), where="test")
    assert np.array_equal(dec["rgb_right"].numpy().transpose(1, 2, 0), s["rgb_right"])
    assert np.array_equal(dec["seg"].numpy(), s["seg"])
    assert np.abs(dec["depth"].numpy()[0] - s["depth"]).max() <= 0.5 / 256 + 1e-6
    flow = dec["flow"].numpy().transpose(1, 2, 0)
    assert np.array_equal(flow[..., 2], s["flow"][..., 2])
    assert np.abs(flow[..., :2] - s["flow"][..., :2]).max() <= 0.5 / 64 + 1e-6  # 1/64-px fixed point


def test_deterministic_by_seed():
    cfg = small_cfg(height=24, width=80, sequences={"train": 1}, frames_per_sequence=4)
    a = [schema.encode_sample(s) for s in iter_samples("train", cfg)]
    b = [schema.encode_sample(s) for s in iter_samples("train", cfg)]
    assert a == b
    c = [schema.encode_sample(s) for s in iter_samples("train", small_cfg(
        seed=4, height=24, width=80, sequences={"train": 1}, frames_per_sequence=4))]
    assert all(x["rgb.png"] != y["rgb.png"] for x, y in zip(a, c))


def test_splits_use_disjoint_scenes():
    cfg = small_cfg(height=24, width=80, sequences={"train": 3, "val": 2, "test": 2}, frames_per_sequence=3)
    frames = {}
    for split in ("train", "val", "test"):
        frames[split] = {s["rgb"].tobytes() for s in iter_samples(split, cfg)}
        assert len(frames[split]) == cfg.sequences[split]
    assert not (frames["train"] & frames["val"]) and not (frames["train"] & frames["test"])
    assert not (frames["val"] & frames["test"])
    widths = {make_sequence(cfg, sp, i).scene.road_half for sp in ("train", "val", "test")
              for i in range(cfg.sequences[sp])}
    assert len(widths) == 7  # every sequence has its own scene
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        next(iter_samples("dev", cfg))


def test_depth_is_z_depth_and_sky_is_zero(train_samples):
    s = train_samples[1]
    K, T = np.array(s["meta"]["K"]), np.array(s["meta"]["T_wc"])
    H, W = s["depth"].shape
    v, u = np.mgrid[0:H, 0:W]
    road = (s["seg"] == 0) & (s["depth"] > 0)
    d = s["depth"][road].astype(np.float64)
    pc = np.stack([(u[road] - K[0, 2]) / K[0, 0] * d, (v[road] - K[1, 2]) / K[1, 1] * d, d], -1)
    pw = pc @ T[:3, :3].T + T[:3, 3]
    # Road points lie on the world's ground plane y = 0 (ray length instead of z would not).
    assert road.sum() > 500
    assert np.abs(pw[:, 1]).max() < 0.01
    assert np.all(s["depth"][s["seg"] == 10] == 0)
    assert np.all(s["depth"][s["seg"] != 10] >= 0)
    assert abs(-T[1, 3] - 1.65) < 0.05


def test_temporal_reprojection_reproduces_next_frame(train_samples):
    errs = np.concatenate([photometric_error(s, "rgb_next", np.array(s["meta"]["T_wc_next"]))
                           for s in train_samples])
    prev = np.concatenate([photometric_error(s, "rgb_prev", np.array(s["meta"]["T_wc_prev"]))
                           for s in train_samples])
    assert np.median(errs) < 3.0 and np.median(prev) < 3.0
    assert np.mean(errs < 10) > 0.85
    # The check can fail: the wrong pose (t-1 instead of t+1) gives much larger errors.
    wrong = np.concatenate([photometric_error(s, "rgb_next", np.array(s["meta"]["T_wc_prev"]))
                            for s in train_samples])
    assert np.median(wrong) > 2 * np.median(errs) + 1.5


def test_stereo_reprojection_reproduces_right_view(train_samples):
    errs = []
    for s in train_samples:
        T = np.array(s["meta"]["T_wc"])
        T_right = T.copy()
        T_right[:3, 3] += s["meta"]["baseline_m"] * T[:3, 0]
        errs.append(photometric_error(s, "rgb_right", T_right))
        # Same thing in disparity form: u_right = u - fx * b / depth.
        K = np.array(s["meta"]["K"])
        u1, v1, u, v = project_into(s, T_right)
        ok = s["depth"] > 0
        np.testing.assert_allclose(u1[ok], u[ok] - K[0, 0] * 0.54 / s["depth"][ok], atol=1e-3)
        np.testing.assert_allclose(v1[ok], v[ok], atol=1e-3)
    errs = np.concatenate(errs)
    assert np.median(errs) < 3.0 and np.mean(errs < 10) > 0.85


def test_flow_matches_the_warp_and_the_next_frame(train_samples):
    for s in train_samples:
        flow = s["flow"]
        valid = flow[..., 2] > 0
        assert set(np.unique(flow[..., 2]).tolist()) <= {0.0, 1.0}
        assert valid.mean() > 0.6
        u1, v1, u, v = project_into(s, np.array(s["meta"]["T_wc_next"]))
        d = valid & (s["depth"] > 0)
        np.testing.assert_allclose(flow[..., 0][d], (u1 - u)[d], atol=1e-3)
        np.testing.assert_allclose(flow[..., 1][d], (v1 - v)[d], atol=1e-3)
        H, W = s["depth"].shape
        assert np.all((u + flow[..., 0])[valid] > -0.5) and np.all((u + flow[..., 0])[valid] < W - 0.5)
        warped = bilinear(s["rgb_next"], (u + flow[..., 0])[valid], (v + flow[..., 1])[valid])
        err = np.abs(warped - s["rgb"][valid].astype(np.float64)).mean(-1)
        assert np.median(err) < 3.0, s["__key__"]
        # Sky (at infinity) moves with the rotation only.
        sky = valid & (s["seg"] == 10)
        assert sky.any()
        K = np.array(s["meta"]["K"])
        T0, T1 = np.array(s["meta"]["T_wc"]), np.array(s["meta"]["T_wc_next"])
        R01 = T1[:3, :3].T @ T0[:3, :3]
        ray = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ R01.T
        np.testing.assert_allclose(flow[..., 0][sky], (K[0, 0] * ray[..., 0] / ray[..., 2] + K[0, 2] - u)[sky],
                                   atol=1e-3)


def test_flow_marks_occlusion_invalid():
    """A point hidden in t+1 behind a nearer surface is invalid: synthetic one-pixel case."""
    cfg = small_cfg(height=16, width=32)
    K = intrinsics(cfg)
    T0, T1 = np.eye(4), np.eye(4)
    T1[2, 3] = 1.0  # move 1 m forward
    depth0 = np.full((16, 32), 20.0, np.float32)
    depth1 = np.full((16, 32), 19.0, np.float32)
    seg = np.full((16, 32), 2, np.uint8)
    base = compute_flow(depth0, seg, depth1, seg, K, T0, T1)[..., 2]
    # Moving forward, the border pixels leave the image: exactly those are invalid.
    u = np.arange(32) - 16.0
    v = np.arange(16) - 8.0
    inside = (np.abs(v[:, None] * 20 / 19) < 8.5) & (np.abs(u[None, :] * 20 / 19) < 16.5)
    inside &= (v[:, None] * 20 / 19 < 7.5) & (u[None, :] * 20 / 19 < 15.5)
    assert np.array_equal(base > 0, inside)
    depth1[8, 16] = 5.0  # something nearer now covers the centre pixel
    flow = compute_flow(depth0, seg, depth1, seg, K, T0, T1)
    assert flow[8, 16, 2] == 0 and flow[..., 2].sum() == base.sum() - 1


def test_all_classes_present_and_colour_alone_cannot_segment(train_samples):
    present = set().union(*(s["meta"]["classes"] for s in train_samples))
    assert ALL_CLASSES <= present, ALL_CLASSES - present
    assert present <= ALL_CLASSES
    # Best colour-only classifier (majority label per coarse RGB bin), fitted and scored on the
    # same pixels: an optimistic upper bound, still far from perfect because palettes overlap.
    rgb = np.concatenate([s["rgb"].reshape(-1, 3) for s in train_samples]) // 32
    seg = np.concatenate([s["seg"].reshape(-1) for s in train_samples])
    keep = seg != 255
    bins = (rgb[keep, 0].astype(int) * 64 + rgb[keep, 1] * 8 + rgb[keep, 2])
    counts = np.zeros((512, 256), np.int64)
    np.add.at(counts, (bins, seg[keep]), 1)
    acc = counts.max(1).sum() / keep.sum()
    assert acc < 0.85, acc
    # Grey shared by road, building, car; green by vegetation, terrain, car.
    shared = [(counts[:, a] > 0) & (counts[:, b] > 0) for a, b in ((0, 2), (0, 13), (8, 9), (2, 13))]
    assert all(m.sum() >= 5 for m in shared)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="frames_per_sequence"):
        SyntheticConfig(frames_per_sequence=2)
    with pytest.raises(ValueError, match="sequences\\['train'\\]"):
        SyntheticConfig(sequences={"train": -1})


def test_screen_space_culling_loses_no_hit():
    """The renderer's per-primitive screen rectangles give the same nearest hits as brute force."""
    from data_shards.sources import synthetic_render as r

    cfg = small_cfg(height=24, width=80)
    world = make_sequence(cfg, "train", 0)
    rays = r.camera_rays(world.K, 24, 80)
    far = cfg.far_m
    side = world.poses[3].copy()  # looking 50 deg to the right: boxes cross the near plane
    c, s_ = np.cos(np.deg2rad(50)), np.sin(np.deg2rad(50))
    side[:3, :3] = np.array([[c, 0, s_], [0, 1, 0], [-s_, 0, c]]) @ side[:3, :3]
    for T in (world.poses[0], world.poses[5], side):
        zbuf, oid, _, d = r.cast(world.scene, rays, T, world.K, far)
        o, df = T[:3, 3], d.reshape(-1, 3)
        best = np.where(df[:, 1] > 1e-9, -o[1] / np.where(df[:, 1] > 1e-9, df[:, 1], 1), np.inf)
        best_id = np.where(np.isfinite(best), 1, 0)
        aabbs, ids = world.scene.aabb_table
        for obj in ids:  # every primitive against every pixel
            ptype, i = world.scene.prim_type[obj], world.scene.prim_index[obj]
            table = {r.P_BOX: world.scene.boxes, r.P_CYL: world.scene.cyls, r.P_SPHERE: world.scene.spheres}[ptype]
            t, _ = r._intersect(ptype, o, df, np.repeat(table[i][None], len(df), 0))
            closer = t < best
            best[closer], best_id[closer] = t[closer], obj
        seen = best < far
        np.testing.assert_allclose(zbuf.reshape(-1)[seen], best[seen], rtol=1e-12)
        assert np.array_equal(oid.reshape(-1)[seen], best_id[seen])
        assert np.all(zbuf.reshape(-1)[~seen] >= far - 1e-9)
