"""The synthetic world: deterministic procedural driving sequences (the embedded default data set).

Each sequence is a street corridor (``synthetic_scene``) driven along by a KITTI-like stereo
rig (fx = 0.58 W, fy = 1.92 H, principal point at the centre, camera 1.65 m above the road,
0.5-1.0 m forward per frame with small yaw/pitch jitter, right camera 0.54 m along the left
camera's x axis), ray cast on the CPU (``synthetic_render``). Everything follows from
``(seed, split, sequence)``: the same config gives the same bytes; splits use disjoint scenes.

Samples come out in the input format of :func:`data_shards.schema.encode_sample`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .synthetic_render import Frame, camera_rays, render, rotate
from .synthetic_scene import SKY, Scene, build_scene

DATASET = "synthetic"
#: Colour domains (SyntheticConfig.palette): the RGB channel order each rendered image is re-read in.
PALETTE_CHANNELS: dict[str, tuple[int, int, int]] = {"default": (0, 1, 2), "gbr": (1, 2, 0)}


@dataclass
class SyntheticConfig:
    """What to generate: seed, resolution, split sizes, rig and world parameters."""

    seed: int = 0
    """Master seed; scenes and camera paths derive from (seed, split, sequence)."""
    height: int = 96
    """Image height in pixels."""
    width: int = 320
    """Image width in pixels."""
    sequences: dict[str, int] = field(default_factory=lambda: {"train": 22, "val": 3, "test": 5})
    """Number of sequences per split (each split its own scenes)."""
    frames_per_sequence: int = 20
    """Frames rendered per sequence; every frame but the first and last is a sample (t-1, t+1)."""
    baseline_m: float = 0.54
    """Stereo baseline: the right camera sits at +baseline along the left camera's x axis."""
    camera_height_m: float = 1.65
    """Camera height above the road."""
    speed_m: tuple[float, float] = (0.5, 1.0)
    """Range of forward motion per frame (metres)."""
    max_yaw_deg: float = 2.0
    """Amplitude of the slow yaw sway (degrees); per-frame noise is a fifth of it."""
    max_pitch_deg: float = 0.8
    """Amplitude of the pitch jitter (degrees)."""
    far_m: float = 150.0
    """Render distance: hits beyond it are hazed into the sky colour, depth 0, label 255."""
    haze_start_m: float = 60.0
    """Distance where the haze starts (it reaches the sky colour at ``far_m``)."""
    palette: str = "default"
    """Colour domain of the rendered images: ``default``, or ``gbr`` (each pixel's RGB rotated to
    GBR: green vegetation turns red, the blue sky yellow-green...): the same geometry, textures and
    labels in other colours, e.g. a different-domain world for a pre-training (launch/demo.py)."""

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"SyntheticConfig: height/width must be >= 8, got {self.height}x{self.width}")
        if self.frames_per_sequence < 3:
            raise ValueError(f"SyntheticConfig.frames_per_sequence must be >= 3 (t-1, t, t+1), "
                             f"got {self.frames_per_sequence}")
        for split, n in self.sequences.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"SyntheticConfig.sequences[{split!r}] must be an int >= 0, got {n!r}")
        lo, hi = self.speed_m
        if not 0 < lo <= hi:
            raise ValueError(f"SyntheticConfig.speed_m must satisfy 0 < lo <= hi, got {self.speed_m}")
        if self.palette not in PALETTE_CHANNELS:
            raise ValueError(f"SyntheticConfig.palette={self.palette!r}: expected one of {sorted(PALETTE_CHANNELS)}")
        if not 0 < self.haze_start_m < self.far_m <= 255.0:
            raise ValueError(f"SyntheticConfig: need 0 < haze_start_m < far_m <= 255 (16-bit depth), "
                             f"got {self.haze_start_m}, {self.far_m}")


def intrinsics(cfg: SyntheticConfig) -> np.ndarray:
    """KITTI-like 3x3 K at the config's resolution (Monodepth2's normalised KITTI K, scaled)."""
    return np.array([[0.58 * cfg.width, 0.0, cfg.width / 2.0],
                     [0.0, 1.92 * cfg.height, cfg.height / 2.0],
                     [0.0, 0.0, 1.0]])


def _check_split(split: str, cfg: SyntheticConfig) -> int:
    """Number of sequences of ``split``; a clear error naming it if the config has no such split."""
    if split not in cfg.sequences:
        raise ValueError(f"synthetic: unknown split {split!r}; configured splits: {sorted(cfg.sequences)}")
    return cfg.sequences[split]


def count_samples(split: str, cfg: SyntheticConfig) -> int:
    """Number of samples :func:`iter_samples` yields for ``split``."""
    return _check_split(split, cfg) * (cfg.frames_per_sequence - 2)


def sequence_seed(cfg: SyntheticConfig, split: str, sequence: int) -> np.random.SeedSequence:
    """The seed of one sequence: a function of (master seed, split name, sequence index) only."""
    return np.random.SeedSequence([cfg.seed, zlib.crc32(split.encode("utf-8")), sequence])


def _rot(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation: pitch about x, then yaw about the world's vertical (y) axis."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return Ry @ Rx


def camera_path(rng: np.random.Generator, cfg: SyntheticConfig, road_half: float) -> np.ndarray:
    """(F, 4, 4) left-camera-to-world poses: forward motion with smooth sway and jitter."""
    F = cfg.frames_per_sequence
    lo, hi = cfg.speed_m
    v0 = rng.uniform(lo, hi)
    speed = np.clip(v0 + rng.normal(0, 0.05 * (hi - lo + 0.1), F), lo, hi)
    z = np.concatenate([[0.0], np.cumsum(speed[1:])])
    t = np.arange(F)
    x0 = rng.uniform(-0.3, 0.3) + 0.15 * road_half - 0.6
    x = x0 + 0.15 * np.sin(2 * np.pi * t / rng.uniform(25, 60) + rng.uniform(0, 6.3))
    ya = np.deg2rad(cfg.max_yaw_deg)
    yaw = ya * np.sin(2 * np.pi * t / rng.uniform(15, 40) + rng.uniform(0, 6.3)) + rng.normal(0, ya / 5, F)
    pitch = rng.normal(0, np.deg2rad(cfg.max_pitch_deg) / 2, F).clip(-np.deg2rad(cfg.max_pitch_deg),
                                                                    np.deg2rad(cfg.max_pitch_deg))
    height = cfg.camera_height_m + rng.normal(0, 0.01, F)
    poses = np.tile(np.eye(4), (F, 1, 1))
    for i in range(F):
        poses[i, :3, :3] = _rot(yaw[i], pitch[i])
        poses[i, :3, 3] = (x[i], -height[i], z[i])
    return poses


def right_pose(T_wc: np.ndarray, baseline: float) -> np.ndarray:
    """Right camera pose: the left pose moved by +baseline along the left camera's x axis."""
    T = T_wc.copy()
    T[:3, 3] = T_wc[:3, 3] + baseline * T_wc[:3, 0]
    return T


def compute_flow(depth0: np.ndarray, seg0: np.ndarray, depth1: np.ndarray, seg1: np.ndarray,
                 K: np.ndarray, T0: np.ndarray, T1: np.ndarray) -> np.ndarray:
    """Forward flow t -> t+1 (H, W, 3) = (u, v, valid) from depth and poses (static world).

    Points are back-projected with t's depth, moved into t+1's camera and projected. Valid
    where in front of the camera, inside the image and not occluded (t+1's depth at the
    target agrees within 3 %, nearest pixel or bilinear inverse depth). Sky pixels (at
    infinity) get the rotation-only flow, valid where t+1 also sees sky there; hits beyond
    the render distance (depth 0, not sky) get the rotation-only flow, marked invalid.
    """
    H, W = depth0.shape
    rays = camera_rays(K, H, W).reshape(-1, 3)
    d0 = depth0.reshape(-1).astype(np.float64)
    has_depth = d0 > 0
    R01 = T1[:3, :3].T @ T0[:3, :3]
    t01 = T1[:3, :3].T @ (T0[:3, 3] - T1[:3, 3])
    p1 = rotate(rays, R01)  # rotation-only (directions)
    p1[has_depth] = rotate(rays[has_depth] * d0[has_depth, None], R01) + t01
    z1 = p1[:, 2]
    front = z1 > 1e-6
    zs = np.where(front, z1, 1.0)
    u1 = K[0, 0] * p1[:, 0] / zs + K[0, 2]
    v1 = K[1, 1] * p1[:, 1] / zs + K[1, 2]
    uu, vv = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    flow = np.zeros((H * W, 3), np.float32)
    flow[:, 0] = np.where(front, u1 - uu.ravel(), 0.0)
    flow[:, 1] = np.where(front, v1 - vv.ravel(), 0.0)
    inside = front & (u1 > -0.5) & (u1 < W - 0.5) & (v1 > -0.5) & (v1 < H - 0.5)
    ui = np.clip(np.rint(u1), 0, W - 1).astype(np.int64)
    vi = np.clip(np.rint(v1), 0, H - 1).astype(np.int64)
    dn = depth1[vi, ui].astype(np.float64)
    tol = 0.03 * np.abs(z1)
    near_ok = (dn > 0) & (np.abs(dn - z1) <= tol)
    # Bilinear inverse depth (affine in pixels on planes: robust at grazing angles).
    u0c = np.clip(np.floor(u1), 0, W - 2).astype(np.int64)
    v0c = np.clip(np.floor(v1), 0, H - 2).astype(np.int64)
    fu = np.clip(u1 - u0c, 0, 1)
    fv = np.clip(v1 - v0c, 0, 1)
    q = [depth1[v0c + a, u0c + b].astype(np.float64) for a in (0, 1) for b in (0, 1)]
    allv = (q[0] > 0) & (q[1] > 0) & (q[2] > 0) & (q[3] > 0)
    with np.errstate(divide="ignore"):
        iq = [np.where(allv, 1.0 / np.where(allv, x, 1.0), 0.0) for x in q]
    inv = (iq[0] * (1 - fu) + iq[1] * fu) * (1 - fv) + (iq[2] * (1 - fu) + iq[3] * fu) * fv
    bil_ok = allv & (np.abs(inv * zs - 1.0) <= 0.03)
    sky0 = seg0.reshape(-1) == SKY
    valid = inside & np.where(has_depth, near_ok | bil_ok, sky0 & (seg1[vi, ui] == SKY))
    flow[:, 2] = valid
    return flow.reshape(H, W, 3)


def _meta(cfg: SyntheticConfig, K, split, seq, frame, poses, seg) -> dict:
    """The sample's JSON meta: intrinsics, baseline, poses, provenance, classes present."""
    classes = sorted(int(c) for c in np.unique(seg) if c != 255)
    return {
        "K": K.tolist(),
        "baseline_m": cfg.baseline_m,
        "T_wc": poses[frame].tolist(),
        "T_wc_prev": poses[frame - 1].tolist(),
        "T_wc_next": poses[frame + 1].tolist(),
        "source": {"dataset": DATASET, "split": split, "sequence": seq, "frame": frame, "seed": cfg.seed},
        "classes": classes,
    }


@dataclass
class SequenceWorld:
    """One sequence's scene, poses and intrinsics, able to render any of its frames."""

    cfg: SyntheticConfig
    scene: Scene
    poses: np.ndarray
    K: np.ndarray

    def __post_init__(self) -> None:
        self._rays = camera_rays(self.K, self.cfg.height, self.cfg.width)

    def render_left(self, frame: int) -> Frame:
        """Render the left camera at ``frame``."""
        return self._recolour(render(self.scene, self._rays, self.poses[frame], self.K, self.cfg.far_m,
                                     self.cfg.haze_start_m))

    def render_right(self, frame: int) -> Frame:
        """Render the right camera at ``frame``."""
        return self._recolour(render(self.scene, self._rays, right_pose(self.poses[frame], self.cfg.baseline_m),
                                     self.K, self.cfg.far_m, self.cfg.haze_start_m))

    def _recolour(self, frame: Frame) -> Frame:
        """Apply the config's palette (a channel re-ordering; ``default`` leaves the frame as rendered)."""
        order = PALETTE_CHANNELS[self.cfg.palette]
        if order != (0, 1, 2):
            frame.rgb = np.ascontiguousarray(frame.rgb[..., list(order)])
        return frame


def make_sequence(cfg: SyntheticConfig, split: str, sequence: int) -> SequenceWorld:
    """Build the scene and camera path of one sequence (deterministic in (seed, split, sequence))."""
    scene_ss, path_ss = sequence_seed(cfg, split, sequence).spawn(2)
    length = cfg.frames_per_sequence * cfg.speed_m[1] + 5.0
    scene = build_scene(np.random.default_rng(scene_ss), -30.0, length + cfg.far_m + 20.0)
    path_rng = np.random.default_rng(path_ss)
    poses = camera_path(path_rng, cfg, scene.road_half)
    return SequenceWorld(cfg=cfg, scene=scene, poses=poses, K=intrinsics(cfg))


def iter_sequence(cfg: SyntheticConfig, split: str, sequence: int) -> Iterator[dict]:
    """Samples of one sequence, frames 1 .. F-2, each frame rendered once per camera."""
    world = make_sequence(cfg, split, sequence)
    name = f"seq{sequence:04d}"
    F = cfg.frames_per_sequence
    prev, cur = world.render_left(0), world.render_left(1)
    for f in range(1, F - 1):
        nxt = world.render_left(f + 1)
        right = world.render_right(f)
        flow = compute_flow(cur.depth, cur.seg, nxt.depth, nxt.seg, world.K, world.poses[f], world.poses[f + 1])
        yield {
            "__key__": f"{name}_f{f:06d}",
            "rgb": cur.rgb,
            "rgb_prev": prev.rgb,
            "rgb_next": nxt.rgb,
            "rgb_right": right.rgb,
            "depth": cur.depth,
            "seg": cur.seg,
            "flow": flow,
            "meta": _meta(cfg, world.K, split, name, f, world.poses, cur.seg),
        }
        prev, cur = cur, nxt


def iter_samples(split: str, cfg: SyntheticConfig) -> Iterator[dict]:
    """Samples of a split in deterministic order, in the input format of ``schema.encode_sample``.

    ``__key__`` ``seq0003_f000012``; rgb, rgb_prev, rgb_next, rgb_right uint8 (H, W, 3); depth
    float32 z-depth in metres (H, W), 0 for sky; seg uint8 train ids (H, W); flow float32
    (H, W, 3) forward t -> t+1 (u, v, valid); meta with K, baseline_m, T_wc / T_wc_prev /
    T_wc_next (camera-to-world, OpenCV axes), source and classes. Frames are rendered once and
    shared: sample t's ``rgb`` is the same array as sample t+1's ``rgb_prev``; copy before
    modifying in place.
    """
    for s in range(_check_split(split, cfg)):
        yield from iter_sequence(cfg, split, s)
