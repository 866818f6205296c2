"""Generated sample data: aerial-looking RGB orthophotos of car parks and streets, with car labels.

``make sample`` writes, deterministically from a seed, training scenes with their car footprints
(stored in EPSG:4326 so reprojection is always exercised), a batch of scenes to predict and their
ground truth (in the scenes' CRS). The scenes imitate 15 cm orthophotos: asphalt with texture,
cracks and oil stains, roads with lane markings, parking rows with painted lines, buildings with
roofs and rooftop units, grass and trees, one sun per scene casting every shadow, and cars of real
size and colour with a windshield, roof and rear window. Hard cases are made on purpose: cars parked
nearly touching, dark cars on dark asphalt, cars under trees and car-like objects that are not cars.

Everything is drawn in a local street frame rotated by a random angle per scene, so cars and
markings appear at any heading; cars and trees are drawn per patch with anti-aliased
signed-distance shapes at 2x supersampling, never over the whole scene.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio import features
from rasterio.crs import CRS
from rasterio.windows import Window
from scipy import ndimage

from pipeline.config import SampleConfig
from pipeline.io import (
    InputError,
    atomic_path,
    read_vector,
    temp_dir,
    write_json,
    write_vector,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SS = 2  # supersampling of car and tree patches (anti-aliased edges)
# GeoPackage embeds the time of writing; GDAL uses this instead, so files are byte-identical.
FIXED_OGR_DATE = "2020-01-01T00:00:00Z"

# Car body colours as seen from above (sRGB), with their share in a typical European car park.
CAR_COLOURS: list[tuple[str, float, tuple[int, int, int]]] = [
    ("white", 0.24, (222, 223, 220)),
    ("black", 0.20, (26, 27, 30)),
    ("grey", 0.17, (92, 95, 99)),
    ("silver", 0.15, (163, 166, 170)),
    ("blue", 0.07, (32, 58, 118)),
    ("red", 0.06, (148, 24, 26)),
    ("darkblue", 0.03, (24, 32, 62)),
    ("green", 0.02, (38, 78, 50)),
    ("beige", 0.02, (186, 172, 138)),
    ("brown", 0.02, (88, 58, 40)),
    ("yellow", 0.01, (212, 176, 38)),
    ("orange", 0.01, (200, 98, 30)),
]
# (kind, share, (length m range), (width m range), band layout from front (+1) to rear (-1)):
# hood end, windshield end, roof end, rear window end (fractions of the half length).
CAR_KINDS = [
    ("sedan", 0.45, (4.3, 4.9), (1.72, 1.86), (0.38, 0.06, -0.46, -0.66)),
    ("hatch", 0.25, (3.8, 4.3), (1.64, 1.78), (0.42, 0.12, -0.62, -0.86)),
    ("suv", 0.20, (4.4, 5.0), (1.82, 2.0), (0.50, 0.26, -0.80, -0.93)),
    ("van", 0.05, (4.8, 5.2), (1.9, 2.1), (0.62, 0.40, -0.90, -0.97)),
    ("pickup", 0.05, (4.9, 5.2), (1.85, 2.0), (0.42, 0.16, -0.22, -0.30)),
]


@dataclass(frozen=True)
class Style:
    """Light and camera of a flight: ranges each scene draws from (same draws for every style).

    ``default`` is the sample as it always was (byte-identical for a given seed); the others
    exist to measure generalisation: train on one style, evaluate on another.
    """

    sun_elevation_deg: tuple[float, float] = (30, 62)
    shadow_light: tuple[float, float] = (0.35, 0.55)  # light left in shadow
    haze: tuple[float, float] = (0, 18)  # digital numbers of veil
    gain: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mean per-band gain
    gamma: tuple[float, float] = (0.85, 1.15)
    noise: tuple[float, float] = (1.5, 3.5)  # sensor noise sigma, digital numbers
    blur_px: float = 0.55  # optics blur sigma


STYLES: dict[str, Style] = {
    "default": Style(),
    # Overcast: high diffuse light, weak short shadows, flat and bluish.
    "overcast": Style(sun_elevation_deg=(55, 75), shadow_light=(0.7, 0.85), haze=(10, 30),
                      gain=(0.85, 1.05), contrast=(0.7, 0.9), white_balance=(0.95, 1.0, 1.08),
                      noise=(2.0, 4.0)),
    # Evening: low sun, long dark shadows, warm light, darker exposure.
    "evening": Style(sun_elevation_deg=(15, 28), shadow_light=(0.25, 0.4), haze=(5, 25),
                     gain=(0.7, 0.95), contrast=(0.9, 1.2), white_balance=(1.12, 1.0, 0.82),
                     gamma=(0.9, 1.2)),
    # Faded: an older, softer camera with heavy haze and more noise.
    "faded": Style(haze=(20, 40), contrast=(0.65, 0.85), white_balance=(1.03, 1.03, 0.95),
                   noise=(3.0, 6.0), blur_px=0.9),
}


@dataclass
class Car:
    """One car in pixel coordinates of its scene (x = column, y = row, continuous)."""

    cx: float
    cy: float
    length_m: float
    width_m: float
    heading: float  # radians in the pixel frame: the front points to (cos, sin) in (x, y)
    colour: str = "grey"
    kind: str = "sedan"
    rgb: tuple[float, float, float] = (128.0, 128.0, 128.0)
    under_tree: float = 0.0

    def corners(self, gsd: float) -> np.ndarray:
        """The footprint rectangle's 4 corners as (x, y) pixel coordinates."""
        hl, hw = self.length_m / 2 / gsd, self.width_m / 2 / gsd
        c, s = math.cos(self.heading), math.sin(self.heading)
        local = np.array([[hl, hw], [hl, -hw], [-hl, -hw], [-hl, hw]])
        return np.stack([self.cx + local[:, 0] * c - local[:, 1] * s,
                         self.cy + local[:, 0] * s + local[:, 1] * c], axis=1)


@dataclass
class Box:
    """A car-like object that is not a car (container, rooftop unit, dumpster, road patch)."""

    cx: float
    cy: float
    length_m: float
    width_m: float
    heading: float
    kind: str
    rgb: tuple[float, float, float]
    height_m: float = 2.5


@dataclass
class SceneRender:
    """A rendered scene: the image, where it is valid, the cars and the car pixels drawn."""

    image: np.ndarray  # (3, rows, cols) uint8, 0 only where invalid
    valid: np.ndarray  # (rows, cols) bool
    cars: list[Car]
    car_mask: np.ndarray  # (rows, cols) bool: body coverage >= 0.5 as drawn (before trees)
    transform: Affine
    crs: CRS
    gsd: float
    sun_azimuth_deg: float
    boxes: list[Box] = field(default_factory=list)

    def footprints(self) -> list:
        """The cars' rectangles as shapely polygons in the scene CRS."""
        from shapely.geometry import Polygon

        polys = []
        for car in self.cars:
            xy = car.corners(self.gsd)
            t = self.transform
            xs, ys = t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f
            polys.append(Polygon(np.stack([xs, ys], axis=1)))
        return polys


# ====================================================================================
# Noise and shape helpers
# ====================================================================================

def _fbm(rng: np.random.Generator, shape: tuple[int, int], scales_px: list[float],
         weights: list[float]) -> np.ndarray:
    """Multi-scale value noise (zero mean, about unit std): coarse grids upsampled smoothly."""
    rows, cols = shape
    out = np.zeros(shape, np.float32)
    for scale, weight in zip(scales_px, weights, strict=True):
        if scale <= 1.0:
            out += weight * rng.standard_normal(shape).astype(np.float32)
            continue
        gr, gc = int(rows / scale) + 3, int(cols / scale) + 3
        grid = rng.standard_normal((gr, gc)).astype(np.float32)
        # Bilinear upsampling of several octaves looks smooth and is 4x cheaper than cubic.
        up = ndimage.zoom(grid, scale, order=1, mode="nearest", grid_mode=False)
        out += weight * up[:rows, :cols] / 0.8
    return out


def _coverage(sdf: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf / soft, 0.0, 1.0)


def _box_sdf(s: np.ndarray, t: np.ndarray, hl: float, hw: float, r: float) -> np.ndarray:
    """Signed distance to a rounded rectangle of half sizes hl, hw and corner radius r."""
    qx = np.abs(s) - hl + r
    qy = np.abs(t) - hw + r
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _band(x: np.ndarray, lo: float, hi: float, soft: float) -> np.ndarray:
    """Soft indicator of lo <= x <= hi."""
    return np.clip((x - lo) / soft + 0.5, 0, 1) * np.clip((hi - x) / soft + 0.5, 0, 1)


def _pick(rng: np.random.Generator, table: list) -> tuple:
    shares = np.array([row[1] for row in table], float)
    return table[int(rng.choice(len(table), p=shares / shares.sum()))]


def _patch(cx: float, cy: float, radius: float, shape: tuple[int, int]):
    """Pixel bounds of a square patch around (cx, cy), clipped to the image; None if empty."""
    r0, r1 = max(0, int(cy - radius)), min(shape[0], int(cy + radius) + 2)
    c0, c1 = max(0, int(cx - radius)), min(shape[1], int(cx + radius) + 2)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _ss_grid(r0: int, r1: int, c0: int, c1: int, ss: int = SS):
    """Supersampled sample positions (x, y) of a patch, in continuous pixel coordinates."""
    ys = r0 + (np.arange((r1 - r0) * ss) + 0.5) / ss
    xs = c0 + (np.arange((c1 - c0) * ss) + 0.5) / ss
    return np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))


def _pool(a: np.ndarray, ss: int = SS) -> np.ndarray:
    """Average ss x ss blocks of the last two axes (supersampled -> pixel)."""
    if ss == 1:
        return a
    out = a[..., 0::ss, 0::ss].copy()
    for i in range(ss):
        for j in range(ss):
            if i or j:
                out += a[..., i::ss, j::ss]
    return out / (ss * ss)


# ====================================================================================
# Scene layout in the local street frame (metres; u along streets, v across them)
# ====================================================================================

@dataclass
class _Frame:
    theta: float
    cx: float  # scene centre in pixels
    cy: float
    gsd: float

    def to_px(self, u: float, v: float) -> tuple[float, float]:
        c, s = math.cos(self.theta), math.sin(self.theta)
        return self.cx + (u * c - v * s) / self.gsd, self.cy + (u * s + v * c) / self.gsd


@dataclass
class _Layout:
    bands: list[tuple[str, float, float, dict]]  # (kind, v0, v1, params)
    cars: list[tuple[float, float, float, bool]] = field(default_factory=list)  # u, v, hdg, tight
    boxes: list[tuple[float, float, float, str]] = field(default_factory=list)
    trees: list[tuple[float, float, float]] = field(default_factory=list)  # u, v, radius
    buildings: list[tuple[float, float, float, float, str, float]] = field(default_factory=list)
    stains: list[tuple[float, float]] = field(default_factory=list)


def _plan(rng: np.random.Generator, half: float) -> _Layout:
    """Bands across v (road, sidewalk, parking, buildings, grass) and what stands in them."""
    # Car parks dominate (cars are the subject) but leave room for roofs, lawns and streets,
    # so a model also sees plenty of ground without cars.
    nxt = {"road": ["sidewalk"], "sidewalk": ["lot", "building", "grass"],
           "lot": ["grass", "road", "building", "lot"], "building": ["grass", "sidewalk", "lot"],
           "grass": ["lot", "road", "building"]}
    v = -half - rng.uniform(0, 10)
    kind = str(rng.choice(["lot", "grass", "road"]))
    lay = _Layout(bands=[])
    # Guarantee a parking band across the centre of every scene, however small.
    centre_lot_at = rng.uniform(-6, 2)
    while v < half:
        if kind != "lot" and v < centre_lot_at < v + 30:
            kind = "lot"
        if kind == "road":
            lanes = int(rng.choice([2, 2, 3]))
            width = lanes * rng.uniform(3.2, 3.6) + (2.4 if rng.random() < 0.6 else 0)
            p = {"lanes": lanes, "lane_w": (width - 2.4 * (width % 1 > 0)) / lanes,
                 "dark": rng.random() < 0.3}
            p["parking_lane"] = width - lanes * p["lane_w"] > 1
        elif kind == "sidewalk":
            width, p = rng.uniform(1.8, 3.2), {}
        elif kind == "lot":
            rows = int(rng.choice([2, 2, 4]))
            depth = rng.uniform(4.9, 5.5)
            aisle = rng.uniform(5.8, 7.2)
            width = rows * depth + (rows // 2) * aisle + rng.uniform(0.5, 1.5)
            p = {"rows": rows, "depth": depth, "aisle": aisle,
                 "dark": rng.random() < 0.4, "stall_w": rng.uniform(2.35, 2.7)}
        elif kind == "building":
            width, p = rng.uniform(12, 30), {}
        else:
            width, p = rng.uniform(4, 14), {}
        lay.bands.append((kind, v, v + width, p))
        v += width
        kind = str(rng.choice(nxt[kind]))
    for kind, v0, v1, p in lay.bands:
        {"road": _plan_road, "lot": _plan_lot, "building": _plan_buildings,
         "grass": _plan_grass}.get(kind, lambda *a: None)(rng, lay, v0, v1, p, half)
    return lay


def _car_length(rng: np.random.Generator) -> float:
    return rng.uniform(3.8, 5.2)


def _plan_road(rng, lay: _Layout, v0, v1, p, half) -> None:
    lane_w = p["lane_w"]
    for lane in range(p["lanes"]):
        vc = v0 + (lane + 0.5) * lane_w
        direction = 0.0 if lane % 2 == 0 else math.pi
        u = -half - rng.uniform(0, 20)
        while u < half:
            jam = rng.random() < 0.3
            n = int(rng.integers(2, 6)) if jam else 1
            for _ in range(n):
                L = _car_length(rng)
                lay.cars.append((u + L / 2, vc + rng.normal(0, 0.15),
                                 direction + rng.normal(0, 0.02), jam))
                u += L + (rng.uniform(0.6, 2.5) if jam else 0)
            u += rng.uniform(8, 40)
    if p["parking_lane"]:
        vc = v1 - 1.2
        u = -half - rng.uniform(0, 5)
        while u < half:
            if rng.random() < 0.75:
                L = _car_length(rng)
                lay.cars.append((u + L / 2, vc + rng.normal(0, 0.08),
                                 float(rng.choice([0.0, math.pi])) + rng.normal(0, 0.03), True))
                u += L + rng.uniform(0.15, 0.4) if rng.random() < 0.6 else L + rng.uniform(1, 5)
            else:
                u += rng.uniform(2, 8)
    for _ in range(int(rng.poisson(2 * half / 40))):
        # A repaired road patch the size of a car: flat, no shadow, not a car.
        lay.boxes.append((rng.uniform(-half, half), rng.uniform(v0 + 0.5, v1 - 0.5),
                          rng.normal(0, 0.05), "patch"))


def _plan_lot(rng, lay: _Layout, v0, v1, p, half) -> None:
    depth, aisle, stall_w = p["depth"], p["aisle"], p["stall_w"]
    v = v0 + 0.3
    row_v: list[tuple[float, float]] = []
    for i in range(p["rows"]):
        row_v.append((v, v + depth))
        v += depth + (aisle if i % 2 == 0 else 0)
    p["row_v"] = row_v
    p["u_off"] = rng.uniform(0, stall_w)
    for r, (a, b) in enumerate(row_v):
        # Cars face the aisle or back in; the aisle side alternates per row.
        facing = math.pi / 2 if r % 2 == 0 else -math.pi / 2
        tight = rng.random() < 0.45
        occupancy = rng.uniform(0.55, 0.95)
        if tight:
            # Overflow parking without lines: cars packed side by side with 0-0.4 m gaps.
            u = -half - rng.uniform(0, 5)
            while u < half:
                if rng.random() < 0.85:
                    w = rng.uniform(1.6, 2.1)
                    hdg = facing + (math.pi if rng.random() < 0.25 else 0) + rng.normal(0, 0.012)
                    lay.cars.append((u + w / 2, (a + b) / 2 + rng.normal(0, 0.25), hdg, True))
                    u += w + rng.uniform(0.08, 0.4)
                else:
                    u += rng.uniform(2.5, 6)
            p.setdefault("unlined", []).append(r)
            continue
        k0 = int(math.floor((-half - p["u_off"]) / stall_w))
        for k in range(k0, int(math.ceil((half - p["u_off"]) / stall_w)) + 1):
            uc = p["u_off"] + (k + 0.5) * stall_w
            roll = rng.random()
            if roll < occupancy:
                hdg = facing + (math.pi if rng.random() < 0.2 else 0) + rng.normal(0, 0.04)
                lay.cars.append((uc + rng.normal(0, 0.15), (a + b) / 2 + rng.normal(0, 0.3),
                                 hdg, False))
            elif roll < occupancy + 0.04:
                lay.boxes.append((uc, (a + b) / 2, math.pi / 2, "dumpster"))
            else:
                lay.stains.append((uc + rng.normal(0, 0.2), (a + b) / 2 + rng.normal(0, 0.4)))
        if rng.random() < 0.35:
            # A shipping container parked across three stalls.
            uc = rng.uniform(-half, half)
            lay.boxes.append((uc, (a + b) / 2, math.pi / 2 + rng.normal(0, 0.02), "container"))
    # Cars manoeuvring in the aisles, at any heading.
    for r in range(0, len(row_v), 2):
        va = row_v[r][1]
        for _ in range(int(rng.poisson(2 * half / 60))):
            lay.cars.append((rng.uniform(-half, half), va + aisle / 2 + rng.normal(0, 0.6),
                             rng.uniform(0, 2 * math.pi), False))
    # Trees on the lot's edges, reaching over the outer stall rows.
    for edge in (v0, v1):
        for _ in range(int(rng.poisson(2 * half / 35))):
            lay.trees.append((rng.uniform(-half, half), edge + rng.normal(0, 1.2),
                              rng.uniform(2.2, 4.5)))


def _plan_buildings(rng, lay: _Layout, v0, v1, p, half) -> None:
    u = -half - rng.uniform(0, 15)
    while u < half:
        length = rng.uniform(10, 40)
        a, b = v0 + rng.uniform(1, 3), v1 - rng.uniform(1, 3)
        roof = str(rng.choice(["gravel", "tar", "tile", "metal", "gable_grey"],
                              p=[0.3, 0.2, 0.2, 0.15, 0.15]))
        lay.buildings.append((u, u + length, a, b, roof, rng.uniform(4, 14)))
        if roof in ("gravel", "tar", "metal"):
            for _ in range(int(rng.integers(0, 5))):
                lay.boxes.append((rng.uniform(u + 2, u + length - 2), rng.uniform(a + 2, b - 2),
                                  float(rng.choice([0, math.pi / 2])) + rng.normal(0, 0.01),
                                  "hvac"))
        u += length + rng.uniform(3, 12)
        if rng.random() < 0.5:
            lay.trees.append((u - rng.uniform(1, 4), rng.uniform(v0, v1), rng.uniform(2, 4)))


def _plan_grass(rng, lay: _Layout, v0, v1, p, half) -> None:
    for _ in range(int(rng.poisson((v1 - v0) * 2 * half / 60))):
        lay.trees.append((rng.uniform(-half, half), rng.uniform(v0, v1), rng.uniform(1.8, 5.0)))
    if rng.random() < 0.3 and v1 - v0 > 4:
        lay.boxes.append((rng.uniform(-half, half), (v0 + v1) / 2, rng.normal(0, 0.1),
                          "container"))


# ====================================================================================
# Drawing
# ====================================================================================

def _ground(rng, lay: _Layout, fr: _Frame, shape, valid) -> tuple[np.ndarray, np.ndarray]:
    """Ground colours (3, rows, cols) float32 and a height map of buildings for shadows."""
    rows, cols = shape
    g = fr.gsd
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    dx, dy = (xx + 0.5 - fr.cx) * g, (yy + 0.5 - fr.cy) * g
    c, s = math.cos(fr.theta), math.sin(fr.theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    del xx, yy, dx, dy

    edges = np.array([b[1] for b in lay.bands[1:]], np.float32)
    band_id = np.searchsorted(edges, v, side="right")
    kinds = [b[0] for b in lay.bands]
    base = np.zeros((len(kinds), 3), np.float32)
    amp = np.zeros(len(kinds), np.float32)
    for i, (kind, _v0, _v1, p) in enumerate(lay.bands):
        if kind in ("road", "lot"):
            tone = rng.uniform(48, 62) if p.get("dark") else rng.uniform(88, 122)
            base[i] = tone * np.array([1.0, 1.0, 1.02]) + rng.normal(0, 2, 3)
            amp[i] = rng.uniform(5, 9)
        elif kind == "sidewalk":
            base[i] = rng.uniform(150, 185) * np.array([1.0, 0.99, 0.95])
            amp[i] = 6
        elif kind == "building":
            base[i] = (rng.uniform(70, 100), rng.uniform(95, 125), rng.uniform(45, 65))
            amp[i] = 12
        else:
            dry = rng.uniform(0, 1)
            base[i] = np.array([70, 105, 48]) * (1 - dry) + np.array([130, 128, 80]) * dry
            amp[i] = 12
    img = base[band_id].transpose(2, 0, 1).copy()  # (3, rows, cols)
    ftype = np.array([k in ("road", "lot") for k in kinds])[band_id]
    grass = np.array([k in ("grass", "building") for k in kinds])[band_id]

    # Texture: coarse mottling, medium patches and per-pixel aggregate grain.
    px = 1 / g
    n = _fbm(rng, shape, [40 * px, 8 * px, 1.5 * px, 1.0], [0.6, 0.5, 0.4, 0.6])
    img += (amp[band_id] * n)[None]
    # Grass colour varies between green and straw, not just in brightness.
    hue = _fbm(rng, shape, [12 * px, 3 * px], [0.7, 0.5])
    img[0] += np.where(grass, 10 * hue, 0)
    img[2] -= np.where(grass, 4 * hue, 0)

    soft = g
    paint = np.zeros(shape, np.float32)
    for kind, v0, v1, p in lay.bands:
        inb = (v >= v0) & (v < v1)
        if not inb.any():
            continue
        if kind == "road":
            lw = p["lane_w"]
            for k in range(1, p["lanes"]):
                dash = (np.mod(u, 9.0) < 3.0) if k == p["lanes"] // 2 else (np.mod(u, 6.0) < 1.5)
                paint = np.maximum(paint, inb * dash * _band(v, v0 + k * lw - 0.08,
                                                             v0 + k * lw + 0.08, soft))
            edge = _band(v, v0 + 0.25, v0 + 0.40, soft)
            edge += _band(v, v0 + p["lanes"] * lw - 0.15, v0 + p["lanes"] * lw, soft)
            paint = np.maximum(paint, inb * np.clip(edge, 0, 1))
            # Tyre tracks darken the middle of each wheel path.
            for k in range(p["lanes"]):
                for off in (0.25, 0.75):
                    vt = v0 + (k + off) * lw
                    img *= 1 - 0.06 * (inb * np.exp(-((v - vt) / 0.35) ** 2))[None]
        elif kind == "sidewalk":
            joints = np.abs(np.mod(u, 1.8) - 0.9) > 0.86
            img *= 1 - 0.18 * (inb & joints)[None]
            curb = _band(v, v0, v0 + 0.2, soft) + _band(v, v1 - 0.2, v1, soft)
            img += (28 * inb * np.clip(curb, 0, 1))[None]
        elif kind == "lot":
            for r, (a, b) in enumerate(p["row_v"]):
                if r in p.get("unlined", []):
                    continue
                inrow = inb & (v >= a) & (v <= b)
                du = np.abs(np.mod(u - p["u_off"] + p["stall_w"] / 2, p["stall_w"])
                            - p["stall_w"] / 2)
                paint = np.maximum(paint, inrow * _coverage((du - 0.06) / soft))
            for r in range(0, len(p["row_v"]), 2):
                end = p["row_v"][r][1]
                paint = np.maximum(paint, inb * _band(v, end - 0.08, end + 0.06, soft) * 0.8)
    # Worn paint: the white shows through unevenly.
    wear = np.clip(0.75 + 0.35 * _fbm(rng, shape, [2 * px, 1.0], [0.7, 0.4]), 0.2, 1)
    paint *= wear
    paint_rgb = np.array([232, 232, 225], np.float32) if rng.random() < 0.8 else \
        np.array([225, 195, 60], np.float32)
    img = img * (1 - paint) + paint_rgb[:, None, None] * paint

    # Cracks (dark polylines) and oil stains on the asphalt.
    crack = np.zeros(shape, np.float32)
    from skimage.draw import line_aa

    for _ in range(int(rows * cols * g * g / 150)):
        y, x = rng.uniform(0, rows), rng.uniform(0, cols)
        ang = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(4, 16))):
            ang += rng.normal(0, 0.5)
            step = rng.uniform(2, 8)
            y2, x2 = y + step * math.sin(ang), x + step * math.cos(ang)
            rr, cc, val = line_aa(int(y), int(x), int(y2), int(x2))
            ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
            crack[rr[ok], cc[ok]] = np.maximum(crack[rr[ok], cc[ok]], val[ok])
            y, x = y2, x2
    img *= 1 - (0.22 * crack * ftype)[None]
    for us, vs in lay.stains:
        xs, ys = fr.to_px(us, vs)
        pb = _patch(xs, ys, 1.5 / g, shape)
        if pb is None:
            continue
        r0, r1, c0, c1 = pb
        yy, xx = np.mgrid[r0:r1, c0:c1]
        d2 = ((xx - xs) ** 2 + (yy - ys) ** 2) * g * g
        blob = np.exp(-d2 / rng.uniform(0.1, 0.4)) * rng.uniform(0.2, 0.45)
        img[:, r0:r1, c0:c1] *= 1 - blob * ftype[r0:r1, c0:c1]

    # Buildings: roofs, and a height map that casts their shadows.
    height = np.zeros(shape, np.float32)
    for u0, u1, a, b, roof, h in lay.buildings:
        inb = (u >= u0) & (u < u1) & (v >= a) & (v < b)
        if not inb.any():
            continue
        tex = {"gravel": (rng.uniform(120, 160), 10), "tar": (rng.uniform(55, 75), 5),
               "tile": (rng.uniform(120, 160), 8), "metal": (rng.uniform(170, 200), 4),
               "gable_grey": (rng.uniform(80, 110), 6)}[roof]
        col = np.array([1.0, 0.98, 0.95]) if roof != "tile" else np.array([1.0, 0.5, 0.36])
        shade = np.ones(shape, np.float32)
        if roof in ("tile", "gable_grey"):
            # Two roof planes: the one facing the sun is brighter; a ridge line between.
            side = np.sign(v - (a + b) / 2)
            shade = np.where(side > 0, 1.12, 0.82).astype(np.float32) if rng.random() < 0.5 \
                else np.where(side > 0, 0.82, 1.12).astype(np.float32)
            shade *= 1 - 0.25 * np.exp(-((v - (a + b) / 2) / 0.15) ** 2)
            stripes = 0.06 * np.sin(u * 2 * math.pi / 0.35)
            shade += stripes.astype(np.float32)
        elif roof == "metal":
            shade = (1 - 0.08 * (np.mod(u, 0.6) < 0.12)).astype(np.float32)
        idx = np.nonzero(inb)
        tone = tex[0] * shade[idx] + tex[1] * n[idx]
        img[:, idx[0], idx[1]] = (tone[None] * col[:, None]).astype(np.float32)
        # A parapet: a slightly lighter rim on flat roofs.
        if roof in ("gravel", "tar", "metal"):
            rim = inb & ~((u >= u0 + 0.3) & (u < u1 - 0.3) & (v >= a + 0.3) & (v < b - 0.3))
            img[:, rim] = np.minimum(img[:, rim] * 1.25 + 15, 250)
        height[inb] = h
    return img, height


def _building_shadow(lay: _Layout, frame: _Frame, shape: tuple[int, int],
                     per_m: tuple[float, float]) -> np.ndarray:
    """Shadow of each building: its footprint swept away from the sun by its height (0/1)."""
    from shapely.geometry import MultiPoint

    shapes = []
    for u0, u1, a, b, _roof, h in lay.buildings:
        corners = [frame.to_px(u, v) for u, v in ((u0, a), (u1, a), (u1, b), (u0, b))]
        moved = [(x + per_m[0] * h, y + per_m[1] * h) for x, y in corners]
        # A box swept along a straight line covers the convex hull of its start and end.
        shapes.append((MultiPoint(corners + moved).convex_hull, 1))
    if not shapes:
        return np.zeros(shape, np.float32)
    return features.rasterize(shapes, out_shape=shape, fill=0, dtype="uint8").astype(np.float32)


def _draw_car(img: np.ndarray, car_mask: np.ndarray, car: Car, gsd: float, rng,
              shadow_dir: tuple[float, float], shadow_len_m: float, sun_px: tuple[float, float],
              shadow_dark: float) -> None:
    """Draw one car (contact shadow, cast shadow, body, glass, highlights) into its patch."""
    kind = next(k for k in CAR_KINDS if k[0] == car.kind)
    hood, ws, roof_end, rear = kind[4]
    hl, hw = car.length_m / 2 / gsd, car.width_m / 2 / gsd
    sh = shadow_len_m / gsd
    pb = _patch(car.cx, car.cy, math.hypot(hl, hw) + sh + 3, car_mask.shape)
    if pb is None:
        return
    r0, r1, c0, c1 = pb
    X, Y = _ss_grid(r0, r1, c0, c1)
    ch, sn = math.cos(car.heading), math.sin(car.heading)

    def local(ox: float = 0.0, oy: float = 0.0):
        dx, dy = X - car.cx - ox, Y - car.cy - oy
        return dx * ch + dy * sn, -dx * sn + dy * ch

    s, t = local()
    radius = min(0.45 / gsd, hw * 0.6)
    body_sdf = _box_sdf(s, t, hl, hw, radius)
    # Cast shadow: the body swept away from the sun, soft-edged; plus a dark contact rim.
    sdf_sh = body_sdf.copy()
    for f in (0.35, 0.7, 1.0):
        ss_, st_ = local(shadow_dir[0] * sh * f, shadow_dir[1] * sh * f)
        sdf_sh = np.minimum(sdf_sh, _box_sdf(ss_, st_, hl * 0.97, hw * 0.95, radius * 1.5))
    shadow = _coverage(sdf_sh * SS, soft=2.0 * SS) * (1 - shadow_dark)
    contact = 0.35 * np.exp(-np.maximum(body_sdf, 0) / 1.2)
    ground_mul = _pool(np.maximum(shadow, contact * (body_sdf > 0)))

    sn_ = s / hl
    tn = t / hw
    base = np.array(car.rgb, np.float32)
    dark_car = base.mean() < 60
    # Body: rounded across its width (sides fall off), hood and boot slightly darker than roof.
    curve = 1 - 0.28 * np.abs(tn) ** 4
    body = base[:, None, None] * curve[None]
    cabin = _band(sn_, rear - 0.02, hood + 0.02, 0.05) * _band(tn, -0.84, 0.84, 0.06)
    glass_w = 0.80 - 0.12 * np.clip((hood - sn_) / max(hood - ws, 1e-3), 0, 1)
    windshield = _band(sn_, ws, hood, 0.04) * (np.abs(tn) < glass_w)
    rear_win = _band(sn_, rear, roof_end, 0.04) * (np.abs(tn) < 0.76)
    side_win = _band(sn_, roof_end, ws, 0.03) * _band(np.abs(tn), 0.62, 0.84, 0.05)
    glass_rgb = np.array([38, 42, 50], np.float32) * rng.uniform(0.8, 1.25)
    # Sky reflected in the windshield: lighter towards the front edge.
    sky = 30 * np.clip((sn_ - ws) / max(hood - ws, 1e-3), 0, 1)
    glass = glass_rgb[:, None, None] + sky[None]
    g_alpha = np.clip(windshield + rear_win + 0.8 * side_win, 0, 1) * cabin
    body = body * (1 - g_alpha[None]) + glass * g_alpha[None]
    roof = _band(sn_, roof_end, ws, 0.03) * _band(tn, -0.62, 0.62, 0.05)
    body *= (1 + (0.06 if not dark_car else 0.15) * roof)[None]
    # Tail lights at the rear corners; a black roof on some small cars.
    tail = _band(sn_, -1.0, -0.93, 0.02) * _band(np.abs(tn), 0.55, 0.92, 0.05)
    body = body * (1 - 0.6 * tail)[None] + (tail * 0.6)[None] * \
        np.array([150, 20, 20], np.float32)[:, None, None]
    if car.kind == "hatch" and not dark_car and rng.random() < 0.2:
        body = body * (1 - 0.8 * roof)[None] + (roof * 0.8 * 30)[None]
    if car.kind == "pickup":
        bed = _band(sn_, -0.95, rear - 0.04, 0.03) * _band(tn, -0.8, 0.8, 0.05)
        body = body * (1 - 0.55 * bed)[None]
    if rng.random() < 0.15 and car.kind in ("sedan", "suv"):
        sunroof = _band(sn_, (roof_end + ws) / 2 - 0.05, ws - 0.05, 0.03) * (np.abs(tn) < 0.4)
        body = body * (1 - sunroof[None]) + glass * sunroof[None]
    # Specular highlight on the roof and hood on the side facing the sun.
    hx, hy = sun_px
    for centre, amp in ((((roof_end + ws) / 2) * hl, 1.0), (((hood + 1) / 2) * hl, 0.6)):
        d2 = (s - centre - (hx * ch + hy * sn) * hw * 0.4) ** 2 + \
             (t - (-hx * sn + hy * ch) * hw * 0.4) ** 2
        spec = amp * np.exp(-d2 / (2 * (0.25 * hw) ** 2)) * (1 - 0.6 * g_alpha)
        body += (spec * (40 if dark_car else 0.3 * (255 - base.mean()) + 10))[None]
    # A thin dark outline where the body meets the ground (bumpers, side skirts).
    body *= (1 - 0.25 * _band(body_sdf, -1.0 * SS / SS, 0.5, 0.5))[None]
    alpha = _coverage(body_sdf * SS, soft=1.0)

    patch = img[:, r0:r1, c0:c1]
    patch *= 1 - ground_mul[None] * np.array([1.0, 0.98, 0.92], np.float32)[:, None, None]
    a = _pool(alpha)
    col = _pool(body * alpha[None]) / np.maximum(a, 1e-6)[None]
    patch[:] = patch * (1 - a[None]) + col * a[None]
    car_mask[r0:r1, c0:c1] |= a >= 0.5


def _draw_box(img: np.ndarray, box: Box, gsd: float, shadow_dir, per_m: float,
              shadow_dark: float, rng) -> None:
    """Draw a non-car object: container, rooftop unit, dumpster or road patch."""
    hl, hw = box.length_m / 2 / gsd, box.width_m / 2 / gsd
    sh = 0 if box.kind == "patch" else per_m * box.height_m
    pb = _patch(box.cx, box.cy, math.hypot(hl, hw) + sh + 3, img.shape[1:])
    if pb is None:
        return
    r0, r1, c0, c1 = pb
    X, Y = _ss_grid(r0, r1, c0, c1)
    ch, sn = math.cos(box.heading), math.sin(box.heading)
    dx, dy = X - box.cx, Y - box.cy
    s, t = dx * ch + dy * sn, -dx * sn + dy * ch
    sdf = _box_sdf(s, t, hl, hw, 0.1 / gsd)
    base = np.array(box.rgb, np.float32)
    col = np.broadcast_to(base[:, None, None], (3,) + s.shape).copy()
    if box.kind == "container":
        col *= (1 - 0.18 * (np.mod(s * gsd, 0.28) < 0.1))[None]  # corrugated walls
        col *= (1 - 0.3 * _band(np.abs(s), hl - 0.12 / gsd, hl, 0.5))[None]
    elif box.kind == "hvac":
        fan = np.hypot(s - hl * 0.4, t) < hw * 0.6
        col *= (1 - 0.55 * fan)[None]
        col *= (1 - 0.15 * (np.mod(s * gsd, 0.2) < 0.05) * ~fan)[None]
    elif box.kind == "dumpster":
        col *= (1 - 0.3 * (np.abs(s) < 0.06 / gsd))[None]
    elif box.kind == "patch":
        col += 6 * rng.standard_normal(s.shape)[None]
    patch = img[:, r0:r1, c0:c1]
    if sh > 0:
        sdf_sh = sdf.copy()
        for f in (0.33, 0.66, 1.0):
            dxs, dys = dx - shadow_dir[0] * sh * f, dy - shadow_dir[1] * sh * f
            sdf_sh = np.minimum(sdf_sh, _box_sdf(dxs * ch + dys * sn, -dxs * sn + dys * ch,
                                                 hl, hw, 0.1 / gsd))
        shadow = _pool(_coverage(sdf_sh * SS, soft=1.5 * SS) * (1 - shadow_dark))
        patch *= 1 - shadow[None]
    alpha = _coverage(sdf * SS, soft=1.0) * (0.8 if box.kind == "patch" else 1.0)
    a = _pool(alpha)
    c = _pool(col * alpha[None]) / np.maximum(a, 1e-6)[None]
    patch[:] = patch * (1 - a[None]) + c * a[None]


def _draw_tree(img: np.ndarray, shade: np.ndarray, cx: float, cy: float, r_m: float,
               gsd: float, rng, shadow_dir, per_m: float, sun_px, cover: np.ndarray,
               leaf_tex: np.ndarray) -> None:
    """A lobed tree crown with leafy texture, lit from the sun, and its shadow on the ground.

    Crowns are soft-edged anyway, so they are drawn at pixel resolution (no supersampling), with
    their leaf texture cut from one scene-wide noise field.
    """
    r = r_m / gsd
    h = rng.uniform(5, 12)
    sh = per_m * h
    pb = _patch(cx + shadow_dir[0] * sh / 2, cy + shadow_dir[1] * sh / 2, r * 1.3 + sh / 2 + 3,
                img.shape[1:])
    if pb is None:
        return
    r0, r1, c0, c1 = pb
    X, Y = _ss_grid(r0, r1, c0, c1, ss=1)
    k = rng.integers(3, 7)
    ph = rng.uniform(0, 2 * math.pi, 3)

    def crown(ox: float, oy: float) -> np.ndarray:
        dx, dy = X - cx - ox, Y - cy - oy
        ang = np.arctan2(dy, dx)
        rr = r * (1 + 0.12 * np.sin(k * ang + ph[0]) + 0.07 * np.sin((k + 3) * ang + ph[1]))
        return np.hypot(dx, dy) - rr

    sdf = crown(0, 0)
    sdf_sh = crown(shadow_dir[0] * sh, shadow_dir[1] * sh)
    shadow = _coverage(sdf_sh, soft=3.0)
    shade[r0:r1, c0:c1] = np.maximum(shade[r0:r1, c0:c1], shadow * 0.85)
    leaf = leaf_tex[r0:r1, c0:c1]
    # Leafy clumps: bright tops on the sunny side, dark gaps between; the rim is ragged.
    dx, dy = (X - cx) / r, (Y - cy) / r
    rho2 = np.clip(dx**2 + dy**2, 0, 1)
    light = 0.9 + 0.3 * (dx * sun_px[0] + dy * sun_px[1]) - 0.25 * rho2
    base = np.array([rng.uniform(38, 68), rng.uniform(62, 92), rng.uniform(28, 44)], np.float32)
    col = base[:, None, None] * np.clip(light + 0.3 * leaf, 0.35, 1.8)[None]
    alpha = _coverage(sdf + 1.2 * r * 0.08 * leaf, soft=1.5)
    # Thin foliage at the rim lets a car show through a little.
    alpha *= np.clip(1.05 + 0.25 * leaf - 0.5 * np.clip(rho2 - 0.75, 0, 1), 0, 1)
    img[:, r0:r1, c0:c1] = img[:, r0:r1, c0:c1] * (1 - alpha[None]) + col * alpha[None]
    cover[r0:r1, c0:c1] = np.maximum(cover[r0:r1, c0:c1], alpha)


def _collar(rng, shape: tuple[int, int]) -> np.ndarray:
    """Valid-data mask with an irregular mosaic border on two sides (True = valid)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    edge = cols * rng.uniform(0.05, 0.15) + np.cumsum(rng.normal(0, 1.5, rows))
    # Mosaic seams run in straight runs with steps, not smooth curves.
    edge = ndimage.median_filter(edge, size=31, mode="nearest")
    valid = xx >= edge[:, None]
    diag = (xx / cols + (rows - yy) / rows) > rng.uniform(1.55, 1.75)
    return valid & ~diag


def render_scene(rng: np.random.Generator, width: int, height: int, *, gsd: float,
                 transform: Affine, crs: CRS, collar: bool = False,
                 style: Style | str = "default") -> SceneRender:
    """Draw one scene; the result keeps the car raster it drew, for checks against labels.

    Args:
        rng: the scene's random generator (the only source of randomness).
        width, height: scene size in pixels.
        gsd: pixel size in metres.
        transform, crs: the scene's grid.
        collar: give the scene an irregular nodata border.
        style: light and camera (a name in ``STYLES`` or a ``Style``).
    """
    st = STYLES[style] if isinstance(style, str) else style
    shape = (height, width)
    frame = _Frame(theta=rng.uniform(0, math.pi), cx=width / 2, cy=height / 2, gsd=gsd)
    half = 0.5 * math.hypot(width, height) * gsd + 6
    lay = _plan(rng, half)
    valid = _collar(rng, shape) if collar else np.ones(shape, bool)

    # One sun per scene: azimuth (from north, clockwise) and elevation set every shadow.
    azimuth = rng.uniform(0, 360)
    elevation = math.radians(rng.uniform(*st.sun_elevation_deg))
    sun_px = (math.sin(math.radians(azimuth)), -math.cos(math.radians(azimuth)))
    shadow_dir = (-sun_px[0], -sun_px[1])
    per_m = 1 / math.tan(elevation) / gsd  # shadow pixels per metre of height
    shadow_dark = rng.uniform(*st.shadow_light)  # light left in shadow

    img, heights = _ground(rng, lay, frame, shape, valid)
    building = heights > 0
    shade = _building_shadow(lay, frame, shape, (shadow_dir[0] * per_m, shadow_dir[1] * per_m))

    # Distractors first (they stand on the ground like cars do).
    boxes: list[Box] = []
    for u, v, hdg, kind in lay.boxes:
        x, y = frame.to_px(u, v)
        if kind == "container":
            L, W, rgb, h = (rng.choice([6.06, 12.19]), 2.44,
                            tuple(rng.choice([(150, 40, 30), (30, 70, 130), (40, 100, 60),
                                              (120, 120, 118), (180, 110, 40)])), 2.6)
        elif kind == "hvac":
            L, W = rng.uniform(1.4, 3.2), rng.uniform(1.0, 2.0)
            rgb, h = (rng.uniform(165, 215),) * 3, rng.uniform(0.8, 1.6)
        elif kind == "dumpster":
            L, W, h = rng.uniform(1.6, 2.2), rng.uniform(1.0, 1.4), 1.3
            rgb = tuple(rng.choice([(40, 70, 50), (50, 55, 60), (40, 60, 110), (150, 110, 40)]))
        else:
            L, W, h = rng.uniform(3.5, 5.5), rng.uniform(1.5, 2.6), 0.0
            rgb = (rng.uniform(40, 75),) * 3
        if 0 <= x < width and 0 <= y < height:
            boxes.append(Box(x, y, float(L), float(W), frame.theta + hdg, kind,
                             tuple(float(c) for c in rgb), h))
    # Road patches are painted before everything else stands on them.
    for box in sorted(boxes, key=lambda b: b.kind != "patch"):
        _draw_box(img, box, gsd, shadow_dir, per_m, shadow_dark, rng)

    cars = _place_cars(rng, lay, frame, gsd, shape, valid, building, boxes)
    car_mask = np.zeros(shape, bool)
    for car in cars:
        _draw_car(img, car_mask, car, gsd, rng, shadow_dir, 1.45 / math.tan(elevation),
                  sun_px, shadow_dark)

    # Trees over cars and ground, their shadows with the buildings'.
    cover = np.zeros(shape, np.float32)
    tree_img = img.copy()
    leaf_tex = _fbm(rng, shape, [0.7 / gsd, 0.3 / gsd, 1.0], [0.6, 0.5, 0.3])
    for u, v, r in lay.trees:
        x, y = frame.to_px(u, v)
        _draw_tree(tree_img, shade, x, y, r, gsd, rng, shadow_dir, per_m, sun_px, cover,
                   leaf_tex)
    shade = ndimage.gaussian_filter(shade, 1.2)
    shade = np.where(building, 0, shade)
    # Shadows are lit by the blue sky only: darker and bluer.
    tint = np.array([1.0, 0.97, 0.88], np.float32)[:, None, None]
    mul = 1 - shade[None] * (1 - shadow_dark) * tint
    img = img * mul
    # Tree crowns sit above the shadows cast on the ground (their own shading is in the texture).
    img = _composite_trees(img, tree_img, cover, mul)
    for car in cars:
        car.under_tree = _mean_cover(car, cover, gsd)

    # Camera: optics blur, chroma at lower resolution than luma (as in JPEG-compressed
    # orthophoto deliveries), haze, per-scene exposure, contrast, white balance, sensor noise.
    img = ndimage.gaussian_filter(img, (0, st.blur_px, st.blur_px))
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    chroma = ndimage.gaussian_filter(img - luma[None], (0, 1.0, 1.0))
    img = luma[None] + chroma
    if rng.random() < 0.5:
        # A mosaic seamline: the two source photos differ a little in exposure and colour.
        yy, xx = np.mgrid[0:height, 0:width]
        ang = rng.uniform(0, math.pi)
        side = (xx - width * rng.uniform(0.3, 0.7)) * math.cos(ang) + \
            (yy - height * rng.uniform(0.3, 0.7)) * math.sin(ang) > 0
        step = (rng.normal(1, 0.03) * rng.normal(1, 0.015, 3)).astype(np.float32)
        img = np.where(side[None], img * step[:, None, None], img)
    haze = rng.uniform(*st.haze)
    img = img * (1 - haze / 255) + haze * np.array([0.9, 0.97, 1.1], np.float32)[:, None, None]
    gain = rng.uniform(*st.gain)
    contrast = rng.uniform(*st.contrast)
    wb = rng.normal(1, 0.03, 3) * np.asarray(st.white_balance)
    wb = wb.astype(np.float32)[:, None, None]
    mean = float(img.mean())
    img = ((img - mean) * contrast + mean) * gain * wb
    img = 255 * np.clip(img / 255, 0, None) ** rng.uniform(*st.gamma)
    img += rng.normal(0, rng.uniform(*st.noise), img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 1, 255).astype(np.uint8)  # 0 is reserved for nodata
    out[:, ~valid] = 0
    return SceneRender(out, valid, cars, car_mask & valid, transform, crs, gsd, azimuth, boxes)


def _composite_trees(img: np.ndarray, tree_img: np.ndarray, cover: np.ndarray,
                     mul: np.ndarray) -> np.ndarray:
    # Crowns are drawn onto the unshadowed image; undo nothing, just blend over the shadowed one.
    return img * (1 - cover[None]) + tree_img * cover[None] * np.maximum(mul, 0.8)


def _mean_cover(car: Car, cover: np.ndarray, gsd: float) -> float:
    pb = _patch(car.cx, car.cy, car.width_m / 2 / gsd, cover.shape)
    if pb is None:
        return 0.0
    r0, r1, c0, c1 = pb
    return float(cover[r0:r1, c0:c1].mean())


def _place_cars(rng, lay: _Layout, frame: _Frame, gsd: float, shape, valid: np.ndarray,
                building: np.ndarray, boxes: list[Box]) -> list[Car]:
    """Turn planned car slots into cars; drop any that leave the valid area or overlap."""
    from shapely import STRtree
    from shapely.geometry import Polygon

    rows, cols = shape
    kept: list[Car] = []
    polys: list = [Polygon(_box_corners(b, gsd)) for b in boxes if b.kind != "patch"]
    n_obstacles = len(polys)
    for u, v, hdg, tight in lay.cars:
        kind = _pick(rng, CAR_KINDS)
        colour = _pick(rng, CAR_COLOURS)
        L = rng.uniform(*kind[2])
        W = rng.uniform(*kind[3])
        if tight and abs(math.sin(hdg)) > 0.5:
            W = min(W, 2.05)
        x, y = frame.to_px(u, v)
        rgb = np.clip(np.array(colour[2], float) * rng.normal(1, 0.06), 8, 250)
        car = Car(x, y, float(L), float(W), frame.theta + hdg, colour[0], kind[0],
                  tuple(float(c) for c in rgb))
        xy = car.corners(gsd)
        margin = 2
        if (xy[:, 0].min() < margin or xy[:, 1].min() < margin or xy[:, 0].max() > cols - margin
                or xy[:, 1].max() > rows - margin):
            continue
        pb = _patch(x, y, math.hypot(L, W) / 2 / gsd + 1, shape)
        r0, r1, c0, c1 = pb
        if not valid[r0:r1, c0:c1].all() or building[r0:r1, c0:c1].any():
            continue
        poly = Polygon(xy)
        polys.append(poly)
        kept.append(car)
    # Greedy removal of overlaps, obstacles first so cars never stand inside containers.
    tree = STRtree(polys)
    alive = np.ones(len(polys), bool)
    for i, poly in enumerate(polys):
        if not alive[i]:
            continue
        for j in tree.query(poly):
            if j > i and alive[j] and polys[j].intersection(poly).area > 1e-6:
                alive[j] = False
    return [car for k, car in enumerate(kept) if alive[n_obstacles + k]]


def _box_corners(box: Box, gsd: float) -> np.ndarray:
    return Car(box.cx, box.cy, box.length_m, box.width_m, box.heading).corners(gsd)


# ====================================================================================
# Files
# ====================================================================================

def _profile(width: int, height: int, transform: Affine, crs: CRS) -> dict:
    """GeoTIFF profile of an orthophoto delivery: RGB uint8, tiled, deflate, nodata 0."""
    block = 256 if min(width, height) >= 256 else 16 * max(1, min(width, height) // 16)
    return dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                transform=transform, nodata=0, tiled=True, blockxsize=block, blockysize=block,
                compress="deflate", predictor=2, interleave="pixel", photometric="RGB")


def _write_scene(path: Path, scene: SceneRender) -> None:
    _, rows, cols = scene.image.shape
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **_profile(cols, rows, scene.transform, scene.crs)) as dst:
            dst.write(scene.image)
            dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                               rasterio.enums.ColorInterp.blue]


def _car_frame(scene: SceneRender, name: str):
    import geopandas as gpd

    rows = [{"scene": name, "car_id": i + 1, "colour": c.colour, "kind": c.kind,
             "length_m": round(c.length_m, 3), "width_m": round(c.width_m, 3),
             # Compass azimuth of the car's front (rows grow southwards in the pixel frame).
             "heading_deg": round(math.degrees(math.atan2(math.cos(c.heading),
                                                          -math.sin(c.heading))) % 360, 2),
             "under_tree": round(c.under_tree, 3)} for i, c in enumerate(scene.cars)]
    columns = ["scene", "car_id", "colour", "kind", "length_m", "width_m", "heading_deg",
               "under_tree"]
    return gpd.GeoDataFrame(rows, columns=columns, geometry=scene.footprints(), crs=scene.crs)


@contextlib.contextmanager
def _fixed_ogr_date() -> Iterator[None]:
    """Make GDAL stamp GeoPackages with a fixed date, so the same sample gives the same bytes."""
    old = os.environ.get("OGR_CURRENT_DATE")
    os.environ["OGR_CURRENT_DATE"] = FIXED_OGR_DATE
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OGR_CURRENT_DATE", None)
        else:
            os.environ["OGR_CURRENT_DATE"] = old


def _write_geojson(gdf, path: Path) -> None:
    # GeoJSON stores the layer name, which would otherwise be the random temporary file name.
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GeoJSON", engine="pyogrio", layer=path.stem)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scene_specs(cfg: SampleConfig) -> list[tuple[str, str, int, int, bool]]:
    """(relative path, scene name, width, height, collar) of every scene the sample holds.

    The second scene of each set has an awkward size (not a multiple of any chip size); the
    third training scene and the first incoming scene have a nodata collar.
    """
    odd_w = max(64, cfg.width * 5 // 6) | 1
    odd_h = max(64, cfg.height * 837 // 1000) | 1
    specs = []
    for i in range(cfg.train_scenes):
        w, h = (odd_w, odd_h) if i == 1 else (cfg.width, cfg.height)
        specs.append((f"raw/images/train_{i + 1:02d}.tif", f"train_{i + 1:02d}", w, h,
                      i == 2 or (cfg.train_scenes < 3 and i == cfg.train_scenes - 1)))
    for i in range(cfg.incoming_scenes):
        w, h = (odd_w, odd_h) if i == 1 else (cfg.width, cfg.height)
        specs.append((f"incoming/scene_{i + 1:02d}.tif", f"scene_{i + 1:02d}", w, h, i == 0))
    return specs


def _render_job(job: tuple) -> SceneRender:
    seed, w, h, gsd, transform, epsg, collar, style = job
    return render_scene(np.random.default_rng(seed), w, h, gsd=gsd, transform=transform,
                        crs=CRS.from_epsg(epsg), collar=collar, style=style)


def generate(cfg: SampleConfig, *, workers: int | None = None) -> dict[str, SceneRender]:
    """Render every scene of the sample in memory (no files), keyed by scene name.

    Args:
        cfg: sample settings.
        workers: processes to render in; None = up to 2 for a full-size sample, else 1.
            Each scene has its own seed, so the result does not depend on this.
    """
    specs = scene_specs(cfg)
    seeds = np.random.SeedSequence([cfg.seed, GENERATOR_VERSION]).spawn(len(specs))
    jobs = []
    for k, ((_rel, _name, w, h, collar), seed) in enumerate(zip(specs, seeds, strict=True)):
        # Scenes sit side by side 1 km apart, near 48 N in the configured UTM zone.
        transform = Affine(cfg.gsd, 0, 400000.0 + 1000.0 * k, 0, -cfg.gsd, 5320000.0)
        jobs.append((seed, w, h, cfg.gsd, transform, cfg.epsg, collar, cfg.style))
    if workers is None:
        pixels = sum(w * h for _, _, w, h, _ in specs)
        workers = min(2, os.cpu_count() or 1, len(specs)) if pixels > 2_000_000 else 1
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (TensorFlow, Dask) that fork would copy.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            renders = list(ex.map(_render_job, jobs))
    else:
        renders = [_render_job(job) for job in jobs]
    return {name: r for (_rel, name, *_), r in zip(specs, renders, strict=True)}


def make_sample(data_dir: Path, *, cfg: SampleConfig, force: bool = False) -> Path:
    """Write the sample scenes, labels and truth into ``data_dir``; return the manifest path.

    Every file is first written into a staging folder; only when no existing file would be
    changed (or ``force`` is set) are they moved into place, one atomic rename each.

    Raises:
        InputError: a file of the sample already exists with other content and force is off.
    """
    import pandas as pd

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    scenes = generate(cfg)
    specs = scene_specs(cfg)
    # Staged in the swept scratch folder: a killed run leaves nothing behind for long.
    with temp_dir(data_dir) as stage:
        files: list[str] = []
        for rel, name, *_ in specs:
            _write_scene(stage / rel, scenes[name])
            files.append(rel)
        train = [n for r, n, *_ in specs if r.startswith("raw/")]
        incoming = [n for r, n, *_ in specs if r.startswith("incoming/")]
        # Training labels in degrees, split across a GeoJSON and a GeoPackage ("one or many
        # files"): every consumer must reproject and merge.
        frames = [_car_frame(scenes[n], n).to_crs(4326) for n in train]
        split = max(1, (len(frames) + 1) // 2)
        with _fixed_ogr_date():
            _write_geojson(pd.concat(frames[:split], ignore_index=True),
                           stage / "raw/labels/cars.geojson")
            files.append("raw/labels/cars.geojson")
            if frames[split:]:
                write_vector(pd.concat(frames[split:], ignore_index=True),
                             stage / "raw/labels/cars_more.gpkg", layer="cars")
                files.append("raw/labels/cars_more.gpkg")
            truth = pd.concat([_car_frame(scenes[n], n) for n in incoming], ignore_index=True)
            write_vector(truth, stage / "truth/cars.gpkg", layer="cars")
            files.append("truth/cars.gpkg")
        manifest = {
            "generator": "pipeline.sample", "version": GENERATOR_VERSION,
            "settings": cfg.model_dump(mode="json"),
            "files": {rel: {"sha256": _sha256(stage / rel), "bytes": (stage / rel).stat().st_size}
                      for rel in files},
            "scenes": {n: {"cars": len(scenes[n].cars), "width": int(scenes[n].image.shape[2]),
                           "height": int(scenes[n].image.shape[1]),
                           "sun_azimuth_deg": round(scenes[n].sun_azimuth_deg, 2),
                           "nodata_fraction": round(float(1 - scenes[n].valid.mean()), 4)}
                       for n in scenes},
        }
        write_json(stage / "sample-manifest.json", manifest)
        files.append("sample-manifest.json")
        if not force:
            for rel in files:
                target = data_dir / rel
                if target.exists() and _sha256(target) != _sha256(stage / rel):
                    raise InputError(f"{target}: exists and differs from the sample that would "
                                     "be written; use --force to overwrite it")
        # Manifest last: its presence means the whole sample is in place.
        for rel in files:
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, data_dir / rel)
    log.info("sample: %d scenes, %d cars, in %s", len(scenes),
             sum(len(s.cars) for s in scenes.values()), data_dir)
    return data_dir / "sample-manifest.json"


def plot_scene_with_labels(scene_tif: Path, labels, png: Path, *,
                           window: Window | tuple[int, int, int, int] | None = None) -> Path:
    """Draw a scene (or a window of it) with car footprints outlined, as a PNG.

    Args:
        scene_tif: the GeoTIFF scene.
        labels: a GeoDataFrame, a vector file path, or a list of vector file paths; any CRS.
        png: the picture to write (atomically).
        window: ``rasterio.windows.Window`` or ``(col_off, row_off, width, height)``; None = all.

    Returns:
        ``png``.
    """
    import geopandas as gpd
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from shapely.geometry import box as shp_box

    scene_tif, png = Path(scene_tif), Path(png)
    if isinstance(labels, gpd.GeoDataFrame):
        gdf = labels
    else:
        paths = [labels] if isinstance(labels, (str, Path)) else list(labels)
        gdf = pd.concat([read_vector(p) for p in paths], ignore_index=True)
    with rasterio.open(scene_tif) as src:
        if window is None:
            window = Window(0, 0, src.width, src.height)
        elif not isinstance(window, Window):
            window = Window(*window)
        data = src.read([1, 2, 3] if src.count >= 3 else [1], window=window, boundless=True,
                        fill_value=0)
        t = src.transform
        crs = src.crs
    # Map coordinates of the window's edges (north-up scenes).
    left, top = t.c + window.col_off * t.a, t.f + window.row_off * t.e
    right, bottom = left + window.width * t.a, top + window.height * t.e
    if gdf.crs is not None and crs is not None and gdf.crs != crs:
        gdf = gdf.to_crs(crs)
    if len(gdf):
        gdf = gdf.iloc[gdf.sindex.query(shp_box(left, bottom, right, top))]
    rgb = np.moveaxis(data, 0, -1)
    if rgb.shape[-1] == 1:
        rgb = rgb[..., 0]
    fig = Figure(figsize=(8, 8 * window.height / max(window.width, 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(rgb, extent=(left, right, bottom, top), interpolation="nearest",
              cmap=None if rgb.ndim == 3 else "gray")
    if len(gdf):
        gdf.boundary.plot(ax=ax, color="#ffd400", linewidth=0.9)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_axis_off()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png
