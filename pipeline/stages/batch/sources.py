"""What the batch reads of each scene: its rasters, its car layer and its CRS."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipeline.cars import edge_distances, valid_footprint
from pipeline.config import DistributedConfig
from pipeline.errors import InputError
from pipeline.io import read_vector
from pipeline.layout import Layout
from pipeline.styles import (
    quiet_style_table,
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
