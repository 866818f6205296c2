"""Vector layers: reading any vector file (one clear line when it cannot be used), writing one
atomically (styled for QGIS), and listing a folder's vector files.

The other shared rooms that once lived here are ``errors``, ``files`` (atomic writes,
temporaries, locks, JSON), ``scenes`` and ``layout`` (``check_outputs_apart``); their names are
re-exported here for the modules not yet moved over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import (  # noqa: F401  (re-exported while modules move over)
    EXIT_PARTIAL,
    InputError,
    InputNotFound,
    OutputConflict,
    RasterInputError,
    SettingsError,
    VectorInputError,
    first_line,
)
from pipeline.files import (  # noqa: F401  (re-exported while modules move over)
    _HOST,
    LOCK_FILE,
    STAGE_PREFIX,
    TEMP_DIR,
    _json_text,
    _lock_holder,
    _pid_alive,
    _remove,
    _swap_in,
    atomic_dir,
    atomic_path,
    folder_lock,
    json_differs,
    progress_bar,
    read_json,
    read_json_if_any,
    stage_log,
    staged_dir,
    sweep_temporaries,
    temp_dir,
    write_if_changed,
    write_json,
)
from pipeline.scenes import (  # noqa: F401  (re-exported while modules move over)
    EMPTY_REASON,
    EMPTY_STATUS,
    RESERVED_PREFIX,
    SCENE_SUFFIXES,
    check_georeferenced,
    has_valid_pixels,
    is_scene_file,
    list_scenes,
    open_scene,
    scene_name,
)

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".parquet", ".fgb")
# Files between stages (docs/ARCHITECTURE.md): the writer and every reader name them from here.
CHIPS_FILE = "chips.gpkg"  # DATA/interim/chips/<scene>/chips.gpkg, one scene's chips
MASKS_FILE = "masks.json"  # DATA/interim/masks/<scene>/masks.json, car pixels per chip
INDEX_FILE = "index.gpkg"  # DATA/interim/chips/index.gpkg, every chip with its split
STATS_FILE = "stats.json"  # DATA/interim/chips/stats.json, band statistics of train chips
# The car layer's file suffix for each `vectors.format`.
VECTOR_SUFFIX = {"gpkg": ".gpkg", "geojson": ".geojson", "parquet": ".parquet"}



def write_vector(gdf, path: Path | str, *, layer: str | None = None, style: str | None = None,
                 **kwargs) -> Path:
    """Write a GeoDataFrame atomically; the format follows the suffix (.gpkg, .geojson, .parquet).

    Args:
        layer: the layer name (GeoPackage, GeoJSON); default the file's stem.
        style: QGIS QML stored as the layer's default style (GeoPackage only).
        kwargs: passed to ``GeoDataFrame.to_file`` (e.g. ``geometry_type``).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            gdf.to_parquet(tmp)
        else:
            driver = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON",
                      ".fgb": "FlatGeobuf", ".shp": "ESRI Shapefile"}[path.suffix]
            # The temporary file's neutral name would otherwise become the layer name.
            if driver in ("GPKG", "GeoJSON"):
                kwargs["layer"] = layer or path.stem
            with ogr_writable(tmp) as safe:
                gdf.to_file(safe, driver=driver, engine="pyogrio", **kwargs)
            if style is not None and driver == "GPKG":
                from pipeline.styles import add_layer_style

                add_layer_style(tmp, kwargs["layer"], style)
    return path


def read_vector(path: Path | str):
    """Read any vector file GeoPandas can (GeoPackage, GeoJSON, Shapefile, GeoParquet).

    Raises:
        InputError: unreadable, or no CRS.
    """
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            gdf = gpd.read_parquet(path)
        else:
            with gdal_safe_name(path) as safe:
                gdf = gpd.read_file(safe, engine="pyogrio", layer=_data_layer(safe))
    except Exception as exc:  # pyogrio/arrow raise many types; the user needs the file and why
        raise VectorInputError(f"{path}: not a readable vector file ({first_line(exc)})") from None
    if gdf.crs is None and len(gdf):
        raise VectorInputError(
            f"{path}: vector file has no CRS; set one (e.g. with ogr2ogr -a_srs)")
    if len(gdf) and gdf.crs.is_geographic:
        minx, miny, maxx, maxy = gdf.total_bounds
        if minx < -181 or maxx > 361 or miny < -91 or maxy > 91:
            # GeoJSON without a "crs" member is WGS 84 by definition, so a file in metres that
            # lost its CRS reads as degrees far off the globe and would burn nothing.
            raise VectorInputError(
                f"{path}: coordinates reach ({maxx:.0f}, {maxy:.0f}), which are not degrees, "
                f"but the file says its CRS is {gdf.crs.to_string()}; the file has lost its real "
                "CRS (GeoJSON without one is read as WGS 84): set it with ogr2ogr -a_srs EPSG:...")
    return gdf


# OGR reads these characters of a file name as syntax ("!" for archives, ";" for options).
_OGR_SYNTAX = set(";!")


@contextlib.contextmanager
def ogr_writable(target: Path) -> Iterator[Path]:
    """A path OGR can write for ``target`` (a temporary, see :func:`atomic_path`).

    Where OGR would misread the folder's name, the file is written in the system's temporary
    folder and moved to ``target`` afterwards.
    """
    import tempfile

    if not _OGR_SYNTAX & set(str(target)):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="carseg-") as tmp:
        safe = Path(tmp) / f"data{target.suffix}"
        yield safe
        shutil.move(safe, target)


@contextlib.contextmanager
def gdal_safe_name(path: Path) -> Iterator[Path]:
    """``path``, or a link to it under a plain name when OGR would misread its name.

    The link (and links to a shapefile's sidecar files) lives in the system's temporary
    folder, never beside the user's file.
    """
    import glob
    import tempfile

    if not _OGR_SYNTAX & set(str(path)):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="carseg-") as tmp:
        for part in path.parent.glob(f"{glob.escape(path.stem)}.*"):
            os.symlink(part.resolve(), Path(tmp) / f"data{part.suffix}")
        yield Path(tmp) / f"data{path.suffix}"


# QGIS keeps layer styles in a table of the GeoPackage itself; it is never the data.
STYLE_LAYER = "layer_styles"


def _data_layer(path: Path) -> str | None:
    """The data layer of a vector file: its first layer that is not QGIS's style table."""
    if path.suffix.lower() != ".gpkg":
        return None
    import pyogrio

    layers = [name for name, _ in pyogrio.list_layers(path) if name != STYLE_LAYER]
    return layers[0] if layers else None


def list_vectors(folder: Path | str) -> list[Path]:
    """Vector files in a folder, sorted so results do not depend on directory order."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VECTOR_SUFFIXES
                  and not p.name.startswith(".")) if folder.is_dir() else []
