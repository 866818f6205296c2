"""``python -m pipeline STAGE ...``: one thin command per stage.

Each command parses its arguments, loads the settings (YAML + ``--set``), calls the stage and
turns known errors into one line on stderr. Heavy libraries (TensorFlow, Dask) are imported
inside the commands that need them, so ``--help`` and no-op reruns stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import STAGE_SECTIONS, Config, load_config, split_overrides, stage_settings
from pipeline.io import (
    CHIPS_FILE,
    INDEX_FILE,
    MASKS_FILE,
    STATS_FILE,
    InputError,
    check_outputs_apart,
    first_line,
    folder_lock,
    is_fresh,
    json_differs,
    list_scenes,
    scene_name,
    write_if_changed,
)

log = logging.getLogger("pipeline")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="settings YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting, e.g. train.epochs=3")
    parser.add_argument("--sets", default="", metavar="'K=V K=V'",
                        help="several overrides in one string, as make's SET passes them "
                             "(values may hold spaces: 'tile.bands=[1, 2, 3] train.epochs=3')")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", default=None,
                        help="address of an existing Dask scheduler (default: embedded cluster)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the embedded Dask cluster (default: cores)")
    parser.add_argument("--force", action="store_true",
                        help="redo scenes whose outputs look up to date")


def _cfg(args) -> Config:
    cfg = load_config(args.config, [*split_overrides(args.sets), *args.overrides])
    if getattr(args, "scheduler", None):
        cfg.distributed.scheduler = args.scheduler
    if getattr(args, "workers", None):
        cfg.distributed.workers = args.workers
    return cfg


def _import_keras_quietly(debug: bool) -> None:
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


def _stamp(args, cfg: Config, stage: str) -> list[Path]:
    """Write the stage's settings to ``--settings`` when they changed; it is then an input.

    Its mtime changes only when the stage's own sections change, so changing ``train.epochs``
    redoes training and nothing before it.
    """
    if not getattr(args, "settings", None):
        return []
    write_if_changed(args.settings, stage_settings(cfg, stage))
    return [args.settings]


LABEL_FILES = "labels.json"  # in MASKS: the names of the label files the masks come from


def _settings_changed(args, cfg: Config, stage: str) -> bool:
    """Whether :func:`_stamp` would write the stage's settings (they changed, or are new)."""
    settings = getattr(args, "settings", None)
    return bool(settings) and json_differs(settings, stage_settings(cfg, stage))


def _nothing_to_do(args, cfg: Config, stage: str, items: list[Path], outputs,
                   extra_inputs: list[Path] | None = None) -> bool:
    """Whether a per-scene stage would skip every item, looked at before its folder lock.

    Without the lock and without stamping: a rerun with nothing to do neither waits for another
    run nor writes anything (the lock records its holder). When there is work, the stage takes
    the lock and looks again; a run it waited for has usually done that work by then.
    """
    if getattr(args, "force", False) or _settings_changed(args, cfg, stage):
        return False
    inputs = [*(extra_inputs or []), *([args.settings] if getattr(args, "settings", None) else [])]
    return all(is_fresh(outputs(item), [item, *inputs]) for item in items)


def _gone(folder: Path, scenes: list[Path]) -> list[Path]:
    """The derived folders (chips, masks) of scenes no longer in the training folder."""
    from pipeline.io import TEMP_DIR

    keep = {scene_name(s) for s in scenes}
    if not folder.is_dir():
        return []
    return [sub for sub in sorted(folder.iterdir())
            if sub.is_dir() and sub.name != TEMP_DIR and sub.name not in keep]


def _prune(folder: Path, scenes: list[Path], what: str) -> None:
    """Remove the derived folders (chips, masks) of scenes no longer in the training folder, so
    the chip index and training see exactly the scenes that are there now."""
    import shutil

    for sub in _gone(folder, scenes):
        log.info("%s: scene %s is gone from the training folder; removing its %s",
                 folder, sub.name, what)
        shutil.rmtree(sub)


def _scenes(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    scenes = list_scenes(folder)
    if not scenes:
        raise InputError(f"{folder}: no GeoTIFF scenes (.tif/.tiff) {what}")
    return scenes


# === Commands ===

def cmd_scenes(args) -> int:
    """Print the scene names of a folder, one per line (the one list Make and the CLI share)."""
    scenes = list_scenes(args.folder)
    if args.any:
        return 0 if scenes else 1
    for path in scenes:
        print(scene_name(path))
    return 0


# Folders under OUT that the batch stages write.
OUT_FOLDERS = ("probability", "masks", "cars", "batch", "evaluation", "settings", "logs")


def cmd_paths(args) -> int:
    """Refuse, before any work, outputs that would write into or over an input folder."""
    # TRUTH and ZONES are files: an output beside them (project/truth.gpkg, project/out) is fine.
    inputs = {"IMAGES": args.images, "DATA/raw": args.data / "raw" if args.data else None,
              "TRUTH": args.truth, "ZONES": args.zones}
    outputs: dict[str, Path | None] = {}
    if args.out:
        outputs.update({f"OUT/{name}": args.out / name for name in OUT_FOLDERS})
    outputs.update({"MODEL_DIR": args.model_dir, "REPORTS/RUN": args.report,
                    "DATA/interim": args.data / "interim" if args.data else None})
    check_outputs_apart(outputs, inputs)
    return 0


def cmd_settings(args) -> int:
    """Write a stage's settings only when they changed (Make uses its mtime)."""
    cfg = _cfg(args)
    changed = write_if_changed(args.dst, stage_settings(cfg, args.stage))
    log.debug("%s settings %s", args.stage, "changed" if changed else "unchanged")
    return 0


def cmd_sample(args) -> int:
    from pipeline.sample import make_sample

    cfg = _cfg(args)
    manifest = args.data / "sample-manifest.json"

    def fresh() -> bool:
        return bool(args.settings) and not args.force and is_fresh([manifest], [args.settings])

    if not _settings_changed(args, cfg, "sample") and fresh():
        log.info("sample: %s is up to date", manifest)
        return 0
    # One writer of DATA's sample at a time: a second `make sample` waits, then finds it there.
    with folder_lock(args.data, "sample"):
        _stamp(args, cfg, "sample")
        if fresh():
            log.info("sample: %s is up to date", manifest)
            return 0
        manifest = make_sample(args.data, cfg=cfg.sample, force=args.force)
    log.info("sample written: %s", manifest)
    return 0


def cmd_tile(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.tile import tile_scene

    cfg = _cfg(args)
    scenes = _scenes(args.images, "to tile")

    def outputs(s: Path) -> list[Path]:
        return [args.chips / scene_name(s) / CHIPS_FILE]

    if not _gone(args.chips, scenes) and _nothing_to_do(args, cfg, "tile", scenes, outputs):
        log.info("tile: all %d up to date", len(scenes))
        return 0
    # One writer of CHIPS at a time (index writes there too): a second run waits here.
    with folder_lock(args.chips, "tile"):
        if _gone(args.chips, scenes):
            # The chip index lists the chips of a scene that is gone, and nothing newer than it
            # is left to say so: removed, so `index` rebuilds it (and `train` then retrains).
            for name in (INDEX_FILE, STATS_FILE):
                (args.chips / name).unlink(missing_ok=True)
        _prune(args.chips, scenes, "chips")
        return run_stage_batch(
            "tile", tile_scene, scenes, outputs=outputs,
            extra_inputs=_stamp(args, cfg, "tile"),
            args=(args.chips,), kwargs={"cfg": cfg.tile}, cfg=cfg.distributed, force=args.force)


def cmd_masks(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.io import list_vectors
    from pipeline.rasterize import load_labels, rasterize_scene

    cfg = _cfg(args)
    label_files = list_vectors(args.labels)
    if not label_files:
        raise InputError(f"{args.labels}: no label files (.gpkg, .geojson, .shp, .parquet)")
    gone: list[Path] = []
    if args.images is not None:
        # The scenes of the training folder now, not every folder a past run left in chips/.
        scenes = _scenes(args.images, "to rasterize labels for")
        gone = _gone(args.masks, scenes)
        scene_indexes = [args.chips / scene_name(s) / CHIPS_FILE for s in scenes]
    else:
        scene_indexes = sorted(p for p in args.chips.glob(f"*/{CHIPS_FILE}")
                               if not p.parent.name.startswith(".carseg"))
    missing = [p for p in scene_indexes if not p.exists()]
    if not scene_indexes or missing:
        raise InputError(f"{missing[0] if missing else args.chips}: no chips; "
                         "run `make tiles` first")

    def outputs(idx: Path) -> list[Path]:
        return [args.masks / idx.parent.name / MASKS_FILE]

    # The label files the masks were burned from: one removed (or renamed) leaves no file
    # newer than the masks, so only this list says that every scene's masks must be redone.
    record, names = args.masks / LABEL_FILES, [p.name for p in label_files]
    relabel = record.exists() and json_differs(record, names)
    status = 0
    if (gone or relabel
            or not _nothing_to_do(args, cfg, "masks", scene_indexes, outputs, label_files)):
        # One writer of MASKS at a time: a second run waits here, then finds them up to date.
        with folder_lock(args.masks, "masks"):
            if args.images is not None:
                _prune(args.masks, scenes, "masks")
            stamp = _stamp(args, cfg, "masks")
            relabel = record.exists() and json_differs(record, names)
            stale = [p for p in scene_indexes if args.force or relabel
                     or not is_fresh(outputs(p), [p, *label_files, *stamp])]
            labels = load_labels(label_files, cfg=cfg.labels) if stale else None
            status = run_stage_batch(
                "masks", rasterize_scene, stale, outputs=outputs,
                extra_inputs=[], args=(labels, args.masks), kwargs={"cfg": cfg.labels},
                cfg=cfg.distributed, force=True) if stale else 0
            if status == 0:
                write_if_changed(record, names)
    if status == 0:
        _check_labels_hit(scene_indexes, args.masks, label_files)
    return status


def _check_labels_hit(scene_indexes: list[Path], masks_dir: Path, label_files: list[Path]) -> None:
    """Refuse labels that burn no car pixel in any chip (wrong CRS, other place, other scenes)."""
    from pipeline.io import read_json

    burned = 0
    for idx in scene_indexes:
        summary = read_json(masks_dir / idx.parent.name / MASKS_FILE, missing="masks missing")
        burned += sum(summary.get("chips", {}).values())
    if not burned:
        names = ", ".join(p.name for p in label_files)
        raise InputError(f"{label_files[0].parent}: no chip holds a car: the labels ({names}) "
                         "fall outside every training scene; check their CRS and extent")


def cmd_index(args) -> int:
    from pipeline.tile import build_index

    cfg = _cfg(args)
    outputs = [args.chips / INDEX_FILE, args.chips / STATS_FILE]

    def inputs() -> list[Path]:
        return [*args.chips.glob(f"*/{CHIPS_FILE}"), *args.masks.glob(f"*/{MASKS_FILE}"),
                *([args.settings] if args.settings else [])]

    if (not args.force and not _settings_changed(args, cfg, "masks")
            and is_fresh(outputs, inputs())):
        log.info("chip index: up to date")
        return 0
    # It writes into CHIPS, so it waits for a tile (or index) of another run there.
    with folder_lock(args.chips, "index"):
        _stamp(args, cfg, "masks")
        if not args.force and is_fresh(outputs, inputs()):
            log.info("chip index: up to date")
            return 0
        path = build_index(args.chips, args.masks, cfg=cfg.tile)
    log.info("chip index: %s", path)
    return 0


def cmd_train(args) -> int:
    from pipeline.io import json_differs
    from pipeline.model import MODEL_FILE, train_lock

    cfg = _cfg(args)
    model = args.model_dir / MODEL_FILE
    if args.images is not None and not list_scenes(args.images):
        # A bundle trained elsewhere, and no training data here: it is used as it is.
        if model.exists():
            log.info("train: no training scenes in %s; using %s as it is", args.images, model)
            return 0
        raise InputError(f"{args.images}: no training scenes (.tif/.tiff) and no model in "
                         f"{args.model_dir}")
    inputs = {"the chip index": args.chips / INDEX_FILE, "the band statistics":
              args.chips / STATS_FILE}
    if args.settings:
        inputs["the training settings"] = args.settings
    # Looked at first without the lock (and without stamping), so a rerun with nothing to do
    # neither waits for another run nor touches MODEL_DIR.
    if (not args.force and _train_reason(model, inputs) is None
            and not (args.settings and json_differs(args.settings,
                                                     stage_settings(cfg, "train")))):
        log.info("train: %s is up to date", model)
        return 0
    # One training per MODEL_DIR: a second run waits here for the first, then looks again
    # (the settings stamp too is written under the lock, so it always matches the model).
    with train_lock(args.model_dir):
        _stamp(args, cfg, "train")
        reason = _train_reason(model, inputs)
        if reason is None and not args.force:
            log.info("train: %s is up to date", model)
            return 0
        log.info("train: %s", reason or "--force")
        _import_keras_quietly(args.debug)
        from pipeline.train import train

        path = train(args.chips, args.masks, args.model_dir, cfg=cfg)
    log.info("model: %s", path)
    return 0


def _train_reason(model: Path, inputs: dict[str, Path]) -> str | None:
    """Why the model must be (re)trained, in words, or None when it is up to date."""
    if not model.exists():
        return f"no model in {model.parent}; training one"
    newer = [name for name, path in inputs.items()
             if path.exists() and path.stat().st_mtime > model.stat().st_mtime]
    if newer:
        return (f"{' and '.join(newer)} changed since {model} was trained; retraining "
                f"(the previous bundle is kept in {model.parent / 'previous'})")
    return None


def cmd_predict(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.model import METADATA_FILE, MODEL_FILE, check_bundle
    from pipeline.predict import predict_scene

    cfg = _cfg(args)
    check_outputs_apart({"OUT/probability": args.out / "probability",
                         "OUT/masks": args.out / "masks"},
                        {"IMAGES": args.images, "MODEL_DIR": args.model_dir})
    scenes = _scenes(args.images, "to predict")
    model_dir = args.model_dir
    check_bundle(model_dir)  # predict never trains: no model is one line, before any work

    def outputs(s: Path) -> list[Path]:
        return [args.out / "probability" / f"{scene_name(s)}.tif",
                args.out / "masks" / f"{scene_name(s)}.tif"]

    model_files = [model_dir / MODEL_FILE, model_dir / METADATA_FILE]
    if _nothing_to_do(args, cfg, "predict", scenes, outputs, model_files):
        log.info("predict: all %d up to date", len(scenes))
        return 0
    # One writer of OUT at a time (predict, vectors, batch, evaluate): a second run waits here.
    with folder_lock(args.out, "predict"):
        return run_stage_batch(
            "predict", predict_scene, scenes, outputs=outputs,
            extra_inputs=model_files + _stamp(args, cfg, "predict"),
            args=(model_dir, args.out), kwargs={"cfg": cfg.predict}, cfg=cfg.distributed,
            force=args.force, log_dir=args.out / "logs",
            prepare=lambda: _import_keras_quietly(args.debug))


def cmd_vectors(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.io import VECTOR_SUFFIX, find_cars_file
    from pipeline.vectorize import vectorize_scene, write_summary

    cfg = _cfg(args)
    masks_dir = args.out / "masks"
    suffix = VECTOR_SUFFIX[cfg.vectors.format]

    def masks_now() -> tuple[list[Path], list[Path]]:
        """The masks to vectorize, and the car layers of scenes without a mask (stale)."""
        if args.images is None:
            return list_scenes(masks_dir), []
        # The batch's scenes that predict has finished (a failed scene has no mask; it is
        # reported in the summary from its log).
        masks = [masks_dir / f"{scene_name(s)}.tif" for s in _scenes(args.images, "")]
        # Its predict failed (or was never run): an old car layer would be stale.
        stale = [find_cars_file(args.out, scene_name(m)) for m in masks if not m.exists()]
        return [m for m in masks if m.exists()], [p for p in stale if p is not None]

    def outputs(m: Path) -> list[Path]:
        return [args.out / "cars" / f"{scene_name(m)}{suffix}"]

    def summarise() -> Path:
        # Rewritten only when it changes, so a rerun with nothing to do (no lock) leaves it.
        return write_summary(args.out, [scene_name(s) for s in list_scenes(args.images)]
                             if args.images is not None else None)

    masks, stale = masks_now()
    if masks and not stale and _nothing_to_do(args, cfg, "vectors", masks, outputs):
        log.info("vectors: all %d up to date", len(masks))
        status, summary = 0, summarise()
    else:
        # One writer of OUT at a time: a second run waits here, then finds the cars up to date.
        with folder_lock(args.out, "vectors"):
            masks, stale = masks_now()
            for path in stale:
                path.unlink()
            if not masks:
                raise InputError(f"{masks_dir}: no predicted masks; run `make predict` first")
            status = run_stage_batch(
                "vectors", vectorize_scene, masks, outputs=outputs,
                extra_inputs=_stamp(args, cfg, "vectors"),
                args=(args.out,), kwargs={"cfg": cfg.vectors}, cfg=cfg.distributed,
                force=args.force, log_dir=args.out / "logs")
            summary = summarise()
    _warn_empty(summary, args.images)
    return status


def _warn_empty(summary: Path, images: Path | None) -> None:
    """One warning per scene without a valid pixel, naming its file.

    Such a scene is no failure (a tile of a delivery grid outside the flown area is normal, and
    failing the batch for it would make users prune their archive), so the stage still exits 0;
    but it is not a scene with zero cars either, and the user must hear that it was not looked at.
    """
    import csv

    from pipeline.io import EMPTY_REASON, EMPTY_STATUS

    files = {scene_name(p): p for p in list_scenes(images)} if images is not None else {}
    with open(summary, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == EMPTY_STATUS:
                path = files.get(row["scene"]) or summary.parents[1] / "masks" / f"{row['scene']}.tif"
                log.warning("%s: %s; listed as %s in %s, and left out of car counts and batch "
                            "products", path, EMPTY_REASON, EMPTY_STATUS, summary)


def cmd_batch(args) -> int:
    from pipeline.batch import CATALOG, batch_up_to_date, build_batch

    cfg = _cfg(args)
    if (not args.force and not _settings_changed(args, cfg, "batch")
            and batch_up_to_date(args.images, args.out, model_dir=args.model_dir, cfg=cfg,
                                 zones=args.zones, settings=args.settings)):
        log.info("batch: up to date")
        log.info("batch catalog: %s", args.out / "batch" / CATALOG)
        return 0
    # One writer of OUT at a time: a second run waits here, then finds the batch up to date.
    with folder_lock(args.out, "batch"):
        _stamp(args, cfg, "batch")
        path = build_batch(args.images, args.out, model_dir=args.model_dir, cfg=cfg,
                           zones=args.zones, settings=args.settings, force=args.force)
    log.info("batch catalog: %s", path)
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate

    cfg = _cfg(args)
    metrics = args.out / "evaluation" / "metrics.json"

    def fresh() -> bool:
        inputs = [args.truth, *(args.out / "cars").glob("*"),
                  *([args.settings] if args.settings else [])]
        return not args.force and is_fresh([metrics], inputs)

    if not _settings_changed(args, cfg, "evaluate") and fresh():
        log.info("evaluate: %s is up to date", metrics)
        return 0
    # One writer of OUT at a time: OUT/evaluation is replaced as a whole.
    with folder_lock(args.out, "evaluate"):
        _stamp(args, cfg, "evaluate")
        if fresh():
            log.info("evaluate: %s is up to date", metrics)
            return 0
        path = evaluate(args.out, args.truth, cfg=cfg.evaluate)
    log.info("metrics: %s", path)
    return 0


def cmd_report(args) -> int:
    from pipeline.model import METADATA_FILE, MODEL_FILE
    from pipeline.report import build_report

    cfg = _cfg(args)
    page = args.dst / "index.html"

    def fresh() -> bool:
        inputs = [args.model_dir / MODEL_FILE, args.model_dir / METADATA_FILE,
                  args.out / "cars" / "summary.csv", args.out / "evaluation" / "metrics.json",
                  *(args.out / "batch").glob("*"), *([args.settings] if args.settings else [])]
        return not args.force and is_fresh([page], inputs)

    if not _settings_changed(args, cfg, "report") and fresh():
        log.info("report: %s is up to date", page)
        return 0
    # One writer of the report folder at a time (it reads OUT, whose files are each replaced
    # whole, so it needs no lock there).
    with folder_lock(args.dst, "report"):
        _stamp(args, cfg, "report")
        if fresh():
            log.info("report: %s is up to date", page)
            return 0
        path = build_report(args.dst, model_dir=args.model_dir, out_dir=args.out,
                            data_dir=args.data, cfg=cfg.report)
    log.info("report: %s", path)
    return 0


# === Parser ===

SETTINGS_HELP = "settings file this run depends on"


def _finish(p: argparse.ArgumentParser, func, *, settings: str | None = SETTINGS_HELP,
            force: str | None = None, batch: bool = False) -> None:
    """The options the stage commands share, always in one order, and the command to run:
    ``--settings`` (the stage's settings stamp), ``--force``, the common options, the batch
    options (which bring their own ``--force``)."""
    if settings:
        p.add_argument("--settings", type=Path, help=settings)
    if force:
        p.add_argument("--force", action="store_true", help=force)
    _common(p)
    if batch:
        _batch(p)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Find cars in GeoTIFFs: tile, rasterize labels, train a U-Net, predict, "
                    "vectorize, evaluate, report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = sub.add_parser("settings", help="write a stage's settings file only if it changed")
    p.add_argument("stage", choices=sorted(STAGE_SECTIONS))
    p.add_argument("dst", type=Path)
    _finish(p, cmd_settings, settings=None)

    p = sub.add_parser("scenes", help="list the scene names of a folder (the one scene list)")
    p.add_argument("folder", type=Path)
    p.add_argument("--any", action="store_true",
                   help="print nothing; exit 0 when the folder holds a scene, 1 when not")
    _finish(p, cmd_scenes, settings=None)

    p = sub.add_parser("paths", help="refuse output folders that would write over an input")
    for flag in ("--data", "--images", "--out", "--model-dir", "--report", "--truth",
                 "--zones"):
        p.add_argument(flag, type=Path, default=None)
    _finish(p, cmd_paths, settings=None)

    p = sub.add_parser("sample", help="generate sample scenes, labels and truth into DATA")
    p.add_argument("data", type=Path, help="data root (raw/, incoming/, truth/ are written)")
    _finish(p, cmd_sample, force="overwrite an existing sample")

    p = sub.add_parser("tile", help="cut every scene in IMAGES into chips")
    p.add_argument("images", type=Path, help="folder of GeoTIFF scenes")
    p.add_argument("chips", type=Path, help="chips folder (chips/<scene>/<chip>.tif)")
    _finish(p, cmd_tile, batch=True)

    p = sub.add_parser("masks", help="rasterize car labels into a mask per chip")
    p.add_argument("chips", type=Path, help="chips folder from `tile`")
    p.add_argument("labels", type=Path, help="folder of vector label files")
    p.add_argument("masks", type=Path, help="masks folder (masks/<scene>/<chip>.tif)")
    p.add_argument("--images", type=Path, default=None,
                   help="the training scenes' folder (default: every scene in CHIPS)")
    _finish(p, cmd_masks, batch=True)

    p = sub.add_parser("index", help="chip index with split and band statistics")
    p.add_argument("chips", type=Path)
    p.add_argument("masks", type=Path)
    _finish(p, cmd_index, settings="the masks settings file this run depends on",
            force="rebuild even when up to date")

    p = sub.add_parser("train", help="train the U-Net into MODEL_DIR")
    p.add_argument("chips", type=Path)
    p.add_argument("masks", type=Path)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--images", type=Path, default=None,
                   help="the training scenes' folder; without scenes there, an existing model "
                        "is used as it is")
    _finish(p, cmd_train, force="train even when the model is fresh")

    p = sub.add_parser("predict", help="probability and mask COGs for every scene in IMAGES")
    p.add_argument("images", type=Path, help="folder of GeoTIFF scenes to predict")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output root (probability/, masks/)")
    _finish(p, cmd_predict, batch=True)

    p = sub.add_parser("vectors", help="one polygon per car for every predicted scene")
    p.add_argument("--out", type=Path, required=True, help="output root (reads masks/)")
    p.add_argument("--images", type=Path, default=None,
                   help="the batch's folder: vectorize its scenes (default: every mask in OUT)")
    _finish(p, cmd_vectors, batch=True)

    p = sub.add_parser("batch", help="batch products: one car layer, mosaics, counts, STAC")
    p.add_argument("--images", type=Path, required=True, help="folder of the batch's GeoTIFFs")
    p.add_argument("--out", type=Path, required=True,
                   help="output root (reads probability/, masks/, cars/; writes batch/)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--zones", type=Path, default=None,
                   help="polygons to count cars in (any vector format and CRS)")
    _finish(p, cmd_batch, batch=True)

    p = sub.add_parser("evaluate", help="pixel and object metrics against ground truth")
    p.add_argument("--out", type=Path, required=True, help="output root of predictions")
    p.add_argument("--truth", type=Path, required=True, help="ground-truth car footprints")
    _finish(p, cmd_evaluate, force="evaluate even when up to date")

    p = sub.add_parser("report", help="HTML report with plots and overlays")
    p.add_argument("dst", type=Path, help="report folder (index.html is written there)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None, help="data root, for sample overlays")
    _finish(p, cmd_report, force="rebuild even when up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one stage; known errors become one line on stderr and a non-zero exit."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.debug else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("pyogrio", "rasterio", "matplotlib", "PIL", "distributed", "absl", "h5py"):
        # Libraries' INFO chatter ("Created 99 records") hides the pipeline's own lines.
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if not args.debug:
        # GDAL's errors reach the user as the stage's one line (io.first_line); its own log
        # lines ("_tiffWriteProc: No space left on device.") would only repeat them.
        logging.getLogger("rasterio._err").setLevel(logging.CRITICAL)
        logging.getLogger("rasterio._env").setLevel(logging.CRITICAL)
    if not args.debug:
        # TensorFlow's C++ banner and Dask's worker start/stop narration are noise to a GIS
        # user; --debug keeps them. Dask reads this variable at import, in every worker too.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    try:
        return args.func(args)
    except InputError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: the file and the reason, in one line
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {args.command}: {where}{first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: still one line, traceback on --debug
        if args.debug:
            raise
        print(f"error: {args.command}: {exc.__class__.__name__}: {first_line(exc)} (rerun "
              "with --debug for the traceback)", file=sys.stderr)
        return 1
