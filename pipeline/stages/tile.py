"""Cut scenes into georeferenced chips (``make tiles``) and index them with a split (``index``).

A scene is read on its own block rows, each pixel once, into a buffer of one chip row plus one
block row (or, for scenes too wide for that, strip by strip, a bounded number of chips wide), so
memory does not grow with the scene. Chips keep the scene's dtype and the selected bands, on
their own grid, written by threads in batches (GDAL compresses without the GIL).
Pixels that are not valid (nodata, a source mask, padding beyond a scene smaller than a chip) are
recorded in a GDAL internal mask band of the chip; ``rasterize`` reads ``chip.dataset_mask()`` and
marks them 255 in the mask, so training gives them zero weight.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetWriter
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from pipeline.config import TileConfig
from pipeline.errors import InputError, first_line
from pipeline.files import atomic_dir, read_json, write_json
from pipeline.geo import (
    axis_windows,
    gsd_m,
    metres_per_unit,
    pixel_size,
    utm_crs_for,
    valid_mask,
)
from pipeline.io import CHIPS_FILE, INDEX_FILE, MASKS_FILE, STATS_FILE, read_vector, write_vector
from pipeline.scenes import open_scene

log = logging.getLogger(__name__)

DTYPES = ("uint8", "uint16")
# Widest strip read at once, in pixels, where whole rows of the scene do not fit in
# ROW_BUFFER_BYTES: bounds memory for very wide scenes.
MAX_STRIP_WIDTH = 4096
# Whole-width rows of the scene kept in memory per process (a chip row plus one block row).
# Reads on the scene's block rows cost half of reads across them (GDAL decodes a block
# straight into the buffer instead of through its block cache), so a scene whose rows fit is
# read block row by block row, once, and chips are sliced from that.
ROW_BUFFER_BYTES = 96 * 2**20
# Chips handed to a writer thread at once: one hand-off per chip cost as much as a tenth of
# writing the chip.
WRITE_BATCH = 16
# Band statistics are taken on every STAT_STEP-th pixel in each direction: the mean and std of
# imagery do not need every pixel, and a full pass would cost as much as the tiling itself.
STAT_STEP = 4
GDAL_CACHE_MB = 64


def chip_name(scene: str, row: int, col: int) -> str:
    """File stem of the chip whose window starts at (row, col) of the scene grid."""
    return f"{scene}_r{row:05d}_c{col:05d}"


# === Scene grid ===

def _target_grid(src, path: Path, cfg: TileConfig):
    """The grid chips are cut from: (crs, transform, width, height), or None for the native grid."""
    if src.crs.is_geographic:
        if cfg.geographic != "reproject":
            raise InputError(f"{path}: CRS {src.crs.to_string()} is geographic (degrees); "
                             "reproject it to a projected CRS or set tile.geographic=reproject")
        left, bottom, right, top = src.bounds
        dst_crs = utm_crs_for((left + right) / 2, (bottom + top) / 2)
        kwargs = {"resolution": cfg.gsd} if cfg.gsd else {}
        transform, width, height = calculate_default_transform(
            src.crs, dst_crs, src.width, src.height, *src.bounds, **kwargs)
        if not cfg.gsd:
            # Snap to square pixels of the mean size so the GSD is one number in metres.
            gsd = pixel_size(transform)
            l2, b2, r2, t2 = transform_bounds(src.crs, dst_crs, *src.bounds, densify_pts=21)
            transform = Affine(gsd, 0, l2, 0, -gsd, t2)
            width, height = max(1, round((r2 - l2) / gsd)), max(1, round((t2 - b2) / gsd))
        log.info("%s: reprojecting from %s to %s", path.name, src.crs.to_string(), dst_crs)
        return dst_crs, transform, width, height
    native = gsd_m(src.transform, src.crs)
    rotated = src.transform.b != 0 or src.transform.d != 0
    if cfg.gsd and (rotated or not math.isclose(native, cfg.gsd, rel_tol=1e-6)):
        left, bottom, right, top = src.bounds
        step = cfg.gsd / metres_per_unit(src.crs)  # tile.gsd is in metres, the grid in CRS units
        width = max(1, round((right - left) / step))
        height = max(1, round((top - bottom) / step))
        log.info("%s: resampling from %.4g m to %.4g m", path.name, native, cfg.gsd)
        return src.crs, Affine(step, 0, left, 0, -step, top), width, height
    return None


def _open_grid(src, path: Path, cfg: TileConfig):
    """The dataset to cut chips from: the scene itself, or a WarpedVRT onto the target grid."""
    target = _target_grid(src, path, cfg)
    if target is None:
        return src
    crs, transform, width, height = target
    kwargs = {}
    if src.nodata is not None:
        kwargs.update(src_nodata=src.nodata, nodata=src.nodata)
    else:
        # No nodata value: an alpha band tells which warped pixels came from the scene.
        kwargs["add_alpha"] = True
    return WarpedVRT(src, crs=crs, transform=transform, width=width, height=height,
                     resampling=Resampling[cfg.resampling], **kwargs)


def _has_mask(ds, band: int) -> bool:
    flags = ds.mask_flag_enums[band - 1]
    return MaskFlags.per_dataset in flags or MaskFlags.alpha in flags


# === Chips ===

# Chips are written once and read every epoch: ZSTD level 1 compresses about 3x faster than
# deflate level 1 (where tiling spent half its time) and decodes faster too; the horizontal
# predictor makes imagery smaller for both. ``bench.bench_tiling`` gives gdal_retile the same.
CHIP_COMPRESSION = {"compress": "zstd", "zstd_level": 1, "predictor": 2}


def _chip_profile(grid, bands: int, size: int) -> dict:
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype=grid.dtypes[0],
                   crs=grid.crs, nodata=grid.nodata, **CHIP_COMPRESSION)
    if size % 16 == 0:
        profile.update(tiled=True, blockxsize=min(size, 256), blockysize=min(size, 256))
    return profile


def _write_chip(path: Path, data: np.ndarray, valid: np.ndarray | None, profile: dict,
                transform: Affine) -> None:
    """Write one chip; runs in a writer thread, inside the GDAL environment of ``_writer_env``.

    ``rasterio.io.DatasetWriter`` is what ``rasterio.open(path, "w")`` returns; called
    directly it skips the per-call environment that ``rasterio.open`` enters and leaves (about
    a tenth of a chip's cost), since the thread already holds one.
    """
    with DatasetWriter(str(path), "w", transform=transform, **profile) as dst:
        dst.write(data)
        if valid is not None:
            # Inside the chip (GDAL_TIFF_INTERNAL_MASK), so a chip is one self-contained file.
            dst.write_mask(valid.astype(np.uint8) * 255)


def _write_chips(jobs: list[tuple], profile: dict) -> None:
    """Write a batch of chips (one hand-off to a writer thread, not one per chip)."""
    for path, data, valid, transform in jobs:
        _write_chip(path, data, valid, profile, transform)


def tile_scene(scene: Path, chips_dir: Path, *, cfg: TileConfig) -> Path:
    """Cut one scene into chips under ``chips_dir/<scene>/`` and index them in chips.gpkg.

    Args:
        scene: a GeoTIFF (projected CRS, or geographic when ``cfg.geographic == "reproject"``).
        chips_dir: the chips root; the scene's folder is replaced atomically.
        cfg: chip size, overlap, bands, GSD, nodata threshold.

    Returns:
        The scene's chips.gpkg (written last; it may hold zero rows).

    Raises:
        InputError: unreadable file, no georeferencing, too few bands, unsupported dtype.
    """
    import geopandas as gpd
    import pandas as pd
    scene = Path(scene)
    name = scene.stem
    size, overlap = cfg.chip_size, cfg.overlap
    if overlap >= size:
        raise InputError(f"{scene}: tile.overlap {overlap} must be smaller than chip_size {size}")
    # A small GDAL block cache: each block is read once or twice (overlap), so a big cache only
    # makes memory grow with the scene (the default is 5% of RAM).
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), \
            open_scene(scene, allow_geographic=True) as src:
        if max(cfg.bands) > src.count or min(cfg.bands) < 1:
            raise InputError(f"{scene}: has {src.count} bands, tile.bands asks for {cfg.bands}")
        dtype = src.dtypes[cfg.bands[0] - 1]
        if dtype not in DTYPES or any(src.dtypes[b - 1] != dtype for b in cfg.bands):
            raise InputError(f"{scene}: imagery must be uint8 or uint16 in every band, "
                             f"found {sorted(set(src.dtypes))}")
        grid = _open_grid(src, scene, cfg)
        try:
            with atomic_dir(Path(chips_dir) / name) as tmp:
                records = _cut(grid, scene, tmp, cfg)
                columns = ["chip", "scene", "row_off", "col_off", "width", "height",
                           "valid_fraction", "gsd", "stat_pixels"]
                columns += [f"sum_{i}" for i in range(len(cfg.bands))]
                columns += [f"sumsq_{i}" for i in range(len(cfg.bands))]
                geoms = _footprints([r.pop("transform") for r in records], cfg.chip_size)
                table = pd.DataFrame.from_records(records, columns=columns)
                table["scene"] = table["scene"].astype(str)
                table["chip"] = table["chip"].astype(str)
                chips = gpd.GeoDataFrame(table, geometry=gpd.GeoSeries(geoms, crs=grid.crs))
                write_vector(chips, tmp / CHIPS_FILE, layer="chips")
        except RasterioError as exc:
            # A corrupt block surfaces only when read; the user needs the file and GDAL's reason.
            raise InputError(f"{scene}: tiling failed ({first_line(exc)})") from None
        finally:
            if grid is not src:
                grid.close()
    if not records:
        log.warning("%s: no chip has at least %.0f%% valid pixels; zero chips", scene,
                    100 * cfg.min_valid_fraction)
    log.info("%s: %d chips", name, len(records))
    return Path(chips_dir) / name / CHIPS_FILE


def _cut(grid, scene: Path, out: Path, cfg: TileConfig) -> list[dict]:
    """Read the grid strip by strip, write the kept chips into ``out``, return their records.

    A big scene's rows of chips are split into bands that worker processes cut side by side,
    each opening the scene itself (a strip's Python work, the chips' slicing and statistics,
    holds the GIL, so threads alone leave cores idle). Records come back in row-major order and
    every chip is written by the same code, so the output does not depend on the split.
    """
    size, overlap = cfg.chip_size, cfg.overlap
    rows = list(axis_windows(grid.height, size, overlap, edge="fit").starts)
    cols = list(axis_windows(grid.width, size, overlap, edge="fit").starts)
    processes = _processes(len(rows), len(cols))
    if processes <= 1:
        return _cut_rows(grid, scene, out, cfg, rows, cols)
    import multiprocessing

    # A few bands per process, so one slow band does not leave the others idle at the end.
    n_bands = min(len(rows), processes * 4)
    bands = [rows[i * len(rows) // n_bands:(i + 1) * len(rows) // n_bands]
             for i in range(n_bands)]
    # fork: a worker starts in milliseconds with this module loaded, and (unlike spawn) does
    # not re-run the caller's script. No thread of this process is inside GDAL at this point:
    # the scene is opened but idle, and the chip writers start later, in each worker.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_open,
                             initargs=(str(scene), cfg.model_dump())) as pool:
        parts = pool.map(_worker_cut, [str(out)] * n_bands, bands, [cols] * n_bands)
        return [rec for part in parts for rec in part]


# Processes that cut one scene: never more than the cores, and only when every process gets
# enough chips to pay for its start (a fork, and opening the scene: tens of milliseconds).
MAX_PROCESSES = 4
MIN_CHIPS_PER_PROCESS = 64


def _processes(n_rows: int, n_cols: int) -> int:
    import multiprocessing

    if multiprocessing.current_process().daemon or "fork" not in \
            multiprocessing.get_all_start_methods():
        return 1  # a Dask worker (daemonic) may not start processes; scenes run side by side
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    by_size = (n_rows * n_cols) // MIN_CHIPS_PER_PROCESS
    return max(1, min(MAX_PROCESSES, cores or 1, by_size, n_rows))


_WORKER: dict = {}


def _worker_open(scene: str, cfg: dict) -> None:
    """Open the scene (and its target grid) once per worker process."""
    tile_cfg = TileConfig(**cfg)
    env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
    env.__enter__()  # held for the process's life, as the scene is
    src = open_scene(Path(scene), allow_geographic=True)
    _WORKER.update(env=env, src=src, grid=_open_grid(src, Path(scene), tile_cfg),
                   cfg=tile_cfg, scene=Path(scene))


def _worker_cut(out: str, rows: list[int], cols: list[int]) -> list[dict]:
    w = _WORKER
    return _cut_rows(w["grid"], w["scene"], Path(out), w["cfg"], rows, cols)


def _writer_env() -> None:
    """Give a chip-writer thread its own GDAL environment for its whole life.

    rasterio's environment is per thread: without one, every ``rasterio.open`` of a chip sets
    up and tears down a fresh environment, which costs about as much as writing the chip.
    """
    # The chips' creation options are fixed and tested: GDAL need not re-parse its option list
    # (an XML document) for every chip.
    env = rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_VALIDATE_CREATION_OPTIONS=False)
    env.__enter__()
    _THREAD.env = env  # held, with the thread, until the pool shuts down


_THREAD = threading.local()


def _cut_rows(grid, scene: Path, out: Path, cfg: TileConfig, rows: list[int],
              cols: list[int]) -> list[dict]:
    """Cut the chips whose windows start on ``rows`` x ``cols``; return their records."""
    size, overlap, bands = cfg.chip_size, cfg.overlap, cfg.bands
    width, height = grid.width, grid.height
    gsd = gsd_m(grid.transform, grid.crs)
    nodata = grid.nodata
    fill = nodata if nodata is not None else 0
    masked = _has_mask(grid, bands[0])
    profile = _chip_profile(grid, len(bands), size)
    rowbuf = _RowBuffer.fitting(grid, bands, size)
    if rowbuf is not None:
        groups = [cols]
    else:
        # Chips of one strip are grouped so a strip is at most MAX_STRIP_WIDTH wide.
        per_group = max(1, (MAX_STRIP_WIDTH - size) // (size - overlap) + 1)
        groups = [cols[i:i + per_group] for i in range(0, len(cols), per_group)]
    records: list[dict] = []
    workers = max(1, min(4, os.cpu_count() or 1))
    pending: deque[Future] = deque()
    cut = _Cut(size, fill, out, scene.stem, gsd, grid, cfg, jobs=[])

    def flush() -> None:
        if cut.jobs:
            pending.append(pool.submit(_write_chips, cut.jobs, profile))
            cut.jobs = []
        # Bounded queue of writes: memory stays flat however many chips there are.
        while len(pending) > 2 * workers:
            pending.popleft().result()

    with ThreadPoolExecutor(max_workers=workers, initializer=_writer_env) as pool:
        for row in rows:
            for group in groups:
                col0 = group[0]
                # Clip to the grid: only a scene smaller than a chip runs past it (padded below).
                win = Window(col0, row, min(group[-1] + size, width) - col0,
                             min(row + size, height) - row)
                if rowbuf is not None:
                    data = rowbuf.rows(row, win.height)
                else:
                    data = grid.read(bands, window=win)
                mask = grid.dataset_mask(window=win) if masked else None
                valid = valid_mask(data, nodata, mask)
                strip = _Strip(data, valid, bool(valid.all()), row, col0)
                for col in group:
                    rec = _chip(strip, col, cut)
                    if rec is not None:
                        records.append(rec)
                    if len(cut.jobs) >= WRITE_BATCH:
                        flush()
                flush()
        while pending:
            pending.popleft().result()
    return records


class _RowBuffer:
    """Whole-width rows of the grid, read on its block rows, each pixel once.

    ``rows(row, height)`` returns a view of rows ``row`` .. ``row + height``; rows must be asked
    for in increasing order. Rows before the last request's start are dropped, so the buffer
    holds a chip row plus at most one block row.
    """

    def __init__(self, grid, bands, block_rows: int, capacity: int):
        self.grid, self.bands, self.block_rows = grid, list(bands), block_rows
        self.buf = np.empty((len(bands), capacity, grid.width), dtype=grid.dtypes[bands[0] - 1])
        self.top = 0  # grid row of buf[:, 0]
        self.filled = 0  # rows of buf holding data

    @classmethod
    def fitting(cls, grid, bands, size: int) -> _RowBuffer | None:
        """A buffer for chips of ``size``, or None where whole rows would take too much memory."""
        block_rows = grid.block_shapes[bands[0] - 1][0]
        if block_rows > size:
            return None  # e.g. one strip for the whole image: block rows do not bound memory
        capacity = size + block_rows
        itemsize = np.dtype(grid.dtypes[bands[0] - 1]).itemsize
        if grid.width * capacity * len(bands) * itemsize > ROW_BUFFER_BYTES:
            return None
        return cls(grid, bands, block_rows, capacity)

    def rows(self, row: int, height: int) -> np.ndarray:
        start = row - self.top
        if start < 0 or start > self.filled:
            # First request (or a jump): start at ``row``; reads are aligned from the next
            # block row on, so the buffer holds at most a chip row plus one block row.
            self.top, self.filled = row, 0
        elif start > 0:
            keep = self.filled - start
            self.buf[:, :keep] = self.buf[:, start:self.filled]
            self.top, self.filled = row, keep
        need = min(row + height, self.grid.height)
        while self.top + self.filled < need:
            r0 = self.top + self.filled
            # Up to the end of this block row: aligned reads from the second on.
            r1 = min(r0 - r0 % self.block_rows + self.block_rows, self.grid.height)
            # Straight into the buffer (rasterio reads into a strided view).
            self.grid.read(self.bands, window=Window(0, r0, self.grid.width, r1 - r0),
                           out=self.buf[:, self.filled:self.filled + r1 - r0])
            self.filled += r1 - r0
        start = row - self.top
        return self.buf[:, start:start + need - row]


@dataclass
class _Strip:
    """One strip read from the grid: its pixels, their validity, and where it starts."""

    data: np.ndarray
    valid: np.ndarray
    all_valid: bool
    row: int
    col0: int


@dataclass
class _Cut:
    """What every chip of a scene is cut with, and ``jobs``, the writes queued so far."""

    size: int
    fill: float
    out: Path
    scene: str
    gsd: float
    grid: object
    cfg: TileConfig
    jobs: list


def _chip(strip: _Strip, col: int, cut: _Cut) -> dict | None:
    """Queue the chip at ``col`` of ``strip`` for writing; its index record, or None if too
    little of it is valid."""
    data, valid, all_valid_strip, row = strip.data, strip.valid, strip.all_valid, strip.row
    size, fill, out, scene, gsd = cut.size, cut.fill, cut.out, cut.scene, cut.gsd
    grid, cfg = cut.grid, cut.cfg
    c = col - strip.col0
    sub = data[:, :, c:c + size]
    sub_valid = valid[:, c:c + size]
    inside = sub_valid.size
    n_valid = inside if all_valid_strip else int(np.count_nonzero(sub_valid))
    if inside == 0 or n_valid < cfg.min_valid_fraction * inside or n_valid == 0:
        return None
    if sub.shape[1:] != (size, size):
        # The scene is smaller than a chip: pad with nodata, and the padding is not valid.
        padded = np.full((sub.shape[0], size, size), fill, dtype=sub.dtype)
        padded[:, :sub.shape[1], :sub.shape[2]] = sub
        pad_valid = np.zeros((size, size), dtype=bool)
        pad_valid[:sub.shape[1], :sub.shape[2]] = sub_valid
        sub, sub_valid = padded, pad_valid
    all_valid = n_valid == size * size
    if not all_valid and grid.nodata is not None:
        sub = np.where(sub_valid, sub, np.asarray(fill, dtype=sub.dtype))
    name = chip_name(scene, row, col)
    transform = window_transform(Window(col, row, size, size), grid.transform)
    # A copy, never a view: the strip's buffer is reused while the writer thread works.
    cut.jobs.append((out / f"{name}.tif", np.array(sub, order="C"),
                 None if all_valid else sub_valid, transform))
    sample = sub[:, ::STAT_STEP, ::STAT_STEP]
    if all_valid:
        values = sample.reshape(sample.shape[0], -1).astype(np.float64)
    else:
        values = sample[:, sub_valid[::STAT_STEP, ::STAT_STEP]].astype(np.float64)
    sums = values.sum(axis=1)
    sumsqs = np.einsum("ij,ij->i", values, values)
    rec = {"chip": name, "scene": scene, "row_off": row, "col_off": col, "width": size,
           "height": size, "valid_fraction": n_valid / (size * size), "gsd": gsd,
           "stat_pixels": int(values.shape[1]),
           # Six numbers, not a polygon: footprints are made for all chips at once at the end.
           "transform": transform[:6]}
    for i in range(len(sums)):
        rec[f"sum_{i}"] = float(sums[i])
        rec[f"sumsq_{i}"] = float(sumsqs[i])
    return rec


def _footprints(transforms: list[tuple], size: int) -> list:
    """Chip polygons from the chips' transforms: ``window_footprint`` for many chips at once.

    All four corners (on a rotated grid a chip's footprint is not a north-up box), computed
    with the same float operations as ``Affine @ (x, y)``, so the corners equal the chips'
    own ``bounds`` exactly.
    """
    import shapely

    if not transforms:
        return []
    sa, sb, sc, sd, se, sf = np.asarray(transforms, dtype=np.float64).T
    corners = [(0, 0), (size, 0), (size, size), (0, size)]
    xy = np.stack([np.stack([vx * sa + vy * sb + sc, vx * sd + vy * se + sf], axis=-1)
                   for vx, vy in corners], axis=1)
    return list(shapely.polygons(xy))


# === Index, split and statistics ===

def build_index(chips_dir: Path, masks_dir: Path, *, cfg: TileConfig) -> Path:
    """Join every scene's chips with their car pixels, split train/val, write index and stats.

    Writes ``chips_dir/index.gpkg`` (the chips.gpkg columns + ``car_pixels`` + ``split``) and
    ``chips_dir/stats.json`` (per-band mean/std over valid pixels of train chips).

    Raises:
        InputError: no chips at all, a scene without masks, or scenes of mixed dtype.
    """
    import geopandas as gpd
    import pandas as pd

    chips_dir, masks_dir = Path(chips_dir), Path(masks_dir)
    tables, dtypes, label_ids, labels_total = [], {}, set(), 0
    for gpkg in sorted(chips_dir.glob(f"*/{CHIPS_FILE}")):
        chips = read_vector(gpkg)
        if not len(chips):
            continue
        masks = read_json(masks_dir / gpkg.parent.name / MASKS_FILE,
                          missing=f"masks missing for scene {gpkg.parent.name}; "
                                  "run `make masks` first")
        chips["car_pixels"] = chips["chip"].map(masks["chips"]).fillna(0).astype(int)
        label_ids.update(masks.get("label_ids", []))
        labels_total = max(labels_total, masks.get("labels_total", 0))
        with rasterio.open(gpkg.parent / f"{chips['chip'].iloc[0]}.tif") as first:
            dtypes[gpkg.parent.name] = first.dtypes[0]
        tables.append(chips)
    if not tables:
        raise InputError(f"{chips_dir}: no chips in any scene (all nodata, or no scenes tiled)")
    if len(set(dtypes.values())) > 1:
        raise InputError(f"{chips_dir}: scenes mix dtypes {dtypes}; convert them to one dtype")
    if labels_total and len(label_ids) < labels_total:
        log.warning("%d of %d labels fall on no scene", labels_total - len(label_ids),
                    labels_total)
    val_scenes = _val_scenes([t["scene"].iloc[0] for t in tables], cfg)
    for t in tables:
        scene = t["scene"].iloc[0]
        if cfg.val_fraction <= 0:
            t["split"] = "train"
        elif val_scenes is not None:
            t["split"] = "val" if scene in val_scenes else "train"
        else:
            t["split"] = _block_split(t, cfg, scene)
    if len({t.crs.to_string() for t in tables}) > 1:
        tables = [t.to_crs("EPSG:4326") for t in tables]
    index = gpd.GeoDataFrame(pd.concat(tables, ignore_index=True), crs=tables[0].crs)
    write_vector(index, chips_dir / INDEX_FILE, layer="chips")
    write_json(chips_dir / STATS_FILE, _stats(index, cfg, next(iter(dtypes.values()))))
    counts = index["split"].value_counts().to_dict()
    log.info("chip index: %d chips %s", len(index), counts)
    return chips_dir / INDEX_FILE


def _val_scenes(scenes: list[str], cfg: TileConfig) -> set[str] | None:
    """Scenes held out for validation when there are >= 2; None means split within a scene."""
    if len(scenes) < 2:
        return None
    scenes = sorted(scenes)
    n_val = min(len(scenes) - 1, max(1, round(cfg.val_fraction * len(scenes))))
    order = np.random.default_rng(cfg.seed).permutation(len(scenes))
    return {scenes[i] for i in order[:n_val]}


def _block_split(chips, cfg: TileConfig, scene: str, block: float | None = None) -> np.ndarray:
    """Spatial blocks of ``split_block_m``; chips over both a train and a val block -> buffer.

    A scene that fits in one block is split with blocks half the size, so there is always a
    training and (where the scene allows) a validation side.
    """
    bounds = chips.geometry.bounds.to_numpy()
    block = block or cfg.split_block_m / metres_per_unit(chips.crs)  # metres -> CRS units
    width = max(bounds[:, 2].max() - bounds[:, 0].min(), bounds[:, 3].max() - bounds[:, 1].min())
    if width <= block and block > 1e-3:
        return _block_split(chips, cfg, scene, block / 2)
    x0, y1 = bounds[:, 0].min(), bounds[:, 3].max()
    # Shrink by a hair so a chip that ends exactly on a block line is not counted in the next.
    eps = 1e-6 * block
    bx0 = np.floor((bounds[:, 0] + eps - x0) / block).astype(int)
    bx1 = np.floor((bounds[:, 2] - eps - x0) / block).astype(int)
    by0 = np.floor((y1 - bounds[:, 3] + eps) / block).astype(int)
    by1 = np.floor((y1 - bounds[:, 1] - eps) / block).astype(int)
    pure = sorted({(int(a), int(b)) for a, b, c, d in zip(bx0, by0, bx1, by1, strict=True)
                   if a == c and b == d})
    seed = cfg.seed + sum(scene.encode())
    rng = np.random.default_rng(seed)
    split = np.full(len(chips), "train", dtype=object)
    if not pure:
        # Blocks smaller than a chip: the block of each chip's centre, and train chips that
        # overlap a val chip become buffer so no overlapping pair straddles the split.
        log.warning("%s: tile.split_block_m=%.1f is smaller than a chip; splitting by chip "
                    "centres", scene, block)
        cx = ((bounds[:, 0] + bounds[:, 2]) / 2 - x0) // block
        cy = (y1 - (bounds[:, 1] + bounds[:, 3]) / 2) // block
        keys = sorted(set(zip(cx.astype(int), cy.astype(int), strict=True)))
        n_val = min(len(keys) - 1, max(1, round(cfg.val_fraction * len(keys))))
        val_keys = {keys[i] for i in rng.permutation(len(keys))[:n_val]}
        is_val = np.array([(int(a), int(b)) in val_keys for a, b in zip(cx, cy, strict=True)])
        split[is_val] = "val"
        geoms = chips.geometry.to_numpy()
        val_geoms = chips.geometry[is_val]
        for i in np.flatnonzero(~is_val):
            if val_geoms.intersection(geoms[i]).area.max(initial=0) > 0:
                split[i] = "buffer"
        return split
    # Every block any chip touches takes part; val blocks are drawn from blocks holding a whole
    # chip, so the validation set is never empty.
    n_blocks = len({(a, b) for x in range(len(chips)) for a in range(bx0[x], bx1[x] + 1)
                    for b in range(by0[x], by1[x] + 1)})
    n_val = min(len(pure), max(1, round(cfg.val_fraction * n_blocks)))
    if n_blocks > 1:
        n_val = min(n_val, n_blocks - 1)
    val_blocks = {pure[i] for i in rng.permutation(len(pure))[:n_val]}
    for i in range(len(chips)):
        sides = {(a, b) in val_blocks for a in range(bx0[i], bx1[i] + 1)
                 for b in range(by0[i], by1[i] + 1)}
        split[i] = "buffer" if len(sides) > 1 else "val" if True in sides else "train"
    return split


def _stats(index, cfg: TileConfig, dtype: str) -> dict:
    """Per-band mean and std over the (subsampled) valid pixels of train chips."""
    train = index[index["split"] == "train"]
    if not len(train) or train["stat_pixels"].sum() == 0:
        train = index
    n = float(train["stat_pixels"].sum())
    nb = len(cfg.bands)
    mean = [float(train[f"sum_{i}"].sum() / n) for i in range(nb)]
    std = [float(math.sqrt(max(train[f"sumsq_{i}"].sum() / n - m * m, 0.0))) or 1.0
           for i, m in zip(range(nb), mean, strict=True)]
    gsds = index["gsd"].to_numpy()
    if np.ptp(gsds) > 1e-6 * gsds.max():
        log.warning("chips differ in GSD (%.4g..%.4g m); set tile.gsd to resample", gsds.min(),
                    gsds.max())
    return {"bands": list(cfg.bands), "dtype": dtype, "mean": mean, "std": std,
            "gsd": float(np.median(gsds)), "chips": int(len(index)),
            "train_chips": int((index["split"] == "train").sum()),
            "val_chips": int((index["split"] == "val").sum())}
