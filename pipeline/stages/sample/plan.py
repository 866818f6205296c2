"""Scene layout in a local street frame (metres; u along streets, v across them).

A scene is a stack of bands across v (road, sidewalk, parking lot, buildings, grass); each band's
planner says what stands in it: car slots, non-car objects (long vehicles among them), trees,
buildings, oil stains. ``_place_cars`` then turns car slots into cars in pixel coordinates, keeping
cars cut by the scene's edge and dropping those a tree would mostly hide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.stages.sample.objects import CAR_COLOURS, CAR_KINDS, Box, Car
from pipeline.stages.sample.shapes import _patch, _pick


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


def _plan(rng: np.random.Generator, half: float, *, sparse: bool = False) -> _Layout:
    """Bands across v (road, sidewalk, parking, buildings, grass) and what stands in them.

    A ``sparse`` scene is a residential street: roads, sidewalks, houses and lawns, no car park,
    so cars are a few percent of the pixels (as in most frames of a real city flight).
    """
    # Car parks dominate (cars are the subject) but leave room for roofs, lawns and streets,
    # so a model also sees plenty of ground without cars.
    nxt = {"road": ["sidewalk"], "sidewalk": ["lot", "building", "grass"],
           "lot": ["grass", "road", "building", "lot"], "building": ["grass", "sidewalk", "lot"],
           "grass": ["lot", "road", "building"]}
    if sparse:
        nxt = {"road": ["sidewalk"], "sidewalk": ["building", "grass", "building"],
               "building": ["grass", "sidewalk"], "grass": ["road", "building", "grass"]}
    v = -half - rng.uniform(0, 10)
    kind = str(rng.choice(["grass", "road"] if sparse else ["lot", "grass", "road"]))
    lay = _Layout(bands=[])
    # Guarantee a parking band (a street in a sparse scene) across the centre, however small.
    centre_kind = "road" if sparse else "lot"
    centre_lot_at = rng.uniform(-6, 2)
    while v < half:
        if kind != centre_kind and v < centre_lot_at < v + 30:
            kind = centre_kind
            centre_lot_at = math.inf
        if kind == "road":
            lanes = int(rng.choice([2, 2, 3]))
            lane_w = rng.uniform(3.0, 3.5)
            # Kerbside parking lanes on either side, cars at the street's heading.
            park = [rng.uniform(2.1, 2.5) if rng.random() < q else 0.0 for q in (0.75, 0.55)]
            width = lanes * lane_w + sum(park)
            p = {"lanes": lanes, "lane_w": lane_w, "lane_v0": park[0], "park": park,
                 "dark": rng.random() < 0.3, "sparse": sparse}
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
         "grass": _plan_grass, "sidewalk": _plan_sidewalk}[kind](rng, lay, v0, v1, p, half)
    return lay


def _car_length(rng: np.random.Generator) -> float:
    return rng.uniform(3.8, 5.2)


def _plan_road(rng, lay: _Layout, v0, v1, p, half) -> None:
    lane_w, lane_v0 = p["lane_w"], v0 + p["lane_v0"]
    for lane in range(p["lanes"]):
        vc = lane_v0 + (lane + 0.5) * lane_w
        direction = 0.0 if lane % 2 == 0 else math.pi
        u = -half - rng.uniform(0, 20)
        while u < half:
            if rng.random() < 0.1:
                # A bus, lorry or long van in traffic: a distractor, not a car.
                kind = str(rng.choice(["bus", "truck", "longvan"]))
                lay.boxes.append((u + 6, vc + rng.normal(0, 0.1), direction + rng.normal(0, 0.01),
                                  kind))
                u += 12 + rng.uniform(2, 20)
                continue
            jam = rng.random() < (0.15 if p["sparse"] else 0.3)
            n = int(rng.integers(2, 6)) if jam else 1
            for _ in range(n):
                L = _car_length(rng)
                lay.cars.append((u + L / 2, vc + rng.normal(0, 0.15),
                                 direction + rng.normal(0, 0.02), jam))
                u += L + (rng.uniform(0.6, 2.5) if jam else 0)
            u += rng.uniform(8, 40) * (2 if p["sparse"] else 1)
    occupancy = rng.uniform(0.35, 0.7) if p["sparse"] else rng.uniform(0.7, 0.9)
    for side, width in enumerate(p["park"]):
        if not width:
            continue
        vc = v0 + width / 2 + 0.1 if side == 0 else v1 - width / 2 - 0.1
        u = -half - rng.uniform(0, 5)
        while u < half:
            roll = rng.random()
            if roll < 0.04:
                L = rng.uniform(6, 8)  # a delivery van or small lorry at the kerb
                lay.boxes.append((u + L / 2, vc, float(rng.choice([0.0, math.pi])),
                                  str(rng.choice(["longvan", "truck"]))))
                u += L + rng.uniform(0.5, 3)
            elif roll < occupancy:
                L = _car_length(rng)
                lay.cars.append((u + L / 2, vc + rng.normal(0, 0.08),
                                 float(rng.choice([0.0, math.pi])) + rng.normal(0, 0.03), True))
                u += L + rng.uniform(0.15, 0.5) if rng.random() < 0.6 else L + rng.uniform(1, 5)
            else:
                u += rng.uniform(2, 8)
    for _ in range(int(rng.poisson(2 * half / 40))):
        # A repaired road patch the size of a car: flat, no shadow, not a car.
        lay.boxes.append((rng.uniform(-half, half), rng.uniform(v0 + 0.5, v1 - 0.5),
                          rng.normal(0, 0.05), "patch"))


def _plan_sidewalk(rng, lay: _Layout, v0, v1, p, half) -> None:
    """Street trees along some sidewalks: their crowns reach over the kerbside cars."""
    if rng.random() < 0.5:
        u = -half - rng.uniform(0, 10)
        while u < half:
            lay.trees.append((u, (v0 + v1) / 2 + rng.normal(0, 0.2), rng.uniform(2.2, 4.0)))
            u += rng.uniform(8, 16)


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
        if rng.random() < 0.3:
            # A long van or lorry nose-in across two or three stalls, sticking out into the aisle.
            lay.boxes.append((rng.uniform(-half, half), (a + b) / 2 + rng.normal(0, 0.3),
                              facing + rng.normal(0, 0.02),
                              str(rng.choice(["longvan", "longvan", "truck"]))))
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



# A car counts as drawn when at least this share of its footprint is on the scene's valid pixels;
# less is too small a sliver to say anything. Labels keep the whole outline either way, as truth
# always has: evaluation ignores cars that are less than half in a scene.
MIN_IN_SCENE = 0.15
# Trees may hide at most this share of a car: a labeller sees (and outlines) the rest of it.
MAX_UNDER_TREE = 0.4


def footprint_mean(car: Car, raster: np.ndarray, gsd: float, outside: float = 0.0) -> float:
    """Mean of a (rows, cols) raster over a car's footprint, from a 9 x 5 grid of samples.

    Samples that fall off the raster count as ``outside``.
    """
    s = (np.arange(9) + 0.5) / 9 - 0.5
    t = (np.arange(5) + 0.5) / 5 - 0.5
    ss, tt = np.meshgrid(s * car.length_m / gsd, t * car.width_m / gsd)
    c, sn = math.cos(car.heading), math.sin(car.heading)
    x = np.floor(car.cx + ss * c - tt * sn).astype(int).ravel()
    y = np.floor(car.cy + ss * sn + tt * c).astype(int).ravel()
    rows, cols = raster.shape
    inside = (x >= 0) & (x < cols) & (y >= 0) & (y < rows)
    vals = np.full(x.shape, float(outside))
    vals[inside] = raster[y[inside], x[inside]]
    return float(vals.mean())


def _place_cars(rng, lay: _Layout, frame: _Frame, gsd: float, shape, valid: np.ndarray,
                building: np.ndarray, boxes: list[Box], tree_cover: np.ndarray,
                max_fraction: float | None = None) -> list[Car]:
    """Turn planned car slots into cars; drop any that overlap, stand on roofs or are hidden.

    Cars may be cut by the scene's edge or its nodata collar (at least ``MIN_IN_SCENE`` of each
    is seen); trees hide at most ``MAX_UNDER_TREE`` of a car. With ``max_fraction``, cars are
    then thinned at random until their footprints cover at most that share of the valid pixels.
    """
    from shapely import STRtree
    from shapely.geometry import Polygon

    kept: list[Car] = []
    polys: list = [Polygon(_box_corners(b, gsd)) for b in boxes if b.kind != "patch"]
    n_obstacles = len(polys)
    valid_f = valid.astype(np.float32)
    for u, v, hdg, tight in lay.cars:
        kind = _pick(rng, CAR_KINDS)
        colour = _pick(rng, CAR_COLOURS)
        L = rng.uniform(*kind[2])
        W = rng.uniform(*kind[3])
        if tight and abs(math.sin(hdg)) > 0.5:
            W = min(W, 2.0)
        x, y = frame.to_px(u, v)
        rgb = np.clip(np.array(colour[2], float) * rng.normal(1, 0.06), 8, 250)
        car = Car(x, y, float(L), float(W), frame.theta + hdg, colour[0], kind[0],
                  tuple(float(c) for c in rgb))
        pb = _patch(x, y, math.hypot(L, W) / 2 / gsd + 1, shape)
        if pb is None:
            continue
        r0, r1, c0, c1 = pb
        if building[r0:r1, c0:c1].any():
            continue
        car.in_scene = footprint_mean(car, valid_f, gsd)
        if car.in_scene < MIN_IN_SCENE:
            continue
        if footprint_mean(car, tree_cover, gsd) > MAX_UNDER_TREE:
            continue
        polys.append(Polygon(car.corners(gsd)))
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
    cars = [car for k, car in enumerate(kept) if alive[n_obstacles + k]]
    if max_fraction is not None and cars:
        # Empty kerbs: drop cars at random until they are the share of pixels asked for.
        px = np.array([c.length_m * c.width_m * c.in_scene / gsd**2 for c in cars])
        budget = max_fraction * max(int(valid.sum()), 1)
        order = rng.permutation(len(cars))
        total = float(px.sum())
        drop = set()
        for k in order:
            if total <= budget:
                break
            drop.add(int(k))
            total -= px[k]
        cars = [c for k, c in enumerate(cars) if k not in drop]
    return cars


def _box_corners(box: Box, gsd: float) -> np.ndarray:
    return Car(box.cx, box.cy, box.length_m, box.width_m, box.heading).corners(gsd)

