"""The base model: a bundle trained on generated scenes only, shipped with the package.

A user's first batch needs a model before anyone labels a car. The generator already teaches
what a car looks like (the sample-only demo model finds real cars), so ``make base`` trains on
many small generated samples, each with its own seed, GSD, light and UTM zone, and the bundle
it makes is committed in :data:`BASE_BUNDLE`. It is used three ways:

- as it is: ``make vectors RUN=base`` (the Makefile points ``RUN=base`` at :data:`BASE_BUNDLE`);
- as the starting weights of every training (``train.init: base``) whose U-Net has its shape;
- never trained over: :func:`check_not_shipped` refuses ``MODEL_DIR`` = the shipped folder.

Each variant is written under its own UTM zone, so one variant's labels (in their own CRS,
reprojected like any user's) can never fall on another variant's scenes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pipeline.config import BaseConfig, Config, SampleConfig
from pipeline.errors import InputError
from pipeline.files import temp_dir, write_json
from pipeline.io import write_vector

log = logging.getLogger(__name__)

BASE_BUNDLE = Path(__file__).parents[1] / "base_model"  # pipeline/base_model, package data
BASE_MANIFEST = "base-manifest.json"
PROVENANCE_FILE = "PROVENANCE.json"
FIRST_ZONE = 32630  # variant k is written in EPSG 32630 + k (WGS 84 / UTM north)


def variant_settings(base: BaseConfig, sample: SampleConfig) -> list[SampleConfig]:
    """The generated samples of the base, each a full sample setting of its own.

    GSDs are spread evenly (log scale: as many fine as coarse variants per octave) over
    ``gsd_min..gsd_max``; styles go in turn; every third variant ends on a sparse street.
    """
    gsds = np.geomspace(base.gsd_min, base.gsd_max, base.variants)
    return [sample.model_copy(update={
        "seed": base.seed + k, "gsd": round(float(gsds[k]), 4),
        "style": base.styles[k % len(base.styles)], "epsg": FIRST_ZONE + k % 30,
        "train_scenes": base.train_scenes, "incoming_scenes": 1, "sparse": k % 3 == 2,
        "width": base.width, "height": base.height}) for k in range(base.variants)]


def make_base_sample(data_dir: Path, cfg: Config) -> Path:
    """Write every variant's training scenes and labels into ``data_dir/raw``.

    Scenes are named ``v<k>_<scene>.tif`` and each variant's labels go to ``v<k>.gpkg``; the
    listing with each variant's settings goes to ``base-manifest.json`` (written last: its
    presence means the set is whole).
    """
    import pandas as pd

    from pipeline.stages.sample.writer import _car_frame, _write_scene, generate

    data_dir = Path(data_dir)
    variants = variant_settings(cfg.base, cfg.sample)
    listing = []
    with temp_dir(data_dir) as stage:
        for k, sample in enumerate(variants):
            scenes = generate(sample)
            train = [n for n in scenes if n.startswith("train_")]
            for name in train:
                _write_scene(stage / "raw" / "images" / f"v{k:02d}_{name}.tif", scenes[name])
            frames = [_car_frame(scenes[n], f"v{k:02d}_{n}") for n in train]
            write_vector(pd.concat(frames, ignore_index=True),
                         stage / "raw" / "labels" / f"v{k:02d}.gpkg", layer="cars")
            listing.append({"variant": k, "settings": sample.model_dump(mode="json"),
                            "cars": int(sum(len(scenes[n].cars) for n in train))})
            log.info("base: variant %d of %d (GSD %.3f m, %s light): %d cars", k + 1,
                     len(variants), sample.gsd, sample.style, listing[-1]["cars"])
        for sub in ("images", "labels"):
            target = data_dir / "raw" / sub
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted((stage / "raw" / sub).iterdir()):
                os.replace(path, target / path.name)
    manifest = data_dir / BASE_MANIFEST
    write_json(manifest, {"base": cfg.base.model_dump(mode="json"), "variants": listing})
    return manifest


def provenance(data_dir: Path, cfg: Config) -> dict:
    """What the base bundle was made from, for its metadata and PROVENANCE.json."""
    from pipeline.files import read_json
    from pipeline.stamps import digest

    manifest = read_json(Path(data_dir) / BASE_MANIFEST, missing="no base sample; run `make base`")
    return {"made_by": "make base", "generated_only": True,
            "base": cfg.base.model_dump(mode="json"),
            "gsd_range": [cfg.base.gsd_min, cfg.base.gsd_max],
            "variants": len(manifest["variants"]),
            "cars": sum(v["cars"] for v in manifest["variants"]),
            "sample_fingerprint": digest(manifest)}


def ship(model_dir: Path, target: Path, prov: dict) -> Path:
    """Copy the trained bundle to ``target`` (the package's base_model folder) as one unit,
    with its provenance in the metadata and beside it."""
    from pipeline.bundle import (
        METADATA_FILE,
        MODEL_FILE,
        check_bundle,
        load_bundle,
        load_validation,
        save_bundle,
    )
    from pipeline.files import read_json_if_any

    trained = check_bundle(model_dir)  # model and metadata belong together (no Keras yet)
    shipped = read_json_if_any(Path(target) / METADATA_FILE) or {}
    prov = {**prov, "trained_sha256": trained["model_sha256"]}
    if shipped.get("base", {}).get("trained_sha256") == prov["trained_sha256"]:
        log.info("base: %s is up to date", Path(target) / MODEL_FILE)
        return Path(target) / MODEL_FILE
    bundle = load_bundle(model_dir)
    metadata = {k: v for k, v in bundle.metadata.items() if k != "model_sha256"}
    metadata["base"] = prov
    metadata["gsd_range"] = prov["gsd_range"]  # predict keeps a scene's GSD inside it
    save_bundle(bundle.model, metadata, target, validation=load_validation(model_dir))
    write_json(Path(target) / PROVENANCE_FILE, prov)
    log.info("base: shipped %s (%d variants, %d cars, GSD %.2f-%.2f m)", target,
             prov["variants"], prov["cars"], *prov["gsd_range"])
    return Path(target) / "model.keras"


def check_not_shipped(model_dir: Path | None) -> None:
    """The shipped base is rebuilt by ``make base`` only, never trained over by hand."""
    if model_dir is not None and Path(model_dir).resolve() == BASE_BUNDLE.resolve():
        raise InputError(f"{model_dir}: this is the shipped base model; `make base` rebuilds "
                         "it. Train your own with another RUN (it starts from the base: "
                         "train.init: base)")


# === train.init ===

def init_source(init: str) -> Path | None:
    """The bundle folder ``train.init`` names, or None for 'scratch'."""
    if init == "scratch":
        return None
    path = BASE_BUNDLE if init == "base" else Path(init)
    if init != "base" and not (path / "model.keras").exists():
        raise InputError(f"train.init: {init}: no model.keras there ('base', 'scratch' or a "
                         "bundle folder)")
    return path


def start_weights(model, init: str) -> dict:
    """Load the starting weights ``train.init`` names into ``model``, if they fit.

    Returns what the bundle should record about where training started. A base of another
    shape (depth, filters, bands) is not an error: training starts from scratch and says so.
    """
    import keras

    from pipeline.bundle import METADATA_FILE, MODEL_FILE
    from pipeline.files import file_sha256

    source = init_source(init)
    if source is None:
        return {"from": "scratch"}
    path = source / MODEL_FILE
    if not path.exists():  # a checkout without the shipped base (it is in git)
        log.warning("train.init %s: %s not found; training from scratch", init, path)
        return {"from": "scratch", "asked": init}
    donor = keras.saving.load_model(path, compile=False, safe_mode=True)
    theirs, ours = donor.get_weights(), model.get_weights()
    if [w.shape for w in theirs] != [w.shape for w in ours]:
        log.info("train.init %s: %s is a U-Net of another shape (depth, filters or bands); "
                 "training from scratch", init, path)
        return {"from": "scratch", "asked": init, "reason": "another shape"}
    model.set_weights(theirs)
    from pipeline.files import read_json_if_any

    meta = read_json_if_any(source / METADATA_FILE) or {}
    log.info("train.init %s: starting from %s", init, path)
    return {"from": init if init in ("base",) else str(source), "model_sha256": file_sha256(path),
            "made_by": meta.get("base", {}).get("made_by", "train")}
