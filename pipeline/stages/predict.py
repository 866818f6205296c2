"""Sliding-window prediction of a scene into probability and mask COGs.

The scene is read one block of windows at a time (a row of windows, ``window`` rows high, taken
in chunks of about ``CHUNK_COLS`` columns), windows are batched through the model, and each
window's probabilities are blended into a chunk accumulator with a smooth weight that is zero on
the window's inner edges (where a convolution sees padding) and cosine-squared across the rest of
the overlap, so no seam shows. Pixels that no later window touches are flushed to an intermediate
tiled GeoTIFF straight away and only the overlaps are carried on, so memory depends on the window
and the chunk, not on the scene's size (bar an ``overlap``-row seam as wide as the scene); the
COGs are then built from those files with ``rio_cogeo`` (which streams too). A reader thread
prefetches the next block and a writer thread writes the previous one while the model runs, so
wall time stays close to the model's own time.

The bundle's contract is honoured: bands are picked and normalised as in training, a scene at
another GSD is warped to the model's GSD and the probability brought back to the scene's grid,
and a scene the model cannot take (too few bands, another dtype) is refused with one clear line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.plot import reshape_as_image
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from pipeline.bundle import METADATA_FILE, MODEL_FILE, Bundle, load_bundle, read_metadata
from pipeline.config import ONNX_FLOAT32_ONLY, PredictConfig
from pipeline.engine_choice import REFERENCE, Choice, choose_engine
from pipeline.engines import EXPORTED_ENGINES, engine_model, with_precision
from pipeline.errors import InputError, first_line
from pipeline.files import atomic_path, progress_bar, temp_dir
from pipeline.geo import NODATA, PROB_SCALE, axis_windows, gsd_m, valid_mask
from pipeline.layout import Layout
from pipeline.scenes import open_scene, scene_name
from pipeline.styles import mask_qml, probability_qml, write_qml

log = logging.getLogger(__name__)

GSD_TOLERANCE = 0.01  # relative GSD difference beyond which the scene is resampled
_EPS = 1e-6  # weight floor for valid pixels, so every one of them has a positive total weight
_BLOCK = 256  # block size of the intermediate GeoTIFFs
_FLUSH_PIXELS = 2**20  # pixels handed to the writer at a time
# Frame columns of windows predicted and blended together: with the overlap-row seam, all that
# memory holds, so it is flat in the scene's width and height.
CHUNK_COLS = 4096
# Overlap from the receptive field (predict.overlap = None): the dead margin at each inner
# window edge is this share of the half-field, and the cos^2 ramp between two margins is this
# share of one margin.
# A U-Net's effective receptive field is much smaller than its theoretical one (the weights of
# far pixels are tiny); bench.seams measures what is left at this share.
CONTEXT_SHARE = 0.5
RAMP_SHARE = 0.5
DEFAULT_FIELD = 128  # receptive field assumed when a model's cannot be measured
# Pixels per forward pass (batch x window area): one 2048^2 window (the default; never fewer
# than one), 1 of 1040^2 (a 1024 window plus a lattice step), 28 of 272^2; the default U-Net
# then peaks near 2.3 GB on a CPU with Keras and near 3.6 GB with ONNX Runtime (its arena).
MAX_BATCH_PIXELS = 2 * 1024 * 1024
# GDAL's block cache defaults to 5% of RAM and fills up as large outputs stream through it; a
# small one is enough for strip-by-strip writes and keeps memory flat whatever the scene size.
# (rasterio passes an integer straight to GDALSetCacheMax64, so it is in bytes, not MB.)
_GDAL_ENV = {"GDAL_CACHEMAX": 32 * 2**20, "GDAL_TIFF_INTERNAL_MASK": True}


# === Model bundle, cached per process ===

@functools.lru_cache(maxsize=4)
def _cached_bundle(model_dir: str, stamp: tuple[int, int], precision: str, engine: str,
                   choice: str = "") -> Bundle:
    """The bundle with its model ready to run on ``engine`` at ``precision``.

    Whatever cannot be had (the engine's package, an export, a bf16 rebuild) falls back,
    with a warning, to Keras and then to float32: predicting slower is better than not
    predicting, and the warning says which engine ran (tests fail on it unless they expect it).
    ``choice``: how ``auto`` came to this engine, for the COG tags ("" = set by the user).
    """
    if (engine, precision) == REFERENCE and not choice:
        log.info("loading model %s", model_dir)
        bundle = load_bundle(model_dir)
        return dataclasses.replace(bundle, metadata={
            **bundle.metadata, "inference_precision": precision, "inference_engine": engine,
            "engine_choice": "", "receptive_field": bundle.receptive_field})
    exact = _cached_bundle(model_dir, stamp, "float32", "keras")
    model = exact.model
    if engine in EXPORTED_ENGINES:
        try:
            model = engine_model(exact.model, Path(model_dir) / MODEL_FILE, engine, precision)
        except Exception as exc:  # noqa: BLE001 - any failure means: use Keras
            log.warning("%s: %s unavailable (%s); using Keras", model_dir,
                        EXPORTED_ENGINES[engine][0], first_line(exc))
            engine = "keras"
    if engine == "keras" and precision != "float32":
        try:
            model = with_precision(exact.model, precision)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be rebuilt stays exact
            log.warning("%s: staying float32 (%s cannot be rebuilt: %s)", model_dir, precision,
                        first_line(exc))
            precision = "float32"
    metadata = {**exact.metadata, "inference_precision": precision, "inference_engine": engine,
                "engine_choice": choice}
    return dataclasses.replace(exact, model=model, metadata=metadata)


@functools.lru_cache(maxsize=4)
def _auto(model_dir: str, stamp: tuple[int, int], engine: str, precision: str,
          shape: tuple[int, int, int]) -> Choice:
    """``auto`` resolved once per process, model and window shape (``choose_engine``)."""
    return choose_engine(_cached_bundle(model_dir, stamp, "float32", "keras"), engine, precision,
                         shape)


def get_bundle(model_dir: Path | str, precision: str = "float32", engine: str = "keras", *,
               cfg: PredictConfig | None = None) -> Bundle:
    """Load a model bundle once per process (a Dask worker reuses it for every scene).

    ``precision`` and ``engine`` are ``predict.precision`` / ``predict.engine`` values; ``auto``
    in either is chosen by measurement on windows of ``cfg`` (``predict.window`` and
    ``batch_size``), per process, so a Dask worker decides on its own CPU. The cache key
    includes the model and metadata mtimes, so a retrained model is picked up.
    """
    model_dir = Path(model_dir).resolve()
    read_metadata(model_dir)  # raises the clear InputError when the bundle is missing
    model_path = model_dir / MODEL_FILE
    if not model_path.exists():
        raise InputError(f"{model_path}: model not found; run `make train` first")
    if engine == "onnxruntime" and precision == "bfloat16":
        raise InputError(ONNX_FLOAT32_ONLY)
    stamp = (model_path.stat().st_mtime_ns, (model_dir / METADATA_FILE).stat().st_mtime_ns)
    if "auto" not in (engine, precision):
        return _cached_bundle(str(model_dir), stamp, precision, engine)
    cfg = cfg or PredictConfig()
    exact = _cached_bundle(str(model_dir), stamp, "float32", "keras")
    side = window_geometry(cfg, exact.metadata, exact.receptive_field).window
    shape = (max(1, min(cfg.batch_size, MAX_BATCH_PIXELS // side**2)), side, side)
    choice = _auto(str(model_dir), stamp, engine, precision, shape)
    return _cached_bundle(str(model_dir), stamp, choice.precision, choice.engine, choice.summary)


# === Window geometry and blending weights ===

@dataclass(frozen=True)
class Geometry:
    """How a scene is cut into inference windows.

    Attributes:
        window: ``predict.window`` rounded to the model's multiple; windows are at most one
            multiple longer (see ``_frame_axis``).
        overlap: pixels shared by neighbouring windows (a multiple of the model's multiple).
        margin: pixels next to a window's inner edge that get no weight at all.
        multiple: window sides and strides are multiples of this (2 ** U-Net depth).
        receptive_field: side of one output pixel's context in input pixels (None = unknown).
    """

    window: int
    overlap: int
    margin: int
    multiple: int
    receptive_field: int | None


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def window_geometry(cfg: PredictConfig, metadata: dict,
                    receptive_field: int | None = None) -> Geometry:
    """The window, overlap and dead margin to predict with.

    The window is ``cfg.window`` (independent of the training chip size: the U-Net is fully
    convolutional, and one big window computes far fewer pixels twice than many chip-sized
    ones), rounded up to the model's size multiple. With ``cfg.overlap`` None the overlap comes
    from the model's receptive field: a pixel closer to a window's edge than half the field is
    computed partly from padding, so its value depends on where the window falls. Each inner
    edge drops ``margin`` = a share of that half-field outright (weight 0) and blends across the
    rest of the overlap; measured on the project's U-Nets (``bench.seams``), the context beyond
    ``CONTEXT_SHARE`` of the half-field moves a probability by well under 1/254, so a crop then
    predicts like the whole scene whatever its windows. All sizes are multiples of the model's
    multiple, so every window sits on the model's pooling lattice. Of the overlap, the margin is
    1 / (2 + ``RAMP_SHARE``) at each end and the ramp the rest, given or computed alike.
    """
    multiple = int(metadata.get("size_multiple", 1))
    window = _round_up(cfg.window, multiple)
    if cfg.overlap is None:
        half = (receptive_field or DEFAULT_FIELD) / 2
        overlap = _round_up((2 + RAMP_SHARE) * CONTEXT_SHARE * half, multiple)
    else:
        overlap = _round_up(cfg.overlap, multiple) if cfg.overlap else 0
    # Neighbouring ramps must not cross, and a window must move forward.
    overlap = min(overlap, window // 2 // multiple * multiple)
    margin = max(round(overlap / (2 + RAMP_SHARE)), min(2, overlap // 2))
    if cfg.overlap is not None and overlap != cfg.overlap:
        log.info("overlap %d set to %d (a multiple of %d, at most half the %d px window)",
                 cfg.overlap, overlap, multiple, window)
    return Geometry(window, overlap, margin, multiple, receptive_field)


def lattice_phase(transform: Affine, multiple: int) -> tuple[int, int]:
    """(row, col) of the scene's first pixel on the map's pooling lattice, modulo ``multiple``.

    Pixel (r, c) of a north-up scene is pixel (r + R, c + C) of the map-wide grid of its pixel
    size, with C = x0 / a and R = y0 / e; a crop of the scene has the same grid shifted by whole
    pixels. Windows start at ``-phase``, i.e. on multiples of ``multiple`` of that map-wide grid,
    so a crop's windows pool the same 2x2 blocks as the whole scene's, whatever its offset: the
    U-Net is shift-equivariant only for shifts that are multiples of 2 ** depth.
    """
    if multiple <= 1 or transform.b != 0 or transform.d != 0:
        return 0, 0
    col = round(transform.c / transform.a) % multiple
    row = round(transform.f / transform.e) % multiple
    return int(row), int(col)


def _frame_axis(length: int, phase: int, geometry: Geometry) -> tuple[int, list[int]]:
    """Window side and starts along one axis, in frame coordinates (the scene starts at phase).

    The layout is ``geo.axis_windows``' ``past`` rule: windows on the pooling lattice, the
    fewest of at most ``geometry.window`` px plus one lattice step (below), shrunk to the
    smallest lattice multiple that covers (a 700 px scene is one 704 px window, not a 1280 px
    one mostly made of padding).

    A window may be one lattice step longer than ``geometry.window``: the frame starts up to
    ``multiple - 1`` px before the scene, and without the step a scene of exactly ``window`` px
    whose origin is off the lattice (almost every scene) would be cut into two windows a side,
    four of them overlapping, computing ~1.2 times its pixels instead of ~1.02 times.
    """
    layout = axis_windows(length, geometry.window + geometry.multiple, geometry.overlap,
                          edge="past", phase=phase, multiple=geometry.multiple)
    return layout.size, [s + phase for s in layout.starts]


def edge_ramp(size: int, overlap: int, margin: int | None = None) -> np.ndarray:
    """1-D weights of a window's leading edge: 0 on a margin, then a cos^2 rise, then 1.

    The margin drops the pixels a convolution computes partly from the window's padding; the
    ramp fills the rest of the overlap. A neighbour's trailing ramp is this one mirrored, and
    sin^2 + cos^2 = 1, so the blend is a partition of unity.
    """
    # Built at least one overlap long, then cut: a window narrower than the overlap (a scene
    # of a few pixels, one window, no neighbour) gets the ramp's start, not a broadcast error.
    ramp = np.ones(max(size, overlap), dtype=np.float32)
    if overlap <= 0:
        return ramp[:size]
    if margin is None:
        margin = max(overlap // 4, min(2, overlap // 2))
    ramp[:margin] = 0.0
    n = overlap - 2 * margin
    if n > 0:
        t = (np.arange(n, dtype=np.float64) + 0.5) / n
        ramp[margin:margin + n] = (np.sin(np.pi / 2 * t) ** 2).astype(np.float32)
    return ramp[:size]


def axis_weight(offset: int, size: int, length: int, overlap: int,
                margin: int | None = None) -> np.ndarray:
    """1-D blending weight of a window at ``offset`` along an axis of ``length`` pixels.

    Only edges that have a neighbouring window are ramped: at the scene's true edge nothing else
    covers the pixels, so they keep full weight.
    """
    weight = np.ones(size, dtype=np.float32)
    ramp = edge_ramp(size, overlap, margin)
    if offset > 0:
        weight *= ramp
    if offset + size < length:
        weight *= ramp[::-1]
    return weight


# === Reading ===

class _StripReader:
    """Reads strips of a dataset (all of its width, or some columns) with their validity."""

    def __init__(self, src, scene: Path, bands: list[int]):
        self.src = src
        self.scene = scene
        self.bands = bands
        self.width, self.height = src.width, src.height
        # An internal mask or alpha band is a per-dataset mask; a nodata value is checked per
        # pixel across all bands by valid_mask (the GDAL convention for RGB orthophotos).
        self.use_dataset_mask = _has_mask(src)

    def read(self, row: int, rows: int, col: int = 0,
             cols: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(bands, rows, cols) data and (rows, cols) validity of the block at (``row``, ``col``).

        ``cols`` None reads to the scene's right edge. Rows above the scene's top (``row`` < 0)
        or past its bottom are filled by reflecting the rows read, columns left or right of the
        scene by reflecting the scene (``np.pad``'s ``symmetric`` rule, so a block of a padded
        frame equals the same block of the whole padded strip); both are marked invalid.
        """
        cols = self.width - col if cols is None else cols
        top = max(0, row)
        n = max(0, min(row + rows, self.height) - top)
        frame = np.arange(col, col + cols)
        inside = (frame >= 0) & (frame < self.width)
        pick = None
        left, span = col, cols
        if not inside.all():
            period = 2 * self.width
            folded = np.mod(frame, period)
            source = np.where(folded < self.width, folded, period - 1 - folded)
            left, span = int(source.min()), int(source.max() - source.min()) + 1
            pick = source - left
        win = Window(left, top, span, n)
        try:
            data = self.src.read(self.bands, window=win)
            mask = self.src.dataset_mask(window=win) if self.use_dataset_mask else None
        except RasterioError as exc:
            raise InputError(f"{self.scene}: cannot read pixels ({first_line(exc)})") from None
        valid = valid_mask(data, self.src.nodata, mask)
        if pick is not None:
            # The reflected columns as a few slices (left mirror, scene, right mirror): the
            # same pixels as ``data[:, :, pick]``, at copying speed rather than a gather's
            # (which cost three times the read itself on a 4096 px strip).
            runs = _runs(pick)
            data = np.concatenate([data[:, :, r] for r in runs], axis=2)
            valid = np.concatenate([valid[:, r] for r in runs], axis=1) & inside
        before, after = top - row, rows - n - (top - row)
        if before or after:
            data = np.pad(data, ((0, 0), (before, after), (0, 0)), mode="symmetric")
            valid = np.pad(valid, ((before, after), (0, 0)), constant_values=False)
        return data, valid


def _runs(index: np.ndarray) -> list[slice]:
    """``index`` (steps of +1 or -1, as reflected columns are) as the fewest slices."""
    index = np.asarray(index, dtype=np.int64)
    steps = np.diff(index)
    runs, start = [], 0
    while start < len(index):
        step = int(steps[start]) if start < len(steps) and abs(steps[start]) == 1 else 1
        rest = steps[start:] != step  # the run ends before the first other step
        end = start + (int(np.argmax(rest)) if rest.any() else len(rest))
        stop = int(index[end]) + step
        runs.append(slice(int(index[start]), stop if stop >= 0 else None, step))
        start = end + 1
    return runs


# === Inference ===

def normalize_into(image: np.ndarray, mean: np.ndarray, std: np.ndarray, out: np.ndarray) -> None:
    """``bundle.prepare(image)`` (``(float32(image) - mean) / std``) written into ``out``.

    The same operations in the same float32 order, so the values are identical, without the
    three window-sized temporaries: on a 1280 px window they cost as much time as the blending.
    """
    np.subtract(image, mean, out=out, dtype=np.float32)
    np.divide(out, std, out=out)


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


def _chunks(cols: list[int], win_w: int, overlap: int, batch_size: int,
            chunk_cols: int) -> list[list[int]]:
    """Window columns grouped into chunks of about ``chunk_cols`` frame columns.

    A chunk holds a multiple of ``batch_size`` windows, so a row's batches are the same as if
    the whole row were one chunk (a model may round differently at another batch shape). Only
    windows skipped for having no valid pixel can regroup a row's batches.
    """
    per = max(1, chunk_cols // max(1, win_w - overlap))
    per = math.ceil(per / batch_size) * batch_size
    return [cols[k:k + per] for k in range(0, len(cols), per)]


def predict_grid(reader: _StripReader, bundle: Bundle, *, geometry: Geometry,
                 phase: tuple[int, int], batch_size: int, tta: bool,
                 emit: Callable[[int, int, np.ndarray], None], predictor=None,
                 chunk_cols: int = CHUNK_COLS) -> None:
    """Predict every window of ``reader``'s grid and emit finished blocks of blended probability.

    Windows are laid out in a frame that starts ``phase`` (rows, cols) pixels before the scene,
    on the map's pooling lattice (see ``lattice_phase``); pixels outside the scene are filled by
    reflection and get no weight. Each row of windows is taken in chunks of about
    ``chunk_cols`` columns, left to right: a chunk's windows are read, predicted and blended
    into a chunk-sized accumulator, and its pixels that no later window touches are final.
    What a later window still adds to is carried: the chunk's right overlap (``overlap``
    columns, to the next chunk) and its bottom overlap (``overlap`` rows, to the next row of
    windows, in a seam as wide as the frame). Every pixel gets the same additions in the same
    order as with one accumulator for the whole strip, so the result is bit for bit the same;
    memory holds one chunk and the ``overlap``-row seam, whatever the scene's size.

    ``emit(row_off, col_off, prob)`` receives float32 blocks on the scene's grid with NaN at
    nodata, rows of windows top to bottom and chunks left to right, in a writer thread.
    """
    width, height = reader.width, reader.height
    win_h, rows = _frame_axis(height, phase[0], geometry)
    win_w, cols = _frame_axis(width, phase[1], geometry)
    frame_w = cols[-1] + win_w  # the strip's width in the frame: the scene plus padding
    overlap, margin = geometry.overlap, geometry.margin
    col_weights = {c: axis_weight(c, win_w, frame_w, overlap, margin) for c in cols}
    # A batch is capped in pixels: a few big windows already keep every core busy, and
    # activations grow with the batch's pixels.
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // (win_h * win_w)))
    chunks = _chunks(cols, win_w, overlap, batch_size, chunk_cols)
    # Where each chunk's final columns end: the next chunk's first window, or the frame's edge.
    ends = [nxt[0] for nxt in chunks[1:]] + [frame_w]
    tasks = [(i, k) for i in range(len(rows)) for k in range(len(chunks))]
    # The bottom overlap of the last row of windows, frame-wide (acc, wsum): rows the next row
    # of windows adds to. The stride is constant, so it is the same height for every row.
    seam_h = win_h - (rows[1] - rows[0]) if len(rows) > 1 else 0
    seam = np.zeros((2, seam_h, frame_w), dtype=np.float32)
    carry: np.ndarray | None = None  # (acc, wsum) of the previous chunk's right overlap
    predictor = predictor or _Predictor(bundle.model, batch_size, tta)
    n_bands = len(bundle.bands)
    mean, std = (np.asarray(bundle.metadata["normalization"][k], dtype=np.float32)
                 for k in ("mean", "std"))
    emitted = 0  # scene pixels handed to the writer so far

    def read(task: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        i, k = task
        c0 = chunks[k][0]
        return reader.read(rows[i] - phase[0], win_h, c0 - phase[1], chunks[k][-1] + win_w - c0)

    with ThreadPoolExecutor(1, thread_name_prefix="read") as read_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
        next_block: Future = read_pool.submit(read, tasks[0])
        pending: Future | None = None
        bar = progress_bar(len(rows) * len(cols), "windows", "window")
        for t, (i, k) in enumerate(tasks):
            data, valid = next_block.result()
            if t + 1 < len(tasks):
                next_block = read_pool.submit(read, tasks[t + 1])
            image = reshape_as_image(data)  # (rows, cols, bands) once, before Keras
            chunk, c0, end = chunks[k], chunks[k][0], ends[k]
            row, span = rows[i], chunk[-1] + win_w - c0
            done = rows[i + 1] - row if i + 1 < len(rows) else win_h  # rows final after this
            # The accumulator starts from what earlier windows added: the seam above, then
            # the previous chunk's right overlap (which already holds the seam's share).
            acc = np.zeros((2, win_h, span), dtype=np.float32)
            if i > 0:
                acc[:, :seam_h] = seam[:, :, c0:c0 + span]
            if k > 0:
                acc[:, :, :carry.shape[2]] = carry
            row_weight = axis_weight(row, win_h, rows[-1] + win_h, overlap, margin)
            # Windows without one valid pixel are not worth a forward pass (nodata borders).
            live = [c for c in chunk if valid[:, c - c0:c - c0 + win_w].any()]
            # One batch at a time, so memory holds batch_size windows, not a chunk of them.
            for start in range(0, len(live), batch_size):
                group = live[start:start + batch_size]
                batch = np.empty((len(group), win_h, win_w, n_bands), dtype=np.float32)
                for j, col in enumerate(group):
                    normalize_into(image[:, col - c0:col - c0 + win_w], mean, std, batch[j])
                probs = predictor(batch)
                for col, prob in zip(group, probs, strict=True):
                    x = slice(col - c0, col - c0 + win_w)
                    weight = np.maximum(np.outer(row_weight, col_weights[col]), _EPS)
                    weight *= valid[:, x]  # nodata and padding get no say
                    acc[0, :, x] += np.clip(prob, 0.0, 1.0) * weight
                    acc[1, :, x] += weight
            # Hand on what later windows still add to, then emit what is final.
            carry = acc[:, :, end - c0:].copy() if k + 1 < len(chunks) else None
            if done < win_h:
                seam[:, :, c0:end] = acc[:, done:, :end - c0]
            # Frame rows [row, row + done) are scene rows [row - phase, ...), clipped to it;
            # frame columns [c0, end) likewise.
            first, last = max(0, phase[0] - row), min(done, height + phase[0] - row)
            left, right = max(c0, phase[1]), min(end, width + phase[1])
            step = max(1, _FLUSH_PIXELS // max(1, right - left))
            for top in range(first, last if right > left else first, step):
                part = slice(top, min(last, top + step))
                x = slice(left - c0, right - c0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out = np.where(acc[1, part, x] > 0, acc[0, part, x] / acc[1, part, x],
                                   np.float32(np.nan))
                if pending is not None:
                    pending.result()
                pending = write_pool.submit(emit, row + top - phase[0], left - phase[1], out)
                emitted += out.size
            bar.update(len(chunk))
        bar.close()
        if pending is not None:
            pending.result()
    if emitted != height * width:  # a bookkeeping slip must never write a partial raster
        raise RuntimeError(f"predicted {emitted} of {height * width} pixels")


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

    def __call__(self, row: int, col: int, prob: np.ndarray) -> None:
        q, m = encode(prob, self.threshold)
        win = Window(col, row, prob.shape[1], prob.shape[0])
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
    with atomic_path(prob_out) as tmp_prob, atomic_path(mask_out) as tmp_mask, \
            ThreadPoolExecutor(2, thread_name_prefix="cog") as pool:
        # The two COGs side by side: each is mostly GDAL's (GIL-free) reading, overview
        # building and deflating, and one alone leaves a core idle between its steps.
        # Average overviews keep probability meaningful when zoomed out; a mask needs nearest.
        jobs = [pool.submit(cog_translate, source, target, dict(profile),
                            overview_resampling=resampling,
                            in_memory=False, quiet=True, additional_cog_metadata=tags,
                            config=config)
                for source, target, resampling in ((prob_tmp, tmp_prob, "average"),
                                                   (mask_tmp, tmp_mask, "nearest"))]
        for job in jobs:
            job.result()


# === The stage ===

def check_compatible(src, scene: Path, metadata: dict) -> None:
    """Refuse a scene whose bands or dtype the model was not trained on; say which bands it uses.

    Every band the model reads is checked (a VRT can mix dtypes), and a scene with more bands
    than the model reads is predicted from the model's bands, with a warning naming the rest.
    """
    bands = [int(b) for b in metadata["bands"]]
    if src.count < max(bands):
        raise InputError(f"{scene}: has {src.count} band(s) but the model reads bands {bands}")
    dtype = str(metadata["dtype"])
    wrong = [(b, src.dtypes[b - 1]) for b in bands if src.dtypes[b - 1] != dtype]
    if wrong:
        listed = ", ".join(f"band {b} is {t}" for b, t in wrong)
        raise InputError(f"{scene}: {listed} but the model was trained on {dtype}; convert the "
                         f"scene (gdal_translate -ot) or retrain")
    if src.width < 1 or src.height < 1:
        raise InputError(f"{scene}: raster is empty")
    alpha = {i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha}
    unused = [b for b in range(1, src.count + 1) if b not in bands and b not in alpha]
    if unused:
        log.warning("%s: has %d bands; the model reads bands %s and ignores band(s) %s",
                    scene.name, src.count, bands, unused)
    else:
        log.info("%s: the model reads bands %s", scene.name, bands)


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
    lay = Layout(out=out_dir)
    prob_out, mask_out = lay.probability(scene_name(scene)), lay.mask(scene_name(scene))
    with rasterio.Env(**_GDAL_ENV):
        src = open_scene(scene)
        try:
            check_compatible(src, scene, metadata)
            bundle = get_bundle(model_dir, cfg.precision, cfg.engine, cfg=cfg)
            geometry = window_geometry(cfg, bundle.metadata, bundle.receptive_field)
            threshold = cfg.threshold if cfg.threshold is not None else bundle.threshold
            tags = {"model": str(Path(model_dir).resolve() / MODEL_FILE),
                    "data_fingerprint": str(bundle.metadata.get("data_fingerprint", "")),
                    "threshold": f"{threshold:g}", "window": str(geometry.window),
                    "overlap": str(geometry.overlap), "margin": str(geometry.margin),
                    "tta": str(cfg.tta), "prob_scale": str(PROB_SCALE),
                    "precision": bundle.metadata["inference_precision"],
                    "engine": bundle.metadata["inference_engine"]}
            if bundle.metadata.get("engine_choice"):  # auto: what it measured, in one line
                tags["engine_choice"] = bundle.metadata["engine_choice"]
            # The model's post-processing, chosen on validation: vectors reads it from here.
            chosen = bundle.metadata.get("postprocess", {})
            tags.update({k: f"{chosen[k]:g}" for k in ("min_area_m2", "min_mean_prob",
                                                       "min_truncated_area_m2")
                         if chosen.get(k) is not None})
            out_dir.mkdir(parents=True, exist_ok=True)
            # Intermediates live beside the outputs (same disk, scene-sized), hidden from scene
            # listings, and go away even after a kill (the next run sweeps them).
            with temp_dir(out_dir) as tmp:
                profile = _tiled_profile(src.width, src.height, src.crs, src.transform,
                                         "uint8", NODATA)
                writer = _PairWriter(tmp / "prob.tif", tmp / "mask.tif", profile, threshold)
                try:
                    _predict_into(src, scene, bundle, writer, tmp, geometry=geometry, cfg=cfg)
                finally:
                    writer.close()
                # QGIS opens both styled: a probability ramp, the mask's cars in red (255
                # transparent). The styles go first: a scene counts as done once its COGs
                # exist, so a kill between the two must find the styles already there.
                for raster, qml in ((prob_out, probability_qml()), (mask_out, mask_qml())):
                    raster.parent.mkdir(parents=True, exist_ok=True)
                    write_qml(raster, qml)
                _write_cogs(tmp / "prob.tif", tmp / "mask.tif", prob_out, mask_out, tags)
        finally:
            src.close()
    log.info("%s: wrote %s and %s", scene.name, prob_out, mask_out)
    return prob_out, mask_out


def _has_mask(src) -> bool:
    """Whether validity comes from an internal mask or alpha band rather than a nodata value."""
    flags = src.mask_flag_enums[0] if src.count else ()
    return MaskFlags.per_dataset in flags or MaskFlags.alpha in flags


def gsd_to_predict_at(scene_gsd: float, metadata: dict) -> float | None:
    """The GSD a scene is predicted at: the bundle's, or (for a bundle trained over a range
    of GSDs, like the base) the scene's own inside that range and the nearest end outside.
    None: the scene's own."""
    if metadata.get("gsd_range"):
        low, high = metadata["gsd_range"]
        return None if low <= scene_gsd <= high else min(max(scene_gsd, low), high)
    return metadata.get("gsd")


def _predict_into(src, scene: Path, bundle: Bundle, writer: _PairWriter, tmp: Path, *,
                  geometry: Geometry, cfg: PredictConfig) -> None:
    """Predict on the scene's grid, or on the model's GSD and bring the result back."""
    opts = dict(geometry=geometry, batch_size=cfg.batch_size, tta=cfg.tta)
    src_gsd = gsd_m(src.transform, src.crs)  # metres, like the bundle's, in any CRS unit
    model_gsd = gsd_to_predict_at(src_gsd, bundle.metadata)
    if not model_gsd or abs(src_gsd - model_gsd) / model_gsd <= GSD_TOLERANCE:
        predict_grid(_StripReader(src, scene, bundle.bands), bundle, emit=writer,
                     phase=lattice_phase(src.transform, geometry.multiple), **opts)
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
    elif _has_mask(src):
        # The warper honours the scene's mask but writes plain zeros where it is off; an alpha
        # band on the warped grid carries the mask through, so masked pixels stay nodata.
        vrt_opts["add_alpha"] = True
    profile = _tiled_profile(width, height, src.crs, transform, "float32", float("nan"))
    with WarpedVRT(src, **vrt_opts) as vrt, rasterio.open(warped_path, "w", **profile) as dst:
        def emit_float(row: int, col: int, prob: np.ndarray) -> None:
            dst.write(prob, 1, window=Window(col, row, prob.shape[1], prob.shape[0]))

        predict_grid(_StripReader(vrt, scene, bundle.bands), bundle, emit=emit_float,
                     phase=lattice_phase(transform, geometry.multiple), **opts)

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
            writer(row, 0, np.where(valid, prob, np.nan).astype(np.float32))


def _reproject_strip(warped, shape: tuple[int, int], dst_transform: Affine, crs,
                     resampling: Resampling) -> np.ndarray:
    from rasterio.warp import reproject

    out = np.full(shape, np.nan, dtype=np.float32)
    reproject(rasterio.band(warped, 1), out, src_nodata=np.nan, dst_transform=dst_transform,
              dst_crs=crs, dst_nodata=np.nan, resampling=resampling)
    return out
