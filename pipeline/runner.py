"""One way in: the stage table and :func:`run_stage`, which every entry point goes through.

``make``, ``python -m pipeline <stage>`` by hand and the batch all call :func:`run_stage` (make
through :func:`run_targets`), so each contract holds for all of them at once:

1. **guard**: the stage's outputs are apart from its inputs (not over, inside or holding one);
2. **plan**: the items the stage would make now (a scene, or ``"*"``), each with its inputs;
3. **stale**: items whose manifest entry (:mod:`pipeline.stamps`) does not match the inputs'
   identity, the stage's settings and the model; items of the manifest that are no longer
   planned (a scene gone) are pruned: their recorded outputs, and nothing else, are deleted;
4. **lock**: one writer of the stage's folder at a time (:func:`pipeline.io.folder_lock`); looked
   at first without it, so a rerun with nothing to do neither waits nor writes;
5. **run** the stage function on the stale items (in this process or on Dask);
6. **stamp**: the manifest records each finished item's outputs and what they were made from.

Exit statuses: 0 done, 2 bad input (nothing done), 3 (:data:`EXIT_PARTIAL`) some scenes failed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, stage_settings
from pipeline.errors import EXIT_PARTIAL, InputError
from pipeline.files import LOCK_FILE, TEMP_DIR, folder_lock, write_if_changed
from pipeline.io import (
    CHIPS_FILE,
    INDEX_FILE,
    MASKS_FILE,
    STATS_FILE,
    list_vectors,
    split_layer,
    vector_file,
)
from pipeline.layout import (
    BATCH,
    CARS,
    EVALUATION,
    LOGS,
    OUT_FOLDERS,
    OUT_MASKS,
    PROBABILITY,
    SUGGEST,
    Layout,
    check_outputs_apart,
)
from pipeline.scenes import list_scenes, scene_name
from pipeline.stamps import (
    STAGE_FILES,
    STAGE_ITEM,
    Made,
    Manifest,
    digest,
    prune_empty,
    record,
    relative,
    remove_path,
)

log = logging.getLogger("pipeline")


@dataclass
class Job:
    """One run of one stage: where (layout), with what settings, and how."""

    layout: Layout
    cfg: Config
    force: bool = False
    debug: bool = False


@dataclass
class Item:
    """What a stage would make of one source now: its outputs and what they are made from."""

    source: Any  # what the stage function takes (a scene path), or None for "*"
    inputs: dict[str, Any]  # role -> Path (compared by identity) or str (a digest)
    outputs: list[Path]


@dataclass
class Outcome:
    """The stage function's result over the stale items."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, list[Path]] = field(default_factory=dict)  # key -> outputs to keep (logs)


@dataclass(frozen=True)
class Stage:
    """A row of the stage table."""

    name: str
    folder: Callable[[Layout], Path]  # the folder it writes: its lock and its manifest
    reads: Callable[[Layout], dict[str, Path | None]]  # for the guard
    writes: Callable[[Layout], dict[str, Path | None]]
    plan: Callable[[Job], dict[str, Item]]
    run: Callable[[Job, dict[str, Item]], Outcome]
    finish: Callable[[Job], int] | None = None  # after every run, fresh or not (summary.csv)
    what: str = "written"  # "<folder> is being <what> by ..." while another run holds it
    why: Callable[[Job], str | None] | None = None  # said before a run (why train retrains)
    guard: Callable[[Layout], None] | None = None  # a refusal of its own, beside outputs-apart

    def check(self, lay: Layout) -> None:
        """Refuse, before any work, outputs over its inputs (and what the stage refuses)."""
        check_outputs_apart(self.writes(lay), self.reads(lay))
        if self.guard is not None:
            self.guard(lay)


def settings_digest(job: Job, stage: str) -> str:
    return digest(stage_settings(job.cfg, stage))


def _settings_key(name: str) -> str:
    return {"index": "masks"}.get(name, name)


# === Running one stage ===

def run_stage(stage: Stage | str, job: Job) -> int:
    """Guard, plan, prune, lock, run what is stale, stamp; return the exit status."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    stage.check(job.layout)
    folder = stage.folder(job.layout)
    plan = stage.plan(job)
    stale, gone = _stale(stage, job, plan, Manifest.load(folder, stage.name))
    if not stale and not gone:
        log.info("%s: %s", stage.name, _up_to_date(plan))
        return stage.finish(job) if stage.finish else 0
    with folder_lock(folder, stage.name, doing=stage.what):
        manifest = Manifest.load(folder, stage.name)  # a run we waited for may have done it
        stale, gone = _stale(stage, job, plan, manifest)
        _stamp_settings(stage, job, manifest)
        for key in gone:
            for path in manifest.forget(key):
                log.info("%s: %s is gone from the inputs; removed %s", stage.name, key, path)
        status = _run_stale(stage, job, plan, stale, manifest) if stale else 0
        manifest.save()
        if not stale:
            log.info("%s: %s", stage.name, _up_to_date(plan))
    if stage.finish and status in (0, EXIT_PARTIAL):
        status = stage.finish(job) or status
    return status


def _up_to_date(plan: dict[str, Item]) -> str:
    if len(plan) != 1 or STAGE_ITEM not in plan:
        return f"all {len(plan)} up to date"
    outputs = plan[STAGE_ITEM].outputs
    return f"{outputs[0]} is up to date" if outputs else "up to date"


def _stale(stage: Stage, job: Job, plan: dict[str, Item], manifest: Manifest
           ) -> tuple[list[str], list[str]]:
    stale = [k for k, item in plan.items() if job.force or not manifest.fresh(k, item.inputs)]
    gone = [k for k in manifest.items if k not in plan and k != STAGE_FILES]
    return stale, gone


def _stamp_settings(stage: Stage, job: Job, manifest: Manifest) -> None:
    """Write the settings the stage runs with where the user reads them (only on change)."""
    path = job.layout.settings_file(stage.name)
    if path is None:
        return
    write_if_changed(path, stage_settings(job.cfg, _settings_key(stage.name)))
    _own(manifest, path)


def _own(manifest: Manifest, path: Path) -> bool:
    """List a stage-level file in the manifest (so clean finds it); True when it was new."""
    files = manifest.items.setdefault(STAGE_FILES, Made([], {}))
    rel = relative(path, manifest.folder)
    if rel in files.outputs:
        return False
    files.outputs.append(rel)
    return True


def _run_stale(stage: Stage, job: Job, plan: dict[str, Item], stale: list[str],
               manifest: Manifest) -> int:
    folder = manifest.folder
    if stage.why is not None:  # asked before the manifest marks the items as under way
        log.info("%s: %s", stage.name, stage.why(job) or "--force")
    identities = {k: record(plan[k].inputs) for k in stale}  # before the run: a scene
    # overwritten while it runs is redone next time
    for key in stale:  # listed before any write, so clean finds a crashed run's files too
        was = manifest.items.get(key)
        new = [relative(p, folder) for p in plan[key].outputs]
        manifest.items[key] = Made(sorted({*new, *(was.outputs if was else [])}), None)
    manifest.save()
    log.info("%s: %d of %d to do", stage.name, len(stale), len(plan))
    outcome = stage.run(job, {k: plan[k] for k in stale})
    for key in outcome.done:
        new = [relative(p, folder) for p in plan[key].outputs]
        old = manifest.items[key].outputs
        manifest.items[key] = Made(new, identities[key])
        for rel in set(old) - set(new):  # e.g. cars.gpkg after vectors.format=parquet
            if rel not in manifest.owned():
                remove_path(folder / rel)
    for key, kept in outcome.failed.items():
        # A failed scene keeps no outputs of an earlier run: later stages must not use
        # results that no longer match its input. Its log stays for the summary.
        keep = {relative(p, folder) for p in kept}
        made = manifest.items.pop(key)
        for rel in made.outputs:
            if rel not in keep:
                remove_path(folder / rel)
        manifest.items[key] = Made(sorted(keep), None)
    if not outcome.failed:
        return 0
    return EXIT_PARTIAL if outcome.done or len(outcome.failed) < len(plan) else 2


# === Batch stages over scenes ===

def _batch(job: Job, stage: str, func: Callable, items: dict[str, Item], *, args: tuple,
           kwargs: dict, log_dir: Path | None = None, name: Callable | None = None,
           prepare: Callable | None = None) -> Outcome:
    from pipeline.distributed import run_items

    sources = {k: it.source for k, it in items.items()}
    result = run_items(stage, func, list(sources.values()), args=args, kwargs=kwargs,
                       cfg=job.cfg.distributed, name=name or scene_name, log_dir=log_dir,
                       prepare=prepare)
    key_of = {(name or scene_name)(src): k for k, src in sources.items()}
    kept = (lambda k: [job.layout.log(k, stage)]) if log_dir is not None else (lambda k: [])
    return Outcome(done=[key_of[k] for k in result.done],
                   failed={key_of[k]: kept(key_of[k]) for k in result.failed})


def _scenes(folder: Path | None, what: str) -> list[Path]:
    if folder is None or not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    scenes = list_scenes(folder)
    if not scenes:
        raise InputError(f"{folder}: no GeoTIFF scenes (.tif/.tiff) {what}")
    return scenes


def import_keras_quietly(debug: bool) -> None:
    """Import Keras (and its TensorFlow backend) with C++ start-up chatter kept off stderr.

    TensorFlow's native logger prints oneDNN/CUDA notices before any Python setting can reach
    it; a GIS user needs none of them, so stderr is pointed at /dev/null for the import only.
    """
    if debug or "keras" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --- sample ---

def _plan_sample(job: Job) -> dict[str, Item]:
    return {STAGE_ITEM: Item(None, {"settings": settings_digest(job, "sample")},
                             [job.layout.data / "sample-manifest.json"])}


def _run_sample(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.sample import make_sample

    manifest = make_sample(job.layout.data, cfg=job.cfg.sample, force=job.force)
    log.info("sample written: %s", manifest)
    return Outcome(done=[STAGE_ITEM])


# --- base (the generated set the base model trains on) ---

def _plan_base(job: Job) -> dict[str, Item]:
    from pipeline.stages.base import BASE_MANIFEST

    return {STAGE_ITEM: Item(None, {"settings": settings_digest(job, "base")},
                             [job.layout.data / BASE_MANIFEST])}


def _run_base(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.base import make_base_sample

    lay = job.layout
    manifest = make_base_sample(lay.data, job.cfg)
    # Every scene and label file is the stage's own: a smaller set next time removes the rest.
    written = [p for sub in (lay.raw_images, lay.labels) for p in sorted(sub.iterdir())
               if p.is_file() and p.name.startswith("v")]
    items[STAGE_ITEM].outputs = [manifest, *written]
    return Outcome(done=[STAGE_ITEM])


def run_base(job: Job, ship_to: Path) -> int:
    """``make base``: the generated set, the training chain on it, then the bundle shipped."""
    from pipeline.stages.base import provenance, ship

    lay = job.layout
    check_outputs_apart({"the shipped base": ship_to},
                        {"DATA": lay.data, "MODEL_DIR": lay.model_dir})
    rc = run_stage("base", job) or _train_chain(job)
    if rc:
        return rc
    import_keras_quietly(job.debug)
    ship(lay.model_dir, ship_to, provenance(lay.data, job.cfg))
    return 0


# --- tile ---

def _plan_tile(job: Job) -> dict[str, Item]:
    lay, settings = job.layout, settings_digest(job, "tile")
    return {scene_name(s): Item(s, {"scene": s, "settings": settings}, [lay.chips / scene_name(s)])
            for s in _scenes(lay.raw_images, "to tile")}


def _run_tile(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.tile import tile_scene

    return _batch(job, "tile", tile_scene, items, args=(job.layout.chips,),
                  kwargs={"cfg": job.cfg.tile})


# --- masks ---

def _scene_indexes(lay: Layout) -> list[Path]:
    """The chip lists of the training scenes (every scene in CHIPS when no scene folder)."""
    if lay.raw_images is not None:
        return [lay.chips / scene_name(s) / CHIPS_FILE
                for s in _scenes(lay.raw_images, "to rasterize labels for")]
    return sorted(p for p in lay.chips.glob(f"*/{CHIPS_FILE}")
                  if not p.parent.name.startswith("."))


def _plan_masks(job: Job) -> dict[str, Item]:
    lay = job.layout
    label_files = list_vectors(lay.labels)
    if not label_files:
        raise InputError(f"{lay.labels}: no label files (.gpkg, .geojson, .shp, .parquet)")
    indexes = _scene_indexes(lay)
    missing = [p for p in indexes if not p.exists()]
    if not indexes or missing:
        raise InputError(f"{missing[0] if missing else lay.chips}: no chips; "
                         "run `make tiles` first")
    # Each label file is an input by name (with its layer, `cars.gpkg:cars`): one removed or
    # renamed redoes every scene.
    labels = {f"labels/{p.name}": vector_file(p) for p in label_files}
    settings = settings_digest(job, "masks")
    return {idx.parent.name: Item(idx, {"chips": idx, **labels, "settings": settings},
                                  [lay.masks / idx.parent.name]) for idx in indexes}


def _run_masks(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.rasterize import load_labels, rasterize_scene

    # Listed again rather than taken from the inputs, which hold files without their layer.
    labels = load_labels(list_vectors(job.layout.labels), cfg=job.cfg.labels)
    return _batch(job, "masks", rasterize_scene, items, args=(labels, job.layout.masks),
                  kwargs={"cfg": job.cfg.labels}, name=lambda i: Path(i).parent.name)


def _check_labels_hit(job: Job) -> int:
    """Refuse labels that burn no car pixel in any chip (wrong CRS, other place, other scenes)."""
    from pipeline.files import read_json

    lay = job.layout
    burned = 0
    for idx in _scene_indexes(lay):
        summary = read_json(lay.masks / idx.parent.name / MASKS_FILE, missing="masks missing")
        burned += sum(summary.get("chips", {}).values())
    if not burned:
        files = list_vectors(lay.labels)
        names = ", ".join(p.name for p in files)
        raise InputError(f"{lay.labels}: no chip holds a car: the labels ({names}) "
                         "fall outside every training scene; check their CRS and extent")
    return 0


# --- index ---

def _plan_index(job: Job) -> dict[str, Item]:
    lay = job.layout
    inputs: dict[str, Any] = {"settings": settings_digest(job, "masks")}
    for p in sorted(lay.chips.glob(f"*/{CHIPS_FILE}")):
        if not p.parent.name.startswith("."):
            inputs[f"chips/{p.parent.name}"] = p
    for p in sorted(lay.masks.glob(f"*/{MASKS_FILE}")):
        if not p.parent.name.startswith("."):
            inputs[f"masks/{p.parent.name}"] = p
    return {STAGE_ITEM: Item(None, inputs, [lay.chips / INDEX_FILE, lay.chips / STATS_FILE])}


def _run_index(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.tile import build_index

    path = build_index(job.layout.chips, job.layout.masks, cfg=job.cfg.tile)
    log.info("chip index: %s", path)
    return Outcome(done=[STAGE_ITEM])


# --- train ---

TRAIN_INPUTS = {"index": "the chip index", "stats": "the band statistics",
                "settings": "the training settings"}


def _plan_train(job: Job) -> dict[str, Item]:
    from pipeline.bundle import METADATA_FILE, MODEL_FILE

    lay = job.layout
    return {STAGE_ITEM: Item(None, {"index": lay.chips / INDEX_FILE,
                                    "stats": lay.chips / STATS_FILE,
                                    "settings": settings_digest(job, "train")},
                             [lay.model_dir / MODEL_FILE, lay.model_dir / METADATA_FILE])}


def _not_the_shipped_base(lay: Layout) -> None:
    from pipeline.stages.base import check_not_shipped

    check_not_shipped(lay.model_dir)


def train_reason(job: Job) -> str | None:
    """Why the model must be (re)trained, in words, or None when it is up to date."""
    from pipeline.bundle import MODEL_FILE
    from pipeline.stamps import same

    lay = job.layout
    model = lay.model_dir / MODEL_FILE
    if not model.exists():
        return f"no model in {lay.model_dir}; training one"
    made = Manifest.load(lay.model_dir, "train").items.get(STAGE_ITEM)
    item = _plan_train(job)[STAGE_ITEM]
    if made is None or made.inputs is None:
        return f"{model} has no record of what it was trained from; retraining"
    changed = [TRAIN_INPUTS[role] for role, now in item.inputs.items()
               if (not same(made.inputs.get(role), now) if isinstance(now, Path)
                   else made.inputs.get(role) != now)]
    if changed:
        return (f"{' and '.join(changed)} changed since {model} was trained; retraining "
                f"(the previous bundle is kept in {model.parent / 'previous'})")
    return None


def _run_train(job: Job, items: dict[str, Item]) -> Outcome:
    lay = job.layout
    import_keras_quietly(job.debug)
    from pipeline.stages.train import train

    path = train(lay.chips, lay.masks, lay.model_dir, cfg=job.cfg)
    log.info("model: %s", path)
    return Outcome(done=[STAGE_ITEM])


def has_training_scenes(lay: Layout) -> bool:
    return lay.raw_images is not None and bool(list_scenes(lay.raw_images))


def run_train(job: Job) -> int:
    """Train, or use the bundle as it is when there is no training data here."""
    from pipeline.bundle import MODEL_FILE

    lay = job.layout
    STAGES["train"].check(lay)
    if lay.raw_images is not None and not list_scenes(lay.raw_images):
        model = lay.model_dir / MODEL_FILE
        if model.exists():  # a bundle trained elsewhere, and no training data here
            log.info("train: no training scenes in %s; using %s as it is", lay.raw_images, model)
            return 0
        raise InputError(f"{lay.raw_images}: no training scenes (.tif/.tiff) and no model in "
                         f"{lay.model_dir}")
    return run_stage("train", job)


# --- predict ---

def _bundle_inputs(lay: Layout) -> dict[str, Path]:
    from pipeline.bundle import METADATA_FILE, MODEL_FILE

    return {"model": lay.model_dir / MODEL_FILE, "metadata": lay.model_dir / METADATA_FILE}


def _plan_predict(job: Job) -> dict[str, Item]:
    from pipeline.bundle import check_bundle

    lay = job.layout
    scenes = _scenes(lay.images, "to predict")
    check_bundle(lay.model_dir)  # predict never trains: no model is one line, before any work
    common = {**_bundle_inputs(lay), "settings": settings_digest(job, "predict")}
    items = {}
    for s in scenes:
        name = scene_name(s)
        prob, mask = lay.probability(name), lay.mask(name)
        items[name] = Item(s, {"scene": s, **common},
                           [prob, prob.with_suffix(".qml"), mask, mask.with_suffix(".qml"),
                            lay.log(name, "predict")])
    return items


def _run_predict(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.predict import predict_scene

    lay = job.layout
    return _batch(job, "predict", predict_scene, items, args=(lay.model_dir, lay.out),
                  kwargs={"cfg": job.cfg.predict}, log_dir=lay.out / LOGS,
                  prepare=lambda: import_keras_quietly(job.debug))


# --- vectors ---

def _vector_scenes(lay: Layout) -> list[str]:
    if lay.images is None:
        return [scene_name(p) for p in list_scenes(lay.out / OUT_MASKS)]
    return [scene_name(s) for s in _scenes(lay.images, "")]


def _plan_vectors(job: Job) -> dict[str, Item]:
    lay, fmt = job.layout, job.cfg.vectors.format
    settings = settings_digest(job, "vectors")
    # The batch's scenes that predict has finished: a failed scene has no mask, and its old
    # car layer (listed in the manifest, planned no more) is removed as stale.
    ready = [s for s in _vector_scenes(lay) if lay.mask(s).exists()]
    if not ready:
        raise InputError(f"{lay.out / OUT_MASKS}: no predicted masks; run `make predict` first")
    return {s: Item(lay.mask(s), {"mask": lay.mask(s), "settings": settings},
                    [lay.cars(s, fmt), lay.log(s, "vectors")]) for s in ready}


def _run_vectors(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.vectorize import vectorize_scene

    lay = job.layout
    return _batch(job, "vectors", vectorize_scene, items, args=(lay.out,),
                  kwargs={"cfg": job.cfg.vectors}, log_dir=lay.out / LOGS)


def _finish_vectors(job: Job) -> int:
    """summary.csv (rewritten only when it changes) and a warning per scene with no pixel."""
    from pipeline.stages.vectorize import write_summary

    lay = job.layout
    summary = write_summary(lay.out, _vector_scenes(lay) if lay.images is not None else None)
    if _own(Manifest.load(lay.out, "vectors"), summary):
        with folder_lock(lay.out, "vectors"):
            manifest = Manifest.load(lay.out, "vectors")
            _own(manifest, summary)
            manifest.save()
    _warn_empty(summary, lay.images)
    return 0


def _warn_empty(summary: Path, images: Path | None) -> None:
    """One warning per scene without a valid pixel, naming its file.

    Such a scene is no failure (a tile of a delivery grid outside the flown area is normal), so
    the stage still exits 0; but it is not a scene with zero cars either.
    """
    import csv

    from pipeline.scenes import EMPTY_REASON, EMPTY_STATUS

    files = {scene_name(p): p for p in list_scenes(images)} if images is not None else {}
    with open(summary, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == EMPTY_STATUS:
                path = files.get(row["scene"]) or summary.parents[1] / "masks" / f"{row['scene']}.tif"
                log.warning("%s: %s; listed as %s in %s, and left out of car counts and batch "
                            "products", path, EMPTY_REASON, EMPTY_STATUS, summary)


# --- batch ---

def _plan_batch(job: Job) -> dict[str, Item]:
    from pipeline.stages.batch import MANIFEST, complete_scenes

    lay = job.layout
    inputs: dict[str, Any] = {**_bundle_inputs(lay),
                              "settings": digest([stage_settings(job.cfg, "batch"),
                                                  job.cfg.vectors.window])}
    if lay.zones is not None:
        inputs.update(_vector_input("zones", lay.zones, "zones file not found"))
    for scene, image, cars in complete_scenes(lay.images, lay.out):
        inputs.update({f"scene/{scene}": image, f"probability/{scene}": lay.probability(scene),
                       f"masks/{scene}": lay.mask(scene), f"cars/{scene}": cars})
    # The products are named by the run that writes them (zones or density, one mosaic per
    # CRS); the manifest's list of the last run is what must still be there.
    return {STAGE_ITEM: Item(None, inputs, [lay.out / BATCH / MANIFEST])}


def _run_batch(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.files import read_json
    from pipeline.stages.batch import MANIFEST, build_batch

    lay = job.layout
    path = build_batch(lay.images, lay.out, model_dir=lay.model_dir, cfg=job.cfg,
                       zones=lay.zones)
    # Each file by name (batch.json lists them), so one deleted is a batch to redo, and
    # clean removes exactly these and leaves a user's file in batch/.
    written = read_json(lay.out / BATCH / MANIFEST, missing="batch manifest missing")
    items[STAGE_ITEM].outputs = [lay.out / BATCH / rel for rel in written["files"]]
    log.info("batch catalog: %s", path)
    return Outcome(done=[STAGE_ITEM])


# --- suggest ---

def _plan_suggest(job: Job) -> dict[str, Item]:
    """One item: the batch's probability rasters, the training scenes and labels, the bundle."""
    from pipeline.bundle import check_bundle

    lay = job.layout
    check_bundle(lay.model_dir)  # suggest never trains: no model is one line, before any work
    inputs: dict[str, Any] = {**_bundle_inputs(lay), "settings": settings_digest(job, "suggest")}
    for scene in _scenes(lay.images, "to rank"):
        name = scene_name(scene)
        if lay.probability(name).exists():  # a scene predict failed on has nothing to rank
            inputs.update({f"scene/{name}": scene, f"probability/{name}": lay.probability(name)})
    if job.cfg.suggest.training and lay.raw_images is not None and lay.raw_images.is_dir():
        for scene in list_scenes(lay.raw_images):
            inputs[f"training/{scene_name(scene)}"] = scene
        for path in list_vectors(lay.labels) if lay.labels is not None else []:
            inputs[f"labels/{path.name}"] = path
    if not any(k.startswith(("probability/", "training/")) for k in inputs):
        raise InputError(f"{lay.out / PROBABILITY}: no predicted scenes; run `make predict` "
                         "first")
    target = lay.suggestions
    return {STAGE_ITEM: Item(None, inputs, [target, target.with_suffix(".qml")])}


def _run_suggest(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.suggest import Sources, build_suggestions

    inputs = items[STAGE_ITEM].inputs
    pick = lambda prefix: [v for k, v in sorted(inputs.items()) if k.startswith(prefix)]  # noqa: E731
    sources = Sources(batch=tuple(zip(pick("scene/"), pick("probability/"), strict=True)),
                      training=tuple(pick("training/")), labels=tuple(pick("labels/")))
    import_keras_quietly(job.debug)
    path = build_suggestions(job.layout.suggestions, sources, model_dir=job.layout.model_dir,
                             cfg=job.cfg)
    log.info("squares to label next: %s", path)
    return Outcome(done=[STAGE_ITEM])


# --- evaluate ---

def _vector_input(role: str, spec: Path, missing: str) -> dict[str, Any]:
    """A vector source as stage inputs: its file by identity, a named layer by name."""
    path, layer = split_layer(spec)
    if not path.exists():
        raise InputError(f"{spec}: {missing}")
    return {role: path, **({f"{role}/layer": layer} if layer else {})}


def _plan_evaluate(job: Job) -> dict[str, Item]:
    from pipeline.stages.evaluate import EVALUATION_FILES

    lay = job.layout
    if lay.truth is None:
        raise InputError("None: ground truth not found")
    inputs: dict[str, Any] = {**_vector_input("truth", lay.truth, "ground truth not found"),
                              "settings": settings_digest(job, "evaluate")}
    for mask in list_scenes(lay.out / OUT_MASKS):
        inputs[f"masks/{scene_name(mask)}"] = mask
    for cars in sorted((lay.out / CARS).glob("*")):
        if not cars.name.startswith("."):
            inputs[f"cars/{cars.name}"] = cars
    return {STAGE_ITEM: Item(None, inputs, [lay.out / EVALUATION / f for f in EVALUATION_FILES])}


def _run_evaluate(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.evaluate import evaluate

    path = evaluate(job.layout.out, job.layout.truth, cfg=job.cfg.evaluate,
                    images=job.layout.images)
    log.info("metrics: %s", path)
    return Outcome(done=[STAGE_ITEM])


# --- report ---

def _plan_report(job: Job) -> dict[str, Item]:
    lay = job.layout
    inputs: dict[str, Any] = {**_bundle_inputs(lay), "settings": settings_digest(job, "report")}
    for path in [lay.summary, lay.metrics, lay.out / BATCH / "batch.json"]:
        inputs[relative(path, lay.out)] = path if path.exists() else "absent"
    return {STAGE_ITEM: Item(None, inputs, [lay.report / "index.html"])}


def _run_report(job: Job, items: dict[str, Item]) -> Outcome:
    from pipeline.stages.report import build_report

    lay = job.layout
    started = time.time_ns()
    path = build_report(lay.report, model_dir=lay.model_dir, out_dir=lay.out,
                        data_dir=lay.data, cfg=job.cfg.report)
    # Every file the report wrote is its own (the pictures beside index.html), so clean
    # removes exactly those.
    written = [p for p in lay.report.iterdir() if p.is_file() and not p.name.startswith(".")
               and p.stat().st_mtime_ns >= started]
    items[STAGE_ITEM].outputs = sorted({path, *written})
    log.info("report: %s", path)
    return Outcome(done=[STAGE_ITEM])


# === The table ===

def _out(name: str) -> Callable[[Layout], Path | None]:
    return lambda lay: lay.out / name if lay.out is not None else None


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("sample", lambda lay: lay.data, lambda lay: {}, lambda lay: {},
          _plan_sample, _run_sample),
    Stage("base", lambda lay: lay.data, lambda lay: {}, lambda lay: {"DATA": lay.data},
          _plan_base, _run_base),
    Stage("tile", lambda lay: lay.chips, lambda lay: {"IMAGES": lay.raw_images},
          lambda lay: {"CHIPS": lay.chips}, _plan_tile, _run_tile),
    Stage("masks", lambda lay: lay.masks,
          lambda lay: {"CHIPS": lay.chips, "LABELS": lay.labels, "IMAGES": lay.raw_images},
          lambda lay: {"MASKS": lay.masks}, _plan_masks, _run_masks, finish=_check_labels_hit),
    Stage("index", lambda lay: lay.chips, lambda lay: {"MASKS": lay.masks},
          lambda lay: {"CHIPS": lay.chips}, _plan_index, _run_index),
    Stage("train", lambda lay: lay.model_dir,
          lambda lay: {"CHIPS": lay.chips, "MASKS": lay.masks, "IMAGES": lay.raw_images},
          lambda lay: {"MODEL_DIR": lay.model_dir}, _plan_train, _run_train,
          what="trained into", why=train_reason, guard=_not_the_shipped_base),
    Stage("predict", lambda lay: lay.out,
          lambda lay: {"IMAGES": lay.images, "MODEL_DIR": lay.model_dir},
          lambda lay: {f"OUT/{n}": _out(n)(lay) for n in (PROBABILITY, OUT_MASKS, LOGS)},
          _plan_predict, _run_predict),
    Stage("vectors", lambda lay: lay.out,
          lambda lay: {"IMAGES": lay.images, "OUT/masks": _out(OUT_MASKS)(lay)},
          lambda lay: {"OUT/cars": _out(CARS)(lay)}, _plan_vectors, _run_vectors,
          finish=_finish_vectors),
    Stage("batch", lambda lay: lay.out,
          lambda lay: {"IMAGES": lay.images, "MODEL_DIR": lay.model_dir,
                       "ZONES": vector_file(lay.zones),
                       "OUT/cars": _out(CARS)(lay), "OUT/masks": _out(OUT_MASKS)(lay),
                       "OUT/probability": _out(PROBABILITY)(lay)},
          lambda lay: {"OUT/batch": _out(BATCH)(lay)}, _plan_batch, _run_batch),
    Stage("suggest", lambda lay: lay.out,
          lambda lay: {"IMAGES": lay.images, "MODEL_DIR": lay.model_dir,
                       "DATA/raw/images": lay.raw_images, "LABELS": lay.labels,
                       "OUT/probability": _out(PROBABILITY)(lay)},
          lambda lay: {"OUT/suggest": _out(SUGGEST)(lay)}, _plan_suggest, _run_suggest),
    Stage("evaluate", lambda lay: lay.out,
          lambda lay: {"TRUTH": vector_file(lay.truth), "OUT/cars": _out(CARS)(lay),
                       "OUT/masks": _out(OUT_MASKS)(lay)},
          lambda lay: {"OUT/evaluation": _out(EVALUATION)(lay)}, _plan_evaluate, _run_evaluate),
    Stage("report", lambda lay: lay.report,
          lambda lay: {"MODEL_DIR": lay.model_dir, "OUT/cars": _out(CARS)(lay),
                       "OUT/evaluation": _out(EVALUATION)(lay), "OUT/batch": _out(BATCH)(lay)},
          lambda lay: {"REPORTS/RUN": lay.report}, _plan_report, _run_report),
]}


def check_layout(lay: Layout, stages: list[str] | None = None) -> None:
    """Refuse, before any work, a layout whose outputs would write into or over an input.

    Every stage checks its own outputs against its own inputs as it runs; this is the whole
    chain at once, so ``make all`` fails before the first stage, not after training: first
    each stage's own check (the same line as by hand), then the layout's folders together.
    """
    for name in stages or ORDER:
        STAGES[name.rstrip("?")].check(lay)
    # TRUTH and ZONES are files: an output beside them (project/truth.gpkg, project/out) is fine.
    inputs = {"IMAGES": lay.images, "DATA/raw": lay.data / "raw" if lay.data else None,
              "TRUTH": vector_file(lay.truth), "ZONES": vector_file(lay.zones)}
    outputs: dict[str, Path | None] = {}
    if lay.out is not None:
        outputs.update({f"OUT/{name}": lay.out / name for name in OUT_FOLDERS})
    outputs.update({"MODEL_DIR": lay.model_dir, "REPORTS/RUN": lay.report,
                    "DATA/interim": lay.data / "interim" if lay.data else None})
    check_outputs_apart(outputs, inputs)


# === Make targets: several in one command work as one ===

# The stages each make target runs, in pipeline order. "evaluate?" runs where TRUTH exists.
TARGETS: dict[str, tuple[str, ...]] = {
    "sample": ("sample",),
    "tiles": ("tile",),
    "masks": ("tile", "masks", "index"),
    "train": ("train",),
    "predict": ("predict",),
    "vectors": ("predict", "vectors"),
    "batch": ("predict", "vectors", "batch"),
    "evaluate": ("predict", "vectors", "evaluate"),
    "report": ("predict", "vectors", "batch", "evaluate?", "report"),
    "suggest": ("predict", "suggest"),
    "all": ("train", "predict", "vectors", "batch", "suggest", "evaluate?", "report"),
}
ORDER = ("sample", "tile", "masks", "index", "train", "predict", "vectors", "batch", "suggest",
         "evaluate", "report")


def stages_for(targets: list[str]) -> list[str]:
    """The union of the targets' stages in pipeline order ("evaluate?" unless one needs it)."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise InputError(f"{unknown[0]}: not a pipeline target (one of {', '.join(TARGETS)})")
    wanted = {s for t in targets for s in TARGETS[t]}
    if "evaluate" in wanted:
        wanted.discard("evaluate?")
    return [s for s in ORDER for w in (s, f"{s}?") if w in wanted]


def run_targets(targets: list[str], job: Job) -> int:
    """Run the stages of several make targets as one chain.

    A stage where some scenes failed (exit 3) lets the next stages go on with the others,
    and the chain ends non-zero; bad input (exit 2) stops it.
    """
    lay = job.layout
    status = 0
    check_layout(lay, stages_for(targets))
    for stage in stages_for(targets):
        if stage.endswith("?"):
            stage = stage[:-1]
            if lay.truth is None or not vector_file(lay.truth).exists():
                continue
        if stage == "train":
            rc = _train_chain(job)
        else:
            rc = run_stage(stage, job)
        if rc not in (0, EXIT_PARTIAL):
            return rc
        status = status or rc
    return status


def _train_chain(job: Job) -> int:
    """Training data to a model: chips, masks, index, then train (which says why it (re)trains);
    without training scenes, an existing bundle is used as it is."""
    if has_training_scenes(job.layout):
        for stage in ("tile", "masks", "index"):
            rc = run_stage(stage, job)
            if rc:
                return rc
    return run_train(job)


# === clean: only what the stages wrote ===

CLEANED = (("chips", ("tile", "index")), ("masks", ("masks",)),
           ("out", ("predict", "vectors", "batch", "evaluate", "suggest")),
           ("report", ("report",)))


def clean(layout: Layout) -> list[Path]:
    """Remove every file and folder a stage's manifest lists, and the manifests; never anything
    else (a user's own folder or file in OUT, CHIPS, MASKS or the report folder stays)."""
    removed: list[Path] = []
    for attr, stages in CLEANED:
        folder = getattr(layout, attr)
        if folder is None or not folder.is_dir():
            continue
        with folder_lock(folder, "clean", doing="cleaned"):
            for stage in stages:
                manifest = Manifest.load(folder, stage)
                for key in list(manifest.items):
                    removed += manifest.forget(key)
                manifest.save()
                for path in removed:
                    prune_empty(path.parent, folder)
            remove_path(folder / TEMP_DIR)
        (folder / LOCK_FILE).unlink(missing_ok=True)
        prune_empty(folder, folder.parent)
    for path in {p.parent for p in removed}:
        if path.exists():
            prune_empty(path, path.parent)
    return removed
