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


EDGE_RULES = ("fit", "past", "clip")


@dataclass(frozen=True)
class AxisLayout:
    """Windows along one axis: the one home of every stage's window layout.

    Attributes:
        size: the side of every window (``past`` may have shrunk it, see ``axis_windows``).
        starts: window starts in axis pixels (``past`` may start before 0 by ``phase``).
        length: the axis length the windows cover.
        edge: the edge rule the layout was made with (``fit``, ``past`` or ``clip``).
    """

    size: int
    starts: tuple[int, ...]
    length: int
    edge: str

    def spans(self) -> list[tuple[int, int]]:
        """(start, stop) of each window; ``clip`` windows stop at the axis end."""
        if self.edge == "clip":
            return [(s, min(s + self.size, self.length)) for s in self.starts]
        return [(s, s + self.size) for s in self.starts]


def axis_windows(length: int, size: int, overlap: int = 0, *, edge: str = "fit",
                 phase: int = 0, multiple: int = 1) -> AxisLayout:
    """Windows of ``size`` px, ``overlap`` px shared by neighbours, covering ``[0, length)``.

    The stride is ``size - overlap`` and every pixel of the axis lies in at least one window.
    What happens at the far edge is the explicit ``edge`` rule:

    - ``fit`` (chips): windows start at 0 on the stride and the last one is shifted back to end
      exactly at the edge, so no window runs past the axis and none is mostly padding; only an
      axis shorter than one window gets one window at 0 that runs past (padded by the caller).
    - ``past`` (inference): every window sits on a lattice of ``multiple`` px that starts
      ``phase`` px before the axis (starts are ``-phase + i * stride``, so a model's pooling
      grid falls on the same map pixels whatever the scene's origin). The fewest windows of at
      most ``size`` are taken, then shrunk to the smallest multiple of ``multiple`` that still
      covers, so the last window may run past the edge but never by a whole ``multiple``
      beyond what the count needs. ``size`` and ``overlap`` must be multiples of ``multiple``.
    - ``clip`` (blocks): windows start at 0 on the stride and the last is cut at the edge (its
      span is shorter); nothing runs past.

    Raises:
        ValueError: ``size`` not larger than ``overlap``, an unknown rule, or a negative phase.
    """
    if edge not in EDGE_RULES:
        raise ValueError(f"edge rule {edge!r} is not one of {EDGE_RULES}")
    if size <= overlap or overlap < 0:
        raise ValueError(f"window size {size} must exceed overlap {overlap} (>= 0)")
    if phase < 0:
        raise ValueError(f"phase {phase} must not be negative")
    length = max(int(length), 0)
    if edge == "fit":
        if length <= size:
            return AxisLayout(size, (0,), length, edge)
        stride = size - overlap
        starts = list(range(0, length - size + 1, stride))
        if starts[-1] + size < length:
            starts.append(length - size)
        return AxisLayout(size, tuple(starts), length, edge)
    if edge == "clip" and length == 0:
        return AxisLayout(size, (), length, edge)
    total = phase + length if edge == "past" else length
    count = 1 + max(0, math.ceil((total - size) / (size - overlap)))
    if edge == "past":
        size = min(size, _round_up((total + (count - 1) * overlap) / count, multiple))
    stride = size - overlap
    origin = -phase if edge == "past" else 0
    return AxisLayout(size, tuple(origin + i * stride for i in range(count)), length, edge)


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def grid_windows(width: int, height: int, size: int, overlap: int = 0, *,
                 edge: str = "fit") -> list[Window]:
    """Windows over a ``width`` x ``height`` grid, row-major, laid out by ``axis_windows``.

    ``fit`` windows are all ``size`` x ``size`` (running past only an axis shorter than one);
    ``clip`` windows are cut at the grid's right and bottom edges.
    """
    rows = axis_windows(height, size, overlap, edge=edge).spans()
    cols = axis_windows(width, size, overlap, edge=edge).spans()
    return [Window(c0, r0, c1 - c0, r1 - r0) for r0, r1 in rows for c0, c1 in cols]


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


AREAL = ("Polygon", "MultiPolygon")


def areal_part(geom):
    """The areal part of a repaired geometry (``make_valid`` may return a GeometryCollection,
    or a line for a polygon with no area); None when nothing areal is left."""
    from shapely.geometry import MultiPolygon

    if geom is None:
        return None
    if geom.geom_type in AREAL:
        return None if geom.is_empty else geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in AREAL]
    polys = [p for g in parts for p in (g.geoms if g.geom_type == "MultiPolygon" else [g])]
    return MultiPolygon(polys) if polys else None
