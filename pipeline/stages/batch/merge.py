"""Overlapping scenes merged: every car once, the better view decides (see the package)."""

from __future__ import annotations

import logging

import numpy as np
import shapely

from pipeline.cars import edge_distances
from pipeline.stages.batch.sources import CONTAINED

log = logging.getLogger(__name__)

# === Merging overlapping scenes ===

def merge_cars(cars, *, match_iou: float, footprints: dict | None = None):
    """Keep each car once.

    Args:
        cars: every scene's cars in one CRS, with ``scene`` and ``edge_dist_m``.
        match_iou: copies of one car overlap by this IoU (or one lies half inside the other).
        footprints: each scene's valid-data footprint in the same CRS. With them, a car that
            lies inside another scene's footprint, farther from that scene's edge than from its
            own, and that the other scene did not see at all, is dropped: the scene with the
            better view of the place found no car there (a phantom at one scene's edge, or a
            blob the other scene saw whole and dropped as too large).

    Returns:
        (kept cars with ``copies`` and ``seen_in``, ``dropped_by``: for every input car the
        index of the kept copy that replaced it or -1, ``overruled``: for every input car the
        scene whose better view dropped it, or None).
    """
    n = len(cars)
    dropped_by = np.full(n, -1)
    overruled = np.full(n, None, dtype=object)
    if n == 0:
        return cars.assign(copies=[], seen_in=[]), dropped_by, overruled
    geoms = cars.geometry.values
    scenes = cars["scene"].to_numpy()
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = (left < right) & (scenes[left] != scenes[right])
    left, right = left[pair], right[pair]
    inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    area_l, area_r = shapely.area(geoms[left]), shapely.area(geoms[right])
    iou = inter / np.maximum(area_l + area_r - inter, 1e-12)
    contained = inter / np.maximum(np.minimum(area_l, area_r), 1e-12)
    same = (iou >= match_iou) | (contained >= CONTAINED)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(left[same], right[same], strict=True):
        neighbours[a].append(int(b))
        neighbours[b].append(int(a))
    edge = cars["edge_dist_m"].fillna(0.0).to_numpy()
    if footprints:
        names = sorted(footprints)
        shapes = np.array([footprints[k] for k in names], dtype=object)
        car_idx, fp_idx = shapely.STRtree(shapes).query(geoms, predicate="within")
        for f in np.unique(fp_idx):
            other = names[f]
            idx = car_idx[(fp_idx == f) & (scenes[car_idx] != other)]
            idx = np.array([i for i in idx if not any(scenes[j] == other
                                                      for j in neighbours[i])], dtype=int)
            if not len(idx):
                continue
            better = edge_distances(geoms[idx], shapes[f]) > edge[idx] + 1e-6
            for i in idx[better]:
                overruled[i] = overruled[i] or other
    # Farthest from its own scene's edge first; ties by scene then row, so reruns agree.
    order = sorted(range(n), key=lambda i: (-edge[i], scenes[i], i))
    kept = np.zeros(n, bool)
    for i in order:
        if dropped_by[i] >= 0 or overruled[i] is not None:
            continue
        kept[i] = True
        for j in neighbours[i]:
            if not kept[j] and dropped_by[j] < 0:
                dropped_by[j] = i
    copies = np.ones(n, int)
    seen = {i: [scenes[i]] for i in range(n) if kept[i]}
    for j in np.flatnonzero(dropped_by >= 0):
        copies[dropped_by[j]] += 1
        seen[dropped_by[j]].append(scenes[j])
    out = cars.assign(copies=copies,
                      seen_in=[",".join(sorted(set(seen.get(i, [scenes[i]])))) for i in range(n)])
    return out[kept].reset_index(drop=True), dropped_by, overruled


def seam_table(cars, dropped_by: np.ndarray, overruled: np.ndarray, footprints: dict
               ) -> list[dict]:
    """Per pair of overlapping scenes: overlap area, cars seen in it, cars merged, cars one
    scene dropped because the other saw the place better and found no car."""
    scenes = sorted(footprints)
    names = cars["scene"].to_numpy()
    kept = (dropped_by < 0) & np.array([o is None for o in overruled], bool)
    points = shapely.point_on_surface(cars.geometry.values) if len(cars) else np.array([])
    rows = []
    for i, a in enumerate(scenes):
        for b in scenes[i + 1:]:
            overlap = shapely.intersection(footprints[a], footprints[b])
            if overlap.is_empty or overlap.area <= 0:
                continue
            shapely.prepare(overlap)
            inside = shapely.contains(overlap, points) if len(cars) else np.zeros(0, bool)
            in_a, in_b = inside & (names == a), inside & (names == b)
            merged = sum(1 for j in np.flatnonzero(dropped_by >= 0)
                         if {names[j], names[dropped_by[j]]} == {a, b})
            unseen = sum(1 for j in range(len(names))
                         if overruled[j] is not None and {names[j], overruled[j]} == {a, b})
            rows.append({"scene_a": a, "scene_b": b, "overlap_ha": round(overlap.area / 1e4, 4),
                         "cars_a": int(in_a.sum()), "cars_b": int(in_b.sum()),
                         "merged": merged, "overruled": unseen,
                         "kept_from_a": int((in_a & kept).sum()),
                         "kept_from_b": int((in_b & kept).sum())})
    return rows
