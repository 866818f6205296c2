"""The car layer: its columns, how it is written, and where a car meets its scene's edge.

One home for what ``vectorize`` (one scene's cars) and ``batch`` (the merged layer of a whole
batch) both write and measure, so the two layers keep one schema and one notion of "edge".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from affine import Affine

from pipeline.geo import NODATA, grid_windows
from pipeline.io import write_vector

# Columns of every scene's car layer (OUT/cars/<scene>.gpkg) ...
COLUMNS = ["scene", "area_m2", "length_m", "width_m", "heading_deg", "mean_prob", "max_prob",
           "edge_dist_m", "truncated"]
# ... and of the batch's merged layer: the same, plus an id, the calibrated probability, and
# which scenes saw the car.
BATCH_COLUMNS = ["car_id", *COLUMNS[:-2], "prob", *COLUMNS[-2:], "copies", "seen_in"]


def empty_cars(crs):
    """An empty car layer with the full schema and ``crs``."""
    import geopandas as gpd
    import pandas as pd

    frame = pd.DataFrame({"scene": pd.Series(dtype="str"),
                          **{c: pd.Series(dtype="float64") for c in COLUMNS[1:-1]},
                          "truncated": pd.Series(dtype="bool")})
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def write_cars(gdf, target: Path) -> Path:
    """Write a car layer atomically; a GeoPackage gets QGIS's default style inside it."""
    from pipeline.styles import cars_qml

    target = Path(target)
    if target.suffix == ".parquet":
        return write_vector(gdf, target)
    # Declared, so an empty layer opens in GIS as a polygon layer, not one of unknown type.
    return write_vector(gdf, target, layer="cars" if target.suffix == ".gpkg" else None,
                        style=cars_qml(), geometry_type="Polygon")


def valid_footprint(mask_src, prob_src=None, *, window: int = 2048):
    """The scene's valid data as one (Multi)Polygon in its CRS, read window by window.

    Valid means inside the raster and not nodata (255) in the mask nor the probability
    raster. Each window's valid pixels are polygonized on whole pixels and the pieces joined,
    so the footprint is exact and memory stays bounded on any scene size.
    """
    parts = []
    for win in grid_windows(mask_src.width, mask_src.height, window, 0, edge="clip"):
        valid = mask_src.read(1, window=win) != NODATA
        if prob_src is not None:
            valid &= prob_src.read(1, window=win) != NODATA
        if not valid.any():
            continue
        # Whole scene pixels (exact in floating point), so neighbouring windows' pieces share
        # their edges exactly and the union leaves no seams; mapped to the CRS once at the end.
        if valid.all():  # the common case: one rectangle, no polygonizing
            parts.append(shapely.box(win.col_off, win.row_off, win.col_off + win.width,
                                     win.row_off + win.height))
            continue
        parts += [shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(
            valid.astype(np.uint8), mask=valid, connectivity=4,
            transform=Affine.translation(win.col_off, win.row_off))]
    if not parts:
        return shapely.Polygon()
    t = mask_src.transform
    matrix = np.array([[t.a, t.d], [t.b, t.e]])
    offset = np.array([t.c, t.f])
    return shapely.transform(shapely.union_all(parts), lambda xy: xy @ matrix + offset)


def edge_distances(geoms, footprint) -> np.ndarray:
    """Distance (CRS units) from each geometry to the nearest edge of ``footprint``.

    The footprint's boundary is cut into segments held in an R-tree, so this stays fast for
    thousands of cars against a ragged nodata edge with many vertices.
    """
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return np.zeros(0)
    if footprint.is_empty:
        return np.zeros(len(geoms))
    segments = []
    for ring in shapely.get_parts(shapely.boundary(footprint)):
        xy = shapely.get_coordinates(ring)
        segments.append(shapely.linestrings(np.stack([xy[:-1], xy[1:]], axis=1)))
    tree = shapely.STRtree(np.concatenate(segments))
    (idx, _), dist = tree.query_nearest(geoms, return_distance=True, all_matches=False)
    out = np.zeros(len(geoms))
    out[idx] = dist
    return out
