"""Scenes: the one scene list (any file name a GIS folder holds), their names, and opening a
scene with the checks every stage needs (georeferenced, projected, readable)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import InputError, InputNotFound, RasterInputError, first_line

# === Scenes ===
SCENE_SUFFIXES = (".tif", ".tiff")


def scene_name(path: Path | str) -> str:
    """A scene's name: its file name less the .tif/.tiff suffix (dots inside are kept).

    Every output of a scene is named from this: ``probability/<scene>.tif``, ``cars/<scene>.gpkg``.
    """
    return Path(path).stem


def is_scene_file(path: Path) -> bool:
    """A GeoTIFF by its name; a link to a missing file counts too, so it fails as a scene
    (named, in the summary) instead of being skipped without a word."""
    return path.suffix.lower() in SCENE_SUFFIXES and (path.is_file() or path.is_symlink())


# Names the pipeline keeps for itself beside the scenes' outputs (temporaries, locks, stamps).
RESERVED_PREFIX = ".carseg"


def list_scenes(folder: Path | str) -> list[Path]:
    """GeoTIFF scenes in a folder (``.tif``/``.tiff`` in any case, any file name), sorted.

    This is the one scene list: the Makefile asks the CLI for it (``python -m pipeline scenes``).

    Raises:
        InputError: two files would give the same scene name (``a.tif`` and ``a.TIFF``), so
            their outputs would overwrite each other.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    scenes = sorted(p for p in folder.iterdir() if is_scene_file(p))
    seen: dict[str, Path] = {}
    for path in scenes:
        if path.name.startswith(RESERVED_PREFIX):
            raise InputError(f"{path}: names starting with {RESERVED_PREFIX!r} are reserved for "
                             "the pipeline's own files; rename the scene")
        # Case-folded: on a case-insensitive disk `A.tif` and `a.tif` outputs are one file.
        key = scene_name(path).casefold()
        if key in seen:
            raise InputError(f"{seen[key]} and {path.name}: two scenes with the same name "
                             f"{scene_name(path)!r} would write the same outputs; rename one")
        seen[key] = path
    return scenes


# Summary status of a scene whose raster holds no valid pixel (all nodata, or masked out): it is
# neither a failure nor a scene with zero cars (nothing was looked at), so counts leave it out.
EMPTY_STATUS = "empty"
EMPTY_REASON = "no valid pixels (every pixel is nodata or masked)"


def has_valid_pixels(path: Path | str) -> bool:
    """Whether a raster holds at least one valid pixel (by its nodata value or mask band).

    Reads block by block and stops at the first valid one, so a normal scene costs one block;
    only a scene that really is empty is read to the end.
    """
    import rasterio

    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            if src.dataset_mask(window=window).any():
                return True
    return False


def open_scene(path: Path | str, *, allow_geographic: bool = False):
    """Open a GeoTIFF scene for reading and check that it is georeferenced.

    Raises:
        InputError: not a raster GDAL can read, no CRS, no transform, or a geographic CRS
            when ``allow_geographic`` is false.
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise InputNotFound(f"{path}: a link to a missing file ({os.readlink(path)})")
    if not path.exists():
        raise InputNotFound(f"{path}: file not found")
    try:
        src = rasterio.open(path)
    except RasterioIOError as exc:
        raise RasterInputError(f"{path}: not a readable GeoTIFF ({first_line(exc)})") from None
    try:
        check_georeferenced(src, path, allow_geographic=allow_geographic)
    except InputError:
        src.close()
        raise
    return src


def check_georeferenced(src, path: Path | str, *, allow_geographic: bool = False) -> None:
    """Raise InputError when a dataset lacks a CRS or transform, or is in degrees."""
    if src.crs is None:
        raise RasterInputError(f"{path}: GeoTIFF has no CRS; assign one (gdal_edit.py -a_srs EPSG:...)")
    # A rotated grid (a = e = 0 at 90 degrees) is fine; only a missing or degenerate one is not.
    if src.transform.is_identity or src.transform.determinant == 0:
        raise RasterInputError(f"{path}: GeoTIFF has no geotransform; it cannot be placed on the map")
    if src.crs.is_geographic and not allow_geographic:
        raise RasterInputError(
            f"{path}: CRS {src.crs.to_string()} is geographic (degrees); reproject it to a "
            "projected CRS in metres (e.g. its UTM zone) first")
