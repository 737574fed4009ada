"""Surface appearance of the synthetic world: value noise and each object kind's paint.

Colour is a function of the 3D hit point and the object only (never of the camera), which is
what makes the rendered video photometrically consistent; the ray caster calls :func:`albedo`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic_scene import (
    K_BUILDING, K_CAR_BODY, K_CAR_CABIN, K_CAR_WHEEL, K_CROWN, K_GROUND, K_POLE, K_SIDEWALK,
    K_TRUNK, KIND_TRAIN_ID, TERRAIN, Scene,
)

_N = 64  # lattice period of the value noise (cells); objects are decorrelated by seed offsets
_TABLE = np.random.default_rng(1234567).random(_N ** 3).astype(np.float32)
_SEED_MUL = np.array([7, 13, 29], dtype=np.int64)  # per-axis lattice offsets per unit of seed


def value_noise(p: np.ndarray, scale: float, seed: np.ndarray | int) -> np.ndarray:
    """Smooth 3D value noise in [0, 1] at points ``p`` (n, 3), per-point integer ``seed``."""
    q = p * scale
    i = np.floor(q)
    f = (q - i).astype(np.float32)
    f = f * f * (3.0 - 2.0 * f)
    s = np.asarray(seed, dtype=np.int64)
    i = i.astype(np.int64) + (s[..., None] * _SEED_MUL) % _N
    m = _N - 1
    ax = ((i[:, 0] & m) * _N * _N, ((i[:, 0] + 1) & m) * _N * _N)
    ay = ((i[:, 1] & m) * _N, ((i[:, 1] + 1) & m) * _N)
    az = (i[:, 2] & m, (i[:, 2] + 1) & m)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    out = None
    for dx in (0, 1):
        acc_y = None
        for dy in (0, 1):
            base = ax[dx] + ay[dy]
            lo, hi = _TABLE[base + az[0]], _TABLE[base + az[1]]
            vz = lo + (hi - lo) * fz
            acc_y = vz if acc_y is None else acc_y + (vz - acc_y) * fy
        out = acc_y if out is None else out + (acc_y - out) * fx
    return out


# ----------------------------------------------------------------------------- culling
def _stripes(x: np.ndarray, period: float, width: float) -> np.ndarray:
    """True on the first ``width`` metres of every ``period`` along ``x`` (markings, tile joints)."""
    return np.mod(x, period) < width


@dataclass
class _Hits:
    """The hits of one object kind (contiguous rows) and their colour ``base`` x brightness ``mod``."""

    p: np.ndarray
    face: np.ndarray
    obj: np.ndarray
    cls: np.ndarray
    seed: np.ndarray
    base: np.ndarray
    alt: np.ndarray
    coarse: np.ndarray
    fine: np.ndarray
    mod: np.ndarray


def _paint_ground(scene: Scene, h: _Hits) -> None:
    """Road with centre dashes and edge lines, or noisy terrain."""
    terr = h.cls == TERRAIN
    col = np.where(terr[:, None], h.alt, h.base)
    x, z = h.p[:, 0], h.p[:, 2]
    rh = scene.road_half
    dash = scene.param[1, 1]
    mark = (~terr) & (((np.abs(x) < 0.09) & _stripes(z, dash, dash * 0.45))
                      | (np.abs(np.abs(x) - (rh - 0.35)) < 0.08))
    col = np.where(mark[:, None], scene.param[1, 0], col)
    tm = np.where(terr, 0.55 + 0.7 * h.coarse * h.fine + 0.2 * h.fine, h.mod)
    h.mod[:] = np.where(mark, 0.95 + 0.1 * h.fine, tm)
    h.base[:] = col


def _paint_sidewalk(scene: Scene, h: _Hits) -> None:
    """Tiled top faces, darker kerb sides."""
    top = h.face == 1
    tile = _stripes(h.p[:, 0] + 0.02, 0.6, 0.05) | _stripes(h.p[:, 2], 0.6, 0.05)
    col = np.where(top[:, None], h.base, h.alt * 1.1)
    h.base[:] = np.where((top & tile)[:, None], col * 0.7, col)


def _paint_building(scene: Scene, h: _Hits) -> None:
    """Window grid per floor and a ledge at each floor line."""
    spacing, floor = scene.param[h.obj, 0], scene.param[h.obj, 1]
    along = np.where(h.face == 0, h.p[:, 2], h.p[:, 0])
    up = -h.p[:, 1]
    win = ((np.mod(along, spacing) > 0.3 * spacing) & (np.mod(along, spacing) < 0.8 * spacing)
           & (np.mod(up, floor) > 0.9) & (np.mod(up, floor) < floor - 0.5) & (up > floor))
    ledge = np.mod(up, floor) < 0.18
    col = np.where(win[:, None], h.alt, h.base)
    h.base[:] = np.where((ledge & ~win)[:, None], col * 0.8, col)


def _paint_car_body(scene: Scene, h: _Hits) -> None:
    """Darker lower body, nearly uniform paint."""
    low = h.p[:, 1] > -0.5
    h.base[:] = np.where(low[:, None], h.base * 0.55, h.base)
    h.mod[:] = 0.9 + 0.1 * h.fine + 0.1 * h.coarse


def _paint_car_cabin(scene: Scene, h: _Hits) -> None:
    """Glass above the cabin's belt line."""
    glass = h.p[:, 1] > scene.boxes[scene.prim_index[h.obj], 1] + 0.09
    h.base[:] = np.where(glass[:, None], h.alt, h.base)


def _paint_wheel(scene: Scene, h: _Hits) -> None:
    h.mod[:] = 0.8 + 0.4 * h.fine


def _paint_trunk(scene: Scene, h: _Hits) -> None:
    """Vertically stretched bark noise."""
    bark = value_noise(h.p * np.array([4.0, 0.4, 4.0]), 2.0, h.seed + 5)
    h.mod[:] = 0.6 + 0.7 * bark


def _paint_crown(scene: Scene, h: _Hits) -> None:
    """Leaves: the two foliage colours mixed by fine noise."""
    leaf = value_noise(h.p, 6.0, h.seed + 9)
    h.base[:] = h.base * (1 - leaf[:, None] * 0.5) + h.alt * (leaf[:, None] * 0.5)
    h.mod[:] = 0.55 + 0.5 * h.coarse + 0.45 * leaf


def _paint_pole(scene: Scene, h: _Hits) -> None:
    h.mod[:] = 0.85 + 0.2 * h.coarse + 0.1 * h.fine


_PAINTERS = ((K_GROUND, _paint_ground), (K_SIDEWALK, _paint_sidewalk), (K_BUILDING, _paint_building),
             (K_CAR_BODY, _paint_car_body), (K_CAR_CABIN, _paint_car_cabin), (K_CAR_WHEEL, _paint_wheel),
             (K_TRUNK, _paint_trunk), (K_CROWN, _paint_crown), (K_POLE, _paint_pole))


def albedo(scene: Scene, p: np.ndarray, face: np.ndarray, obj: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Surface colour (n, 3) of each hit: base colour x surface-anchored noise and patterns.

    Hits are sorted by object kind once, so each kind's painter works on contiguous slices
    (numpy views: a painter writes its rows of ``base`` and ``mod`` in place).
    """
    kind = scene.kind[obj]
    order = np.argsort(kind, kind="stable")
    bounds = np.searchsorted(kind[order], np.arange(int(KIND_TRAIN_ID.size) + 1))
    p, face, obj, cls = p[order], face[order], obj[order], cls[order]
    seed = scene.tex_seed[obj]
    base = scene.colour[obj].copy()
    alt = scene.colour2[obj]
    coarse = value_noise(p, 0.7, seed)
    fine = value_noise(p, 3.1, seed + 17)
    mod = 0.7 + 0.35 * coarse + 0.25 * fine
    for k, paint in _PAINTERS:
        r = slice(int(bounds[k]), int(bounds[k + 1]))
        if r.stop > r.start:
            paint(scene, _Hits(p[r], face[r], obj[r], cls[r], seed[r], base[r], alt[r], coarse[r], fine[r], mod[r]))
    out = np.empty_like(base)
    out[order] = base * mod[:, None]
    return out
