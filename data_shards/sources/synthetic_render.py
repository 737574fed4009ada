"""Vectorised numpy ray caster for synthetic street scenes: RGB, z-depth, train ids, object ids.

Rays go through integer pixel coordinates ``(u, v)`` (``u = fx * X / Z + cx``) with camera
directions of unit z, so the ray parameter of a hit *is* its z-depth. Each primitive is
intersected only with the pixel rectangle its (near-clipped) bounding box projects to, and
only if it is in front of the camera and nearer than ``far``. Appearance is a function of the
3D hit point and the object (surface-anchored value noise, facade / marking patterns) times
a view-independent Lambert term (fixed sun + ambient), so the same point has the same colour
from every camera: photometric consistency holds exactly up to sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic_paint import albedo, value_noise
from .synthetic_scene import K_GROUND, KIND_TRAIN_ID, P_BOX, P_CYL, P_SPHERE, ROAD, SKY, TERRAIN, Scene

NEAR = 0.05
_EDGES = np.array([(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7),
                   (0, 4), (1, 5), (2, 6), (3, 7)])
_CORNER_SEL = np.array([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


@dataclass
class Frame:
    """One rendered view."""

    rgb: np.ndarray
    """uint8 (H, W, 3)."""
    depth: np.ndarray
    """float32 (H, W) z-depth in metres, 0 for sky and for hits beyond ``far``."""
    seg: np.ndarray
    """uint8 (H, W) Cityscapes train ids, 255 beyond ``far``."""
    oid: np.ndarray
    """int32 (H, W) object id (0 = sky)."""


def camera_rays(K: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) camera-frame ray directions with z = 1 through integer pixel coordinates."""
    u = (np.arange(width, dtype=np.float64) - K[0, 2]) / K[0, 0]
    v = (np.arange(height, dtype=np.float64) - K[1, 2]) / K[1, 1]
    d = np.empty((height, width, 3))
    d[..., 0] = u[None, :]
    d[..., 1] = v[:, None]
    d[..., 2] = 1.0
    return d


def rotate(v: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``v @ R.T`` for (..., 3) arrays without BLAS (whose threads oversubscribe a busy CPU)."""
    return np.einsum("...j,ij->...i", v, R)


# ----------------------------------------------------------------------------- noise
def screen_rects(aabbs: np.ndarray, R: np.ndarray, o: np.ndarray, K: np.ndarray, height: int,
                 width: int, far: float) -> np.ndarray:
    """Pixel rectangles (n, 4) = r0, r1, c0, c1 (half-open) covering each AABB; empty if culled.

    The AABB is clipped against the near plane (edge crossings added as vertices), so the
    rectangle is a conservative bound of the primitive's image even when it extends behind
    the camera.
    """
    n = len(aabbs)
    corners = np.where(_CORNER_SEL[None] == 0, aabbs[:, None, :3], aabbs[:, None, 3:])  # (n, 8, 3)
    pc = rotate(corners - o, R.T)  # camera frame: R^T (p - o)
    z = pc[..., 2]
    a, b = pc[:, _EDGES[:, 0]], pc[:, _EDGES[:, 1]]
    za, zb = a[..., 2], b[..., 2]
    cross = (za - NEAR) * (zb - NEAR) < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(cross, (NEAR - za) / (zb - za), 0.0)
    xp = a + s[..., None] * (b - a)
    pts = np.concatenate([pc, xp], axis=1)
    ok = np.concatenate([z >= NEAR, cross], axis=1)
    zz = np.where(ok, pts[..., 2], 1.0)
    u = K[0, 0] * pts[..., 0] / zz + K[0, 2]
    v = K[1, 1] * pts[..., 1] / zz + K[1, 2]
    inf = np.inf
    umin, umax = np.where(ok, u, inf).min(1), np.where(ok, u, -inf).max(1)
    vmin, vmax = np.where(ok, v, inf).min(1), np.where(ok, v, -inf).max(1)
    rect = np.zeros((n, 4), dtype=np.int64)
    live = ok.any(1) & (z.min(1) < far)
    rect[:, 0] = np.clip(np.floor(np.where(live, vmin, 0)), 0, height)
    rect[:, 1] = np.clip(np.ceil(np.where(live, vmax, 0)) + 1, 0, height)
    rect[:, 2] = np.clip(np.floor(np.where(live, umin, 0)), 0, width)
    rect[:, 3] = np.clip(np.ceil(np.where(live, umax, 0)) + 1, 0, width)
    rect[~live] = 0
    return rect


# ----------------------------------------------------------------------------- intersection
def _t_box(o, d, box):
    """Entry distance (inf if missed) and entry-face axis of rays ``o + t d`` with boxes (n, 6).

    Slab test written per axis on columns (numpy reductions over a length-3 axis are slow).
    """
    lo, hi = box[:, :3] - o, box[:, 3:] - o
    near, far = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            inv = 1.0 / d[:, k]
            a, b = lo[:, k] * inv, hi[:, k] * inv
            near.append(np.minimum(a, b))
            far.append(np.maximum(a, b))
    tmin = np.maximum(np.maximum(near[0], near[1]), near[2])
    tmax = np.minimum(np.minimum(far[0], far[1]), far[2])
    axis = np.where(near[0] == tmin, 0, np.where(near[1] == tmin, 1, 2)).astype(np.int8)
    return np.where((tmax >= tmin) & (tmin > NEAR), tmin, np.inf), axis


def _t_cyl(o, d, cyl):
    """Entry distance (inf if missed) of rays with vertical cylinders (n, 5), side surface only."""
    ox, oz = o[0] - cyl[:, 0], o[2] - cyl[:, 1]
    dx, dz = d[:, 0], d[:, 2]
    a = dx * dx + dz * dz
    bb = ox * dx + oz * dz
    disc = bb * bb - a * (ox * ox + oz * oz - cyl[:, 2] ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-bb - np.sqrt(disc)) / a
    y = o[1] + t * d[:, 1]
    return np.where((disc >= 0) & (t > NEAR) & (y >= cyl[:, 3]) & (y <= cyl[:, 4]), t, np.inf)


def _t_sphere(o, d, sph):
    """Entry distance (inf if missed) of rays with spheres (n, 4)."""
    oc = o - sph[:, :3]
    d0, d1, d2 = d[:, 0], d[:, 1], d[:, 2]
    c0, c1, c2 = oc[:, 0], oc[:, 1], oc[:, 2]
    a = d0 * d0 + d1 * d1 + d2 * d2
    bb = d0 * c0 + d1 * c1 + d2 * c2
    disc = bb * bb - a * (c0 * c0 + c1 * c1 + c2 * c2 - sph[:, 3] ** 2)
    with np.errstate(invalid="ignore"):
        t = (-bb - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > NEAR), t, np.inf)


_SMALL = 600  # primitives covering fewer screen pixels than this are intersected in one batch


def _intersect(kind: int, o: np.ndarray, d: np.ndarray, rows: np.ndarray):
    """Entry distances (inf = miss) and box face axes of rays ``d`` (n, 3) with primitive rows."""
    if kind == P_BOX:
        return _t_box(o, d, rows)
    fn = _t_cyl if kind == P_CYL else _t_sphere
    return fn(o, d, rows), None


def cast(scene: Scene, rays_c: np.ndarray, T_wc: np.ndarray, K: np.ndarray, far: float):
    """Nearest hit per pixel: z-depth (inf = none), object id, box face axis, world directions.

    Large primitives are intersected with their screen rectangle (a view of the ray array);
    the many small ones are batched: every (pixel, primitive) pair in one vectorised pass
    per primitive type, then a scatter-min keeps the nearest hit per pixel.
    """
    H, W, _ = rays_c.shape
    R, o = T_wc[:3, :3], T_wc[:3, 3]
    d = rotate(rays_c, R)
    zbuf = np.full((H, W), np.inf)
    oid = np.zeros((H, W), np.int32)
    face = np.zeros((H, W), np.int8)
    dy = d[..., 1]
    ground = dy > 1e-9
    zbuf[ground] = -o[1] / dy[ground]
    oid[ground] = 1
    aabbs, ids = scene.aabb_table
    rects = screen_rects(aabbs, R, o, K, H, W, far)
    hh = rects[:, 1] - rects[:, 0]
    ww = rects[:, 3] - rects[:, 2]
    sizes = np.where((hh > 0) & (ww > 0), hh * ww, 0)
    ptype = scene.prim_type[ids]
    pidx = scene.prim_index[ids]
    tables = {P_BOX: scene.boxes, P_CYL: scene.cyls, P_SPHERE: scene.spheres}
    for j in np.nonzero(sizes >= _SMALL)[0]:
        r0, r1, c0, c1 = rects[j]
        zb = zbuf[r0:r1, c0:c1]
        t, axis = _intersect(ptype[j], o, d[r0:r1, c0:c1].reshape(-1, 3), tables[ptype[j]][pidx[j]][None])
        hit = (t < zb.reshape(-1)).reshape(zb.shape)
        zb[hit] = t.reshape(zb.shape)[hit]
        oid[r0:r1, c0:c1][hit] = ids[j]
        if axis is not None:
            face[r0:r1, c0:c1][hit] = axis.reshape(zb.shape)[hit]
    small = np.nonzero((sizes > 0) & (sizes < _SMALL))[0]
    if len(small):
        sz = sizes[small]
        prim = np.repeat(small, sz)
        local = np.arange(len(prim)) - np.repeat(np.cumsum(sz) - sz, sz)
        w_p = ww[prim]
        pix = (rects[prim, 0] + local // w_p) * W + rects[prim, 2] + local % w_p
        df = d.reshape(-1, 3)
        t = np.full(len(prim), np.inf)
        axis = np.zeros(len(prim), np.int8)
        for kind, table in tables.items():
            m = np.nonzero(ptype[prim] == kind)[0]
            if len(m):
                tk, ak = _intersect(kind, o, df[pix[m]], table[pidx[prim[m]]])
                t[m] = tk
                if ak is not None:
                    axis[m] = ak
        zf = zbuf.reshape(-1)
        np.minimum.at(zf, pix, t)
        win = np.isfinite(t) & (t == zf[pix])
        oid.reshape(-1)[pix[win]] = ids[prim[win]]
        face.reshape(-1)[pix[win]] = axis[win]
    return zbuf, oid, face, d


# ----------------------------------------------------------------------------- appearance
def _normals(scene: Scene, p: np.ndarray, d: np.ndarray, obj: np.ndarray, face: np.ndarray) -> np.ndarray:
    """World normals (n, 3) at hit points ``p`` of objects ``obj``."""
    n = np.zeros_like(p)
    pt = scene.prim_type[obj]
    pi = scene.prim_index[obj]
    m = pt == P_BOX
    if m.any():
        ax = face[m].astype(np.int64)
        rows = np.nonzero(m)[0]
        n[rows, ax] = -np.sign(d[rows, ax])
    m = pt == P_CYL
    if m.any():
        c = scene.cyls[pi[m]]
        v = np.stack([p[m, 0] - c[:, 0], np.zeros(m.sum()), p[m, 2] - c[:, 1]], 1)
        n[m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    m = pt == P_SPHERE
    if m.any():
        c = scene.spheres[pi[m]]
        v = p[m] - c[:, :3]
        n[m] = v / c[:, 3:4]
    n[pt < P_BOX] = (0.0, -1.0, 0.0)
    return n


def sky_colour(scene: Scene, d: np.ndarray) -> np.ndarray:
    """Sky colour (n, 3) as a function of the world direction only (consistent under rotation)."""
    dn = d / np.linalg.norm(d, axis=-1, keepdims=True)
    up = np.clip(-dn[:, 1], 0.0, 1.0)
    w = np.sqrt(np.clip(up * 2.5, 0.0, 1.0))[:, None]
    col = scene.sky_horizon * (1 - w) + scene.sky_zenith * w
    cloud = value_noise(dn * 6.0, 1.0, 3) * value_noise(dn * 13.0, 1.0, 5)
    c = np.clip((cloud - 0.2) * 2.0, 0.0, 0.6)[:, None] * np.sqrt(np.clip(up * 8, 0, 1))[:, None]
    return col * (1 - c) + 0.92 * c


def render(scene: Scene, rays_c: np.ndarray, T_wc: np.ndarray, K: np.ndarray, far: float,
           haze_start: float) -> Frame:
    """Render one view: RGB, z-depth (0 = sky / beyond far), train ids (255 beyond far), object ids."""
    H, W, _ = rays_c.shape
    zbuf, oid, face, d = cast(scene, rays_c, T_wc, K, far)
    o = T_wc[:3, 3]
    zf, of, ff, df = zbuf.ravel(), oid.ravel(), face.ravel(), d.reshape(-1, 3)
    hit = np.nonzero(of > 0)[0]
    hazy = zf > haze_start  # sky (inf) and hazed hits: the only pixels that need the sky colour
    sky = np.zeros((H * W, 3), np.float32)
    sky[hazy] = sky_colour(scene, df[hazy])
    rgb = sky.copy()
    seg = np.full(H * W, SKY, np.uint8)
    p = o + zf[hit, None] * df[hit]
    obj = of[hit]
    cls = KIND_TRAIN_ID[scene.kind[obj]].copy()
    ground = scene.kind[obj] == K_GROUND
    cls[ground] = np.where(np.abs(p[ground, 0]) < scene.road_half, ROAD, TERRAIN)
    n = _normals(scene, p, df[hit], obj, ff[hit])
    col = albedo(scene, p, ff[hit], obj, cls)
    lam = scene.ambient + (1.0 - scene.ambient) * np.clip(rotate(n, scene.sun[None])[:, 0], 0.0, None)
    col = col * lam[:, None].astype(np.float32)
    haze = np.clip((zf[hit] - haze_start) / (far - haze_start), 0.0, 1.0)[:, None]
    rgb[hit] = col * (1 - haze) + sky[hit] * haze
    beyond = zf[hit] >= far
    cls[beyond] = 255
    seg[hit] = cls
    depth = np.zeros(H * W, np.float32)
    depth[hit] = np.where(beyond, 0.0, zf[hit])
    img = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(H, W, 3)
    return Frame(rgb=img, depth=depth.reshape(H, W), seg=seg.reshape(H, W), oid=oid)
