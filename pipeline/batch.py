"""Batch products: the whole ``IMAGES`` batch as one set of GIS layers (``make batch``).

Reads what predict and vectors wrote for each scene (``OUT/probability``, ``OUT/masks``,
``OUT/cars``) and writes ``OUT/batch/``:

- ``cars.gpkg`` + ``cars.parquet``: every car once, in one CRS, with a stable ``car_id``
  (``<scene>:<row in the scene's car layer>``, unchanged when other scenes come and go);
- ``seams.csv``: per pair of overlapping scenes, how many cars were seen twice and merged;
- ``probability.vrt`` / ``masks.vrt``: mosaics of the per-scene COGs (one pair per CRS);
- ``zones.gpkg`` (with ``zones``) or ``density.tif`` (cars per hectare, COG);
- ``catalog.json``: a STAC Collection, one Item per scene, with provenance;
- ``.qml`` styles beside every raster and a default style inside every GeoPackage;
- ``batch.json`` (written last): what the run read and wrote, so a rerun with nothing changed
  writes nothing.

Merging overlapping scenes: two cars of different scenes are one car when their footprints
overlap by ``batch.match_iou`` or one lies mostly (half its area) inside the other, the
signature of a copy cut by one scene's valid-data edge. Cars are taken greedily from the one
farthest from its own scene's valid-data edge (``edge_dist_m``), each dropping the copies it
matches that are not already taken, so a car cut by one scene's edge but whole in its
neighbour is taken whole, and a blob one scene merged while the other split it is never
counted both ways. A car only one scene found, lying where another scene sees the place with
more context (farther from its edge) and found nothing, is dropped: the better view decides
(a phantom at one scene's edge, or a roof the other scene saw whole and dropped as too large).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS

from pipeline.bundle import METADATA_FILE, MODEL_FILE, read_metadata
from pipeline.calibration import apply_calibration, count_interval
from pipeline.cars import BATCH_COLUMNS, edge_distances, empty_cars, valid_footprint, write_cars
from pipeline.config import Config, DistributedConfig
from pipeline.errors import InputError
from pipeline.files import (
    atomic_path,
    file_sha256,
    read_json,
    read_json_if_any,
    staged_dir,
    temp_dir,
    write_json,
)
from pipeline.geo import NODATA, areal_part, metres_per_unit
from pipeline.io import read_vector, vector_file, write_vector
from pipeline.layout import Layout
from pipeline.scenes import list_scenes, scene_name
from pipeline.styles import (
    density_qml,
    mask_qml,
    probability_qml,
    quiet_style_table,
    write_qml,
    zones_qml,
)

log = logging.getLogger(__name__)

BATCH_DIR = "batch"
MANIFEST = "batch.json"
CATALOG = "catalog.json"
DENSITY_NODATA = -9999.0
# A car lying at least half inside another scene's copy is that copy, cut by an edge.
CONTAINED = 0.5
# Density cells with less valid imagery than this share give no density (nodata): one car in
# a sliver of a cell would read as a spike of hundreds of cars per hectare.
MIN_COVERAGE = 0.25
VERSION_PACKAGES = ["carseg", "numpy", "scipy", "rasterio", "rio-cogeo", "geopandas", "shapely",
                    "pyproj", "pyogrio", "pyarrow", "pystac", "dask", "keras", "tensorflow"]


@dataclass
class SceneInfo:
    """One scene of the batch: its files, grid and valid-data footprint (scene CRS)."""

    scene: str
    image: Path | None
    prob: Path
    mask: Path
    cars: Path
    crs: CRS
    transform: Affine
    width: int
    height: int
    footprint: object


# === Reading the scenes ===

def _scene_info(scene: str, image: Path | None, out_dir: Path, window: int) -> SceneInfo:
    prob = out_dir / "probability" / f"{scene}.tif"
    mask = out_dir / "masks" / f"{scene}.tif"
    cars = Layout(out=Path(out_dir)).find_cars(scene)
    with rasterio.open(mask) as mask_src, rasterio.open(prob) as prob_src:
        if mask_src.crs is None:
            raise InputError(f"{mask}: mask has no CRS")
        # One pass over the mask (window by window): the exact valid-data edge.
        footprint = valid_footprint(mask_src, prob_src, window=window)
        return SceneInfo(scene, image, prob, mask, cars, mask_src.crs, mask_src.transform,
                         mask_src.width, mask_src.height, footprint)


def _map(func: Callable, items: Sequence, cfg: DistributedConfig) -> list:
    """``[func(*item) for item in items]`` on Dask: threads here, or the given scheduler.

    Reading a scene is I/O and GDAL work that releases the GIL, so Dask's threaded scheduler
    runs scenes side by side without starting worker processes (seconds per batch on a small
    machine); with ``distributed.scheduler`` set the same tasks go to that cluster.
    """
    import dask

    tasks = [dask.delayed(func)(*item) for item in items]
    if cfg.scheduler:
        from dask.distributed import Client

        with Client(cfg.scheduler, timeout="20s") as client:
            return list(client.gather(client.compute(tasks)))
    return list(dask.compute(*tasks, scheduler="threads",
                             num_workers=cfg.workers or os.cpu_count() or 1))


def _batch_crs(infos: list[SceneInfo], setting: str | None) -> CRS:
    """The scenes' CRS when they share one, else ``setting``, else the UTM zone of the centre."""
    crss = {info.crs.to_wkt() for info in infos}
    if len(crss) == 1:
        return infos[0].crs
    if setting:
        try:
            crs = CRS.from_user_input(setting)
        except Exception:  # rasterio raises CRSError; the user needs the setting named
            raise InputError(f"batch.crs: {setting!r} is not a CRS") from None
    else:
        import geopandas as gpd

        from pipeline.geo import utm_crs_for

        centres = [gpd.GeoSeries([info.footprint.centroid], crs=info.crs).to_crs(4326).iloc[0]
                   for info in infos if not info.footprint.is_empty]
        lon = float(np.mean([p.x for p in centres]))
        lat = float(np.mean([p.y for p in centres]))
        crs = utm_crs_for(lon, lat)
    if not crs.is_projected:
        raise InputError(f"batch.crs: {crs.to_string()} is not a projected CRS in metres")
    return crs


def _to_crs(geom, src: CRS, dst: CRS):
    import geopandas as gpd

    if src == dst:
        return geom
    return gpd.GeoSeries([geom], crs=src).to_crs(dst).iloc[0]


def _read_cars(info: SceneInfo, crs: CRS):
    """A scene's car layer in the batch CRS with ``car_id`` and edge attributes."""
    with quiet_style_table():
        gdf = read_vector(info.cars)
    if len(gdf) and gdf.crs is not None and gdf.crs != info.crs:
        gdf = gdf.to_crs(info.crs)
    gdf = gdf.reset_index(drop=True)
    gdf["scene"] = info.scene
    gdf["car_id"] = [f"{info.scene}:{i}" for i in range(len(gdf))]
    if "edge_dist_m" not in gdf.columns:
        # A car layer from before edge attributes: measure them here, in the scene's CRS.
        gdf["edge_dist_m"] = edge_distances(gdf.geometry.values, info.footprint)
        gdf["truncated"] = gdf["edge_dist_m"] <= 0.25 * abs(info.transform.a)
    for col in ("mean_prob", "max_prob", "area_m2", "length_m", "width_m", "heading_deg"):
        if col not in gdf.columns:
            gdf[col] = np.nan
    gdf = gdf.set_crs(info.crs, allow_override=True) if gdf.crs is None else gdf
    return gdf.to_crs(crs) if len(gdf) else gdf.set_crs(crs, allow_override=True)


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


# === Mosaics ===

def _crs_tag(crs: CRS) -> str:
    epsg = crs.to_epsg()
    if epsg:
        return f"EPSG_{epsg}"
    return "CRS_" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:8]


def vrt_xml(sources: list[SceneInfo], paths: list[Path], target: Path, crs: CRS) -> str:
    """A GDAL VRT mosaic of single-band uint8 rasters (255 nodata) that share ``crs``.

    Each source is a ComplexSource with NODATA 255, so a scene's nodata collar never hides its
    neighbour's data where they overlap; elsewhere the later scene (in name order) is on top.
    The mosaic's pixel size is the finest of the sources'.
    """
    res_x = min(abs(s.transform.a) for s in sources)
    res_y = min(abs(s.transform.e) for s in sources)
    bounds = [rasterio.transform.array_bounds(s.height, s.width, s.transform) for s in sources]
    west, south = min(b[0] for b in bounds), min(b[1] for b in bounds)
    east, north = max(b[2] for b in bounds), max(b[3] for b in bounds)
    width = max(1, math.ceil((east - west) / res_x - 1e-6))
    height = max(1, math.ceil((north - south) / res_y - 1e-6))
    parts = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>',
             f"  <GeoTransform>{west!r}, {res_x!r}, 0.0, {north!r}, 0.0, {-res_y!r}"
             "</GeoTransform>",
             '  <VRTRasterBand dataType="Byte" band="1">',
             f"    <NoDataValue>{NODATA}</NoDataValue>",
             "    <ColorInterp>Gray</ColorInterp>"]
    for info, path in zip(sources, paths, strict=True):
        t = info.transform
        rel = os.path.relpath(path, target.parent)
        with rasterio.open(path) as src:
            block_y, block_x = src.block_shapes[0]
        x_off = (t.c - west) / res_x
        y_off = (north - t.f) / res_y
        x_size = info.width * abs(t.a) / res_x
        y_size = info.height * abs(t.e) / res_y
        parts += ["    <ComplexSource>",
                  f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                  "      <SourceBand>1</SourceBand>",
                  f'      <SourceProperties RasterXSize="{info.width}" '
                  f'RasterYSize="{info.height}" DataType="Byte" BlockXSize="{block_x}" '
                  f'BlockYSize="{block_y}"/>',
                  f'      <SrcRect xOff="0" yOff="0" xSize="{info.width}" '
                  f'ySize="{info.height}"/>',
                  f'      <DstRect xOff="{x_off!r}" yOff="{y_off!r}" xSize="{x_size!r}" '
                  f'ySize="{y_size!r}"/>',
                  f"      <NODATA>{NODATA}</NODATA>",
                  "    </ComplexSource>"]
    parts += ["  </VRTRasterBand>", "</VRTDataset>"]
    return "\n".join(parts) + "\n"


def _by_crs(infos: list[SceneInfo], main_crs: CRS) -> list[tuple[str, CRS, list[SceneInfo]]]:
    """Scenes grouped by CRS as (file-name suffix, CRS, scenes): no suffix for the batch's CRS
    (or the most common one), ``_EPSG_xxxx`` for the others."""
    groups: dict[str, list[SceneInfo]] = {}
    for info in infos:
        groups.setdefault(info.crs.to_wkt(), []).append(info)
    main_wkt = main_crs.to_wkt()
    if main_wkt not in groups and groups:
        main_wkt = max(groups, key=lambda k: len(groups[k]))
    return [("" if wkt == main_wkt else f"_{_crs_tag(members[0].crs)}", members[0].crs, members)
            for wkt, members in groups.items()]


def warped_vrt_xml(source: Path, target: Path) -> tuple[str, Affine, int, int]:
    """A north-up GDAL warped VRT of a rotated raster: its XML, transform, width and height.

    A mosaic VRT's sources must be north-up; a scene on a rotated grid enters it through this
    (nearest neighbour, so mask values stay 0/1 and probabilities are not blended). The source
    is named relative to ``target``, so the batch folder can be moved with the scenes.
    """
    from xml.etree import ElementTree

    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as gdal_copy
    from rasterio.vrt import WarpedVRT

    with rasterio.open(source) as src, WarpedVRT(src) as vrt, MemoryFile(ext=".vrt") as mem:
        gdal_copy(vrt, mem.name, driver="VRT")
        root = ElementTree.fromstring(mem.read())
        transform, width, height = vrt.transform, vrt.width, vrt.height
    node = root.find(".//SourceDataset")
    node.text = os.path.relpath(source, target.parent)
    node.set("relativeToVRT", "1")
    return ElementTree.tostring(root, encoding="unicode"), transform, width, height


def _north_up(infos: list[SceneInfo], batch_dir: Path) -> tuple[list[SceneInfo], list[Path]]:
    """The scenes as mosaic sources: a rotated scene as north-up warped VRTs in ``warped/``."""
    sources, written = [], []
    for info in infos:
        if not (info.transform.b or info.transform.d):
            sources.append(info)
            continue
        paths = {}
        for kind, path in (("probability", info.prob), ("masks", info.mask)):
            target = batch_dir / "warped" / kind / f"{info.scene}.vrt"
            xml, transform, width, height = warped_vrt_xml(path, target)
            with atomic_path(target) as tmp:
                tmp.write_text(xml, encoding="utf-8")
            paths[kind] = target
            written.append(target)
        sources.append(dataclasses.replace(info, prob=paths["probability"], mask=paths["masks"],
                                           transform=transform, width=width, height=height))
    return sources, written


def write_mosaics(infos: list[SceneInfo], batch_dir: Path, main_crs: CRS) -> list[Path]:
    """``probability.vrt`` and ``masks.vrt`` per CRS (``*_EPSG_xxxx.vrt`` for the others).

    Scenes on a rotated grid enter through north-up warped VRTs in ``warped/<kind>/``.
    """
    north_up, warped = _north_up(infos, batch_dir)
    for old in batch_dir.glob("warped/*/*.vrt"):  # a rotated scene that left the batch
        if old not in warped:
            old.unlink()
    written = []
    for suffix, crs, members in _by_crs(north_up, main_crs):
        for kind, attr, qml in (("probability", "prob", probability_qml()),
                                ("masks", "mask", mask_qml())):
            target = batch_dir / f"{kind}{suffix}.vrt"
            xml = vrt_xml(members, [getattr(m, attr) for m in members], target, crs)
            with atomic_path(target) as tmp:
                tmp.write_text(xml, encoding="utf-8")
            write_qml(target, qml)
            written.append(target)
    for old in batch_dir.glob("*.vrt"):  # a CRS that left the batch
        if old not in written:
            old.unlink()
            old.with_suffix(".qml").unlink(missing_ok=True)
    return written


# === Counts ===

def read_zones(zones_path: Path):
    """The zones' polygons, checked (read before any batch output is replaced)."""
    with quiet_style_table():
        zones = read_vector(zones_path, role="zones")
    if not len(zones):
        raise InputError(f"{zones_path}: no zones in the file")
    polygonal = zones.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.any():
        raise InputError(f"{zones_path}: zones must be polygons, found "
                         f"{', '.join(sorted(set(zones.geometry.geom_type.dropna())))}")
    if (~polygonal).any():
        log.warning("%s: %d non-polygon features ignored", zones_path, int((~polygonal).sum()))
    zones = _repair_zones(zones[polygonal], zones_path).reset_index(drop=True)
    zones.attrs["source"] = str(zones_path)  # named in zone_counts' warnings
    return zones


def _repair_zones(zones, zones_path: Path):
    """Invalid zones repaired as labels are (``make_valid``, areal part kept): a bow-tie drawn
    in QGIS would otherwise stop the batch with a raw GEOS TopologyException."""
    invalid = ~zones.geometry.is_valid
    if not invalid.any():
        return zones
    fixed = [areal_part(g) for g in shapely.make_valid(zones.geometry[invalid].to_numpy())]
    for row, geom in zip(zones.index[invalid], fixed, strict=True):
        if geom is None:
            raise InputError(f"{zones_path}: zone {row + 1} is not a valid polygon and has no "
                             "area once repaired; fix or remove it")
    zones = zones.copy()
    zones.loc[invalid, zones.geometry.name] = fixed
    log.warning("%s: repaired %d invalid zone polygons (make_valid)", zones_path,
                int(invalid.sum()))
    return zones


def zone_counts(zones, cars, footprint, crs: CRS, *, calibration: dict | None, level: float):
    """Per zone: cars, area, valid area covered, cars per ha, expected count and interval."""
    zones = zones.to_crs(crs)
    geoms = zones.geometry.values
    points = shapely.point_on_surface(cars.geometry.values) if len(cars) else np.array([])
    zone_idx, car_idx = (shapely.STRtree(points).query(geoms, predicate="contains")
                         if len(cars) else (np.array([], int), np.array([], int)))
    probs = cars["prob"].to_numpy() if len(cars) else np.array([])
    rows = []
    for z in range(len(zones)):
        mine = car_idx[zone_idx == z]
        # A car is counted in every zone holding its representative point (zones may overlap).
        covered_ha = shapely.intersection(geoms[z], footprint).area / 1e4
        iv = count_interval(probs[mine], level=level, calibration=calibration)
        row = {"cars": len(mine), "area_ha": geoms[z].area / 1e4, "covered_ha": covered_ha,
               "cars_per_ha": len(mine) / covered_ha if covered_ha > 0 else np.nan,
               "expected": iv["expected"], "lo": iv["lo"], "hi": iv["hi"], "level": level}
        if "expected_all" in iv:
            row.update({"expected_all": iv["expected_all"], "lo_all": iv["lo_all"],
                        "hi_all": iv["hi_all"]})
        rows.append(row)
    import pandas as pd

    _warn_missed(zones, rows)
    stats = pd.DataFrame(rows, index=zones.index)
    keep = [c for c in zones.columns if c != zones.geometry.name and c not in stats.columns]
    return zones[keep].join(stats).set_geometry(zones.geometry)


def _warn_missed(zones, rows: list[dict]) -> None:
    """Zones off the imagery count no car for want of any look, not for want of cars."""
    missed = sum(r["covered_ha"] <= 0 for r in rows)
    if not missed:
        return
    source = zones.attrs.get("source", "zones")
    what = ("none of the zones meets" if missed == len(rows)
            else f"{missed} of {len(rows)} zones do not meet")
    log.warning("%s: %s the batch's imagery (their counts are 0 and cars per ha empty); "
                "check the zones' CRS and extent", source, what)


def write_zones(zones, target: Path) -> Path:
    """``zones.gpkg`` with its default QGIS style (fill graduated by cars per hectare)."""
    density = zones["cars_per_ha"].replace([np.inf], np.nan).dropna()
    return write_vector(zones, target, layer="zones", promote_to_multi=True,
                        style=zones_qml(float(density.max()) if len(density) else 1.0))


def density_grid(cars, footprint, crs: CRS, cell_m: float):
    """Cars per hectare of valid imagery on a grid of ``cell_m`` metres; (array, transform)."""
    from rasterio import features

    cell = cell_m / metres_per_unit(crs)  # the grid is in the CRS's unit (feet, say)
    west, south, east, north = footprint.bounds
    west, south = math.floor(west / cell) * cell, math.floor(south / cell) * cell
    east, north = math.ceil(east / cell) * cell, math.ceil(north / cell) * cell
    width, height = max(1, round((east - west) / cell)), max(1, round((north - south) / cell))
    transform = Affine(cell, 0, west, 0, -cell, north)
    counts = np.zeros((height, width), np.float64)
    if len(cars):
        pts = shapely.get_coordinates(shapely.point_on_surface(cars.geometry.values))
        cols = np.clip(((pts[:, 0] - west) // cell).astype(int), 0, width - 1)
        rows = np.clip(((north - pts[:, 1]) // cell).astype(int), 0, height - 1)
        np.add.at(counts, (rows, cols), 1)
    # The share of each cell covered by valid imagery, from a finer raster of the footprint:
    # a cell half outside the batch has half the area to hold cars.
    k = int(max(1, min(10, math.sqrt(16e6 / (width * height)))))
    fine = features.rasterize([(footprint, 1)], out_shape=(height * k, width * k),
                              transform=Affine(cell / k, 0, west, 0, -cell / k, north),
                              fill=0, dtype="uint8")
    coverage = fine.reshape(height, k, width, k).mean(axis=(1, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        density = counts / (coverage * cell_m * cell_m / 1e4)
    density = np.where(coverage >= MIN_COVERAGE, density, DENSITY_NODATA).astype(np.float32)
    return density, transform


# Largest density grid, in cells: a batch spread over places far apart in one CRS would
# otherwise need a grid of their bounding box (hundreds of GB for two continents).
MAX_DENSITY_CELLS = 25_000_000


def write_densities(cars, infos: list[SceneInfo], batch_dir: Path, main_crs: CRS,
                    cell: float) -> list[Path]:
    """``density.tif`` per CRS of the batch (``density_EPSG_xxxx.tif`` for the others), like the
    mosaics: each on a grid in its scenes' own CRS."""
    written = []
    for suffix, crs, members in _by_crs(infos, main_crs):
        footprint = shapely.union_all([m.footprint for m in members])
        unit = metres_per_unit(crs)
        west, south, east, north = footprint.bounds
        cells = ((east - west) * unit / cell) * ((north - south) * unit / cell)
        if cells > MAX_DENSITY_CELLS:
            log.warning("batch: the scenes in %s span %.0f km; no density grid at %g m cells "
                        "(set batch.density_cell_m larger, or give ZONES)", crs.to_string(),
                        max(east - west, north - south) * unit / 1000, cell)
            continue
        names = {m.scene for m in members}
        mine = cars[cars["scene"].isin(names)].to_crs(crs)
        density, transform = density_grid(mine, footprint, crs, cell)
        written.append(write_density(density, transform, crs,
                                     batch_dir / f"density{suffix}.tif"))
    return written


def write_density(density: np.ndarray, transform: Affine, crs: CRS, target: Path) -> Path:
    """Write the density grid as a COG (rio-cogeo, like predict) with its .qml."""
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    profile = dict(driver="GTiff", width=density.shape[1], height=density.shape[0], count=1,
                   dtype="float32", crs=crs, transform=transform, nodata=DENSITY_NODATA)
    with temp_dir(target.parent) as tmp_dir:
        plain = Path(tmp_dir) / "density.tif"
        with rasterio.open(plain, "w", **profile) as dst:
            dst.write(density, 1)
            dst.update_tags(1, units="cars per hectare")
        with atomic_path(target) as tmp:
            cog_translate(plain, tmp, cog_profiles.get("deflate"), overview_resampling="average",
                          in_memory=True, quiet=True)
    valid = density[density != DENSITY_NODATA]
    write_qml(target, density_qml(float(np.percentile(valid, 99)) if valid.size else 1.0))
    return target


# === STAC catalog and provenance ===

def sha256_file(path: Path, cache: dict | None = None) -> str:
    """sha256 of a file; reused from ``cache`` (last run's manifest) when size and mtime agree."""
    path = Path(path)
    stat = path.stat()
    key = str(path.resolve())
    if cache and key in cache and cache[key][:2] == [stat.st_size, stat.st_mtime_ns]:
        return cache[key][2]
    digest = file_sha256(path)
    if cache is not None:
        cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
    return digest


def package_versions() -> dict:
    """Installed versions of the packages that made the outputs (no heavy imports)."""
    from importlib import metadata

    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(out_dir: Path, model_dir: Path, metadata: dict, cfg: Config,
               cache: dict) -> dict:
    """Model sha256 and training data fingerprint, every stage's settings, package versions."""
    settings = {}
    for path in sorted((out_dir / "settings").glob("*.json")):
        try:
            settings[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable settings file; left out of the provenance", path)
    model_settings = model_dir / "settings.json"
    if model_settings.exists():
        settings["train"] = json.loads(model_settings.read_text())
    elif "train_config" in metadata:
        settings["train"] = metadata["train_config"]
    settings["batch"] = cfg.batch.model_dump(mode="json")
    return {
        "model": {"path": str(model_dir), "sha256": sha256_file(model_dir / MODEL_FILE, cache),
                  "metadata_sha256": sha256_file(model_dir / METADATA_FILE, cache),
                  "data_fingerprint": metadata.get("data_fingerprint"),
                  "threshold": metadata.get("threshold"), "gsd": metadata.get("gsd"),
                  "bands": metadata.get("bands"), "val_metrics": metadata.get("val_metrics"),
                  "calibration": metadata.get("calibration"),
                  "versions": metadata.get("versions")},
        "settings": settings,
        "versions": package_versions(),
    }


def _scene_datetime(info: SceneInfo) -> tuple[datetime, str]:
    """The image's TIFFTAG_DATETIME when it has one, else the image (or mask) file time."""
    path = info.image if info.image is not None and info.image.exists() else info.mask
    try:
        with rasterio.open(path) as src:
            tag = src.tags().get("TIFFTAG_DATETIME")
        if tag:
            return datetime.strptime(tag.strip(), "%Y:%m:%d %H:%M:%S").replace(
                tzinfo=timezone.utc), "TIFFTAG_DATETIME"
    except (rasterio.errors.RasterioIOError, ValueError):
        pass
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc), "file_mtime"


def _asset(path: Path, media_type: str, roles: list[str], title: str, cache: dict):
    import pystac
    from pystac.extensions.file import FileExtension

    asset = pystac.Asset(href=str(path.resolve()), media_type=media_type, roles=roles,
                         title=title)
    # file:checksum is a multihash: 0x12 (sha2-256), 0x20 (32 bytes), then the digest.
    FileExtension.ext(asset, add_if_missing=False).apply(
        checksum="1220" + sha256_file(path, cache), size=path.stat().st_size)
    return asset


def write_catalog(infos: list[SceneInfo], batch_dir: Path, *, crs: CRS, kept, per_scene: dict,
                  products: list[Path], prov: dict, cache: dict) -> Path:
    """A STAC Collection (``catalog.json``): one Item per scene plus the batch products."""
    import pystac
    from pystac.extensions.file import FileExtension
    from pystac.extensions.projection import ProjectionExtension

    cog = pystac.MediaType.COG
    items, boxes, times = [], [], []
    for info in infos:
        fp = info.footprint.simplify(abs(info.transform.a)) if not info.footprint.is_empty \
            else shapely.box(*rasterio.transform.array_bounds(info.height, info.width,
                                                              info.transform))
        fp84 = _to_crs(fp, info.crs, CRS.from_epsg(4326))
        when, source = _scene_datetime(info)
        times.append(when)
        boxes.append(list(fp84.bounds))
        item = pystac.Item(
            id=info.scene, geometry=shapely.geometry.mapping(fp84), bbox=list(fp84.bounds),
            datetime=when,
            properties={"carseg:datetime_source": source,
                        "carseg:cars_detected": per_scene[info.scene]["detected"],
                        "carseg:cars_kept": per_scene[info.scene]["kept"],
                        "carseg:model_sha256": prov["model"]["sha256"]})
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        epsg = info.crs.to_epsg()
        proj.apply(epsg=epsg, wkt2=None if epsg else info.crs.to_wkt(),
                   shape=[info.height, info.width], transform=list(info.transform)[:6],
                   bbox=list(rasterio.transform.array_bounds(info.height, info.width,
                                                              info.transform)))
        FileExtension.add_to(item)
        if info.image is not None and info.image.exists():
            item.add_asset("image", _asset(info.image, pystac.MediaType.GEOTIFF, ["data"],
                                           "source image", cache))
        item.add_asset("probability", _asset(info.prob, cog, ["data"],
                                             "car probability (0..254 = 0..1, 255 nodata)", cache))
        item.add_asset("mask", _asset(info.mask, cog, ["data"],
                                      "car mask (1 car, 0 background, 255 nodata)", cache))
        item.add_asset("cars", _asset(info.cars, _vector_media(info.cars), ["data"],
                                      "car polygons of this scene", cache))
        items.append(item)
    bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes)]
    collection = pystac.Collection(
        id="carseg-batch", title="Cars found by carseg",
        description="Cars segmented from the batch's GeoTIFFs: per-scene probability and mask "
                    "COGs, car polygons, and the merged batch products.",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]),
                             pystac.TemporalExtent([[min(times), max(times)]])),
        license="other",
        extra_fields={"carseg:provenance": prov, "carseg:crs": crs.to_string(),
                      "carseg:cars": int(len(kept))})
    FileExtension.add_to(collection)
    for path in products:
        collection.add_asset(path.stem.replace(".", "_") + path.suffix.replace(".", "_"),
                             _asset(path, _product_media(path), ["data"], path.name, cache))
    target = batch_dir / CATALOG
    collection.set_self_href(str(target.resolve()))
    for item in items:
        collection.add_item(item)
        item.set_self_href(str((batch_dir / "items" / f"{item.id}.json").resolve()))
    collection.catalog_type = pystac.CatalogType.SELF_CONTAINED
    collection.make_all_asset_hrefs_relative()
    for asset in collection.assets.values():  # the products lie beside catalog.json
        asset.href = "./" + Path(asset.href).name
    # Items first, the collection last: a reader never finds links to missing items.
    items_dir = batch_dir / "items"
    wanted = set()
    for item in items:
        path = items_dir / f"{item.id}.json"
        wanted.add(path.name)
        write_json(path, item.to_dict(include_self_link=False, transform_hrefs=True))
    for old in items_dir.glob("*.json"):
        if old.name not in wanted:
            old.unlink()  # a scene that left the batch
    write_json(target, collection.to_dict(include_self_link=False, transform_hrefs=True))
    return target


def _vector_media(path: Path) -> str:
    return {".gpkg": "application/geopackage+sqlite3", ".geojson": "application/geo+json",
            ".parquet": "application/vnd.apache.parquet"}.get(path.suffix,
                                                              "application/octet-stream")


def _product_media(path: Path) -> str:
    return {".vrt": "application/xml", ".csv": "text/csv",
            ".tif": "image/tiff; application=geotiff; profile=cloud-optimized"}.get(
        path.suffix, _vector_media(path))


# === The stage ===

def _signature(scenes: list[str], zones: Path | None, cfg: Config) -> dict:
    return {"scenes": scenes, "zones": str(Path(zones).resolve()) if zones else None,
            "settings": cfg.batch.model_dump(mode="json")}


def complete_scenes(images: Path, out_dir: Path) -> list[tuple[str, Path, Path]]:
    """The batch's scenes that predict and vectors finished: (scene, image, car layer)."""
    scenes = list_scenes(images)
    if not scenes:
        raise InputError(f"{images}: no GeoTIFF scenes (*.tif) in the batch")
    done = []
    for image in scenes:
        scene = scene_name(image)
        missing = [p for p in (out_dir / "probability" / f"{scene}.tif",
                               out_dir / "masks" / f"{scene}.tif") if not p.exists()]
        cars = Layout(out=Path(out_dir)).find_cars(scene)
        if missing or cars is None:
            log.warning("%s: no %s; left out of the batch (run `make vectors`)", scene,
                        "prediction" if missing else "car layer")
            continue
        done.append((scene, image, cars))
    if not done:
        raise InputError(f"{out_dir}: no scene of {images} has been predicted and vectorized; "
                         "run `make vectors` first")
    return done


def build_batch(images: Path, out_dir: Path, *, model_dir: Path, cfg: Config,
                zones: Path | None = None) -> Path:
    """Write the batch products into ``out_dir/batch`` as one unit; returns ``catalog.json``.

    Every product is written into a folder staged beside ``batch/`` and swapped in whole at
    the end, so a failure part-way (bad zones, a full disk) leaves the previous set and its
    catalog as they were. Whether the batch is up to date is the stage runner's question.

    Raises:
        InputError: no scene is ready, the model is missing, or the zones are unusable.
    """
    images, out_dir, model_dir = Path(images), Path(out_dir), Path(model_dir)
    batch_dir = out_dir / BATCH_DIR
    metadata = read_metadata(model_dir)
    if not (model_dir / MODEL_FILE).exists():
        raise InputError(f"{model_dir / MODEL_FILE}: model not found; run `make train` first")
    if zones is not None and not vector_file(zones).exists():
        raise InputError(f"{zones}: zones file not found")
    # Bad zones are refused before any output is replaced, so the catalog never lists a file
    # that a failed run removed.
    zone_table = read_zones(Path(zones)) if zones is not None else None
    scenes = [(s, image) for s, image, _ in complete_scenes(images, out_dir)]
    names = [s for s, _ in scenes]
    signature = _signature(names, zones, cfg)
    previous = read_json_if_any(batch_dir / MANIFEST) or {}
    cache = previous.get("checksums", {})
    # The names in batch/ that the last run wrote: replaced; anything else there is the user's.
    owned = {Path(p).parts[0] for p in previous.get("files", previous.get("outputs", []))}
    owned |= {MANIFEST}
    with staged_dir(batch_dir, owned=owned) as staged:
        catalog = _write_products(scenes, staged, out_dir=out_dir, model_dir=model_dir,
                                  cfg=cfg, metadata=metadata, zone_table=zone_table,
                                  signature=signature, cache=cache)
    return batch_dir / catalog.name


def _write_products(scenes, batch_dir: Path, *, out_dir: Path, model_dir: Path, cfg: Config,
                    metadata: dict, zone_table, signature: dict, cache: dict) -> Path:
    """Write every batch product into ``batch_dir`` (the staged folder); returns the catalog."""
    manifest_path = batch_dir / MANIFEST

    # Per-scene reading: one pass over each mask for its valid-data footprint.
    infos = _map(_scene_info, [(s, img, out_dir, cfg.vectors.window) for s, img in scenes],
                 cfg.distributed)
    # A scene without a valid pixel was not looked at: it is no scene with zero cars, so it
    # stays out of every product (cars, mosaics, counts, density, catalog); vectors warned.
    empty = [i.scene for i in infos if i.footprint.is_empty]
    infos = [i for i in infos if not i.footprint.is_empty]
    if not infos:
        raise InputError(f"{out_dir / 'masks'}: no scene has a valid pixel (every pixel is nodata or "
                         "masked); check the scenes' nodata value and mask")
    if empty:
        log.info("batch: left out %d scenes without valid pixels: %s", len(empty),
                 ", ".join(empty))
    names = [i.scene for i in infos]
    crs = _batch_crs(infos, cfg.batch.crs)
    log.info("batch: %d scenes, CRS %s", len(infos), crs.to_string())
    footprints = {i.scene: _to_crs(i.footprint, i.crs, crs) for i in infos}
    coverage = shapely.union_all(list(footprints.values()))

    import geopandas as gpd
    import pandas as pd

    frames = [_read_cars(info, crs) for info in infos]
    frames = [f for f in frames if len(f)]
    cars = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs)
            if frames else None)
    if cars is None:

        cars = empty_cars(crs).assign(car_id=pd.Series(dtype="str"))
    calibration = metadata.get("calibration")
    if calibration is None:
        log.warning("%s: the model has no calibration; car probabilities are the raw mean_prob "
                    "and zone intervals assume they are calibrated", model_dir / METADATA_FILE)
    cars["prob"] = apply_calibration(cars["mean_prob"].to_numpy(dtype=float), calibration)
    merged, dropped_by, overruled = merge_cars(cars, match_iou=cfg.batch.match_iou,
                                               footprints=footprints)
    merged = merged[[*BATCH_COLUMNS, "geometry"]]
    per_scene = {s: {"detected": int((cars["scene"] == s).sum()),
                     "kept": int((merged["scene"] == s).sum())} for s in names}
    n_overruled = int(sum(o is not None for o in overruled))
    log.info("batch: %d cars from %d detections (%d copies merged, %d dropped where another "
             "scene saw the place better and found no car)", len(merged), len(cars),
             int((dropped_by >= 0).sum()), n_overruled)

    batch_dir.mkdir(parents=True, exist_ok=True)
    products = [write_cars(merged, batch_dir / "cars.gpkg"),
                write_vector(merged, batch_dir / "cars.parquet")]
    seams = seam_table(cars, dropped_by, overruled, footprints)
    target = batch_dir / "seams.csv"
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["scene_a", "scene_b", "overlap_ha", "cars_a",
                                                "cars_b", "merged", "overruled",
                                                "kept_from_a", "kept_from_b"])
        writer.writeheader()
        writer.writerows(seams)
    products.append(target)
    products += write_mosaics(infos, batch_dir, crs)
    if zone_table is not None:
        table = zone_counts(zone_table, merged, coverage, crs, calibration=calibration,
                            level=cfg.batch.interval)
        counts = [write_zones(table, batch_dir / "zones.gpkg")]
    else:
        counts = write_densities(merged, infos, batch_dir, crs, cfg.batch.density_cell_m)
    products += counts
    for info in infos:  # QGIS styles beside every per-scene COG
        write_qml(info.prob, probability_qml())
        write_qml(info.mask, mask_qml())
    prov = provenance(out_dir, model_dir, metadata, cfg, cache)
    catalog = write_catalog(infos, batch_dir, crs=crs, kept=merged, per_scene=per_scene,
                            products=products, prov=prov, cache=cache)
    # The warped VRTs too: the mosaics read through them, so one gone is a batch to redo.
    outputs = [p.relative_to(batch_dir).as_posix()
               for p in [*products, catalog, *sorted(batch_dir.glob("warped/*/*.vrt"))]]
    # Checksums of files that no longer exist are dropped, so the cache does not grow forever.
    cache = {k: v for k, v in cache.items() if Path(k).exists()}
    # Every file of the set (styles and STAC items too): what the next run replaces, and all
    # that clean removes; anything else in batch/ is the user's.
    files = sorted([p.relative_to(batch_dir).as_posix() for p in batch_dir.rglob("*")
                    if p.is_file()] + [MANIFEST])
    write_json(manifest_path, {"signature": signature, "outputs": outputs, "files": files,
                               "checksums": cache,
                               "crs": crs.to_string(), "cars": int(len(merged)),
                               "detections": int(len(cars)),
                               "merged": int((dropped_by >= 0).sum()),
                               "overruled": n_overruled,
                               "calibrated": calibration is not None,
                               "per_scene": per_scene, "empty": empty})
    return catalog


def read_manifest(out_dir: Path) -> dict | None:
    """The last batch run's summary (``OUT/batch/batch.json``), or None."""
    path = Path(out_dir) / BATCH_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        return read_json(path, missing="no batch products")
    except InputError:
        return None

