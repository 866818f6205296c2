"""Atomic writes of rasters, vectors and folders, plus input checks that fail with one clear line.

Every output of the pipeline is written to a temporary name beside its target and moved into
place with ``os.replace``: a crash leaves the old file or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Collection, Iterator
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


# === Errors ===
# Bad input is told apart from bugs by type. Like rasterio's errors, each subclasses the built-in
# a caller would otherwise catch (a missing file is also a FileNotFoundError).

class InputError(ValueError):
    """Bad input: the message names the file and what is wrong; the CLI prints it as one line."""


class InputNotFound(InputError, FileNotFoundError):
    """An input file or folder that is not there."""


class RasterInputError(InputError):
    """A raster that cannot be read or used (corrupt, not georeferenced, wrong bands or dtype)."""


class VectorInputError(InputError):
    """A vector file that cannot be read or used (corrupt, no CRS, implausible coordinates)."""


class SettingsError(InputError):
    """A setting that is unknown, invalid, or inconsistent with another."""


class OutputConflict(InputError):
    """An output folder that would write into or over an input."""


# Exit status of a batch stage when some scenes failed and the others are done: the next stage
# still runs on what was done, and make fails at the end (2 = bad input, nothing done).
EXIT_PARTIAL = 3


# === Atomic writes ===
# Temporaries live in a hidden folder beside their target, one subfolder per process, so no
# scene or chip listing ever sees them, and writers that put their own temporaries beside the
# file they write (rio-cogeo's tmpXXXX.tif) stay inside it too. A crashed process's subfolder
# is removed by the next writer into that folder.
TEMP_DIR = ".carseg-tmp"
_HOST = socket.gethostname().replace("-", "_")
_swept: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(folder: Path | str) -> int:
    """Remove the temporaries that crashed processes on this host left in ``folder``."""
    root = Path(folder) / TEMP_DIR
    removed = 0
    if not root.is_dir():
        return 0
    for entry in root.iterdir():
        host, _, rest = entry.name.partition("-")
        pid = rest.partition("-")[0]
        if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
            _remove(entry)
            removed += 1
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty: another process may be writing
    return removed


@contextlib.contextmanager
def temp_dir(parent: Path | str) -> Iterator[Path]:
    """A private scratch folder under ``parent/.carseg-tmp/``, removed on exit (or next run)."""
    parent = Path(parent)
    if parent not in _swept:
        sweep_temporaries(parent)
        _swept.add(parent)
    scratch = parent / TEMP_DIR / f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for _ in range(3):  # a sweeper in another process may remove the empty parent meanwhile
        try:
            scratch.mkdir(parents=True)
            break
        except FileNotFoundError:
            continue
    try:
        yield scratch
    finally:
        _remove(scratch)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path for ``target``; move it onto ``target`` only on success.

    The temporary keeps the target's suffix, so GDAL/OGR pick the right driver, but not its
    name: GDAL reads some characters of a file name (``;``) as options. Writers name layers
    explicitly (:func:`write_vector`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(target.parent) as scratch:
        tmp = scratch / f"part{target.suffix}"
        yield tmp
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, owned: Collection[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder for ``target``; swap it in for ``target`` on success.

    Args:
        owned: the names in ``target`` that this writer owns (None: all of them). Any other
            entry of the old folder (a user's note in OUT/evaluation) is carried over into
            the new one, never deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(target.parent) as scratch:
        tmp = scratch / target.name
        tmp.mkdir()
        yield tmp
        _swap_in(tmp, target, scratch / f"{target.name}.old", owned)  # .old goes with scratch


def _swap_in(new: Path, target: Path, old: Path, owned: Collection[str] | None) -> None:
    """Put folder ``new`` in place of ``target``; the replaced folder goes to ``old``."""
    if target.exists():
        if owned is not None:
            for entry in target.iterdir():
                if entry.name not in owned and not (new / entry.name).exists():
                    os.replace(entry, new / entry.name)
        os.replace(target, old)
    os.replace(new, target)


# A folder staged beside its target (same depth, so relative paths written inside it hold
# after the move): `.carseg-stage-<host>-<pid>-<token>-<name>`, swept like TEMP_DIR.
STAGE_PREFIX = ".carseg-stage-"


@contextlib.contextmanager
def staged_dir(target: Path | str, *, owned: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; swap it in for ``target`` as one unit.

    For a set of products that must change together (the batch's layers, mosaics and the
    catalog listing them): a failure part-way leaves the previous set whole. ``owned`` as
    in :func:`atomic_dir`.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for entry in parent.glob(f"{STAGE_PREFIX}*"):  # left by a killed run on this host
        host, pid = (entry.name[len(STAGE_PREFIX):].split("-") + ["", ""])[:2]
        if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
            _remove(entry)
    token = f"{STAGE_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new, old = parent / f"{token}-{target.name}", parent / f"{token}-old"
    new.mkdir()
    try:
        yield new
        _swap_in(new, target, old, owned)
    finally:
        _remove(new)
        _remove(old)


# === One writer per output folder ===
# Held (flock) by the process writing into a folder: CHIPS (tile, index), MASKS, OUT (predict,
# vectors, batch, evaluate), MODEL_DIR (train), a report folder. One name for every stage, so any
# two writers of one folder wait for each other, whichever stages they are; hidden, and no
# scene, chip or vector listing takes it for an output.
LOCK_FILE = ".carseg.lock"


@contextlib.contextmanager
def folder_lock(folder: Path | str, stage: str, *, doing: str = "written") -> Iterator[Path]:
    """Hold ``folder/.carseg.lock``: one process writing into ``folder`` at a time.

    A second run of a stage on the same folder (two ``make all`` started together) waits for
    the first, with one warning naming the folder and the other process, and then finds its
    scenes up to date: the outcome of running the two one after the other, and neither fails
    for a mere overlap. ``flock`` is released by the OS when its holder ends in any way,
    ``kill -9`` included, so the lock is never stale; the file stays, and only says who holds
    it while it is held. Taking it writes that name, so a command looks at whether it has
    anything to do before taking it: a rerun with nothing to do neither waits nor writes.

    A process takes at most one folder lock at a time (no stage nests two), so two runs can
    never deadlock.

    Args:
        folder: the output folder (created if need be).
        stage: the stage's name, for the warning.
        doing: what the holder does to the folder, for the warning ("is being <doing> by").
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: %s is being %s by %s; waiting for it to finish", stage, folder,
                        doing, _lock_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _lock_holder(fd: int) -> str:
    """Who holds a folder lock, as its holder wrote it ("process 123 on host").

    The file keeps the text of an earlier holder (one killed -9, say) until the new holder,
    just after taking the lock, writes its own; a holder named there that is dead on this host
    is such a leftover, so it is read again for a moment before saying "another process".
    """
    host = socket.gethostname()
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        words = text.split()
        if len(words) == 4 and words[0] == "process" and words[1].isdigit():
            if words[3] != host or _pid_alive(int(words[1])):
                return text
        time.sleep(0.05)
    return "another process"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def is_fresh(outputs, inputs) -> bool:
    """True when every output exists and is newer than every existing input (Make's rule)."""
    try:
        oldest_output = min(Path(p).stat().st_mtime for p in outputs)
    except (FileNotFoundError, ValueError):
        return False
    newest_input = max((Path(p).stat().st_mtime for p in inputs if Path(p).exists()), default=0)
    return oldest_output >= newest_input


def stage_log(log_dir: Path | str, scene: str, stage: str) -> Path:
    """``OUT/logs/<scene>.<stage>.json``: one scene's time or error in one batch stage."""
    return Path(log_dir) / f"{scene}.{stage}.json"


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
        raise InputNotFound(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path}: not valid JSON") from None


def read_json_if_any(path: Path | str, default: Any = None) -> Any:
    """Read a JSON file the pipeline wrote where its absence is normal (a first run, no
    evaluation yet): ``default`` when it is absent or unreadable (a warning says which)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable; taken as absent", path)
        return default


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def json_differs(path: Path | str, data: Any) -> bool:
    """Whether :func:`write_if_changed` would write ``data`` to ``path`` (absent or other)."""
    path = Path(path)
    return not path.exists() or path.read_text() != _json_text(data)


def write_if_changed(path: Path | str, data: Any) -> bool:
    """Write JSON only when its content differs, so Make sees a new mtime only on real change."""
    if not json_differs(path, data):
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(_json_text(data))
    return True


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


def check_outputs_apart(outputs: dict[str, Path | str | None],
                        inputs: dict[str, Path | str | None]) -> None:
    """Refuse outputs that would write into or over an input, or into each other.

    Args:
        outputs: name (e.g. ``"OUT/masks"``) -> a folder the run writes into (and may replace).
        inputs: name (e.g. ``"IMAGES"``) -> a folder or file the run reads and must never write.

    Raises:
        OutputConflict: naming both places, before any work starts.
    """
    def nested(a: Path, b: Path) -> bool:
        return a == b or a in b.parents or b in a.parents

    outs = {name: Path(p).expanduser().resolve() for name, p in outputs.items() if p is not None}
    for out_name, o in outs.items():
        for in_name, src in inputs.items():
            if src is not None and nested(o, Path(src).expanduser().resolve()):
                raise OutputConflict(
                    f"{outputs[out_name]}: {out_name} would write into or over {in_name} "
                    f"({src}); choose an output folder apart from the inputs")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # e.g. MODEL_DIR inside OUT/evaluation, which evaluate replaces as a whole.
            if nested(outs[a], outs[b]):
                raise OutputConflict(
                    f"{outputs[a]}: {a} and {b} ({outputs[b]}) are the same folder or one holds "
                    "the other; give each its own folder")


def find_cars_file(out_dir: Path | str, scene: str) -> Path | None:
    """The car vector file of ``scene`` in ``out_dir/cars``, whatever its format."""
    for suffix in VECTOR_SUFFIX.values():
        path = Path(out_dir) / "cars" / f"{scene}{suffix}"
        if path.exists():
            return path
    return None


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


def progress_bar(total: int, desc: str, unit: str):
    """A bar with an ETA for a long loop on a terminal; silent in logs, CI and make output."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False,
                disable=total < 2 or not sys.stderr.isatty())


def first_line(exc: BaseException) -> str:
    """The most telling line of an error: GDAL's own reason rather than rasterio's wrapper.

    rasterio raises "Read failed. See previous exception for details." with GDAL's message as
    the cause; a user needs the cause, and to know the file is truncated or corrupt.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    texts = [t for t in (str(e).strip().splitlines()[0] for e in chain if str(e).strip())
             if "see previous exception" not in t.lower()]
    text = texts[-1] if texts else chain[0].__class__.__name__
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) \
            or any("no space left" in t.lower() for t in texts):
        return "no space left on device"
    if any(k in text for k in ("TIFFRead", "Read error", "TIFFFillTile", "TIFFFillStrip",
                               "IReadBlock", "not recognized as a supported file format",
                               "not a TIFF", "Cannot read TIFF header")):
        return f"file is truncated or corrupt ({text})"
    return text
