"""Where to label next: squares of the scenes where the model is least sure, ranked.

A person labelling more cars teaches the model most where it is unsure or wrong, not where it
already agrees with itself and with the labels. The scenes are cut into squares of a chip's
size on each scene's own grid (``geo.grid_windows``, the ``fit`` rule, so every square is
whole), and each square gets three shares of its valid pixels, all on one scale:

- ``uncertain``: the probability lies within ``suggest.band`` of the car threshold (the model
  cannot decide; ``mean_pq`` beside it is the mean of p(1 - p), a smoother reading);
- ``flip``: the prediction of the horizontally flipped square, flipped back, disagrees with
  the prediction (a model that has learnt cars, not a texture, sees them mirrored too); this
  costs two forward passes per square, so only the ``suggest.flip_candidates`` x ``top_n``
  best squares by the other shares get it;
- ``false_cars`` / ``missed_cars`` (training scenes only): predicted car where the labels have
  none, and labelled car the model missed.

The score is their sum, the reason the largest. The batch's squares use the probability
rasters predict wrote (``OUT/probability``: uint8, p = value / ``PROB_SCALE``, 255 nodata);
the training scenes are predicted once, with the same ``predict_scene``, into a scratch
folder that is removed afterwards, so ``OUT/probability`` only ever holds the batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.files import temp_dir
from pipeline.geo import NODATA, PROB_SCALE, grid_windows, gsd_m
from pipeline.io import write_vector
from pipeline.scenes import open_scene, scene_name

log = logging.getLogger(__name__)

LAYER = "label_next"
TARGET = f"{LAYER}.gpkg"
SHARES = ("uncertain", "flip", "false_cars", "missed_cars")
REASONS = {"uncertain": "probability near the threshold",
           "flip": "flipped prediction disagrees",
           "false_cars": "labels: cars predicted where none are labelled",
           "missed_cars": "labels: labelled cars the model missed"}
# Pixels read around a square for the flip check, so the square's own pixels see their
# context as they do in a whole-scene prediction (rounded up to the model's multiple).
FLIP_CONTEXT = 16


@dataclass(frozen=True)
class Sources:
    """What to rank: the batch's scenes with their probability rasters, the training scenes."""

    batch: tuple[tuple[Path, Path], ...] = ()  # (scene image, OUT/probability/<scene>.tif)
    training: tuple[Path, ...] = ()  # labelled training scenes
    labels: tuple[Path, ...] = ()  # their label files


@dataclass(frozen=True)
class _Context:
    """What every square is scored with: the bundle's metadata, the threshold, the settings."""

    metadata: dict
    threshold: float
    cfg: Config


@dataclass
class _Square:
    scene: str
    image: Path
    kind: str  # "batch" or "training"
    window: tuple[int, int, int, int]  # col_off, row_off, width, height
    geometry: object
    crs: object
    valid: float
    shares: dict = field(default_factory=dict)


def build_suggestions(target: Path, sources: Sources, *, model_dir: Path, cfg: Config) -> Path:
    """Rank squares of the batch and training scenes by uncertainty; write the top ones.

    Args:
        target: ``OUT/suggest/label_next.gpkg`` (a ``.qml`` style is written beside it).
        sources: the scenes to rank.
        model_dir: the model bundle (threshold, chip size, the model for the flip check).
        cfg: all settings (``suggest``, ``predict`` for the training scenes, ``labels``).

    Returns:
        The GeoPackage written: one layer of squares, ``rank`` 1 the first to label.
    """
    from pipeline.bundle import read_metadata

    target = Path(target)
    metadata = read_metadata(model_dir)
    threshold = cfg.predict.threshold or float(metadata["threshold"])
    ctx = _Context(metadata, threshold, cfg)
    squares = []
    for image, prob in sources.batch:
        squares += _score_scene(image, prob, "batch", None, ctx)
    if sources.training and cfg.suggest.training:
        squares += _score_training(sources, target.parent, model_dir, ctx)
    if not squares:
        raise InputError(f"{target.parent}: no square of any scene has enough valid pixels "
                         "to rank (suggest.min_valid_fraction)")
    if cfg.suggest.flip:
        _add_flip(squares, model_dir, threshold, cfg)
    return _write(squares, target, cfg)


def _score_training(sources: Sources, scratch_parent: Path, model_dir: Path, ctx: _Context
                    ) -> list[_Square]:
    """Predict each training scene once into scratch and score its squares against labels."""
    from pipeline.stages.predict import predict_scene
    from pipeline.stages.rasterize import load_labels

    cfg = ctx.cfg
    labels = load_labels(list(sources.labels), cfg=cfg.labels) if sources.labels else None
    squares: list[_Square] = []
    scratch_parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(scratch_parent) as tmp:
        for image in sources.training:
            prob, _mask = predict_scene(image, model_dir, tmp, cfg=cfg.predict)
            squares += _score_scene(image, prob, "training", labels, ctx)
    return squares


def _square_side(src, metadata: dict) -> int:
    """A chip's side in this scene's pixels (chips are cut at the model's GSD)."""
    chip = int(metadata["chip_size"])
    model_gsd = metadata.get("gsd")
    if not model_gsd:
        return chip
    return max(8, round(chip * float(model_gsd) / gsd_m(src.transform, src.crs)))


def _score_scene(image: Path, prob_tif: Path, kind: str, labels, ctx: _Context
                 ) -> list[_Square]:
    """Every whole square of one scene with enough valid pixels, with its cheap shares."""
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds
    from shapely.geometry import box

    cfg, s, threshold = ctx.cfg, ctx.cfg.suggest, ctx.threshold
    out = []
    with open_scene(prob_tif) as src:
        side = min(_square_side(src, ctx.metadata), src.width, src.height)
        near = _labels_near(labels, src, cfg) if labels is not None else None
        for win in grid_windows(src.width, src.height, side, 0, edge="fit"):
            stored = src.read(1, window=win)
            valid = stored != NODATA
            if valid.mean() < s.min_valid_fraction:
                continue
            p = stored.astype(np.float32) / PROB_SCALE
            n = int(valid.sum())
            shares = {"uncertain": float(np.sum(valid & (np.abs(p - threshold) <= s.band))) / n,
                      "mean_pq": float(np.sum(np.where(valid, p * (1 - p), 0))) / n,
                      "flip": 0.0, "false_cars": 0.0, "missed_cars": 0.0}
            if near is not None:
                truth = _burn(near, src, win, all_touched=cfg.labels.all_touched)
                car = p >= threshold
                shares["false_cars"] = float(np.sum(valid & car & ~truth)) / n
                shares["missed_cars"] = float(np.sum(valid & truth & ~car)) / n
            geom = box(*window_bounds(Window(*win.flatten()), src.transform))
            out.append(_Square(scene_name(image), Path(image), kind,
                               tuple(int(v) for v in win.flatten()), geom, src.crs,
                               n / valid.size, shares))
    log.info("%s: %d squares of %d px scored (%s)", scene_name(image), len(out), side, kind)
    return out


def _labels_near(labels, src, cfg: Config):
    from pipeline.stages.rasterize import scene_labels

    return scene_labels(labels, src.bounds, src.crs, cfg.labels)


def _burn(near, src, win, *, all_touched: bool) -> np.ndarray:
    """The labels' car pixels on one square's grid (the spatial index finds the candidates)."""
    import rasterio.features
    from rasterio.windows import bounds as window_bounds
    from rasterio.windows import transform as window_transform
    from shapely.geometry import box

    shape = (int(win.height), int(win.width))
    hits = near.sindex.query(box(*window_bounds(win, src.transform))) if len(near) else []
    if not len(hits):
        return np.zeros(shape, bool)
    burned = rasterio.features.rasterize(
        [(g, 1) for g in near.geometry.iloc[np.sort(hits)]], out_shape=shape,
        transform=window_transform(win, src.transform), fill=0, dtype="uint8",
        all_touched=all_touched)  # as the training masks were burned
    return burned.astype(bool)


def _score(sq: _Square) -> float:
    return float(sum(sq.shares[k] for k in SHARES))


def _add_flip(squares: list[_Square], model_dir: Path, threshold: float, cfg: Config) -> None:
    """The flip share of the best squares so far (two forward passes each)."""
    from pipeline.stages.predict import get_bundle

    bundle = get_bundle(model_dir, "float32", "keras")
    n = cfg.suggest.top_n * cfg.suggest.flip_candidates
    best = _pick(squares, n, cfg.suggest.training_share, spacing=cfg.suggest.spacing,
                 per_scene=cfg.suggest.per_scene)
    for sq in best:
        sq.shares["flip"] = _flip_share(sq, bundle, threshold)


def _flip_share(sq: _Square, bundle, threshold: float) -> float:
    """Share of the square's valid pixels where the mirrored prediction disagrees."""
    from rasterio.plot import reshape_as_image
    from rasterio.windows import Window

    from pipeline.geo import valid_mask

    col, row, width, height = sq.window
    with open_scene(sq.image) as src:
        if bundle.gsd and abs(gsd_m(src.transform, src.crs) / float(bundle.gsd) - 1) > 0.05:
            return 0.0  # predict resamples such a scene; a native read would mislead
        pad = FLIP_CONTEXT
        c0, r0 = max(0, col - pad), max(0, row - pad)
        c1, r1 = min(src.width, col + width + pad), min(src.height, row + height + pad)
        data = src.read(bundle.bands, window=Window(c0, r0, c1 - c0, r1 - r0))
        valid = valid_mask(data, src.nodata, None)
    m = bundle.multiple
    extra_r, extra_c = (-data.shape[1]) % m, (-data.shape[2]) % m
    data = np.pad(data, ((0, 0), (0, extra_r), (0, extra_c)), mode="symmetric")
    x = bundle.prepare(reshape_as_image(data))
    both = np.stack([x, x[:, ::-1]])
    prob = np.asarray(bundle.model.predict_on_batch(both), np.float32)[..., 0]
    plain, mirrored = prob[0], prob[1][:, ::-1]
    inner = (slice(row - r0, row - r0 + height), slice(col - c0, col - c0 + width))
    differ = (plain[inner] >= threshold) != (mirrored[inner] >= threshold)
    ok = valid[inner]
    return float(np.sum(differ & ok)) / max(int(ok.sum()), 1)


def _ranked(squares: list[_Square]) -> list[_Square]:
    return sorted(squares, key=lambda sq: (-_score(sq), sq.scene, sq.window[1], sq.window[0]))


def _pick(squares: list[_Square], top_n: int, share: float, *, spacing: float = 0.0,
          per_scene: float = 0.0) -> list[_Square]:
    """The best ``top_n``, ``share`` of them from the training scenes where both sets have
    enough (a training square's label disagreement adds to its score, so without a quota the
    batch, where new labels help most, would never show); the rest spill over either way.
    Within each set the picks are spread (``_spread``)."""
    training = _spread(_ranked([sq for sq in squares if sq.kind == "training"]), top_n,
                       spacing, per_scene)
    batch = _spread(_ranked([sq for sq in squares if sq.kind == "batch"]), top_n, spacing,
                    per_scene)
    n_train = min(len(training), max(round(top_n * share), top_n - len(batch)))
    return _ranked(training[:n_train] + batch[:top_n - n_train])


def _spread(ranked: list[_Square], n: int, spacing: float, per_scene: float) -> list[_Square]:
    """Up to ``n`` of the ranked squares, best first, spread out: a square whose centre lies
    within ``spacing`` square sides of a square already picked in its scene is passed over
    (one unsure car at a square's corner makes its neighbours unsure too; labelling one of
    them is enough), and no scene gives more than ``per_scene`` of ``n`` (rounded up) until
    every scene has had its turn; only then are the passed-over squares taken, best first
    (a square with nothing unsure about it comes last, however far from the others)."""
    if spacing <= 0 and per_scene <= 0:
        return ranked[:n]
    cap = math.ceil(n * per_scene) if per_scene > 0 else n
    picked: list[_Square] = []
    taken: set[int] = set()
    for limit in (cap, n):  # the cap first; then fill up to n without it
        count: dict[str, int] = {}
        for sq in picked:
            count[sq.scene] = count.get(sq.scene, 0) + 1
        for i, sq in enumerate(ranked):
            if len(picked) >= n:
                break
            if (i in taken or _score(sq) <= 0 or count.get(sq.scene, 0) >= limit
                    or _near(sq, picked, spacing)):
                continue
            picked.append(sq)
            taken.add(i)
            count[sq.scene] = count.get(sq.scene, 0) + 1
    rest = [sq for i, sq in enumerate(ranked) if i not in taken]
    return _ranked(picked + rest[:n - len(picked)])


def _near(sq: _Square, picked: list[_Square], spacing: float) -> bool:
    """Whether ``sq``'s centre lies within ``spacing`` sides of a picked square's centre."""
    col, row, width, height = sq.window
    side = max(width, height)
    for other in picked:
        if other.scene != sq.scene or other.image != sq.image:
            continue
        oc, orow, ow, oh = other.window
        dx = (col + width / 2) - (oc + ow / 2)
        dy = (row + height / 2) - (orow + oh / 2)
        if math.hypot(dx, dy) < spacing * side:
            return True
    return False


def _write(squares: list[_Square], target: Path, cfg: Config) -> Path:
    """The top squares as one styled layer (one CRS: the one most squares are in)."""
    from collections import Counter

    import geopandas as gpd

    from pipeline.styles import suggest_qml, write_qml

    s = cfg.suggest
    top = _pick(squares, s.top_n, s.training_share, spacing=s.spacing, per_scene=s.per_scene)
    crs = Counter(sq.crs.to_string() for sq in top).most_common(1)[0][0]
    frames = []
    for rank, sq in enumerate(top, start=1):
        reason = max(SHARES, key=lambda k: sq.shares[k])
        row = {"rank": rank, "scene": sq.scene, "reason": REASONS[reason],
               "score": round(_score(sq), 4), "set": sq.kind,
               **{k: round(v, 4) for k, v in sq.shares.items()},
               "valid_fraction": round(sq.valid, 4), "col_off": sq.window[0],
               "row_off": sq.window[1], "size_px": sq.window[2], "image": str(sq.image)}
        one = gpd.GeoDataFrame([row], geometry=[sq.geometry], crs=sq.crs)
        frames.append(one.to_crs(crs) if one.crs.to_string() != crs else one)
    gdf = gpd.GeoDataFrame(_concat(frames), geometry="geometry", crs=crs)
    target.parent.mkdir(parents=True, exist_ok=True)
    qml = suggest_qml(max(len(top), 1))
    write_qml(target, qml)  # the sidecar first: the GeoPackage is the stage's "done"
    write_vector(gdf, target, layer=LAYER, style=qml, geometry_type="Polygon")
    log.info("%s: the %d squares to label next (best score %.3f)", target, len(top),
             _score(top[0]) if top else math.nan)
    return target


def _concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)
