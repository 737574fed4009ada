"""Procedural street-corridor scenes for the synthetic world: primitives, object kinds, palettes.

World frame (metres): x lateral (right), y down, z along the street (forward). The ground
plane is ``y = 0``; the road is ``|x| < road_half``; raised sidewalks (boxes) run along both
road edges; beyond them lie terrain, buildings, trees, poles; cars are parked on the road
edges. Every primitive is its own *object* with an id (0 = sky, 1 = ground), a kind (which
fixes the Cityscapes train id and the texture), a base and a secondary colour and a texture
seed. Colour families are shared between classes on purpose: colour alone cannot segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Object kinds (what an object is; fixes its train id and its texture function).
K_SKY, K_GROUND, K_SIDEWALK, K_BUILDING = 0, 1, 2, 3
K_CAR_BODY, K_CAR_CABIN, K_CAR_WHEEL, K_POLE, K_TRUNK, K_CROWN = 4, 5, 6, 7, 8, 9

#: Cityscapes train id per kind (the ground is road or terrain depending on x: see render).
KIND_TRAIN_ID = np.array([10, 0, 1, 2, 13, 13, 13, 5, 8, 8], dtype=np.uint8)
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, TERRAIN, SKY, CAR = 0, 1, 2, 5, 8, 9, 10, 13

# Primitive types (how an object is ray cast).
P_NONE, P_PLANE, P_BOX, P_CYL, P_SPHERE = 0, 1, 2, 3, 4

# Shared colour anchors (linear-ish RGB in [0, 1]); classes draw from overlapping subsets.
_C = {
    "dark": (0.22, 0.22, 0.23), "grey": (0.42, 0.42, 0.43), "light": (0.62, 0.61, 0.59),
    "white": (0.82, 0.81, 0.78), "beige": (0.72, 0.64, 0.50), "brick": (0.58, 0.32, 0.24),
    "brown": (0.42, 0.31, 0.20), "olive": (0.44, 0.44, 0.24), "green": (0.30, 0.48, 0.20),
    "dgreen": (0.17, 0.32, 0.14), "blue": (0.26, 0.36, 0.58), "red": (0.64, 0.16, 0.13),
    "sand": (0.66, 0.58, 0.40), "slate": (0.33, 0.38, 0.45),
}
PALETTES: dict[int, tuple[str, ...]] = {
    ROAD: ("dark", "grey", "slate"),
    SIDEWALK: ("grey", "light", "brick", "beige", "sand"),
    BUILDING: ("grey", "light", "white", "beige", "brick", "olive", "slate", "blue", "sand"),
    CAR: ("dark", "grey", "light", "white", "red", "blue", "green", "beige", "slate"),
    POLE: ("dark", "grey", "light", "dgreen", "brown"),
    VEGETATION: ("green", "dgreen", "olive", "brown"),
    TERRAIN: ("green", "olive", "brown", "sand", "dgreen"),
}


def pick_colour(rng: np.random.Generator, train_id: int, jitter: float = 0.06) -> np.ndarray:
    """A colour from the class's palette with a small per-object jitter (float32 RGB in [0, 1])."""
    names = PALETTES[train_id]
    base = np.array(_C[names[rng.integers(len(names))]], dtype=np.float64)
    return np.clip(base * rng.uniform(0.85, 1.15) + rng.normal(0.0, jitter, 3), 0.03, 0.95).astype(np.float32)


@dataclass
class Scene:
    """One street corridor: per-object attributes (indexed by object id) and primitive tables."""

    road_half: float
    """Half width of the road (m); the road is |x| < road_half."""
    curb_h: float
    """Sidewalk (curb) height above the road (m)."""
    sun: np.ndarray
    """Unit vector towards the sun, world frame (y down, so the sun has y < 0)."""
    ambient: float
    """Ambient share of the Lambert shading (0..1)."""
    kind: np.ndarray
    """(n_obj,) int: object kind (K_*)."""
    colour: np.ndarray
    """(n_obj, 3) float32: base colour."""
    colour2: np.ndarray
    """(n_obj, 3) float32: secondary colour (windows, curb, terrain, markings ...)."""
    tex_seed: np.ndarray
    """(n_obj,) int64: texture seed (surface noise differs per object)."""
    param: np.ndarray
    """(n_obj, 2) float32: per-object texture parameters (window spacing, floor height ...)."""
    prim_type: np.ndarray
    """(n_obj,) int: primitive type (P_*)."""
    prim_index: np.ndarray
    """(n_obj,) int: row of the object in its primitive table."""
    boxes: np.ndarray
    """(n_box, 6) float64: x0, y0, z0, x1, y1, z1 (min corner, max corner)."""
    cyls: np.ndarray
    """(n_cyl, 5) float64: vertical cylinders cx, cz, radius, y_top, y_bottom (y_top < y_bottom)."""
    spheres: np.ndarray
    """(n_sph, 4) float64: cx, cy, cz, radius."""
    sky_zenith: np.ndarray
    """(3,) float32: sky colour straight up."""
    sky_horizon: np.ndarray
    """(3,) float32: sky (and haze) colour at the horizon."""

    @cached_property
    def aabb_table(self) -> tuple[np.ndarray, np.ndarray]:
        """World AABBs (n, 6) of every primitive and the object id of each row (computed once)."""
        ids = np.nonzero(self.prim_type >= P_BOX)[0]
        out = np.empty((len(ids), 6))
        for row, oid in enumerate(ids):
            t, i = self.prim_type[oid], self.prim_index[oid]
            if t == P_BOX:
                out[row] = self.boxes[i]
            elif t == P_CYL:
                cx, cz, r, y0, y1 = self.cyls[i]
                out[row] = (cx - r, y0, cz - r, cx + r, y1, cz + r)
            else:
                cx, cy, cz, r = self.spheres[i]
                out[row] = (cx - r, cy - r, cz - r, cx + r, cy + r, cz + r)
        return out, ids


class _Builder:
    """Accumulates objects while a scene is generated, then freezes them into arrays."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.rows: list[tuple] = []
        self.boxes: list[tuple] = []
        self.cyls: list[tuple] = []
        self.spheres: list[tuple] = []

    def _add(self, kind, colour, colour2, ptype, pindex, param=(0.0, 0.0)) -> int:
        """Register an object (its primitive row already appended); returns its object id."""
        seed = int(self.rng.integers(0, 2**31 - 1))
        self.rows.append((kind, colour, colour2, seed, param, ptype, pindex))
        return len(self.rows) - 1

    def box(self, kind, lo, hi, colour, colour2=None, param=(0.0, 0.0)) -> int:
        """Axis-aligned box from corner ``lo`` to corner ``hi``."""
        self.boxes.append(tuple(lo) + tuple(hi))
        c2 = colour if colour2 is None else colour2
        return self._add(kind, colour, c2, P_BOX, len(self.boxes) - 1, param)

    def cyl(self, kind, cx, cz, r, y_top, y_bottom, colour) -> int:
        """Vertical cylinder (pole, trunk)."""
        self.cyls.append((cx, cz, r, y_top, y_bottom))
        return self._add(kind, colour, colour, P_CYL, len(self.cyls) - 1)

    def sphere(self, kind, c, r, colour, colour2) -> int:
        """Sphere (tree crown)."""
        self.spheres.append(tuple(c) + (r,))
        return self._add(kind, colour, colour2, P_SPHERE, len(self.spheres) - 1)

    def freeze(self, **kw) -> Scene:
        """The accumulated objects as a :class:`Scene` (``kw``: the scene-wide fields)."""
        rows = self.rows
        return Scene(
            kind=np.array([r[0] for r in rows], dtype=np.int64),
            colour=np.array([r[1] for r in rows], dtype=np.float32),
            colour2=np.array([r[2] for r in rows], dtype=np.float32),
            tex_seed=np.array([r[3] for r in rows], dtype=np.int64),
            param=np.array([r[4] for r in rows], dtype=np.float32),
            prim_type=np.array([r[5] for r in rows], dtype=np.int64),
            prim_index=np.array([r[6] for r in rows], dtype=np.int64),
            boxes=np.array(self.boxes, dtype=np.float64).reshape(-1, 6),
            cyls=np.array(self.cyls, dtype=np.float64).reshape(-1, 5),
            spheres=np.array(self.spheres, dtype=np.float64).reshape(-1, 4),
            **kw,
        )


def _car(b: _Builder, x_centre: float, z0: float, length: float) -> None:
    """A parked car: body, cabin (glass) and two axle/wheel blocks, one colour."""
    rng = b.rng
    w = rng.uniform(1.65, 1.9)
    col = pick_colour(rng, CAR)
    glass = np.array(_C["dark"], np.float32) * rng.uniform(0.5, 1.1)
    x0, x1 = x_centre - w / 2, x_centre + w / 2
    b.box(K_CAR_BODY, (x0, -rng.uniform(0.95, 1.15), z0), (x1, -0.32, z0 + length), col)
    inset = rng.uniform(0.1, 0.2)
    c0 = z0 + length * rng.uniform(0.22, 0.32)
    c1 = z0 + length * rng.uniform(0.72, 0.82)
    top = -rng.uniform(1.4, 1.55)
    b.box(K_CAR_CABIN, (x0 + inset, top, c0), (x1 - inset, -0.9, c1), col, glass)
    tyre = np.array(_C["dark"], np.float32) * 0.5
    for zc in (z0 + 0.8, z0 + length - 0.8):
        b.box(K_CAR_WHEEL, (x0 + 0.05, -0.62, zc - 0.32), (x1 - 0.05, 0.0, zc + 0.32), tyre)


def _side(b: _Builder, sign: float, road_half: float, sw: float, curb_h: float, z_lo: float, z_hi: float) -> None:
    """Populate one side of the street (sign +1 right, -1 left) from z_lo to z_hi."""
    rng = b.rng
    inner = road_half + sw  # sidewalk outer edge (distance from the centre line)
    # Sidewalk: one long raised box (its road-side face is the curb).
    lo, hi = (road_half, -curb_h, z_lo), (inner, 0.0, z_hi)
    if sign < 0:
        lo, hi = (-inner, -curb_h, z_lo), (-road_half, 0.0, z_hi)
    b.box(K_SIDEWALK, lo, hi, pick_colour(rng, SIDEWALK), pick_colour(rng, SIDEWALK, 0.03))

    def xr(a: float, c: float) -> tuple[float, float]:
        """The lateral interval at distances [a, c] from the centre line, on this side."""
        return (a, c) if sign > 0 else (-c, -a)

    # Buildings with gaps, varied setback / height / facade.
    z = z_lo + rng.uniform(-5, 5)
    while z < z_hi:
        length = rng.uniform(8, 28)
        if rng.random() < 0.8:
            setback = rng.uniform(0.0, 7.0) if rng.random() < 0.6 else 0.0
            depth = rng.uniform(8, 18)
            height = rng.uniform(4.0, 24.0)
            x0, x1 = xr(inner + setback, inner + setback + depth)
            spacing = rng.uniform(2.0, 4.0)
            floor = rng.uniform(2.8, 3.6)
            win = np.array(_C["slate" if rng.random() < 0.5 else "dark"], np.float32) * rng.uniform(0.6, 1.3)
            b.box(K_BUILDING, (x0, -height, z), (x1, 0.0, z + length),
                  pick_colour(rng, BUILDING), np.clip(win, 0, 1), (spacing, floor))
        z += length + (rng.uniform(1, 10) if rng.random() < 0.5 else 0.0)
    # Trees along the sidewalk's outer strip.
    z = z_lo + rng.uniform(0, 10)
    while z < z_hi:
        x = sign * (inner - rng.uniform(0.5, 1.0) if rng.random() < 0.6 else inner + rng.uniform(0.5, 2.0))
        trunk_h = rng.uniform(2.0, 3.5)
        r_crown = rng.uniform(1.3, 2.8)
        bark = pick_colour(rng, VEGETATION) * np.float32(0.7)
        b.cyl(K_TRUNK, x, z, rng.uniform(0.12, 0.25), -trunk_h - r_crown, -curb_h if abs(x) < inner else 0.0, bark)
        b.sphere(K_CROWN, (x, -trunk_h - r_crown * 0.8, z), r_crown,
                 pick_colour(rng, VEGETATION), pick_colour(rng, VEGETATION))
        z += rng.uniform(7, 22)
    # Poles (street lights with an arm over the road) near the curb.
    z = z_lo + rng.uniform(0, 15)
    while z < z_hi:
        x = sign * (road_half + rng.uniform(0.35, 0.7))
        h = rng.uniform(4.5, 8.0)
        r = rng.uniform(0.07, 0.14)
        col = pick_colour(rng, POLE)
        b.cyl(K_POLE, x, z, r, -h, -curb_h, col)
        if rng.random() < 0.6:
            arm = rng.uniform(1.0, 2.5)
            ax0, ax1 = (x - arm, x) if sign > 0 else (x, x + arm)
            b.box(K_POLE, (ax0, -h - 0.12, z - r), (ax1, -h + 0.04, z + r), col)
        z += rng.uniform(14, 40)
    # Parked cars along the road edge.
    z = z_lo + rng.uniform(0, 8)
    while z < z_hi:
        length = rng.uniform(3.8, 4.8)
        if rng.random() < 0.6:
            _car(b, sign * (road_half - rng.uniform(1.05, 1.3)), z, length)
        z += length + rng.uniform(0.8, 6.0)


def build_scene(rng: np.random.Generator, z_lo: float, z_hi: float) -> Scene:
    """Generate a street corridor covering ``z_lo..z_hi`` (metres) from ``rng``."""
    road_half = float(rng.uniform(4.2, 5.5))
    curb_h = float(rng.uniform(0.12, 0.18))
    b = _Builder(rng)
    b._add(K_SKY, np.zeros(3, np.float32), np.zeros(3, np.float32), P_NONE, -1)
    marking = np.array(_C["white"], np.float32) * rng.uniform(0.9, 1.1)
    b._add(K_GROUND, pick_colour(rng, ROAD, 0.03), pick_colour(rng, TERRAIN),
           P_PLANE, -1, (float(marking.mean()), float(rng.uniform(6.0, 12.0))))
    for sign in (1.0, -1.0):
        _side(b, sign, road_half, float(rng.uniform(1.5, 3.5)), curb_h, z_lo, z_hi)
    az = rng.uniform(-0.9, 0.9)
    el = rng.uniform(0.6, 1.0)
    sun = np.array([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)])
    zen = np.array((0.30, 0.48, 0.80), np.float32) * rng.uniform(0.85, 1.1)
    hor = np.array((0.78, 0.82, 0.86), np.float32) * rng.uniform(0.9, 1.05)
    return b.freeze(road_half=road_half, curb_h=curb_h, sun=sun / np.linalg.norm(sun),
                    ambient=float(rng.uniform(0.35, 0.5)), sky_zenith=np.clip(zen, 0, 1),
                    sky_horizon=np.clip(hor, 0, 1))
