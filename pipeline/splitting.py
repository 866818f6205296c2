"""Touching cars split into one piece per car: the shape rules vectorize and validation share.

A blob is split only when it is not car-shaped (low solidity) or larger than one car: by a
watershed on the distance transform or the probability, seeded by the blob's separate cores,
else, for a rectangle of cars, into the strips closest to a typical car. A split is kept only
when every piece is still car-sized, so a car's own mask is not cut into fragments.
Vectorize applies it to a scene's blobs and post-processing calibration (``postprocess``) to the
validation chips', so the rule the threshold is chosen with is the rule the cars are made with.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from scipy import ndimage

from pipeline.config import VectorConfig
from pipeline.geo import PROB_SCALE

# A blob whose area is below this share of its convex hull is not car-shaped: try to split it.
CAR_SOLIDITY = 0.9
# Share of the minimum car half-width that a car's core must reach from the blob's edge.
CORE_DEPTH = 0.8
# ... and rise above the level where it separates by this share of the half-width.
CORE_MARGIN = 0.1
# A probability core must rise this far (0..1) above the level where it separates.
PROB_MARGIN = 0.08
# Strips are cut only when their pieces are this close to a typical car (``_car_likeness``:
# 0.4 is a piece 1.5 times too long or too wide, or 1.2 times both).
MAX_CAR_UNLIKENESS = 0.4
# Only a blob filling this share of its minimum rectangle is cut into strips.
RECT_FILL = 0.85
_EIGHT = np.ones((3, 3), dtype=bool)


# === Geometry attributes ===

def rectangle_attributes(geom) -> tuple[float, float, float]:
    """Length, width (CRS units) and heading of the long axis of ``geom``'s minimum rectangle.

    The heading is in degrees clockwise from grid north, in ``[0, 180)``.
    """
    rect = shapely.minimum_rotated_rectangle(geom)
    coords = np.asarray(rect.exterior.coords) if rect.geom_type == "Polygon" else None
    if coords is None or len(coords) < 4:
        return 0.0, 0.0, 0.0
    edges = np.diff(coords[:3], axis=0)  # two adjacent sides
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    long_side = edges[int(np.argmax(lengths))]
    # x is east, y is north: clockwise-from-north angle is atan2(dx, dy).
    heading = math.degrees(math.atan2(long_side[0], long_side[1])) % 180.0
    if heading >= 180.0 - 1e-9:
        heading = 0.0
    return float(lengths.max()), float(lengths.min()), float(heading)


# === Splitting touching cars ===

def split_component(comp: np.ndarray, *, gsd: float, cfg: VectorConfig,
                    prob: np.ndarray | None = None) -> np.ndarray:
    """Label the cars in one blob (a boolean crop): 1..n, 0 outside; one label when not split.

    Only a blob that is not car-shaped (compity below ``CAR_SOLIDITY``) or larger than one car
    (``cfg.max_car_area_m2``) is split, by the first of these that gives car-sized pieces:

    1. Distance-transform cores: the connected parts of ``{distance to background >= t}``, each
       deep enough to be the middle of a car ``min_car_width_m`` wide; the level ``t`` with the
       most cores wins. The inner parallel set of a convex shape is convex, hence connected, so a
       car-shaped blob is never cut; cars joined by a neck fall apart above the neck.
    2. Probability cores, the same way on the probability raster: the model's probability dips
       in the gap between cars even where the thresholded masks touch.
    3. For a blob larger than one car only: cut its minimum rectangle into ``k`` equal strips
       across one of its axes, with ``k`` (1 included: no cut) and the axis chosen so that the
       pieces are closest to a typical car (``car_length_m`` by ``car_width_m``). Two cars side
       by side are thus two 1.8 m strips, not three 1.5 m ones.

    A piece from 1 or 2 still larger than one car is cut by 3 in turn (a parking row that a
    staggered car joins). Car-sized means at least ``min_car_width_m`` wide and
    ``min_car_length_m`` long: a split that leaves a fragment of one car is not made.
    """
    labels = comp.astype(np.int32)
    if not cfg.split_touching:
        return labels
    # Holes are kept: a small enclosed gap is often all that parts two cars touching at both
    # ends (filling them lost 4 points of object F1 on box-trained masks); a hole in one car
    # is guarded by the car-sized test on the pieces instead.
    area_px = int(comp.sum())
    large = area_px * gsd * gsd > cfg.max_car_area_m2
    if not large and area_px / _hull_area(comp) >= CAR_SOLIDITY:
        return labels  # one car-shaped blob: never split
    half_width_px = cfg.min_car_width_m / 2.0 / gsd
    dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
    surfaces = [(dist, np.arange(1.0, float(dist.max()) + 0.5, 0.5),
                 CORE_DEPTH * half_width_px, CORE_MARGIN * half_width_px)]
    if prob is not None:
        smooth = ndimage.gaussian_filter(prob.astype(np.float32), 1.0)
        smooth[~comp] = 0
        inside = smooth[comp]
        surfaces.append((smooth, np.linspace(inside.min(), inside.max(), 24)[1:],
                         0.0, PROB_MARGIN * PROB_SCALE))
    out = None
    for surface, levels, deep, margin in surfaces:
        out = _split_by_cores(comp, surface, levels, deep, margin, gsd=gsd, cfg=cfg)
        if out is not None:
            out = _strip_large_pieces(out, gsd=gsd, cfg=cfg)
            break
    if out is None and large:
        out = _split_by_strips(comp, gsd=gsd, cfg=cfg)
    if out is None:
        return labels
    return out


def _car_sized(pieces: np.ndarray, values, *, gsd: float, cfg: VectorConfig) -> bool:
    # Each piece must hold a car at least min_car_width wide and min_car_length long.
    min_px = max(cfg.min_area_m2, cfg.min_car_width_m * cfg.min_car_length_m) / gsd**2
    for v in values:
        piece = pieces == v
        if piece.sum() < min_px:
            return False
        width, length = _min_rect_sides(piece)
        if width * gsd < cfg.min_car_width_m or length * gsd < cfg.min_car_length_m:
            return False
    return True


def _split_by_cores(comp, surface, levels, deep: float, margin: float, *, gsd: float,
                    cfg: VectorConfig) -> np.ndarray | None:
    from skimage.segmentation import watershed

    candidates = []
    for level in levels:
        cores, n = ndimage.label(comp & (surface >= level), structure=_EIGHT)
        if n < 2:
            continue
        peak = ndimage.maximum(surface, cores, index=np.arange(1, n + 1))
        # A core must rise clearly above the level: ridge pixels of one car make mere bumps.
        keep = np.flatnonzero((peak >= deep) & (peak >= level + margin)) + 1
        if len(keep) >= 2:
            candidates.append((-len(keep), level, np.where(np.isin(cores, keep), cores, 0)))
    # Most cars first; a split that leaves a sliver falls back to fewer cars, then to none.
    for _, _, markers in sorted(candidates, key=lambda c: c[:2]):
        pieces = watershed(-surface, markers, mask=comp)
        values = [v for v in np.unique(pieces) if v]
        if _car_sized(pieces, values, gsd=gsd, cfg=cfg):
            out = np.zeros(comp.shape, np.int32)
            for k, v in enumerate(values, start=1):
                out[pieces == v] = k
            return out
    return None


def _strip_large_pieces(pieces: np.ndarray, *, gsd: float, cfg: VectorConfig) -> np.ndarray:
    """Cut every piece still larger than one car into car-sized strips (where it is a row)."""
    out = np.zeros(pieces.shape, np.int32)
    n = 0
    for v in range(1, int(pieces.max()) + 1):
        piece = pieces == v
        sub = None
        if piece.sum() * gsd * gsd > cfg.max_car_area_m2:
            sub = _split_by_strips(piece, gsd=gsd, cfg=cfg)
        if sub is None:
            n += 1
            out[piece] = n
        else:
            out[sub > 0] = sub[sub > 0] + n
            n += int(sub.max())
    return out


def _car_likeness(a_m: float, b_m: float, cfg: VectorConfig) -> float:
    """How far a rectangle of sides a by b (metres) is from a typical car: 0 is one exactly."""
    short, long_ = sorted((a_m, b_m))
    return abs(math.log(long_ / cfg.car_length_m)) + abs(math.log(short / cfg.car_width_m))


def _box_likeness(a_m: float, b_m: float, cfg: VectorConfig) -> float:
    """How far a by b (metres) is from the axis-aligned box of a typical car at any heading."""
    short, long_ = sorted((a_m, b_m))
    return min(abs(math.log(long_ / bl)) + abs(math.log(short / bs))
               for bs, bl in _box_sides(cfg.car_length_m, cfg.car_width_m))


def _box_sides(length: float, width: float) -> list[tuple[float, float]]:
    """(short, long) sides of the axis-aligned box of a length x width car, heading 0..90."""
    out = []
    for deg in range(0, 91, 3):
        c, s_ = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        out.append(tuple(sorted((length * c + width * s_, length * s_ + width * c))))
    return out


def _grid_aligned(side: np.ndarray, tol_deg: float = 3.0) -> bool:
    """Whether a rectangle side (row, col vector) runs along the pixel grid."""
    return min(abs(side[0]), abs(side[1])) <= math.sin(math.radians(tol_deg)) * np.hypot(*side)


def _split_by_strips(comp: np.ndarray, *, gsd: float, cfg: VectorConfig) -> np.ndarray | None:
    pts = np.argwhere(comp).astype(float)
    rect = shapely.minimum_rotated_rectangle(shapely.multipoints(pts))
    if rect.geom_type != "Polygon":
        return None
    c = np.asarray(rect.exterior.coords)
    sides = [c[1] - c[0], c[2] - c[1]]
    side_m = [(np.hypot(*s) + 1) * gsd for s in sides]
    if len(pts) < RECT_FILL * (side_m[0] / gsd) * (side_m[1] / gsd):
        return None  # not a rectangle of cars: strips would cut across them
    # k = 1 (no cut) competes too: a van is closer to one car than to two half-vans. A blob
    # whose rectangle follows the grid may be one car's box at any heading (a model taught
    # by box labels draws boxes): a 45-degree car's 4.5 m square box is one car, not two.
    whole = _car_likeness(*side_m, cfg)
    if _grid_aligned(sides[0]):
        whole = min(whole, _box_likeness(*side_m, cfg))
    best = (whole, 1, 0)
    most = int(len(pts) * gsd * gsd / (cfg.min_car_width_m * cfg.min_car_length_m))
    for k in range(2, max(most, 1) + 1):
        for i in (0, 1):
            along, across = side_m[i] / k, side_m[1 - i]
            if (min(along, across) < cfg.min_car_width_m
                    or along * across > cfg.max_car_area_m2):
                continue
            score = _car_likeness(along, across, cfg)
            if score < best[0] - 1e-9:
                best = (score, k, i)
    score, k, i = best
    if k == 1 or score > MAX_CAR_UNLIKENESS:
        return None  # one vehicle, or no cut gives pieces that look like cars (a roof)
    axis = sides[i]
    unit = axis / np.hypot(*axis)
    t = (pts - c[0]) @ unit
    bins = np.clip(((t - t.min()) / (np.ptp(t) + 1e-9) * k).astype(int), 0, k - 1) + 1
    out = np.zeros(comp.shape, np.int32)
    out[pts[:, 0].astype(int), pts[:, 1].astype(int)] = bins
    if not _car_sized(out, range(1, k + 1), gsd=gsd, cfg=cfg):
        return None
    return out


def _hull_area(comp: np.ndarray) -> float:
    """Area in pixels of the convex hull of a blob's pixels."""
    hull = shapely.convex_hull(shapely.multipoints(np.argwhere(comp).astype(float)))
    # Pixel centres understate the hull by half a pixel on each side; buffer to compare fairly.
    return max(hull.buffer(0.5, join_style="mitre").area, 1.0)


def _min_rect_sides(piece: np.ndarray) -> tuple[float, float]:
    """(width, length) in pixels of a piece's minimum rotated rectangle."""
    pts = np.argwhere(piece).astype(float)
    rect = shapely.minimum_rotated_rectangle(shapely.multipoints(pts))
    if rect.geom_type != "Polygon":
        extent = float(np.ptp(pts, axis=0).max()) + 1.0 if len(pts) else 0.0
        return 1.0, extent
    c = np.asarray(rect.exterior.coords)
    a, b = np.hypot(*(c[1] - c[0])) + 1.0, np.hypot(*(c[2] - c[1])) + 1.0
    return float(min(a, b)), float(max(a, b))


# === The scene's valid-data edge ===

# === Window by window ===
