"""Grids, windows and georeferenced arrays shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

# === What the uint8 output rasters mean (one home; every stage imports these) ===
NODATA = 255  # mask and probability rasters: no data (outside the scene's valid pixels)
PROB_SCALE = 254  # a probability p is stored as round(p * 254), so 255 stays free for nodata


def prob_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] to the stored uint8 scale 0..254."""
    return np.rint(np.clip(prob, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)


def uint8_to_prob(stored: np.ndarray) -> np.ndarray:
    """Stored uint8 values 0..254 back to probabilities (255, nodata, is not mapped)."""
    return stored.astype(np.float32) / PROB_SCALE


def metres_per_unit(crs: CRS) -> float:
    """Metres in one linear unit of a projected CRS (1 for metres, ~0.3048 for US feet).

    Every setting in metres (car sizes, GSD, gap-weight sigma, split blocks) is converted with
    this before it meets coordinates, so a State Plane scene in feet works like one in metres.
    """
    if crs is None:
        return 1.0
    if not isinstance(crs, CRS):
        crs = CRS.from_user_input(crs)  # a pyproj CRS, as GeoPandas carries
    if not crs.is_projected:
        return 1.0
    return float(crs.linear_units_factor[1])


@dataclass(frozen=True)
class GeoArray:
    """An array with the grid it sits on: ``data`` is (bands, rows, cols) or (rows, cols)."""

    data: np.ndarray
    transform: Affine
    crs: CRS

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the grid."""
        return tuple(self.data.shape[-2:])  # type: ignore[return-value]

    @property
    def gsd(self) -> float:
        """Pixel size in metres."""
        return pixel_size(self.transform) * metres_per_unit(self.crs)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        rows, cols = self.shape
        left, top = self.transform * (0, 0)
        right, bottom = self.transform * (cols, rows)
        return min(left, right), min(bottom, top), max(left, right), max(bottom, top)


def pixel_size(transform: Affine) -> float:
    """Mean absolute pixel size of a north-up (or rotated) transform, in CRS units."""
    return float(math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)))


def axis_offsets(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets along one axis so windows of ``size`` cover ``[0, length)``.

    The stride is ``size - overlap``; the last window is shifted back to end exactly at the edge
    rather than running past it, so no pixel is lost and no window is mostly padding. An axis
    shorter than one window gets a single window at 0 (read boundless, padded with nodata).
    """
    if size <= overlap:
        raise ValueError(f"window size {size} must exceed overlap {overlap}")
    if length <= size:
        return [0]
    stride = size - overlap
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] + size < length:
        offsets.append(length - size)
    return offsets


def grid_windows(width: int, height: int, size: int, overlap: int) -> list[Window]:
    """Windows of ``size`` x ``size`` over a ``width`` x ``height`` grid, row-major order.

    Every pixel lies in at least one window; windows may run past the grid only when the grid is
    smaller than one window.
    """
    return [Window(col, row, size, size)
            for row in axis_offsets(height, size, overlap)
            for col in axis_offsets(width, size, overlap)]


def gsd_m(transform: Affine, crs: CRS) -> float:
    """Ground sample distance in metres of a grid in any projected CRS."""
    return pixel_size(transform) * metres_per_unit(crs)


def window_footprint(window: Window, transform: Affine):
    """The exact polygon a window covers on the ground (all four corners: rotation-safe)."""
    from shapely.geometry import Polygon

    c0, r0 = window.col_off, window.row_off
    c1, r1 = c0 + window.width, r0 + window.height
    return Polygon([transform @ (c0, r0), transform @ (c1, r0), transform @ (c1, r1),
                    transform @ (c0, r1)])


def utm_crs_for(lon: float, lat: float) -> CRS:
    """The WGS 84 UTM zone CRS that contains a longitude/latitude."""
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def valid_mask(data: np.ndarray, nodata: float | None, dataset_mask: np.ndarray | None = None
               ) -> np.ndarray:
    """Boolean (rows, cols) mask of valid pixels of a (bands, rows, cols) block.

    A pixel is nodata when every band equals the nodata value (the GDAL convention for RGB
    orthophotos), or when the dataset's own mask says so.
    """
    valid = np.ones(data.shape[-2:], dtype=bool)
    if nodata is not None:
        if np.isnan(nodata):
            valid &= ~np.all(np.isnan(data), axis=0)
        else:
            valid &= ~np.all(data == nodata, axis=0)
    if dataset_mask is not None:
        valid &= dataset_mask > 0
    return valid
