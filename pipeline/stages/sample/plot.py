"""A picture of a scene with its car labels outlined (for the report and for people)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from pipeline.files import atomic_path
from pipeline.io import read_vector


def plot_scene_with_labels(scene_tif: Path, labels, png: Path, *,
                           window: Window | tuple[int, int, int, int] | None = None) -> Path:
    """Draw a scene (or a window of it) with car footprints outlined, as a PNG.

    Args:
        scene_tif: the GeoTIFF scene.
        labels: a GeoDataFrame, a vector file path, or a list of vector file paths; any CRS.
        png: the picture to write (atomically).
        window: ``rasterio.windows.Window`` or ``(col_off, row_off, width, height)``; None = all.

    Returns:
        ``png``.
    """
    import geopandas as gpd
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from shapely.geometry import box as shp_box

    scene_tif, png = Path(scene_tif), Path(png)
    if isinstance(labels, gpd.GeoDataFrame):
        gdf = labels
    else:
        paths = [labels] if isinstance(labels, (str, Path)) else list(labels)
        gdf = pd.concat([read_vector(p) for p in paths], ignore_index=True)
    with rasterio.open(scene_tif) as src:
        if window is None:
            window = Window(0, 0, src.width, src.height)
        elif not isinstance(window, Window):
            window = Window(*window)
        data = src.read([1, 2, 3] if src.count >= 3 else [1], window=window, boundless=True,
                        fill_value=0)
        t = src.transform
        crs = src.crs
    # Map coordinates of the window's edges (north-up scenes).
    left, top = t.c + window.col_off * t.a, t.f + window.row_off * t.e
    right, bottom = left + window.width * t.a, top + window.height * t.e
    if gdf.crs is not None and crs is not None and gdf.crs != crs:
        gdf = gdf.to_crs(crs)
    if len(gdf):
        gdf = gdf.iloc[gdf.sindex.query(shp_box(left, bottom, right, top))]
    rgb = np.moveaxis(data, 0, -1)
    if rgb.shape[-1] == 1:
        rgb = rgb[..., 0]
    fig = Figure(figsize=(8, 8 * window.height / max(window.width, 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(rgb, extent=(left, right, bottom, top), interpolation="nearest",
              cmap=None if rgb.ndim == 3 else "gray")
    if len(gdf):
        gdf.boundary.plot(ax=ax, color="#ffd400", linewidth=0.9)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_axis_off()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png
