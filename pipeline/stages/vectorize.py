"""Car polygons from the stitched mask: one polygon per car, the same whatever the window size.

The mask is read window by window with a halo around each window, so memory stays bounded on
any scene size. Connected components are labelled in window + halo, and a component is kept
only by the window whose core holds its representative pixel (its first pixel in row-major
order). A component that does not touch the block's edge is seen whole, so its first pixel is
the same whatever the window size: every car is emitted by exactly one window, never cut in two
at a window boundary. The rare blob cut by the block's edge (larger than the halo, e.g. a row
of merged parked cars) is read again on a window grown around it until it is whole (up to
``MAX_BLOB_PX``), so the output never depends on where windows fall.

Each car carries ``edge_dist_m``, its distance from the scene's valid-data edge (nodata or the
raster's border), and ``truncated`` when it touches that edge; truncated cars smaller than
``min_truncated_area_m2`` are slivers of cars lying mostly outside the scene and are dropped
(in a batch, the neighbouring scene sees them whole). Unset, that minimum is the model's:
training learns it from how the labels treat cut cars (``postprocess.choose_truncated``) and
predict records it in the mask's tags, as it does the minimum area.

Touching cars are split (see ``split_component``) only when a blob is not car-shaped (low
solidity) or larger than one car: by a watershed on the distance transform or the probability,
seeded by the blob's separate cores, else, for a rectangle of cars, into the strips closest to a
typical car (``car_length_m`` by ``car_width_m``; no cut when the whole blob is closer to one car,
or to one car's axis-aligned box as a model taught by box labels draws it). A split is kept only
when every piece is still car-sized (``min_car_width_m`` wide, ``min_car_length_m`` long), so a
car's own mask is not cut into fragments.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.windows
import shapely
from affine import Affine
from rasterio.windows import Window
from scipy import ndimage

from pipeline.cars import COLUMNS, edge_distances, empty_cars, valid_footprint, write_cars
from pipeline.config import VectorConfig
from pipeline.errors import InputError
from pipeline.files import atomic_path, read_json_if_any, stage_log
from pipeline.geo import NODATA, PROB_SCALE, grid_windows, gsd_m, metres_per_unit
from pipeline.io import read_vector
from pipeline.layout import Layout
from pipeline.scenes import list_scenes, open_scene, scene_name
from pipeline.splitting import _EIGHT, rectangle_attributes, split_component

log = logging.getLogger(__name__)

# A blob is grown past its window only up to this many pixels, so memory stays bounded.
MAX_BLOB_PX = 4096 * 4096

def _core_windows(width: int, height: int, size: int) -> list[Window]:
    """Non-overlapping cores cut at the raster's edge (``geo.axis_windows``' ``clip`` rule)."""
    return grid_windows(width, height, size, 0, edge="clip")


def _one_polygon(parts: list):
    geom = shapely.union_all(parts) if len(parts) > 1 else parts[0]
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if geom.geom_type != "Polygon":
        polys = [g for g in getattr(geom, "geoms", []) if g.geom_type == "Polygon"]
        geom = max(polys, key=lambda g: g.area)  # only a diagonal pixel touch makes a multi
    return geom


def _read_block(mask_src, prob_src, block: Window):
    """Car pixels (bool) and probabilities (or None) of a window, nodata never a car."""
    cars = mask_src.read(1, window=block) == 1  # 255 (nodata) is never a car
    prob = None
    if prob_src is not None:
        prob = prob_src.read(1, window=block)
        cars &= prob != NODATA
    return cars, prob


def _clip(mask_src, row0: int, col0: int, row1: int, col1: int) -> Window:
    row0, col0 = max(0, row0), max(0, col0)
    row1, col1 = min(mask_src.height, row1), min(mask_src.width, col1)
    return Window(col0, row0, col1 - col0, row1 - row0)


def _cut(sl, block: Window, mask_src) -> bool:
    """True when a component's bounding box touches a block edge inside the raster."""
    return ((sl[0].start == 0 and block.row_off > 0)
            or (sl[1].start == 0 and block.col_off > 0)
            or (sl[0].stop == block.height and block.row_off + block.height < mask_src.height)
            or (sl[1].stop == block.width and block.col_off + block.width < mask_src.width))


def _whole_component(mask_src, prob_src, seed: tuple[int, int], block: Window, sl, halo: int):
    """Grow the read around a component cut by its block edge until it is seen whole.

    Returns (component crop, probability crop, crop's global (row, col) offset), or None when
    the blob outgrows ``MAX_BLOB_PX`` (memory stays bounded; such a blob is no car anyway).
    """
    r0, c0 = block.row_off + sl[0].start, block.col_off + sl[1].start
    r1, c1 = block.row_off + sl[0].stop, block.col_off + sl[1].stop
    while True:
        region = _clip(mask_src, r0 - halo, c0 - halo, r1 + halo, c1 + halo)
        if region.width * region.height > MAX_BLOB_PX:
            return None
        cars, prob = _read_block(mask_src, prob_src, region)
        labels, _ = ndimage.label(cars, structure=_EIGHT)
        value = labels[seed[0] - region.row_off, seed[1] - region.col_off]
        comp_sl = ndimage.find_objects((labels == value).astype(np.int32))[0]
        if not _cut(comp_sl, region, mask_src):
            comp = labels[comp_sl] == value
            crop_prob = prob[comp_sl] if prob is not None else None
            return comp, crop_prob, (region.row_off + comp_sl[0].start,
                                     region.col_off + comp_sl[1].start)
        r0, c0 = region.row_off + comp_sl[0].start, region.col_off + comp_sl[1].start
        r1, c1 = region.row_off + comp_sl[0].stop, region.col_off + comp_sl[1].stop


def _cars_in_window(mask_src, prob_src, core: Window, *, cfg: VectorConfig, gsd: float,
                    stats: dict) -> list[tuple[tuple[int, int], list[dict]]]:
    """Cars whose representative pixel lies in ``core``, each with its global sort key."""
    halo = cfg.halo
    block = _clip(mask_src, core.row_off - halo, core.col_off - halo,
                  core.row_off + core.height + halo, core.col_off + core.width + halo)
    cars, prob = _read_block(mask_src, prob_src, block)
    if not cars.any():
        return []
    labels, _ = ndimage.label(cars, structure=_EIGHT)

    def in_core(row: int, col: int) -> bool:
        return (core.row_off <= row < core.row_off + core.height
                and core.col_off <= col < core.col_off + core.width)

    out, seen = [], set()
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        # First pixel in row-major order: for a component seen whole, the same pixel whatever
        # the block, so exactly one window owns it.
        r, c = sl[0].start, sl[1].start + int(np.argmax(labels[sl[0].start, sl[1]] == i))
        seed = (r + block.row_off, c + block.col_off)
        if not _cut(sl, block, mask_src):
            if not in_core(*seed):
                continue  # another window owns this component
            comp = labels[sl] == i
            crop_prob = prob[sl] if prob is not None else None
            origin = (block.row_off + sl[0].start, block.col_off + sl[1].start)
            key = seed
        else:
            # Larger than the halo: only reading further shows where it really starts.
            # The piece holding the blob's first pixel overlaps the core if this window owns it.
            if not _overlaps_core(sl, block, core):
                continue
            whole = _whole_component(mask_src, prob_src, seed, block, sl, halo)
            if whole is None:
                stats["too_large"] += 1
                continue
            comp, crop_prob, origin = whole
            rr, cc = np.argwhere(comp)[0]  # argwhere is row-major: the first pixel
            key = (int(rr) + origin[0], int(cc) + origin[1])
            if not in_core(*key) or key in seen:
                continue  # owned by another window, or already done via another piece
            seen.add(key)
        records = _component_cars(comp, crop_prob, origin, cfg=cfg, gsd=gsd, stats=stats)
        out.append((key, records))
    _add_geometry([r for _, recs in out for r in recs], mask_src.transform, cfg=cfg,
                  unit=metres_per_unit(mask_src.crs))
    return out


def _add_geometry(records: list[dict], transform, *, cfg: VectorConfig, unit: float = 1.0
                  ) -> None:
    """Polygonize every car piece of a window in one ``shapes`` call (it is slow per call).

    Geometries stay in the scene's CRS; sizes are in metres (``unit``: metres per CRS unit).
    """
    if not records:
        return
    r0 = min(r["origin"][0] for r in records)
    c0 = min(r["origin"][1] for r in records)
    r1 = max(r["origin"][0] + r["piece"].shape[0] for r in records)
    c1 = max(r["origin"][1] + r["piece"].shape[1] for r in records)
    canvas = np.zeros((r1 - r0, c1 - c0), np.int32)
    for k, rec in enumerate(records, start=1):
        piece, (rr, cc) = rec.pop("piece"), rec.pop("origin")
        view = canvas[rr - r0:rr - r0 + piece.shape[0], cc - c0:cc - c0 + piece.shape[1]]
        view[piece] = k
    parts: dict[int, list] = {}
    # Polygonize in whole scene pixels (exact in floating point), then map to the CRS with the
    # scene's transform: bit-identical coordinates whatever window the car came from.
    for geom, value in rasterio.features.shapes(canvas, mask=canvas > 0, connectivity=8,
                                                transform=Affine.translation(c0, r0)):
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geom))
    matrix = np.array([[transform.a, transform.d], [transform.b, transform.e]])
    offset = np.array([transform.c, transform.f])
    for k, rec in enumerate(records, start=1):
        geom = shapely.transform(_one_polygon(parts[k]), lambda xy: xy @ matrix + offset)
        if cfg.regularize:
            geom = shapely.minimum_rotated_rectangle(geom)
        length, width, heading = rectangle_attributes(geom)
        rec.update({"area_m2": float(geom.area) * unit * unit, "length_m": length * unit,
                    "width_m": width * unit, "heading_deg": heading, "geometry": geom})


def _overlaps_core(sl, block: Window, core: Window) -> bool:
    r0, r1 = block.row_off + sl[0].start, block.row_off + sl[0].stop
    c0, c1 = block.col_off + sl[1].start, block.col_off + sl[1].stop
    return (r0 < core.row_off + core.height and core.row_off < r1
            and c0 < core.col_off + core.width and core.col_off < c1)


def _component_cars(comp: np.ndarray, crop_prob: np.ndarray | None, origin: tuple[int, int],
                    *, cfg: VectorConfig, gsd: float, stats: dict) -> list[dict]:
    """Split one whole blob into cars: each car's pixels, global (row, col) origin, probability."""
    px_area = gsd * gsd
    if comp.sum() * px_area < cfg.min_area_m2:
        stats["too_small"] += 1
        return []
    pieces = split_component(comp, gsd=gsd, cfg=cfg, prob=crop_prob)
    n_pieces = int(pieces.max())
    if n_pieces > 1:
        stats["split"] += 1
    records = []
    for k in range(1, n_pieces + 1):
        piece = pieces == k
        area = float(piece.sum() * px_area)
        if area < cfg.min_area_m2:
            stats["too_small"] += 1
            continue
        if area > cfg.max_area_m2:
            stats["too_large"] += 1
            continue
        if crop_prob is not None:
            values = crop_prob[piece].astype(np.float64) / PROB_SCALE
            mean_prob, max_prob = float(values.mean()), float(values.max())
            if mean_prob < cfg.min_mean_prob:
                stats["faint"] += 1
                continue
        else:
            mean_prob = max_prob = float("nan")
        records.append({"piece": piece, "origin": origin, "mean_prob": mean_prob,
                        "max_prob": max_prob})
    return records


def vectorize_scene(mask_tif: Path, out_dir: Path, *, cfg: VectorConfig) -> Path:
    """Polygonize one scene's car mask into ``out_dir/cars/<scene>.<format>``.

    Args:
        mask_tif: ``out_dir/masks/<scene>.tif`` (uint8, 1 car, 0 background, 255 nodata).
            The probability raster ``out_dir/probability/<scene>.tif`` gives ``mean_prob`` and
            ``max_prob``; without it those are NaN.
        out_dir: the output root.
        cfg: vectorizing settings.

    Returns:
        The vector file written (one polygon per car, in the scene's CRS).
    """
    import geopandas as gpd

    mask_tif, out_dir = Path(mask_tif), Path(out_dir)
    scene = mask_tif.stem
    lay = Layout(out=out_dir)
    prob_tif, target = lay.probability(scene), lay.cars(scene, cfg.format)
    with open_scene(mask_tif) as mask_src:
        if mask_src.count != 1 or mask_src.dtypes[0] != "uint8":
            raise InputError(f"{mask_tif}: expected a single-band uint8 car mask, got "
                             f"{mask_src.count} band(s) of {mask_src.dtypes[0]}")
        prob_src = None
        if prob_tif.exists():
            prob_src = open_scene(prob_tif)
            if (prob_src.width, prob_src.height, prob_src.transform) != (
                    mask_src.width, mask_src.height, mask_src.transform):
                prob_src.close()
                raise InputError(f"{prob_tif}: not on the grid of {mask_tif}")
        else:
            log.warning("%s: no probability raster; mean_prob/max_prob will be empty", prob_tif)
        # Unset minimum area / mean probability: the model's choice, recorded by predict.
        cfg = cfg.resolve(mask_src.tags())
        gsd = gsd_m(mask_src.transform, mask_src.crs)  # metres, whatever the CRS's unit
        crs = mask_src.crs
        stats = {"too_small": 0, "too_large": 0, "split": 0, "slivers": 0, "faint": 0}
        found = []
        try:
            for core in _core_windows(mask_src.width, mask_src.height, cfg.window):
                found += _cars_in_window(mask_src, prob_src, core, cfg=cfg, gsd=gsd, stats=stats)
            footprint = valid_footprint(mask_src, prob_src, window=cfg.window) if found else None
        finally:
            if prob_src is not None:
                prob_src.close()
    # Row-major order of representative pixels: the same file whatever the window size.
    found.sort(key=lambda item: item[0])
    records = [r for _, recs in found for r in recs]
    if records:
        gdf = gpd.GeoDataFrame(records, geometry="geometry", crs=crs)
        gdf.insert(0, "scene", scene)
        gdf["edge_dist_m"] = edge_distances(gdf.geometry.values, footprint) * \
            metres_per_unit(crs)
        # A car's pixels share an edge or corner with nodata or the raster's border: the
        # polygon touches the footprint's boundary (a quarter pixel allows for rounding).
        gdf["truncated"] = gdf["edge_dist_m"] <= 0.25 * gsd
        sliver = gdf["truncated"] & (gdf["area_m2"] < cfg.min_truncated_area_m2)
        stats["slivers"] = int(sliver.sum())
        gdf = gdf[~sliver].reset_index(drop=True)
        gdf = gdf[[*COLUMNS, "geometry"]]
    if not records or not len(gdf):
        gdf = empty_cars(crs)
    write_cars(gdf, target)
    log.info("%s: %d cars (%d blobs split, %d dropped as too small, %d as too large, %d as "
             "slivers cut by the scene edge, %d as faint)", scene, len(gdf), stats["split"],
             stats["too_small"], stats["too_large"], stats["slivers"], stats["faint"])
    return target


# === Summary ===

def _read_log(path: Path) -> dict | None:
    unreadable = {"status": "failed", "error": f"{path}: unreadable log"}
    return read_json_if_any(path, unreadable) if path.exists() else None


def write_summary(out_dir: Path, scenes: list[str] | None = None) -> Path:
    """Write ``out_dir/cars/summary.csv``: scene, cars, car_area_m2, seconds, status, error.

    Scenes are ``scenes`` (the batch's, from its image folder), else those of the predicted
    masks and the per-scene logs; a scene that failed in predict or vectors is listed with
    status ``failed`` and its error, and one without a valid pixel with status ``empty``
    and no car count.
    """
    from pipeline.scenes import EMPTY_REASON, EMPTY_STATUS, has_valid_pixels

    lay = Layout(out=Path(out_dir))
    logs = lay.logs
    if scenes is None:
        scenes = {scene_name(p) for p in list_scenes(lay.out_masks)}
        # Scene names may hold dots (city.2026.tile7): take the name from the log's name less
        # its fixed ".<stage>.json" ending, never from the first dot.
        for stage in ("predict", "vectors"):
            ending = f".{stage}.json"
            scenes |= {p.name[: -len(ending)] for p in logs.glob(f"*{ending}")}
    rows = []
    for scene in sorted(scenes):
        seconds, errors = 0.0, []
        for stage in ("predict", "vectors"):
            entry = _read_log(stage_log(logs, scene, stage))
            if entry is None:
                continue
            if entry.get("status") == "ok":
                seconds += float(entry.get("seconds", 0.0))
            else:
                errors.append(f"{stage}: {entry.get('error', 'failed')}")
        cars_file = lay.find_cars(scene)
        cars, area = 0, 0.0
        if cars_file is None and not errors:
            errors.append("vectors: no car file")
        elif cars_file is not None and not errors:
            try:
                gdf = read_vector(cars_file)
                # Square metres whatever the CRS's unit (State Plane layers are in feet).
                area = (float(gdf["area_m2"].sum()) if "area_m2" in gdf else
                        float(gdf.geometry.area.sum()) * metres_per_unit(gdf.crs) ** 2) \
                    if len(gdf) else 0.0
                cars = len(gdf)
            except InputError as exc:
                errors.append(f"vectors: {exc}")
        mask = lay.mask(scene)
        # A scene with no valid pixel was not looked at: no car count, and not "ok, 0 cars".
        empty = not errors and mask.exists() and not has_valid_pixels(mask)
        counted = not errors and not empty
        rows.append({"scene": scene, "cars": cars if counted else "",
                     "car_area_m2": round(area, 3) if counted else "",
                     "seconds": round(seconds, 3),
                     "status": "failed" if errors else EMPTY_STATUS if empty else "ok",
                     "error": "; ".join(errors) if errors else EMPTY_REASON if empty else ""})
    target = lay.summary
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["scene", "cars", "car_area_m2", "seconds",
                                              "status", "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    # Rewritten only when it changes, so a run with nothing to do leaves it (and Make) alone.
    if not target.exists() or target.read_text() != text.getvalue():
        with atomic_path(target) as tmp:
            tmp.write_text(text.getvalue())
    return target

