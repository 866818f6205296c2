"""Batch products: the whole ``IMAGES`` batch as one set of GIS layers (``make batch``).

Reads what predict and vectors wrote for each scene (``OUT/probability``, ``OUT/masks``,
``OUT/cars``) and writes ``OUT/batch/``:

- ``cars.gpkg`` + ``cars.parquet``: every car once, in one CRS, with a stable ``car_id``
  (``<scene>:<row in the scene's car layer>``, unchanged when other scenes come and go);
- ``seams.csv``: per pair of overlapping scenes, how many cars were seen twice and merged;
- ``probability.vrt`` / ``masks.vrt``: mosaics of the per-scene COGs (one pair per CRS);
- ``zones.gpkg`` (with ``zones``) or ``density.tif`` (cars per hectare, COG);
- ``catalog.json``: a STAC Collection, one Item per scene, with provenance;
- ``.qml`` styles beside every raster and a default style inside every GeoPackage;
- ``batch.json`` (written last): what the run read and wrote, so a rerun with nothing changed
  writes nothing.

Merging overlapping scenes: two cars of different scenes are one car when their footprints
overlap by ``batch.match_iou`` or one lies mostly (half its area) inside the other, the
signature of a copy cut by one scene's valid-data edge. Cars are taken greedily from the one
farthest from its own scene's valid-data edge (``edge_dist_m``), each dropping the copies it
matches that are not already taken, so a car cut by one scene's edge but whole in its
neighbour is taken whole, and a blob one scene merged while the other split it is never
counted both ways. A car only one scene found, lying where another scene sees the place with
more context (farther from its edge) and found nothing, is dropped: the better view decides
(a phantom at one scene's edge, or a roof the other scene saw whole and dropped as too large).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import shapely

from pipeline.bundle import METADATA_FILE, MODEL_FILE, read_metadata
from pipeline.calibration import apply_calibration
from pipeline.cars import BATCH_COLUMNS, empty_cars, write_cars
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.files import (
    atomic_path,
    read_json,
    read_json_if_any,
    staged_dir,
    write_json,
)
from pipeline.io import vector_file, write_vector
from pipeline.layout import Layout
from pipeline.scenes import list_scenes, scene_name
from pipeline.stages.batch.catalog import provenance, write_catalog
from pipeline.stages.batch.merge import merge_cars, seam_table
from pipeline.stages.batch.mosaics import write_mosaics

# The parts the stage uses; callers also reach these as pipeline.stages.batch.<name>.
from pipeline.stages.batch.sources import (  # noqa: E402,F401
    BATCH_DIR,
    CATALOG,
    DENSITY_NODATA,
    MANIFEST,
    SceneInfo,
    _batch_crs,
    _map,
    _read_cars,
    _scene_info,
    _to_crs,
)
from pipeline.stages.batch.zones import (  # noqa: E402,F401
    density_grid,
    read_zones,
    write_densities,
    write_density,
    write_zones,
    zone_counts,
)
from pipeline.styles import (
    mask_qml,
    probability_qml,
    write_qml,
)

log = logging.getLogger(__name__)

# === The stage ===

def _signature(scenes: list[str], zones: Path | None, cfg: Config) -> dict:
    return {"scenes": scenes, "zones": str(Path(zones).resolve()) if zones else None,
            "settings": cfg.batch.model_dump(mode="json")}


def complete_scenes(images: Path, out_dir: Path) -> list[tuple[str, Path, Path]]:
    """The batch's scenes that predict and vectors finished: (scene, image, car layer)."""
    scenes = list_scenes(images)
    if not scenes:
        raise InputError(f"{images}: no GeoTIFF scenes (*.tif) in the batch")
    done = []
    for image in scenes:
        scene = scene_name(image)
        missing = [p for p in (out_dir / "probability" / f"{scene}.tif",
                               out_dir / "masks" / f"{scene}.tif") if not p.exists()]
        cars = Layout(out=Path(out_dir)).find_cars(scene)
        if missing or cars is None:
            log.warning("%s: no %s; left out of the batch (run `make vectors`)", scene,
                        "prediction" if missing else "car layer")
            continue
        done.append((scene, image, cars))
    if not done:
        raise InputError(f"{out_dir}: no scene of {images} has been predicted and vectorized; "
                         "run `make vectors` first")
    return done


def build_batch(images: Path, out_dir: Path, *, model_dir: Path, cfg: Config,
                zones: Path | None = None) -> Path:
    """Write the batch products into ``out_dir/batch`` as one unit; returns ``catalog.json``.

    Every product is written into a folder staged beside ``batch/`` and swapped in whole at
    the end, so a failure part-way (bad zones, a full disk) leaves the previous set and its
    catalog as they were. Whether the batch is up to date is the stage runner's question.

    Raises:
        InputError: no scene is ready, the model is missing, or the zones are unusable.
    """
    images, out_dir, model_dir = Path(images), Path(out_dir), Path(model_dir)
    batch_dir = out_dir / BATCH_DIR
    metadata = read_metadata(model_dir)
    if not (model_dir / MODEL_FILE).exists():
        raise InputError(f"{model_dir / MODEL_FILE}: model not found; run `make train` first")
    if zones is not None and not vector_file(zones).exists():
        raise InputError(f"{zones}: zones file not found")
    # Bad zones are refused before any output is replaced, so the catalog never lists a file
    # that a failed run removed.
    zone_table = read_zones(Path(zones)) if zones is not None else None
    scenes = [(s, image) for s, image, _ in complete_scenes(images, out_dir)]
    names = [s for s, _ in scenes]
    signature = _signature(names, zones, cfg)
    previous = read_json_if_any(batch_dir / MANIFEST) or {}
    cache = previous.get("checksums", {})
    # The names in batch/ that the last run wrote: replaced; anything else there is the user's.
    owned = {Path(p).parts[0] for p in previous.get("files", previous.get("outputs", []))}
    owned |= {MANIFEST}
    with staged_dir(batch_dir, owned=owned) as staged:
        catalog = _write_products(scenes, staged, out_dir=out_dir, model_dir=model_dir,
                                  cfg=cfg, metadata=metadata, zone_table=zone_table,
                                  signature=signature, cache=cache)
    return batch_dir / catalog.name


def _write_products(scenes, batch_dir: Path, *, out_dir: Path, model_dir: Path, cfg: Config,
                    metadata: dict, zone_table, signature: dict, cache: dict) -> Path:
    """Write every batch product into ``batch_dir`` (the staged folder); returns the catalog."""
    manifest_path = batch_dir / MANIFEST

    # Per-scene reading: one pass over each mask for its valid-data footprint.
    infos = _map(_scene_info, [(s, img, out_dir, cfg.vectors.window) for s, img in scenes],
                 cfg.distributed)
    # A scene without a valid pixel was not looked at: it is no scene with zero cars, so it
    # stays out of every product (cars, mosaics, counts, density, catalog); vectors warned.
    empty = [i.scene for i in infos if i.footprint.is_empty]
    infos = [i for i in infos if not i.footprint.is_empty]
    if not infos:
        raise InputError(f"{out_dir / 'masks'}: no scene has a valid pixel (every pixel is nodata or "
                         "masked); check the scenes' nodata value and mask")
    if empty:
        log.info("batch: left out %d scenes without valid pixels: %s", len(empty),
                 ", ".join(empty))
    names = [i.scene for i in infos]
    crs = _batch_crs(infos, cfg.batch.crs)
    log.info("batch: %d scenes, CRS %s", len(infos), crs.to_string())
    footprints = {i.scene: _to_crs(i.footprint, i.crs, crs) for i in infos}
    coverage = shapely.union_all(list(footprints.values()))

    import geopandas as gpd
    import pandas as pd

    frames = [_read_cars(info, crs) for info in infos]
    frames = [f for f in frames if len(f)]
    cars = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs)
            if frames else None)
    if cars is None:

        cars = empty_cars(crs).assign(car_id=pd.Series(dtype="str"))
    calibration = metadata.get("calibration")
    if calibration is None:
        log.warning("%s: the model has no calibration; car probabilities are the raw mean_prob "
                    "and zone intervals assume they are calibrated", model_dir / METADATA_FILE)
    cars["prob"] = apply_calibration(cars["mean_prob"].to_numpy(dtype=float), calibration)
    merged, dropped_by, overruled = merge_cars(cars, match_iou=cfg.batch.match_iou,
                                               footprints=footprints)
    merged = merged[[*BATCH_COLUMNS, "geometry"]]
    per_scene = {s: {"detected": int((cars["scene"] == s).sum()),
                     "kept": int((merged["scene"] == s).sum())} for s in names}
    n_overruled = int(sum(o is not None for o in overruled))
    log.info("batch: %d cars from %d detections (%d copies merged, %d dropped where another "
             "scene saw the place better and found no car)", len(merged), len(cars),
             int((dropped_by >= 0).sum()), n_overruled)

    batch_dir.mkdir(parents=True, exist_ok=True)
    products = [write_cars(merged, batch_dir / "cars.gpkg"),
                write_vector(merged, batch_dir / "cars.parquet")]
    seams = seam_table(cars, dropped_by, overruled, footprints)
    target = batch_dir / "seams.csv"
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["scene_a", "scene_b", "overlap_ha", "cars_a",
                                                "cars_b", "merged", "overruled",
                                                "kept_from_a", "kept_from_b"])
        writer.writeheader()
        writer.writerows(seams)
    products.append(target)
    products += write_mosaics(infos, batch_dir, crs)
    if zone_table is not None:
        table = zone_counts(zone_table, merged, coverage, crs, calibration=calibration,
                            level=cfg.batch.interval)
        counts = [write_zones(table, batch_dir / "zones.gpkg")]
    else:
        counts = write_densities(merged, infos, batch_dir, crs, cfg.batch.density_cell_m)
    products += counts
    for info in infos:  # QGIS styles beside every per-scene COG
        write_qml(info.prob, probability_qml())
        write_qml(info.mask, mask_qml())
    prov = provenance(out_dir, model_dir, metadata, cfg, cache)
    catalog = write_catalog(infos, batch_dir, crs=crs, kept=merged, per_scene=per_scene,
                            products=products, prov=prov, cache=cache)
    # The warped VRTs too: the mosaics read through them, so one gone is a batch to redo.
    outputs = [p.relative_to(batch_dir).as_posix()
               for p in [*products, catalog, *sorted(batch_dir.glob("warped/*/*.vrt"))]]
    # Checksums of files that no longer exist are dropped, so the cache does not grow forever.
    cache = {k: v for k, v in cache.items() if Path(k).exists()}
    # Every file of the set (styles and STAC items too): what the next run replaces, and all
    # that clean removes; anything else in batch/ is the user's.
    files = sorted([p.relative_to(batch_dir).as_posix() for p in batch_dir.rglob("*")
                    if p.is_file()] + [MANIFEST])
    write_json(manifest_path, {"signature": signature, "outputs": outputs, "files": files,
                               "checksums": cache,
                               "crs": crs.to_string(), "cars": int(len(merged)),
                               "detections": int(len(cars)),
                               "merged": int((dropped_by >= 0).sum()),
                               "overruled": n_overruled,
                               "calibrated": calibration is not None,
                               "per_scene": per_scene, "empty": empty})
    return catalog


def read_manifest(out_dir: Path) -> dict | None:
    """The last batch run's summary (``OUT/batch/batch.json``), or None."""
    path = Path(out_dir) / BATCH_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        return read_json(path, missing="no batch products")
    except InputError:
        return None
