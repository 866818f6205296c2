"""Atomic writes of rasters, vectors and folders, plus input checks that fail with one clear line.

Every output of the pipeline is written to a temporary name beside its target and moved into
place with ``os.replace``: a crash leaves the old file or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".parquet", ".fgb")
# Files between stages (docs/ARCHITECTURE.md): the writer and every reader name them from here.
CHIPS_FILE = "chips.gpkg"  # DATA/interim/chips/<scene>/chips.gpkg, one scene's chips
MASKS_FILE = "masks.json"  # DATA/interim/masks/<scene>/masks.json, car pixels per chip
INDEX_FILE = "index.gpkg"  # DATA/interim/chips/index.gpkg, every chip with its split
STATS_FILE = "stats.json"  # DATA/interim/chips/stats.json, band statistics of train chips
# The car layer's file suffix for each `vectors.format`.
VECTOR_SUFFIX = {"gpkg": ".gpkg", "geojson": ".geojson", "parquet": ".parquet"}


class InputError(Exception):
    """Bad input: the message names the file and what is wrong; the CLI prints it as one line."""


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` only on success.

    The temporary name keeps the target's suffix so GDAL/OGR pick the right driver.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}",
                               dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # writers (GDAL, OGR) want to create the file themselves
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        _remove(tmp_path)
        # Sidecars GDAL may have left beside the temporary file (.aux.xml, shapefile parts).
        for extra in tmp_path.parent.glob(tmp_path.stem + ".*"):
            _remove(extra)


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; swap it in for ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_json(path: Path | str, data: Any) -> Path:
    """Write JSON atomically (sorted keys, so identical data gives identical bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path | str, *, missing: str) -> Any:
    """Read a JSON file the pipeline wrote.

    Raises:
        InputError: the file is absent (``missing`` says what to run) or not valid JSON.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path}: not valid JSON") from None


def write_if_changed(path: Path | str, data: Any) -> bool:
    """Write JSON only when its content differs, so Make sees a new mtime only on real change."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def write_vector(gdf, path: Path | str, *, layer: str | None = None) -> Path:
    """Write a GeoDataFrame atomically; the format follows the suffix (.gpkg, .geojson, .parquet)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            gdf.to_parquet(tmp)
        else:
            driver = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON",
                      ".fgb": "FlatGeobuf", ".shp": "ESRI Shapefile"}[path.suffix]
            # The temporary file's random name would otherwise become the layer name.
            kwargs = {"layer": layer or path.stem} if driver in ("GPKG", "GeoJSON") else {}
            gdf.to_file(tmp, driver=driver, engine="pyogrio", **kwargs)
    return path


def read_vector(path: Path | str):
    """Read any vector file GeoPandas can (GeoPackage, GeoJSON, Shapefile, GeoParquet).

    Raises:
        InputError: unreadable, or no CRS.
    """
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        gdf = gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(
            path, engine="pyogrio")
    except Exception as exc:  # pyogrio/arrow raise many types; the user needs the file and why
        raise InputError(f"{path}: not a readable vector file ({first_line(exc)})") from None
    if gdf.crs is None and len(gdf):
        raise InputError(f"{path}: vector file has no CRS; set one (e.g. with ogr2ogr -a_srs)")
    return gdf


def list_vectors(folder: Path | str) -> list[Path]:
    """Vector files in a folder, sorted so results do not depend on directory order."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VECTOR_SUFFIXES
                  and not p.name.startswith(".")) if folder.is_dir() else []


def list_scenes(folder: Path | str) -> list[Path]:
    """GeoTIFF scenes in a folder (``*.tif``/``*.tiff``), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in (".tif", ".tiff") and not p.name.startswith("."))


def find_cars_file(out_dir: Path | str, scene: str) -> Path | None:
    """The car vector file of ``scene`` in ``out_dir/cars``, whatever its format."""
    for suffix in VECTOR_SUFFIX.values():
        path = Path(out_dir) / "cars" / f"{scene}{suffix}"
        if path.exists():
            return path
    return None


def open_scene(path: Path | str, *, allow_geographic: bool = False):
    """Open a GeoTIFF scene for reading and check that it is georeferenced.

    Raises:
        InputError: not a raster GDAL can read, no CRS, no transform, or a geographic CRS
            when ``allow_geographic`` is false.
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        src = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path}: not a readable GeoTIFF ({first_line(exc)})") from None
    try:
        check_georeferenced(src, path, allow_geographic=allow_geographic)
    except InputError:
        src.close()
        raise
    return src


def check_georeferenced(src, path: Path | str, *, allow_geographic: bool = False) -> None:
    """Raise InputError when a dataset lacks a CRS or transform, or is in degrees."""
    if src.crs is None:
        raise InputError(f"{path}: GeoTIFF has no CRS; assign one (gdal_edit.py -a_srs EPSG:...)")
    if src.transform.is_identity or src.transform.a == 0 or src.transform.e == 0:
        raise InputError(f"{path}: GeoTIFF has no geotransform; it cannot be placed on the map")
    if src.crs.is_geographic and not allow_geographic:
        raise InputError(
            f"{path}: CRS {src.crs.to_string()} is geographic (degrees); reproject it to a "
            "projected CRS in metres (e.g. its UTM zone) first")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
