"""Counts: cars per zone with an honest interval, or a density grid (cars per hectare)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS

from pipeline.calibration import count_interval
from pipeline.errors import InputError
from pipeline.files import (
    atomic_path,
    temp_dir,
)
from pipeline.geo import areal_part, metres_per_unit
from pipeline.io import read_vector, write_vector
from pipeline.stages.batch.mosaics import _by_crs
from pipeline.stages.batch.sources import DENSITY_NODATA, MIN_COVERAGE, SceneInfo
from pipeline.styles import (
    density_qml,
    quiet_style_table,
    write_qml,
    zones_qml,
)

log = logging.getLogger(__name__)

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
