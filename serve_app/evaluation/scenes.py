"""The procedural scenes behind serve_app/evaluation/synthetic.py: textured boxes and spheres in a room, and the
analytic ray caster that renders exact depth and colour for them (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

ROOM_MIN = np.array([-4.0, 0.0, -4.0])
ROOM_MAX = np.array([4.0, 3.0, 4.0])
# "lookalike": the room is longer in x and holds the same object cluster at x = -TWIN_SPACING/2 and +TWIN_SPACING/2;
# room textures repeat every TWIN_SPACING along x, so the two places look alike.
TWIN_SPACING = 5.0
TWIN_ROOM_MIN = np.array([-6.0, 0.0, -3.0])
TWIN_ROOM_MAX = np.array([6.0, 3.0, 3.0])
TWIN_CLUSTER_Z = 1.0


# --- scene content --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Texture:
    base: np.ndarray  # (3,) rgb in [0, 1]
    accent: np.ndarray  # (3,) gradient colour
    period: np.ndarray  # (2,) checker periods (m)
    phase: np.ndarray  # (2,)
    freqs: np.ndarray  # (K, 2) noise wave vectors (cycles / m)
    wphase: np.ndarray  # (K,)
    wcol: np.ndarray  # (K, 3) per-wave colour weights
    grad_len: float


def _make_texture(rng: np.random.Generator, cell: tuple[float, float]) -> _Texture:
    k = 6
    wavelength = np.exp(rng.uniform(np.log(0.12), np.log(1.2), size=k))
    ang = rng.uniform(0, 2 * np.pi, size=k)
    freqs = np.stack([np.cos(ang), np.sin(ang)], 1) / wavelength[:, None]
    return _Texture(base=rng.uniform(0.25, 0.85, size=3), accent=rng.uniform(-0.3, 0.3, size=3),
                    period=rng.uniform(*cell, size=2), phase=rng.uniform(0, 2 * np.pi, size=2),
                    freqs=freqs, wphase=rng.uniform(0, 2 * np.pi, size=k),
                    wcol=rng.uniform(-0.08, 0.08, size=(k, 3)), grad_len=float(rng.uniform(3.0, 8.0)))


def _shade(tex: _Texture, uv: np.ndarray) -> np.ndarray:
    """Soft checker + sum of waves + linear colour gradient; uv (M, 2) in metres -> rgb (M, 3) in [0, 1]."""
    a = np.sin(2 * np.pi * uv[:, 0] / tex.period[0] + tex.phase[0])
    b = np.sin(2 * np.pi * uv[:, 1] / tex.period[1] + tex.phase[1])
    checker = np.tanh(4.0 * a * b)  # soft edges: resampling and reprojection stay consistent
    waves = np.sin(2 * np.pi * uv @ tex.freqs.T + tex.wphase)  # (M, K)
    rgb = tex.base * (0.65 + 0.25 * checker)[:, None] + waves @ tex.wcol
    rgb += np.outer(uv[:, 0] / tex.grad_len, tex.accent)
    return np.clip(rgb, 0.0, 1.0)


@dataclass(frozen=True)
class _Box:
    center: np.ndarray
    half: np.ndarray
    yaw: float
    tex: _Texture

    @property
    def rot(self) -> np.ndarray:  # local -> world, rotation about y
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


@dataclass(frozen=True)
class _Sphere:
    center: np.ndarray
    radius: float
    tex: _Texture


@dataclass(frozen=True)
class _Scene:
    room_tex: tuple  # 6 textures: -x, +x, floor(-y), ceiling(+y), -z, +z
    boxes: tuple
    spheres: tuple
    room_min: np.ndarray = field(default_factory=lambda: ROOM_MIN)
    room_max: np.ndarray = field(default_factory=lambda: ROOM_MAX)
    wrap_x: float | None = None  # room textures repeat with this period along x (look-alike places)


@lru_cache(maxsize=16)
def _scene(seed: int, layout: str = "room") -> _Scene:
    if layout == "twin":
        return _twin_scene(seed)
    rng = np.random.default_rng([seed, 7919])
    room = tuple(_make_texture(rng, (0.35, 0.9)) for _ in range(6))
    boxes, spheres = [], []
    # Objects stay within 1.3 m of the room centre (camera paths keep > 2 m away) plus one by a wall.
    for i in range(3):
        half = rng.uniform([0.2, 0.2, 0.2], [0.45, 0.6, 0.45])
        r, a = rng.uniform(0.2, 1.3), rng.uniform(0, 2 * np.pi)
        centre = np.array([r * np.cos(a), half[1], r * np.sin(a)])
        boxes.append(_Box(centre, half, float(rng.uniform(0, np.pi)), _make_texture(rng, (0.15, 0.4))))
    half = np.array([0.6, 0.5, 0.3])
    boxes.append(_Box(np.array([rng.uniform(-2.0, 2.0), 0.5, 3.6]), half, 0.0, _make_texture(rng, (0.15, 0.4))))
    for i in range(2):
        rad = rng.uniform(0.25, 0.4)
        r, a = rng.uniform(0.3, 1.2), rng.uniform(0, 2 * np.pi)
        spheres.append(_Sphere(np.array([r * np.cos(a), rng.uniform(rad, 1.6), r * np.sin(a)]), float(rad),
                               _make_texture(rng, (0.2, 0.5))))
    return _Scene(room, tuple(boxes), tuple(spheres))


def _twin_scene(seed: int) -> _Scene:
    """One cluster of two boxes and a sphere (textures in object coordinates) placed twice, TWIN_SPACING apart."""
    rng = np.random.default_rng([seed, 104729])
    room = tuple(_make_texture(rng, (0.35, 0.9)) for _ in range(6))
    boxes, spheres = [], []
    local_boxes = []
    for i in range(2):
        half = rng.uniform([0.2, 0.25, 0.2], [0.4, 0.6, 0.4])
        off = np.array([(-0.5 + i) * rng.uniform(0.7, 1.0), half[1], rng.uniform(-0.3, 0.3)])
        local_boxes.append((off, half, float(rng.uniform(0, np.pi)), _make_texture(rng, (0.15, 0.4))))
    rad = float(rng.uniform(0.25, 0.35))
    sphere = (np.array([rng.uniform(-0.2, 0.2), rng.uniform(1.2, 1.5), rng.uniform(0.2, 0.5)]), rad,
              _make_texture(rng, (0.2, 0.5)))
    for cx in (-TWIN_SPACING / 2, TWIN_SPACING / 2):
        centre = np.array([cx, 0.0, TWIN_CLUSTER_Z])
        boxes += [_Box(centre + off, half, yaw, tex) for off, half, yaw, tex in local_boxes]
        spheres.append(_Sphere(centre + sphere[0], sphere[1], sphere[2]))
    return _Scene(room, tuple(boxes), tuple(spheres), TWIN_ROOM_MIN, TWIN_ROOM_MAX, TWIN_SPACING)


def _cast(scene: _Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays o (3,) + t d (M, 3), o inside the room: nearest hit t (M,) and its colour (M, 3) in [0, 1]."""
    m = len(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Room: exit distance through the slab on each axis.
        bound = np.where(d > 0, scene.room_max, scene.room_min)
        ts = np.where(d != 0, (bound - o) / d, np.inf)
    axis = np.argmin(ts, axis=1)
    t = ts[np.arange(m), axis]
    surf = axis * 2 + (d[np.arange(m), axis] > 0)  # 0..5 room surfaces
    hit_obj = np.full(m, -1)

    objects = list(scene.boxes) + list(scene.spheres)
    face = np.zeros(m, dtype=np.int64)
    for k, box in enumerate(scene.boxes):
        R = box.rot
        ol = R.T @ (o - box.center)
        dl = d @ R  # = (R^T d^T)^T
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-box.half - ol) / dl
            t2 = (box.half - ol) / dl
        tn = np.nanmax(np.minimum(t1, t2), axis=1)
        tf = np.nanmin(np.maximum(t1, t2), axis=1)
        hit = (tn <= tf) & (tn > 1e-6) & (tn < t)
        if hit.any():
            t[hit] = tn[hit]
            hit_obj[hit] = k
            face[hit] = np.nanargmax(np.minimum(t1, t2)[hit], axis=1)
    for k, sp in enumerate(scene.spheres):
        oc = o - sp.center
        a = np.einsum("ij,ij->i", d, d)
        b = d @ oc
        c = oc @ oc - sp.radius ** 2
        disc = b * b - a * c
        with np.errstate(invalid="ignore"):
            tn = (-b - np.sqrt(disc)) / a
        hit = (disc > 0) & (tn > 1e-6) & (tn < t)
        if hit.any():
            t[hit] = tn[hit]
            hit_obj[hit] = len(scene.boxes) + k

    p = o + t[:, None] * d
    rgb = np.zeros((m, 3))
    room_px = hit_obj < 0
    uv_axes = {0: (2, 1), 1: (0, 2), 2: (0, 1)}  # in-plane axes for surfaces normal to x, y, z
    for s_id in range(6):
        sel = room_px & (surf == s_id)
        if sel.any():
            ax = uv_axes[s_id // 2]
            uv = p[sel][:, ax]
            if scene.wrap_x is not None and ax[0] == 0:  # x repeats: the same wall/floor at both places
                period = scene.wrap_x
                uv[:, 0] = np.mod(uv[:, 0] + period / 2, period) - period / 2
            rgb[sel] = _shade(scene.room_tex[s_id], uv)
    for k, obj in enumerate(objects):
        sel = hit_obj == k
        if not sel.any():
            continue
        if isinstance(obj, _Box):
            pl = (p[sel] - obj.center) @ obj.rot  # local coordinates
            f = face[sel]
            uv = np.where(f[:, None] == 0, pl[:, [2, 1]], np.where(f[:, None] == 1, pl[:, [0, 2]], pl[:, [0, 1]]))
            uv = uv + f[:, None] * 1.7  # faces differ
            rgb[sel] = _shade(obj.tex, uv)
        else:
            q = (p[sel] - obj.center) / obj.radius
            uv = np.stack([np.arctan2(q[:, 2], q[:, 0]), np.arcsin(np.clip(q[:, 1], -1, 1))], 1) * obj.radius
            rgb[sel] = _shade(obj.tex, uv)
    return t, rgb
