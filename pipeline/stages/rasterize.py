"""Car labels to chip masks (``make masks``): one uint8 mask per chip on exactly its grid.

Labels come from any number of vector files in any CRS. They are cleaned once
(:func:`load_labels`), then per scene reprojected to the scene's CRS and burned chip by chip
(:func:`rasterize_scene`), finding candidates through the spatial index. Point labels become an
axis-aligned rectangle of ``point_length_m`` (along x) by ``point_width_m`` in the scene CRS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import rasterio
from rasterio import features
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from pipeline.config import LabelConfig
from pipeline.errors import InputError
from pipeline.files import atomic_dir, write_json
from pipeline.geo import AREAL, areal_part, gsd_m, metres_per_unit, window_footprint
from pipeline.io import MASKS_FILE, read_vector

log = logging.getLogger(__name__)

# === Labels ===

def load_labels(paths, *, cfg: LabelConfig):
    """Read, clean and merge car labels from vector files.

    Polygons and MultiPolygons are kept (invalid ones repaired with ``shapely.make_valid``);
    Points (and MultiPoints, exploded) are kept as points and become rectangles per scene;
    lines and empty geometries are dropped. Counts go to the log and to ``gdf.attrs``.

    Args:
        paths: vector files (GeoPackage, GeoJSON, Shapefile, GeoParquet), any CRS.
        cfg: label settings.

    Returns:
        A GeoDataFrame with ``label_id``, ``source``, ``repaired`` and the geometry, in the CRS of
        the files (EPSG:4326 when they differ); ``attrs`` holds ``repaired`` and ``dropped``.

    Raises:
        InputError: a file is unreadable, or no file holds any usable label.
    """
    import geopandas as gpd
    import pandas as pd
    import shapely

    frames, empty, dropped, repaired = [], [], 0, 0
    for path in map(Path, paths):
        gdf = read_vector(path, role="labels")
        n_in = len(gdf)
        geoms = gdf.geometry
        missing = geoms.isna() | geoms.is_empty
        geoms = geoms[~missing]
        # Points as single points; everything else keeps its type.
        geoms = geoms.explode(index_parts=False) if (geoms.geom_type == "MultiPoint").any() \
            else geoms
        kinds = geoms.geom_type
        points = geoms[kinds == "Point"]
        areal = geoms[kinds.isin(AREAL)]
        invalid = ~areal.is_valid
        if invalid.any():
            fixed = shapely.make_valid(areal[invalid].to_numpy())
            areal = areal.copy()
            areal[invalid] = [areal_part(g) for g in fixed]
            repaired += int(invalid.sum())
        areal_ok = areal.notna() & ~areal.is_empty
        kept = pd.concat([areal[areal_ok], points])
        n_dropped = int(missing.sum()) + int((~kinds.isin((*AREAL, "Point"))).sum()) \
            + int((~areal_ok).sum())
        dropped += n_dropped
        if n_dropped:
            log.warning("%s: dropped %d labels that are empty or not polygons/points (lines?)",
                        path, n_dropped)
        if not len(kept):
            empty.append((path, n_in))
            continue
        fixed_idx = set(areal[invalid].index) if invalid.any() else set()
        frame = gpd.GeoDataFrame(
            {"source": [path.name] * len(kept), "repaired": [i in fixed_idx for i in kept.index]},
            geometry=kept.reset_index(drop=True), crs=gdf.crs)
        frames.append(frame)
    if not frames:
        path, n_in = empty[0] if empty else (Path("labels"), 0)
        what = "is empty" if n_in == 0 else f"has no polygon or point labels ({n_in} dropped)"
        raise InputError(f"{path}: labels file {what}")
    for path, n_in in empty:
        log.warning("%s: no usable labels in this file (%d features); other files have labels",
                    path, n_in)
    if repaired:
        log.warning("repaired %d invalid label geometries (make_valid)", repaired)
    crs = frames[0].crs
    if any(f.crs != crs for f in frames):
        crs = "EPSG:4326"
        frames = [f.to_crs(crs) for f in frames]
    labels = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)
    labels["label_id"] = np.arange(len(labels))
    labels.attrs = {"repaired": repaired, "dropped": dropped}
    log.info("%d labels (%d repaired, %d dropped)", len(labels), repaired, dropped)
    return labels


def _scene_labels(labels, bounds, crs, cfg: LabelConfig):
    """Labels near a scene, in the scene's CRS, points turned into car rectangles."""
    import geopandas as gpd
    from shapely.geometry import box

    if labels.crs is None:
        raise InputError("labels: no CRS")
    # Candidates through the label's own spatial index, with the scene box in the label CRS
    # (densified, and padded by a car length so point labels at the edge are not lost).
    unit = metres_per_unit(crs)  # car sizes are metres; the scene CRS may be in feet
    pad = max(cfg.point_length_m, cfg.point_width_m) / unit
    left, bottom, right, top = bounds
    query = transform_bounds(crs, labels.crs, left - pad, bottom - pad, right + pad, top + pad,
                             densify_pts=21)
    hits = labels.sindex.query(box(*query))
    near = labels.iloc[np.sort(hits)].to_crs(crs)
    is_point = (near.geom_type == "Point").to_numpy()
    if is_point.any():
        # Axis-aligned car footprints: the orientation of a point label is unknown.
        half_l, half_w = cfg.point_length_m / 2 / unit, cfg.point_width_m / 2 / unit
        x, y = near.geometry[is_point].x.to_numpy(), near.geometry[is_point].y.to_numpy()
        rects = [box(a - half_l, b - half_w, a + half_l, b + half_w)
                 for a, b in zip(x, y, strict=True)]
        geoms = near.geometry.to_numpy().copy()
        geoms[is_point] = rects
        near = gpd.GeoDataFrame(near.drop(columns="geometry"), geometry=geoms, crs=crs)
    return near.reset_index(drop=True)


# Public: suggest compares a whole scene's prediction with its labels the same way.
scene_labels = _scene_labels


# === Masks ===

def rasterize_scene(scene_chips_gpkg: Path, labels, masks_dir: Path, *, cfg: LabelConfig) -> Path:
    """Burn the labels into a mask (and a gap-weight map) for every chip of one scene.

    Args:
        scene_chips_gpkg: ``chips/<scene>/chips.gpkg`` from ``tile_scene``.
        labels: from :func:`load_labels` (any CRS).
        masks_dir: masks root; ``masks/<scene>/`` is replaced atomically, masks.json last.
        cfg: label settings.

    Returns:
        ``masks_dir/<scene>/masks.json``: ``{"chips": {chip: car_pixels}, "labels": n,
        "repaired": n, "dropped": n, "label_ids": [...], "labels_total": n}``.
    """

    scene_chips_gpkg = Path(scene_chips_gpkg)
    scene = scene_chips_gpkg.parent.name
    chips = read_vector(scene_chips_gpkg)
    out = Path(masks_dir) / scene
    car_pixels: dict[str, int] = {}
    used: set[int] = set()
    near = None
    if len(chips):
        near = _scene_labels(labels, tuple(chips.total_bounds), chips.crs, cfg)
    with atomic_dir(out) as tmp:
        for chip in chips["chip"]:
            path = scene_chips_gpkg.parent / f"{chip}.tif"
            try:
                src = rasterio.open(path)
            except rasterio.errors.RasterioIOError:
                raise InputError(f"{path}: chip missing or unreadable; rerun `make tiles`") from None
            with src:
                transform, shape = src.transform, src.shape
                valid = src.dataset_mask() > 0
                profile = dict(driver="GTiff", width=src.width, height=src.height, count=1,
                               dtype="uint8", crs=src.crs, transform=transform, nodata=255,
                               compress="deflate")
                if src.width % 16 == 0 and src.height % 16 == 0:
                    profile.update(tiled=True, blockxsize=min(src.width, 256),
                                   blockysize=min(src.height, 256))
            sigma_px = cfg.sigma_m / gsd_m(transform, src.crs)
            # Cars farther than this from the chip add less than w0*exp(-8) to any weight.
            margin = int(np.ceil(4 * sigma_px)) + 1 if cfg.weight_map else 0
            # The chip's true footprint (four corners), so rotated grids find every car.
            reach = window_footprint(Window(-margin, -margin, shape[1] + 2 * margin,
                                            shape[0] + 2 * margin), transform)
            hits = near.sindex.query(reach) if len(near) else []
            cars = near.iloc[np.sort(hits)] if len(hits) else near.iloc[:0]
            mask = np.zeros(shape, dtype=np.uint8)
            overlap = None
            if len(cars):
                # How many labels cover each pixel: where boxes overlap, neither car is sure.
                covered = features.rasterize(((g, 1) for g in cars.geometry), out_shape=shape,
                                             transform=transform, fill=0,
                                             all_touched=cfg.all_touched, dtype="uint8",
                                             merge_alg=features.MergeAlg.add)
                mask = (covered > 0).astype(np.uint8)
                if cfg.overlaps != "car":
                    overlap = covered >= 2
                    mask[overlap] = 0
            burned = int(np.count_nonzero(mask & valid))
            if burned:
                used.update(int(i) for i in cars["label_id"])
            mask[~valid] = 255
            car_pixels[chip] = burned
            with rasterio.open(tmp / f"{chip}.tif", "w", **profile) as dst:
                dst.write(mask, 1)
            if cfg.weight_map:
                weight = gap_weights(cars.geometry.to_numpy(), transform, shape, margin,
                                     w0=cfg.w0, sigma_px=sigma_px, all_touched=cfg.all_touched)
                weight[mask == 1] = 1.0
                weight[mask == 255] = 0.0
                if overlap is not None and cfg.overlaps == "ignore":
                    weight[overlap] = 0.0  # claimed by two labels: taught neither way
                wprofile = dict(profile, dtype="float32", nodata=None, predictor=3)
                with rasterio.open(tmp / f"{chip}.weight.tif", "w", **wprofile) as dst:
                    dst.write(weight.astype(np.float32), 1)
        summary = {"chips": car_pixels, "labels": len(used),
                   "repaired": int(labels.attrs.get("repaired", 0)),
                   "dropped": int(labels.attrs.get("dropped", 0)),
                   "label_ids": sorted(used), "labels_total": int(len(labels))}
        write_json(tmp / MASKS_FILE, summary)
    log.info("%s: %d masks, %d labels", scene, len(car_pixels), len(used))
    return out / MASKS_FILE


def gap_weights(cars, transform, shape: tuple[int, int], margin: int, *, w0: float,
                sigma_px: float, all_touched: bool = False) -> np.ndarray:
    """U-Net border weights (Ronneberger et al. 2015, eq. 2, without the class term w_c).

    ``w = 1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` with d1, d2 the distances (pixels) to the
    nearest and second-nearest car. Each car's distance transform is taken on a crop around it
    (``margin`` pixels), which is exact inside the crop; beyond it the term is negligible.
    Cars up to ``margin`` pixels outside the chip count too, on a grid padded by ``margin``.

    Args:
        cars: car polygons in the chip's CRS.
        transform: the chip's transform; shape its (rows, cols).

    Returns:
        float32 weights on the chip grid (1 inside cars and far from them).
    """
    from scipy.ndimage import distance_transform_edt

    rows, cols = shape
    weight = np.ones(shape, dtype=np.float32)
    if len(cars) < 2:
        return weight
    big = (rows + 2 * margin, cols + 2 * margin)
    big_transform = window_transform(Window(-margin, -margin, big[1], big[0]), transform)
    ids = features.rasterize(((g, i + 1) for i, g in enumerate(cars)), out_shape=big,
                             transform=big_transform, fill=0, all_touched=all_touched,
                             dtype="int32")
    d1 = np.full(big, np.inf, dtype=np.float32)
    d2 = np.full(big, np.inf, dtype=np.float32)
    found = features_boxes(ids, len(cars))
    for car, (r0, r1, c0, c1) in enumerate(found, start=1):
        if r0 < 0:
            continue
        r0, c0 = max(r0 - margin, 0), max(c0 - margin, 0)
        r1, c1 = min(r1 + margin, big[0]), min(c1 + margin, big[1])
        crop = ids[r0:r1, c0:c1]
        dist = distance_transform_edt(crop != car).astype(np.float32)
        a, b = d1[r0:r1, c0:c1], d2[r0:r1, c0:c1]
        # Keep the two smallest distances per pixel.
        d2[r0:r1, c0:c1] = np.minimum(b, np.maximum(a, dist))
        d1[r0:r1, c0:c1] = np.minimum(a, dist)
    d1, d2 = d1[margin:margin + rows, margin:margin + cols], d2[margin:margin + rows,
                                                              margin:margin + cols]
    both = np.isfinite(d2)
    weight[both] += w0 * np.exp(-((d1[both] + d2[both]) ** 2) / (2 * sigma_px ** 2))
    return weight


def features_boxes(ids: np.ndarray, n: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) pixel box of each id 1..n in an id raster; -1s when absent."""
    from scipy.ndimage import find_objects

    boxes = find_objects(ids, max_label=n)
    return [(s[0].start, s[0].stop, s[1].start, s[1].stop) if s is not None else (-1, -1, -1, -1)
            for s in boxes]


# === Box labels ===

def label_boxes(labels, crs=None):
    """Each label as its axis-aligned bounding box in ``crs``: car labels as people often draw them.

    Real car labels are often boxes aligned with the image grid, not outlines. This turns an
    outline label layer into such a box layer (attributes kept), so a run on outline labels can
    be repeated as the box-labelled data is labelled (``bench/bench_boxes.py``). The box is
    taken in ``crs`` (the scenes' grid CRS; default the labels' own), since a box in EPSG:4326
    is not a box on a UTM grid.

    Args:
        labels: a GeoDataFrame of car polygons (or points, which stay points).
        crs: the CRS whose axes the boxes follow; the result is in it.

    Returns:
        A GeoDataFrame like ``labels`` with each polygon replaced by its envelope.
    """
    import geopandas as gpd
    import shapely

    if crs is not None:
        if labels.crs is None:
            raise InputError("labels: no CRS, so their boxes on the scene grid are unknown")
        labels = labels.to_crs(crs)
    geoms = labels.geometry.to_numpy()
    areal = np.isin(shapely.get_type_id(geoms), (3, 6))  # Polygon, MultiPolygon
    out = geoms.copy()
    out[areal] = shapely.envelope(geoms[areal])
    return gpd.GeoDataFrame(labels.drop(columns=labels.geometry.name), geometry=out,
                            crs=labels.crs)
