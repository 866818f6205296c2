"""Sliding-window prediction of a scene into probability and mask COGs.

The scene is read one row of windows at a time (a strip ``window`` rows high), windows are
batched through the model, and each window's probabilities are blended into a strip accumulator
with a smooth weight that is zero on the window's inner edges (where a convolution sees padding)
and cosine-squared across the rest of the overlap, so no seam shows. Rows that no later window
touches are flushed to an intermediate tiled GeoTIFF straight away, so memory depends on the
scene's width and the window, never on its height; the COGs are then built from those files with
``rio_cogeo`` (which streams too). A reader thread prefetches the next strip and a writer thread
writes the previous one while the model runs, so wall time stays close to the model's own time.

The bundle's contract is honoured: bands are picked and normalised as in training, a scene at
another GSD is warped to the model's GSD and the probability brought back to the scene's grid,
and a scene the model cannot take (too few bands, another dtype) is refused with one clear line.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.plot import reshape_as_image
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from pipeline.config import PredictConfig
from pipeline.geo import pixel_size, valid_mask
from pipeline.io import InputError, atomic_path, first_line, open_scene, temp_dir
from pipeline.model import METADATA_FILE, MODEL_FILE, Bundle, load_bundle, read_metadata

log = logging.getLogger(__name__)

NODATA = 255
PROB_SCALE = 254  # probability p is stored as round(p * 254); 255 is left for nodata
GSD_TOLERANCE = 0.01  # relative GSD difference beyond which the scene is resampled
_EPS = 1e-6  # weight floor for valid pixels, so every one of them has a positive total weight
_BLOCK = 256  # block size of the intermediate GeoTIFFs
_FLUSH_ROWS = 64  # rows handed to the writer at a time
# GDAL's block cache defaults to 5% of RAM and fills up as large outputs stream through it; a
# small one is enough for strip-by-strip writes and keeps memory flat whatever the scene size.
# (rasterio passes an integer straight to GDALSetCacheMax64, so it is in bytes, not MB.)
_GDAL_ENV = {"GDAL_CACHEMAX": 32 * 2**20, "GDAL_TIFF_INTERNAL_MASK": True}


# === Model bundle, cached per process ===

@functools.lru_cache(maxsize=4)
def _cached_bundle(model_dir: str, stamp: tuple[int, int]) -> Bundle:
    log.info("loading model %s", model_dir)
    return load_bundle(model_dir)


def get_bundle(model_dir: Path | str) -> Bundle:
    """Load a model bundle once per process (a Dask worker reuses it for every scene).

    The cache key includes the model and metadata mtimes, so a retrained model is picked up.
    """
    model_dir = Path(model_dir).resolve()
    read_metadata(model_dir)  # raises the clear InputError when the bundle is missing
    model_path = model_dir / MODEL_FILE
    if not model_path.exists():
        raise InputError(f"{model_path}: model not found; run `make train` first")
    stamp = (model_path.stat().st_mtime_ns, (model_dir / METADATA_FILE).stat().st_mtime_ns)
    return _cached_bundle(str(model_dir), stamp)


# === Window geometry and blending weights ===

def window_geometry(cfg: PredictConfig, metadata: dict) -> tuple[int, int]:
    """The (window, overlap) to predict with.

    The window is ``cfg.window`` or the bundle's chip size, rounded up to the model's size
    multiple (a U-Net of depth d needs sizes divisible by 2**d). The overlap is rounded to that
    multiple too, so every window starts on the model's pooling lattice: the U-Net is then
    exactly shift-equivariant between windows, and a crop of a scene predicts like the scene.
    It is capped at half the window so the blending ramps of neighbouring windows never cross.
    """
    multiple = int(metadata.get("size_multiple", 1))
    size = int(cfg.window or metadata["chip_size"])
    window = max(multiple, math.ceil(size / multiple) * multiple)
    overlap = min(math.ceil(cfg.overlap / multiple) * multiple,
                  window // 2 // multiple * multiple)
    if overlap != cfg.overlap:
        log.info("overlap %d set to %d (a multiple of %d, at most half the %d px window)",
                 cfg.overlap, overlap, multiple, window)
    return window, overlap


def window_offsets(length: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: every multiple of the stride until the axis is covered.

    Unlike ``geo.axis_offsets``, the last window is not shifted back to end at the edge: it stays
    on the stride lattice and runs past the edge (padded by reflection). That costs no extra
    window, and every window of a scene sits where the same window of any crop of it (offset by
    a multiple of the stride) sits, so the blended result does not depend on where the scene
    ends, and with the stride a multiple of the U-Net's size multiple, windows share its pooling
    grid.
    """
    stride = window - overlap
    if stride <= 0:
        raise ValueError(f"window size {window} must exceed overlap {overlap}")
    count = 1 + max(0, math.ceil((length - window) / stride))
    return [i * stride for i in range(count)]


def edge_ramp(size: int, overlap: int) -> np.ndarray:
    """1-D weights of a window's leading edge: 0 on a margin, then a cos^2 rise, then 1.

    The margin (a quarter of the overlap, at least 2 px) drops the pixels a convolution computes
    from its own zero padding; the ramp fills the rest of the overlap. A neighbour's trailing ramp
    is this one mirrored, and sin^2 + cos^2 = 1, so the blend is a partition of unity.
    """
    ramp = np.ones(size, dtype=np.float32)
    if overlap <= 0:
        return ramp
    margin = max(overlap // 4, min(2, overlap // 2))
    ramp[:margin] = 0.0
    n = overlap - 2 * margin
    if n > 0:
        t = (np.arange(n, dtype=np.float64) + 0.5) / n
        ramp[margin:margin + n] = (np.sin(np.pi / 2 * t) ** 2).astype(np.float32)
    return ramp


def axis_weight(offset: int, size: int, length: int, overlap: int) -> np.ndarray:
    """1-D blending weight of a window at ``offset`` along an axis of ``length`` pixels.

    Only edges that have a neighbouring window are ramped: at the scene's true edge nothing else
    covers the pixels, so they keep full weight.
    """
    weight = np.ones(size, dtype=np.float32)
    ramp = edge_ramp(size, overlap)
    if offset > 0:
        weight *= ramp
    if offset + size < length:
        weight *= ramp[::-1]
    return weight


# === Reading ===

class _StripReader:
    """Reads full-width strips of a dataset with their validity; short strips padded to size."""

    def __init__(self, src, scene: Path, bands: list[int]):
        self.src = src
        self.scene = scene
        self.bands = bands
        self.width, self.height = src.width, src.height
        flags = src.mask_flag_enums[0] if src.count else ()
        # An internal mask or alpha band is a per-dataset mask; a nodata value is checked per
        # pixel across all bands by valid_mask (the GDAL convention for RGB orthophotos).
        self.use_dataset_mask = (MaskFlags.per_dataset in flags or MaskFlags.alpha in flags)

    def read(self, row: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(bands, rows, width) data and (rows, width) validity starting at ``row``.

        Rows past the scene's bottom are filled by reflection (and marked invalid).
        """
        n = min(rows, self.height - row)
        win = Window(0, row, self.width, n)
        try:
            data = self.src.read(self.bands, window=win)
            mask = self.src.dataset_mask(window=win) if self.use_dataset_mask else None
        except RasterioError as exc:
            raise InputError(f"{self.scene}: cannot read pixels ({first_line(exc)})") from None
        valid = valid_mask(data, self.src.nodata, mask)
        if n < rows:
            data = np.pad(data, ((0, 0), (0, rows - n), (0, 0)), mode="symmetric")
            valid = np.pad(valid, ((0, rows - n), (0, 0)), constant_values=False)
        return data, valid


def _window_image(image: np.ndarray, col: int, window: int) -> np.ndarray:
    """The (window, window, bands) image of the window at ``col`` of a strip.

    A window running past the scene's right edge is filled by reflection: it keeps image
    statistics at the edge, unlike zeros, so the model sees no artificial border there.
    """
    cell = image[:, col:col + window]
    short = window - cell.shape[1]
    if short > 0:
        cell = np.pad(cell, ((0, 0), (0, short), (0, 0)), mode="symmetric")
    return cell


# === Inference ===

def _batch_shapes(batch_size: int) -> list[int]:
    """Batch sizes the model is called with: ``batch_size`` and the powers of two below it.

    A few fixed shapes keep the model from retracing for every count of windows, and a short
    remainder is split into them (13 windows at batch 8 run as 8 + 4 + 1) rather than padded,
    so no forward pass is spent on padding.
    """
    shapes = {batch_size}
    b = 1
    while b < batch_size:
        shapes.add(b)
        b *= 2
    return sorted(shapes, reverse=True)


class _Predictor:
    """Runs the model on (n, h, w, bands) float32 windows, in fixed-shape batches."""

    def __init__(self, model, batch_size: int, tta: bool):
        self.model = model
        self.batch_size = batch_size
        self.shapes = _batch_shapes(batch_size)
        self.tta = tta

    def _forward(self, x: np.ndarray) -> np.ndarray:
        out = self.model.predict_on_batch(x)
        return np.asarray(out, dtype=np.float32)[..., 0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[:3], dtype=np.float32)
        start = 0
        while start < len(x):
            size = next(s for s in self.shapes if s <= len(x) - start)
            chunk = x[start:start + size]
            prob = self._forward(chunk)
            if self.tta:
                # Flips are exact symmetries of the pixel grid, so un-flipping lines results up.
                prob = prob + self._forward(chunk[:, :, ::-1])[:, :, ::-1]
                prob = prob + self._forward(chunk[:, ::-1])[:, ::-1]
                prob /= 3.0
            out[start:start + size] = prob
            start += size
        return out


def predict_grid(reader: _StripReader, bundle: Bundle, *, window: int, overlap: int,
                 batch_size: int, tta: bool,
                 emit: Callable[[int, np.ndarray], None]) -> None:
    """Predict every window of ``reader``'s grid and emit finished rows of blended probability.

    ``emit(row_off, prob)`` receives float32 rows (scene width) with NaN at nodata, top to
    bottom, in a writer thread. Memory holds one strip of ``window`` rows, whatever the height.
    """
    width, height = reader.width, reader.height
    rows = window_offsets(height, window, overlap)
    cols = window_offsets(width, window, overlap)
    col_weights = {c: axis_weight(c, window, width, overlap) for c in cols}
    # Accumulators hold one strip: the rows of the current row of windows, scene width.
    acc = np.zeros((window, width), dtype=np.float32)
    wsum = np.zeros_like(acc)
    predictor = _Predictor(bundle.model, batch_size, tta)
    n_bands = len(bundle.bands)
    with ThreadPoolExecutor(1, thread_name_prefix="read") as read_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
        next_strip: Future = read_pool.submit(reader.read, rows[0], window)
        pending: Future | None = None
        for i, row in enumerate(rows):
            data, valid = next_strip.result()
            if i + 1 < len(rows):
                next_strip = read_pool.submit(reader.read, rows[i + 1], window)
            image = reshape_as_image(data)  # (rows, cols, bands) once, before Keras
            row_weight = axis_weight(row, window, height, overlap)
            # Windows without one valid pixel are not worth a forward pass (nodata borders).
            live = [c for c in cols if valid[:, c:c + window].any()]
            # One batch at a time, so memory holds batch_size windows, not a row of them.
            for start in range(0, len(live), batch_size):
                chunk = live[start:start + batch_size]
                batch = np.empty((len(chunk), window, window, n_bands), dtype=np.float32)
                for j, col in enumerate(chunk):
                    batch[j] = bundle.prepare(_window_image(image, col, window))
                probs = predictor(batch)
                for col, prob in zip(chunk, probs, strict=True):
                    inside = min(window, width - col)  # the part of the window on the scene
                    weight = np.maximum(np.outer(row_weight, col_weights[col][:inside]), _EPS)
                    weight *= valid[:, col:col + inside]  # nodata gets no say
                    acc[:, col:col + inside] += np.clip(prob[:, :inside], 0.0, 1.0) * weight
                    wsum[:, col:col + inside] += weight
            # Rows above the next window's top are final: flush them and slide the strip up.
            done = min((rows[i + 1] if i + 1 < len(rows) else height), height) - row
            for top in range(0, done, _FLUSH_ROWS):  # in slices, to keep temporaries small
                part = slice(top, min(done, top + _FLUSH_ROWS))
                with np.errstate(invalid="ignore", divide="ignore"):
                    out = np.where(wsum[part] > 0, acc[part] / wsum[part], np.float32(np.nan))
                if pending is not None:
                    pending.result()
                pending = write_pool.submit(emit, row + top, out)
            keep = window - done
            if keep > 0:
                acc[:keep] = acc[done:]
                wsum[:keep] = wsum[done:]
            acc[max(keep, 0):] = 0.0
            wsum[max(keep, 0):] = 0.0
        if pending is not None:
            pending.result()


# === Output ===

def encode(prob: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantise float probability (NaN = nodata) to the uint8 probability and mask rasters."""
    nodata = np.isnan(prob)
    p = np.where(nodata, 0.0, prob)
    q = np.rint(np.clip(p, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)
    mask = (p >= threshold).astype(np.uint8)
    q[nodata] = NODATA
    mask[nodata] = NODATA
    return q, mask


def _tiled_profile(width: int, height: int, crs, transform: Affine, dtype: str,
                   nodata: float) -> dict:
    return dict(driver="GTiff", width=width, height=height, count=1, dtype=dtype, crs=crs,
                transform=transform, nodata=nodata, tiled=True, blockxsize=_BLOCK,
                blockysize=_BLOCK, compress="deflate", zlevel=1, bigtiff="IF_SAFER")


class _PairWriter:
    """Writes encoded rows of probability and mask into two intermediate GeoTIFFs."""

    def __init__(self, prob_path: Path, mask_path: Path, profile: dict, threshold: float):
        self.threshold = threshold
        self.prob = rasterio.open(prob_path, "w", **profile)
        self.mask = rasterio.open(mask_path, "w", **profile)
        self.prob.set_band_description(1, f"car probability x {PROB_SCALE} (255 = nodata)")
        self.mask.set_band_description(1, "car mask: 1 car, 0 background (255 = nodata)")
        self._lock = threading.Lock()

    def __call__(self, row: int, prob: np.ndarray) -> None:
        q, m = encode(prob, self.threshold)
        win = Window(0, row, prob.shape[1], prob.shape[0])
        with self._lock:
            self.prob.write(q, 1, window=win)
            self.mask.write(m, 1, window=win)

    def close(self) -> None:
        self.prob.close()
        self.mask.close()


def _write_cogs(prob_tmp: Path, mask_tmp: Path, prob_out: Path, mask_out: Path,
                tags: dict) -> None:
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    profile = cog_profiles.get("deflate")
    # Inference is over by now, so compression may use every core.
    config = {"GDAL_NUM_THREADS": "ALL_CPUS", "GDAL_CACHEMAX": _GDAL_ENV["GDAL_CACHEMAX"]}
    with atomic_path(prob_out) as tmp_prob, atomic_path(mask_out) as tmp_mask:
        # Average overviews keep probability meaningful when zoomed out; a mask needs nearest.
        cog_translate(prob_tmp, tmp_prob, profile, overview_resampling="average",
                      in_memory=False, quiet=True, additional_cog_metadata=tags,
                      config=config)
        cog_translate(mask_tmp, tmp_mask, profile, overview_resampling="nearest",
                      in_memory=False, quiet=True, additional_cog_metadata=tags,
                      config=config)


# === The stage ===

def check_compatible(src, scene: Path, metadata: dict) -> None:
    """Refuse a scene whose bands or dtype the model was not trained on."""
    bands = [int(b) for b in metadata["bands"]]
    if src.count < max(bands):
        raise InputError(f"{scene}: has {src.count} band(s) but the model reads bands {bands}")
    dtype = str(metadata["dtype"])
    if src.dtypes[0] != dtype:
        raise InputError(f"{scene}: pixels are {src.dtypes[0]} but the model was trained on "
                         f"{dtype}; convert the scene (gdal_translate -ot) or retrain")
    if src.width < 1 or src.height < 1:
        raise InputError(f"{scene}: raster is empty")


def predict_scene(scene: Path, model_dir: Path, out_dir: Path, *,
                  cfg: PredictConfig) -> tuple[Path, Path]:
    """Predict one scene into ``out_dir/probability/<stem>.tif`` and ``out_dir/masks/<stem>.tif``.

    Returns:
        (probability COG, mask COG), both on exactly the scene's grid.

    Raises:
        InputError: the scene is unreadable, not georeferenced, or has bands or a dtype the
            model does not take; or the model bundle is missing.
    """
    scene, model_dir, out_dir = Path(scene), Path(model_dir), Path(out_dir)
    metadata = read_metadata(model_dir)
    prob_out = out_dir / "probability" / f"{scene.stem}.tif"
    mask_out = out_dir / "masks" / f"{scene.stem}.tif"
    with rasterio.Env(**_GDAL_ENV):
        src = open_scene(scene)
        try:
            check_compatible(src, scene, metadata)
            bundle = get_bundle(model_dir)
            window, overlap = window_geometry(cfg, bundle.metadata)
            threshold = cfg.threshold if cfg.threshold is not None else bundle.threshold
            tags = {"model": str(Path(model_dir).resolve() / MODEL_FILE),
                    "data_fingerprint": str(bundle.metadata.get("data_fingerprint", "")),
                    "threshold": f"{threshold:g}", "window": str(window),
                    "overlap": str(overlap), "tta": str(cfg.tta),
                    "prob_scale": str(PROB_SCALE)}
            out_dir.mkdir(parents=True, exist_ok=True)
            # Intermediates live beside the outputs (same disk, scene-sized), hidden from scene
            # listings, and go away even after a kill (the next run sweeps them).
            with temp_dir(out_dir) as tmp:
                profile = _tiled_profile(src.width, src.height, src.crs, src.transform,
                                         "uint8", NODATA)
                writer = _PairWriter(tmp / "prob.tif", tmp / "mask.tif", profile, threshold)
                try:
                    _predict_into(src, scene, bundle, writer, tmp, window=window,
                                  overlap=overlap, cfg=cfg)
                finally:
                    writer.close()
                _write_cogs(tmp / "prob.tif", tmp / "mask.tif", prob_out, mask_out, tags)
        finally:
            src.close()
    log.info("%s: wrote %s and %s", scene.name, prob_out, mask_out)
    return prob_out, mask_out


def _predict_into(src, scene: Path, bundle: Bundle, writer: _PairWriter, tmp: Path, *,
                  window: int, overlap: int, cfg: PredictConfig) -> None:
    """Predict on the scene's grid, or on the model's GSD and bring the result back."""
    opts = dict(window=window, overlap=overlap, batch_size=cfg.batch_size, tta=cfg.tta)
    src_gsd = pixel_size(src.transform)
    model_gsd = bundle.gsd
    if not model_gsd or abs(src_gsd - model_gsd) / model_gsd <= GSD_TOLERANCE:
        predict_grid(_StripReader(src, scene, bundle.bands), bundle, emit=writer, **opts)
        return

    # === Another GSD: predict on a warped grid at the model's GSD, then reproject back ===
    scale = src_gsd / model_gsd
    width = max(1, round(src.width * scale))
    height = max(1, round(src.height * scale))
    transform = src.transform @ Affine.scale(src.width / width, src.height / height)
    log.info("%s: GSD %.3g m resampled to the model's %.3g m (%dx%d px)",
             scene.name, src_gsd, model_gsd, width, height)
    warped_path = tmp / "model_grid.tif"
    vrt_opts = dict(crs=src.crs, transform=transform, width=width, height=height,
                    resampling=Resampling.bilinear)
    if src.nodata is not None:
        vrt_opts["nodata"] = src.nodata
    profile = _tiled_profile(width, height, src.crs, transform, "float32", float("nan"))
    with WarpedVRT(src, **vrt_opts) as vrt, rasterio.open(warped_path, "w", **profile) as dst:
        def emit_float(row: int, prob: np.ndarray) -> None:
            dst.write(prob, 1, window=Window(0, row, prob.shape[1], prob.shape[0]))

        predict_grid(_StripReader(vrt, scene, bundle.bands), bundle, emit=emit_float,
                     **opts)

    # Back to the scene's grid strip by strip; validity comes from the scene itself.
    reader = _StripReader(src, scene, bundle.bands)
    with rasterio.open(warped_path) as warped:
        for row in range(0, src.height, _BLOCK):
            n = min(_BLOCK, src.height - row)
            dst_transform = window_transform(Window(0, row, src.width, n), src.transform)
            prob = _reproject_strip(warped, (n, src.width), dst_transform, src.crs,
                                    Resampling.bilinear)
            _, valid = reader.read(row, n)
            holes = valid & np.isnan(prob)
            if holes.any():
                # Bilinear leaves a thin rim unset where it lacks neighbours; nearest fills it.
                near = _reproject_strip(warped, (n, src.width), dst_transform, src.crs,
                                        Resampling.nearest)
                prob = np.where(holes, np.nan_to_num(near, nan=0.0), prob)
            writer(row, np.where(valid, prob, np.nan).astype(np.float32))


def _reproject_strip(warped, shape: tuple[int, int], dst_transform: Affine, crs,
                     resampling: Resampling) -> np.ndarray:
    from rasterio.warp import reproject

    out = np.full(shape, np.nan, dtype=np.float32)
    reproject(rasterio.band(warped, 1), out, src_nodata=np.nan, dst_transform=dst_transform,
              dst_crs=crs, dst_nodata=np.nan, resampling=resampling)
    return out
