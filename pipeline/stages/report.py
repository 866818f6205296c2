"""The HTML report: training curves, metrics, cars per scene, overlays; PNGs beside index.html.

Every section is optional: a missing piece (no history, no evaluation because there is no
ground truth, no RGB scene for the crops) becomes a sentence in the report, never an error.

Where the RGB scene of a prediction comes from, first match wins: a ``source`` (or
``scene_path``) key in ``out_dir/logs/<scene>.predict.json`` or a ``SOURCE`` tag of the
probability GeoTIFF naming an existing file; else ``<data_dir>/incoming/<scene>.tif``, then
``<data_dir>/raw/images/<scene>.tif``. Without a scene, the crops are skipped with a note.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.config import ReportConfig
from pipeline.files import atomic_path, read_json_if_any
from pipeline.io import list_vectors, read_vector, vector_file
from pipeline.layout import BATCH, EVALUATION, Layout
from pipeline.scenes import list_scenes

log = logging.getLogger(__name__)

# True positive, false positive, false negative (colour-blind safe: blue, orange, magenta).
COLOURS = {"tp": (0.0, 0.45, 0.95), "fp": (1.0, 0.55, 0.0), "fn": (0.95, 0.0, 0.85)}
PRED_ONLY = (0.0, 0.9, 0.9)
PNG_PREFIX = "fig_"
TRAINING_VIEW_PX = 1024  # side of the training-scene view when the scene is larger


# === Small readers ===

def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return "–"
    if isinstance(value, list | dict):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>nothing to show</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(_maybe_num(r.get(c)))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _maybe_num(value):
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


# === Figures ===

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, dst_dir: Path, name: str) -> str:
    plt = _plt()
    path = dst_dir / f"{PNG_PREFIX}{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path.name


def plot_history(history: list[dict], dst_dir: Path) -> str | None:
    """Training curves: loss and every metric with its ``val_`` twin, one panel each."""
    if not history:
        return None
    plt = _plt()
    columns = [c for c in history[0] if c not in ("epoch", "lr", "learning_rate")]
    base = sorted({c.removeprefix("val_") for c in columns}, key=lambda c: (c != "loss", c))
    epochs = [_num(r.get("epoch", i)) for i, r in enumerate(history)]
    fig, axes = plt.subplots(1, len(base), figsize=(4.2 * len(base), 3.2), squeeze=False)
    for ax, name in zip(axes[0], base, strict=True):
        for col, style in ((name, "-"), (f"val_{name}", "--")):
            if col in columns:
                ax.plot(epochs, [_num(r[col]) for r in history], style, marker=".", label=col)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, dst_dir, "training")


def plot_thresholds(rows: list[dict], threshold: float | None, dst_dir: Path) -> str | None:
    """Pixel precision, recall and F1 against the probability threshold."""
    if not rows:
        return None
    plt = _plt()
    t = [_num(r["threshold"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key in ("precision", "recall", "f1"):
        ax.plot(t, [_num(r[key]) for r in rows], marker=".", label=key)
    if threshold is not None:
        ax.axvline(threshold, color="grey", ls=":", label=f"model threshold {threshold:.2f}")
    ax.set_xlabel("probability threshold")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, dst_dir, "thresholds")


def plot_cars(summary: list[dict], dst_dir: Path) -> str | None:
    """Bar chart of cars found per scene."""
    rows = [r for r in summary if r.get("status", "ok") == "ok"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2), 3.4))
    ax.bar([r["scene"] for r in rows], [_num(r["cars"]) for r in rows], color="#3b75af")
    ax.set_ylabel("cars")
    ax.set_title("cars per scene")
    ax.tick_params(axis="x", rotation=45 if len(rows) > 4 else 0)
    return _save(fig, dst_dir, "cars_per_scene")


def scene_path(scene: str, out_dir: Path, data_dir: Path | None) -> Path | None:
    """The RGB scene a prediction came from (see the module docstring for the lookup order)."""
    entry = dict(read_json_if_any(Layout(out=out_dir).log(scene, "predict")) or {})
    prob_tif = Layout(out=out_dir).probability(scene)
    if prob_tif.exists():
        import rasterio

        with rasterio.open(prob_tif) as src:
            entry.update({k.lower(): v for k, v in src.tags().items()
                          if k.lower() in ("source", "scene_path")})
    for key in ("source", "scene_path"):
        if entry.get(key) and Path(entry[key]).exists():
            return Path(entry[key])
    if data_dir is not None:
        for folder in ("incoming", "raw/images"):
            for suffix in (".tif", ".tiff"):
                path = Path(data_dir) / folder / f"{scene}{suffix}"
                if path.exists():
                    return path
    return None


def _rgb(src, window, bands: list[int], size: int) -> np.ndarray:
    from rasterio.enums import Resampling

    bands = [b for b in bands if 1 <= b <= src.count][:3] or [1]
    window = window.round_offsets().round_lengths()
    if (window.height, window.width) == (size, size):
        # Same grid: a plain boundless read. (A boundless read with out_shape goes through a
        # VRT that squeezes partly-outside windows into the corner.)
        data = src.read(bands, window=window, boundless=True, fill_value=0).astype(np.float32)
    else:
        data = src.read(bands, window=window, boundless=True, fill_value=0,
                        out_shape=(len(bands), size, size),
                        resampling=Resampling.bilinear).astype(np.float32)
    if len(bands) < 3:
        data = np.repeat(data[:1], 3, axis=0)
    lo, hi = np.nanpercentile(data, 2), np.nanpercentile(data, 98)
    return np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1).transpose(1, 2, 0)


def _crop_centres(scene: str, objects: list[dict], cars, n: int, inside=None
                  ) -> list[tuple[float, float, str]]:
    """Map points to centre crops on: errors first (FN, FP), then hits, else predicted cars.

    ``inside(x, y)`` says whether a crop centred there stays within the scene; such points are
    preferred, so crops show imagery rather than the padding beyond the scene's edge.
    """
    mine = [o for o in objects if o["scene"] == scene]
    if inside is not None:
        mine.sort(key=lambda o: not inside(_num(o["x"]), _num(o["y"])))
    picked: list[tuple[float, float, str]] = []
    if mine:
        groups = [("missed car", [o for o in mine if o["kind"] == "truth" and o["matched"] != "True"]),
                  ("false positive", [o for o in mine if o["kind"] == "pred" and o["matched"] != "True"]),
                  ("found car", [o for o in mine if o["kind"] == "truth" and o["matched"] == "True"])]
        while len(picked) < n and any(g for _, g in groups):
            for label, group in groups:
                if group and len(picked) < n:
                    o = group.pop(0)
                    picked.append((_num(o["x"]), _num(o["y"]), label))
    elif cars is not None and len(cars):
        step = max(1, len(cars) // max(n, 1))
        for geom in list(cars.geometry)[::step][:n]:
            c = geom.centroid
            picked.append((c.x, c.y, "predicted car"))
    return picked


def plot_crops(scene: str, *, out_dir: Path, data_dir: Path | None, truth, objects: list[dict],
               bands: list[int], cfg: ReportConfig, dst_dir: Path) -> tuple[str | None, str]:
    """One figure of crops: predictions over truth on the RGB scene. Returns (png, note)."""
    import rasterio
    import rasterio.features
    import rasterio.windows
    from rasterio.windows import Window


    src_path = scene_path(scene, out_dir, data_dir)
    if src_path is None:
        return None, f"{scene}: RGB scene not found (looked in logs and DATA/incoming)"
    mask_path = Layout(out=out_dir).mask(scene)
    cars_file = Layout(out=out_dir).find_cars(scene)
    cars = read_vector(cars_file) if cars_file else None
    with rasterio.open(mask_path) as msk:
        height, width, to_pixel = msk.height, msk.width, ~msk.transform
    half = cfg.crop_size // 2

    def inside(x: float, y: float) -> bool:
        col, row = to_pixel * (x, y)
        return half <= col <= width - half and half <= row <= height - half

    centres = _crop_centres(scene, objects, cars, cfg.crops, inside)
    if not centres:
        return None, f"{scene}: no cars to show"
    plt = _plt()
    fig, axes = plt.subplots(1, len(centres), figsize=(3.2 * len(centres), 3.4), squeeze=False)
    half = cfg.crop_size // 2
    with rasterio.open(src_path) as src, rasterio.open(mask_path) as msk:
        gdf_truth = None
        if truth is not None and len(truth):
            gdf_truth = truth.to_crs(msk.crs) if truth.crs != msk.crs else truth
        for ax, (x, y, label) in zip(axes[0], centres, strict=True):
            row, col = msk.index(x, y)
            win = Window(col - half, row - half, cfg.crop_size, cfg.crop_size)
            wt = msk.window_transform(win)
            pred = msk.read(1, window=win, boundless=True, fill_value=255) == 1
            # Read the scene by map bounds, so a scene on another grid still lines up.
            sw = src.window(*rasterio.windows.bounds(win, msk.transform))
            rgb = _rgb(src, sw, bands, cfg.crop_size)
            img = rgb.copy()
            if gdf_truth is not None:
                true = rasterio.features.rasterize(
                    [(g, 1) for g in gdf_truth.geometry if g is not None and not g.is_empty],
                    out_shape=pred.shape, transform=wt, fill=0, dtype="uint8").astype(bool)
                layers = {"tp": pred & true, "fp": pred & ~true, "fn": ~pred & true}
            else:
                layers = {"pred": pred}
            for key, sel in layers.items():
                colour = np.array(COLOURS.get(key, PRED_ONLY))
                img[sel] = 0.45 * img[sel] + 0.55 * colour
            ax.imshow(img, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
    legend = ("blue = true positive, orange = false positive, magenta = false negative"
              if truth is not None and len(truth) else "cyan = predicted car (no ground truth)")
    fig.suptitle(f"{scene}: {legend}", fontsize=9)
    return _save(fig, dst_dir, f"crops_{scene}"), ""


def plot_training_scene(data_dir: Path, dst_dir: Path) -> tuple[str | None, str]:
    """One training scene with its label footprints, drawn by ``pipeline.stages.sample``."""
    images = list_scenes(Path(data_dir) / "raw" / "images")
    labels = list_vectors(Path(data_dir) / "raw" / "labels")
    if not images or not labels:
        return None, "no training scenes with labels in DATA/raw"
    try:
        from pipeline.stages.sample import plot_scene_with_labels
    except ImportError:
        return None, "pipeline.stages.sample.plot_scene_with_labels is not available"
    import pandas as pd

    frames = [read_vector(p, role="labels") for p in labels]
    crs = next((f.crs for f in frames if f.crs is not None), None)
    gdf = pd.concat([f.to_crs(crs) for f in frames if len(f)], ignore_index=True)
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(images[0]) as src:
        width, height = src.width, src.height
    window = None
    if width * height > TRAINING_VIEW_PX**2:  # a readable view, not a whole large scene
        size = TRAINING_VIEW_PX
        window = Window(max(0, (width - size) // 2), max(0, (height - size) // 2),
                        min(size, width), min(size, height))
    png = dst_dir / f"{PNG_PREFIX}training_scene.png"
    with atomic_path(png) as tmp:
        plot_scene_with_labels(images[0], gdf, tmp, window=window)
    return png.name, f"training scene {images[0].stem}"


# === The page ===

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:.6em 0}.scroll{overflow-x:auto}.note{color:#777;font-style:italic}
"""


def _figure(png: str | None, alt: str) -> str:
    return f'<img src="{html.escape(png)}" alt="{html.escape(alt)}">' if png else ""


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(title: str, func, *args, **kwargs) -> str:
    """Run one section builder; any failure becomes a note, never a failed report."""
    try:
        return f"<h2>{html.escape(title)}</h2>" + func(*args, **kwargs)
    except Exception as exc:  # a broken piece must not hide the rest of the report
        log.warning("report section %r failed: %s", title, exc)
        return f"<h2>{html.escape(title)}</h2>" + _note(f"could not draw this section: {exc}")


def build_report(dst_dir: Path, *, model_dir: Path, out_dir: Path, data_dir: Path | None,
                 cfg: ReportConfig) -> Path:
    """Write ``dst_dir/index.html`` and its PNG figures.

    Figures are written atomically one by one and the page last, so ``index.html`` never points
    at a missing figure. Other files in ``dst_dir`` (such as Make's ``settings.json``) are kept.

    Returns:
        The path of ``index.html``.
    """
    dst_dir, model_dir, out_dir = Path(dst_dir), Path(model_dir), Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else None
    dst_dir.mkdir(parents=True, exist_ok=True)
    metadata = read_json_if_any(model_dir / "metadata.json")
    metrics = read_json_if_any(Layout(out=out_dir).metrics)
    summary = _read_csv(Layout(out=out_dir).summary)
    parts = [f"<h1>Car detection report: {html.escape(dst_dir.name)}</h1>",
             f"<p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Model "
             f"<code>{html.escape(str(model_dir))}</code>, predictions "
             f"<code>{html.escape(str(out_dir))}</code>.</p>"]
    parts.append(_section("Model", _model_section, metadata, model_dir))
    parts.append(_section("Training", _training_section, model_dir, dst_dir))
    parts.append(_section("Cars per scene", _cars_section, summary, out_dir, dst_dir))
    parts.append(_section("Evaluation", _evaluation_section, metrics, metadata, out_dir, dst_dir))
    parts.append(_section("Predictions over truth", _crops_section, summary, metrics, metadata,
                          out_dir, data_dir, cfg, dst_dir))
    if (Layout(out=out_dir).out_folder(BATCH) / "batch.json").exists():
        parts.append(_section("Batch", _batch_section, out_dir, dst_dir))
    if data_dir is not None:
        parts.append(_section("Training data", _training_data_section, data_dir, dst_dir))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>carseg report {html.escape(dst_dir.name)}</title><style>{STYLE}</style>"
            "</head><body>" + "\n".join(parts) + "</body></html>\n")
    target = dst_dir / "index.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    # Figures of pieces that no longer exist must not linger; removed only once the new page
    # is in place, so a crash never leaves a page pointing at a missing figure.
    for old in dst_dir.glob(f"{PNG_PREFIX}*.png"):
        if f'src="{old.name}"' not in page:
            old.unlink()
    return target


def _model_section(metadata: dict | None, model_dir: Path) -> str:
    if metadata is None:
        return _note(f"no model metadata ({model_dir / 'metadata.json'} missing)")
    keys = ["threshold", "gsd", "bands", "dtype", "chip_size", "keras_backend"]
    rows = [{"key": k, "value": metadata[k]} for k in keys if k in metadata]
    val = metadata.get("val_metrics") or {}
    rows += [{"key": f"validation {k}", "value": v} for k, v in sorted(val.items())]
    return _table(rows, ["key", "value"])


def _training_section(model_dir: Path, dst_dir: Path) -> str:
    history = _read_csv(model_dir / "history.csv")
    if not history:
        return _note(f"no training history ({model_dir / 'history.csv'} missing)")
    return _figure(plot_history(history, dst_dir), "training curves")


def _cars_section(summary: list[dict], out_dir: Path, dst_dir: Path) -> str:
    if not summary:
        return _note(f"no vectors yet ({out_dir / 'cars' / 'summary.csv'} missing)")
    return _figure(plot_cars(summary, dst_dir), "cars per scene") + _table(summary)


def _evaluation_section(metrics: dict | None, metadata: dict | None, out_dir: Path,
                        dst_dir: Path) -> str:
    if metrics is None:
        return _note("no evaluation: no ground truth was given (make evaluate TRUTH=...), so "
                     "only predictions are shown")
    overall = metrics.get("overall", {})
    rows = []
    for level in ("pixel", "object"):
        m = overall.get(level, {})
        rows.append({"level": level, **{k: m.get(k) for k in
                                        ("precision", "recall", "f1", "iou", "tp", "fp", "fn")}})
    html_parts = [_table(rows), "<h3>Count</h3>",
                  _table([overall.get("count", {})], ["truth_cars", "pred_cars", "total_error",
                                                     "mean_abs_error", "relative_error"]),
                  "<h3>Recall by car size (m²)</h3>",
                  _table(overall.get("recall_by_size", []),
                         ["min_m2", "max_m2", "truth_cars", "recall"])]
    per_scene = _read_csv(Layout(out=out_dir).out_folder(EVALUATION) / "per_scene.csv")
    html_parts += ["<h3>Per scene</h3>", _table(per_scene)]
    thr = (metadata or {}).get("threshold")
    png = plot_thresholds(_read_csv(Layout(out=out_dir).out_folder(EVALUATION) / "thresholds.csv"),
                          float(thr) if thr is not None else None, dst_dir)
    html_parts += ["<h3>Precision and recall against threshold (pixels)</h3>",
                   _figure(png, "precision and recall against threshold")
                   or _note("no probability rasters to sweep thresholds")]
    return "".join(html_parts)


def _crops_section(summary: list[dict], metrics: dict | None, metadata: dict | None,
                   out_dir: Path, data_dir: Path | None, cfg: ReportConfig, dst_dir: Path) -> str:
    if cfg.crops == 0:
        return _note("crops are turned off (report.crops=0)")
    scenes = [p.stem for p in list_scenes(Layout(out=out_dir).out_masks)]
    if not scenes:
        return _note("no predicted scenes")
    truth = None
    if metrics and metrics.get("truth") and vector_file(metrics["truth"]).exists():
        truth = read_vector(metrics["truth"], role="truth")
    objects = _read_csv(Layout(out=out_dir).out_folder(EVALUATION) / "objects.csv") if metrics else []
    bands = (metadata or {}).get("bands") or [1, 2, 3]
    if not all(isinstance(b, int) for b in bands):
        bands = [1, 2, 3]  # band names, not indexes: the first three are the RGB convention
    out = []
    for scene in scenes:
        png, note = plot_crops(scene, out_dir=out_dir, data_dir=data_dir, truth=truth,
                               objects=objects, bands=bands, cfg=cfg,
                               dst_dir=dst_dir)
        out.append(_figure(png, f"crops of {scene}") or _note(note))
    return "".join(out)


def _training_data_section(data_dir: Path, dst_dir: Path) -> str:
    png, note = plot_training_scene(data_dir, dst_dir)
    return (f"<p>{html.escape(note)}</p>" + _figure(png, note)) if png else _note(note)




# === Batch products ===

def plot_batch_map(out_dir: Path, dst_dir: Path) -> str | None:
    """Scene footprints over the density grid (or the zones coloured by cars per hectare)."""
    import geopandas as gpd
    import rasterio

    from pipeline.styles import quiet_style_table

    batch = Layout(out=out_dir).out_folder(BATCH)
    catalog = read_json_if_any(batch / "catalog.json")
    manifest = read_json_if_any(batch / "batch.json") or {}
    if catalog is None or not manifest.get("crs"):
        return None
    crs = manifest["crs"]
    footprints, names = [], []
    for link in catalog.get("links", []):
        if link.get("rel") != "item":
            continue
        item = read_json_if_any((batch / link["href"]).resolve())
        if item is None:
            continue
        footprints.append(item["geometry"])
        names.append(item["id"])
    if not footprints:
        return None
    import shapely.geometry

    scenes = gpd.GeoDataFrame({"scene": names},
                              geometry=[shapely.geometry.shape(g) for g in footprints],
                              crs=4326).to_crs(crs)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    density = batch / "density.tif"
    zones = batch / "zones.gpkg"
    if zones.exists():
        with quiet_style_table():
            table = read_vector(zones)
        table.plot(ax=ax, column="cars_per_ha", cmap="BuPu", legend=True, edgecolor="0.3",
                   legend_kwds={"label": "cars per hectare"})
    elif density.exists():
        with rasterio.open(density) as src:
            grid = src.read(1, masked=True)
            left, bottom, right, top = src.bounds
        image = ax.imshow(grid, extent=(left, right, bottom, top), cmap="BuPu",
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, label="cars per hectare", shrink=0.6)
    scenes.boundary.plot(ax=ax, color="#d95f02", linewidth=1.2)
    for _, row in scenes.iterrows():
        c = row.geometry.representative_point()
        ax.annotate(row.scene, (c.x, c.y), color="#d95f02", fontsize=8, ha="center")
    ax.set_title(f"scene footprints and car density ({crs})")
    ax.set_aspect("equal")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    return _save(fig, dst_dir, "batch_map")


def _batch_section(out_dir: Path, dst_dir: Path) -> str:
    from pipeline.styles import quiet_style_table

    batch = Layout(out=out_dir).out_folder(BATCH)
    manifest = read_json_if_any(batch / "batch.json") or {}
    summary = [{"scenes": len(manifest.get("per_scene", {})), "crs": manifest.get("crs"),
                "detections": manifest.get("detections"), "cars": manifest.get("cars"),
                "merged_across_scenes": manifest.get("merged"),
                "calibrated": manifest.get("calibrated")}]
    per_scene = [{"scene": k, **v} for k, v in sorted(manifest.get("per_scene", {}).items())]
    parts = [_table(summary),
             _figure(plot_batch_map(out_dir, dst_dir), "scene footprints and car density"),
             "<h3>Cars per scene after the merge</h3>", _table(per_scene),
             "<h3>Seams: cars seen by two overlapping scenes and merged</h3>",
             _table(_read_csv(batch / "seams.csv"))]
    zones = batch / "zones.gpkg"
    if zones.exists():
        with quiet_style_table():
            table = read_vector(zones)
        columns = [c for c in table.columns if c != table.geometry.name]
        rows = table[columns].head(200).to_dict("records")
        level = table["level"].iloc[0] if len(table) and "level" in table else 0.9
        parts += [f"<h3>Cars per zone ({level:.0%} interval)</h3>",
                  _note("expected: the number of real cars among the detections, from the "
                        "calibrated per-car probabilities; lo-hi: the interval that holds it "
                        "with the stated probability (see the README, Batch products)."),
                  _table(rows, columns)]
        if len(table) > 200:
            parts.append(_note(f"first 200 of {len(table)} zones; all in {zones}"))
    return "".join(parts)
