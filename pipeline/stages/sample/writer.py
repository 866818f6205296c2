"""Writing the sample: GeoTIFF scenes, training labels, truth and a manifest, all deterministic."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipeline.config import SampleConfig
from pipeline.errors import InputError
from pipeline.files import atomic_path, temp_dir, write_json
from pipeline.io import write_vector
from pipeline.stages.sample.labels import _car_frame
from pipeline.stages.sample.objects import VEHICLES, SceneRender
from pipeline.stages.sample.render import render_scene

log = logging.getLogger("pipeline.stages.sample")

GENERATOR_VERSION = 2  # 2: edge-cut cars, long vehicles, street parking, sparse scenes
# GeoPackage embeds the time of writing; GDAL uses this instead, so files are byte-identical.
FIXED_OGR_DATE = "2020-01-01T00:00:00Z"


def _profile(width: int, height: int, transform: Affine, crs: CRS) -> dict:
    """GeoTIFF profile of an orthophoto delivery: RGB uint8, tiled, deflate, nodata 0."""
    block = 256 if min(width, height) >= 256 else 16 * max(1, min(width, height) // 16)
    return dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                transform=transform, nodata=0, tiled=True, blockxsize=block, blockysize=block,
                compress="deflate", predictor=2, interleave="pixel", photometric="RGB")


def _write_scene(path: Path, scene: SceneRender) -> None:
    _, rows, cols = scene.image.shape
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **_profile(cols, rows, scene.transform, scene.crs)) as dst:
            dst.write(scene.image)
            dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                               rasterio.enums.ColorInterp.blue]


@contextlib.contextmanager
def _fixed_ogr_date() -> Iterator[None]:
    """Make GDAL stamp GeoPackages with a fixed date, so the same sample gives the same bytes."""
    old = os.environ.get("OGR_CURRENT_DATE")
    os.environ["OGR_CURRENT_DATE"] = FIXED_OGR_DATE
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OGR_CURRENT_DATE", None)
        else:
            os.environ["OGR_CURRENT_DATE"] = old


def _write_geojson(gdf, path: Path) -> None:
    # GeoJSON stores the layer name, which would otherwise be the random temporary file name.
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GeoJSON", engine="pyogrio", layer=path.stem)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scene_specs(cfg: SampleConfig) -> list[tuple[str, str, int, int, bool]]:
    """(relative path, scene name, width, height, collar) of every scene the sample holds.

    The second scene of each set has an awkward size (not a multiple of any chip size); the
    third training scene and the first incoming scene have a nodata collar.
    """
    odd_w = max(64, cfg.width * 5 // 6) | 1
    odd_h = max(64, cfg.height * 837 // 1000) | 1
    specs = []
    for i in range(cfg.train_scenes):
        w, h = (odd_w, odd_h) if i == 1 else (cfg.width, cfg.height)
        specs.append((f"raw/images/train_{i + 1:02d}.tif", f"train_{i + 1:02d}", w, h,
                      i == 2 or (cfg.train_scenes < 3 and i == cfg.train_scenes - 1)))
    for i in range(cfg.incoming_scenes):
        w, h = (odd_w, odd_h) if i == 1 else (cfg.width, cfg.height)
        specs.append((f"incoming/scene_{i + 1:02d}.tif", f"scene_{i + 1:02d}", w, h, i == 0))
    return specs


def sparse_scenes(cfg: SampleConfig) -> set[str]:
    """Names of the sparse scenes: the last of each set (training, incoming) of 2 or more."""
    if not cfg.sparse:
        return set()
    names = set()
    if cfg.train_scenes >= 2:
        names.add(f"train_{cfg.train_scenes:02d}")
    if cfg.incoming_scenes >= 2:
        names.add(f"scene_{cfg.incoming_scenes:02d}")
    return names


def _render_job(job: tuple) -> SceneRender:
    seed, w, h, gsd, transform, epsg, collar, style, sparse = job
    return render_scene(np.random.default_rng(seed), w, h, gsd=gsd, transform=transform,
                        crs=CRS.from_epsg(epsg), collar=collar, style=style, sparse=sparse)


def generate(cfg: SampleConfig, *, workers: int | None = None) -> dict[str, SceneRender]:
    """Render every scene of the sample in memory (no files), keyed by scene name.

    Args:
        cfg: sample settings.
        workers: processes to render in; None = up to 2 for a full-size sample, else 1.
            Each scene has its own seed, so the result does not depend on this.
    """
    specs = scene_specs(cfg)
    seeds = np.random.SeedSequence([cfg.seed, GENERATOR_VERSION]).spawn(len(specs))
    jobs = []
    sparse = sparse_scenes(cfg)
    for k, ((_rel, name, w, h, collar), seed) in enumerate(zip(specs, seeds, strict=True)):
        # Scenes sit side by side 1 km apart, near 48 N in the configured UTM zone.
        transform = Affine(cfg.gsd, 0, 400000.0 + 1000.0 * k, 0, -cfg.gsd, 5320000.0)
        jobs.append((seed, w, h, cfg.gsd, transform, cfg.epsg, collar, cfg.style,
                     name in sparse))
    if workers is None:
        pixels = sum(w * h for _, _, w, h, _ in specs)
        workers = min(2, os.cpu_count() or 1, len(specs)) if pixels > 2_000_000 else 1
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (TensorFlow, Dask) that fork would copy.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            renders = list(ex.map(_render_job, jobs))
    else:
        renders = [_render_job(job) for job in jobs]
    return {name: r for (_rel, name, *_), r in zip(specs, renders, strict=True)}


def make_sample(data_dir: Path, *, cfg: SampleConfig, force: bool = False) -> Path:
    """Write the sample scenes, labels and truth into ``data_dir``; return the manifest path.

    Every file is first written into a staging folder; only when no existing file would be
    changed (or ``force`` is set) are they moved into place, one atomic rename each.

    Raises:
        InputError: a file of the sample already exists with other content and force is off.
    """
    import pandas as pd

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    scenes = generate(cfg)
    specs = scene_specs(cfg)
    # Staged in the swept scratch folder: a killed run leaves nothing behind for long.
    with temp_dir(data_dir) as stage:
        files: list[str] = []
        for rel, name, *_ in specs:
            _write_scene(stage / rel, scenes[name])
            files.append(rel)
        train = [n for r, n, *_ in specs if r.startswith("raw/")]
        incoming = [n for r, n, *_ in specs if r.startswith("incoming/")]
        # Training labels in degrees, split across a GeoJSON and a GeoPackage ("one or many
        # files"): every consumer must reproject and merge.
        frames = [_car_frame(scenes[n], n).to_crs(4326) for n in train]
        split = max(1, (len(frames) + 1) // 2)
        with _fixed_ogr_date():
            _write_geojson(pd.concat(frames[:split], ignore_index=True),
                           stage / "raw/labels/cars.geojson")
            files.append("raw/labels/cars.geojson")
            if frames[split:]:
                write_vector(pd.concat(frames[split:], ignore_index=True),
                             stage / "raw/labels/cars_more.gpkg", layer="cars")
                files.append("raw/labels/cars_more.gpkg")
            truth = pd.concat([_car_frame(scenes[n], n) for n in incoming], ignore_index=True)
            write_vector(truth, stage / "truth/cars.gpkg", layer="cars")
            files.append("truth/cars.gpkg")
        manifest = {
            "generator": "pipeline.stages.sample", "version": GENERATOR_VERSION,
            "settings": cfg.model_dump(mode="json"),
            "files": {rel: {"sha256": _sha256(stage / rel), "bytes": (stage / rel).stat().st_size}
                      for rel in files},
            "scenes": {n: {"cars": len(scenes[n].cars), "width": int(scenes[n].image.shape[2]),
                           "height": int(scenes[n].image.shape[1]),
                           "sun_azimuth_deg": round(scenes[n].sun_azimuth_deg, 2),
                           "nodata_fraction": round(float(1 - scenes[n].valid.mean()), 4),
                           "sparse": scenes[n].sparse,
                           "car_fraction": round(scenes[n].car_fraction(), 4),
                           "vehicles_not_cars": sum(b.kind in VEHICLES for b in scenes[n].boxes)}
                       for n in scenes},
        }
        write_json(stage / "sample-manifest.json", manifest)
        files.append("sample-manifest.json")
        if not force:
            for rel in files:
                target = data_dir / rel
                if target.exists() and _sha256(target) != _sha256(stage / rel):
                    raise InputError(f"{target}: exists and differs from the sample that would "
                                     "be written; use --force to overwrite it")
        # Manifest last: its presence means the whole sample is in place.
        for rel in files:
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, data_dir / rel)
    log.info("sample: %d scenes, %d cars, in %s", len(scenes),
             sum(len(s.cars) for s in scenes.values()), data_dir)
    return data_dir / "sample-manifest.json"
