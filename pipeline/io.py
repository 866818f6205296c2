"""Vector layers: reading any vector file (one clear line when it cannot be used), writing one
atomically (styled for QGIS), and listing a folder's vector files.

The other shared rooms that once lived here are ``errors``, ``files`` (atomic writes,
temporaries, locks, JSON), ``scenes`` and ``layout`` (``check_outputs_apart``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import InputNotFound, VectorInputError, first_line
from pipeline.files import atomic_path

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


# === Vector sources: ``file.gpkg:layer`` ===
# QGIS keeps layer styles in a table of the GeoPackage itself; it is never the data.
STYLE_LAYER = "layer_styles"
# The layer each role takes from a file with several layers when none is named (INTERFACE.md);
# the pipeline's own files (role None) have one data layer.
ROLE_LAYERS = {"labels": ("cars",), "zones": ("zones",), "truth": ("truth", "cars")}


def split_layer(spec: Path | str) -> tuple[Path, str | None]:
    """``(file, layer)`` of a vector source ``file`` or ``file:layer``; the one parser of it.

    Split on the last ``:`` only when the whole is no existing file, the part before it is
    one, and the part after is a name, not a path: ``C:\\data\\cars.gpkg``, ``a:b.gpkg`` (a
    file so named) and ``./x:/y`` stay whole.
    """
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if (sep and head and tail and not Path(text).exists() and Path(head).is_file()
            and not any(c in tail for c in "/\\")):
        return Path(head), tail
    return Path(text), None


def vector_file(spec: Path | str | None) -> Path | None:
    """The file part of a vector source (for existence checks and the output guard)."""
    return None if spec is None else split_layer(spec)[0]


def vector_layers(path: Path) -> list[str]:
    """The data layers of a vector file (QGIS's style table is never one); [] if unknown."""
    if path.suffix.lower() == ".parquet":
        return []
    import pyogrio

    with gdal_safe_name(path) as safe:
        try:
            names = [str(name) for name, _ in pyogrio.list_layers(safe)]
        except Exception:  # noqa: BLE001 - unreadable: read_vector says why, in one line
            return []
    return [n for n in names if n != STYLE_LAYER]


def choose_layer(spec: Path | str, role: str | None = None) -> tuple[Path, str | None]:
    """The file and layer to read for ``role`` ('labels', 'zones', 'truth', or None).

    A named layer must exist; a file with one layer gives it; with several, the layer named
    for the role, else :class:`VectorInputError` naming the file and its layers: never the
    first layer silently (an AOI written before the cars would burn as one car).
    """
    path, layer = split_layer(spec)
    if not path.exists():
        raise InputNotFound(f"{spec}: file not found")
    layers = vector_layers(path)
    if layer is not None:
        if layers and layer not in layers:
            raise VectorInputError(f"{path}: no layer {layer!r} (layers: {', '.join(layers)})")
        return path, layer
    if len(layers) <= 1:
        return path, layers[0] if layers else None
    for wanted in ROLE_LAYERS.get(role or "", ()):
        if wanted in layers:
            return path, wanted
    hint = f" (or a layer named {' or '.join(ROLE_LAYERS[role])})" if role in ROLE_LAYERS else ""
    raise VectorInputError(f"{path}: {len(layers)} layers ({', '.join(layers)}); name one as "
                           f"{path}:LAYER{hint}")


def read_vector(path: Path | str, *, role: str | None = None):
    """Read any vector file GeoPandas can (GeoPackage, GeoJSON, Shapefile, GeoParquet).

    Args:
        path: a file, or ``file:layer`` (:func:`split_layer`).
        role: what the file is for ('labels', 'zones', 'truth'): which layer of a file with
            several is taken when none is named (:func:`choose_layer`).

    Raises:
        InputError: unreadable, several layers and none chosen, or no CRS.
    """
    import geopandas as gpd

    spec = path
    path, layer = choose_layer(spec, role)
    try:
        if path.suffix == ".parquet":
            gdf = gpd.read_parquet(path)
        else:
            with gdal_safe_name(path) as safe:
                gdf = gpd.read_file(safe, engine="pyogrio", layer=layer)
    except Exception as exc:  # pyogrio/arrow raise many types; the user needs the file and why
        raise VectorInputError(f"{spec}: not a readable vector file ({first_line(exc)})") from None
    if gdf.crs is None and len(gdf):
        raise VectorInputError(
            f"{spec}: vector file has no CRS; set one (e.g. with ogr2ogr -a_srs)")
    if len(gdf) and gdf.crs.is_geographic:
        minx, miny, maxx, maxy = gdf.total_bounds
        if minx < -181 or maxx > 361 or miny < -91 or maxy > 91:
            # GeoJSON without a "crs" member is WGS 84 by definition, so a file in metres that
            # lost its CRS reads as degrees far off the globe and would burn nothing.
            raise VectorInputError(
                f"{spec}: coordinates reach ({maxx:.0f}, {maxy:.0f}), which are not degrees, "
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


def list_vectors(folder: Path | str) -> list[Path]:
    """Vector files in a folder, sorted so results do not depend on directory order; a file
    or ``file:layer`` (:func:`split_layer`) given instead of a folder is the one source."""
    if vector_file(folder).is_file():
        return [Path(folder)]
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VECTOR_SUFFIXES
                  and not p.name.startswith(".")) if folder.is_dir() else []
