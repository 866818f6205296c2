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

from pipeline.config import STAGE_SECTIONS, Config, load_config, stage_settings
from pipeline.io import CHIPS_FILE, MASKS_FILE, InputError, write_if_changed

log = logging.getLogger("pipeline")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="settings YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting, e.g. train.epochs=3")
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
    cfg = load_config(args.config, args.overrides)
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


# === Commands ===

def cmd_settings(args) -> int:
    """Write a stage's settings only when they changed (Make uses its mtime)."""
    cfg = _cfg(args)
    changed = write_if_changed(args.dst, stage_settings(cfg, args.stage))
    log.debug("%s settings %s", args.stage, "changed" if changed else "unchanged")
    return 0


def cmd_sample(args) -> int:
    from pipeline.sample import make_sample

    cfg = _cfg(args)
    manifest = make_sample(args.data, cfg=cfg.sample, force=args.force)
    log.info("sample written: %s", manifest)
    return 0


def cmd_tile(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.io import list_scenes
    from pipeline.tile import tile_scene

    cfg = _cfg(args)
    scenes = list_scenes(args.images)
    if not scenes:
        raise InputError(f"{args.images}: no GeoTIFF scenes (*.tif) to tile")
    return run_stage_batch(
        "tile", tile_scene, scenes,
        outputs=lambda s: [args.chips / s.stem / CHIPS_FILE],
        extra_inputs=[args.settings] if args.settings else [],
        args=(args.chips,), kwargs={"cfg": cfg.tile}, cfg=cfg.distributed, force=args.force)


def cmd_masks(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.io import list_vectors
    from pipeline.rasterize import load_labels, rasterize_scene

    cfg = _cfg(args)
    label_files = list_vectors(args.labels)
    if not label_files:
        raise InputError(f"{args.labels}: no label files (.gpkg, .geojson, .shp, .parquet)")
    scene_indexes = sorted(args.chips.glob(f"*/{CHIPS_FILE}"))
    if not scene_indexes:
        raise InputError(f"{args.chips}: no chips; run `make tiles` first")
    labels = load_labels(label_files, cfg=cfg.labels)
    return run_stage_batch(
        "masks", rasterize_scene, scene_indexes,
        outputs=lambda idx: [args.masks / idx.parent.name / MASKS_FILE],
        extra_inputs=label_files + ([args.settings] if args.settings else []),
        args=(labels, args.masks), kwargs={"cfg": cfg.labels}, cfg=cfg.distributed,
        force=args.force)


def cmd_index(args) -> int:
    from pipeline.tile import build_index

    cfg = _cfg(args)
    path = build_index(args.chips, args.masks, cfg=cfg.tile)
    log.info("chip index: %s", path)
    return 0


def cmd_train(args) -> int:
    _import_keras_quietly(args.debug)
    from pipeline.train import train

    cfg = _cfg(args)
    path = train(args.chips, args.masks, args.model_dir, cfg=cfg)
    log.info("model: %s", path)
    return 0


def cmd_predict(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.io import list_scenes
    from pipeline.model import METADATA_FILE, MODEL_FILE
    from pipeline.predict import predict_scene

    cfg = _cfg(args)
    scenes = list_scenes(args.images)
    if not scenes:
        raise InputError(f"{args.images}: no GeoTIFF scenes (*.tif) to predict")
    model_dir = args.model_dir
    return run_stage_batch(
        "predict", predict_scene, scenes,
        outputs=lambda s: [args.out / "probability" / f"{s.stem}.tif",
                           args.out / "masks" / f"{s.stem}.tif"],
        extra_inputs=[model_dir / MODEL_FILE, model_dir / METADATA_FILE]
        + ([args.settings] if args.settings else []),
        args=(model_dir, args.out), kwargs={"cfg": cfg.predict}, cfg=cfg.distributed,
        force=args.force, log_dir=args.out / "logs",
        prepare=lambda: _import_keras_quietly(args.debug))


def cmd_vectors(args) -> int:
    from pipeline.distributed import run_stage_batch
    from pipeline.io import VECTOR_SUFFIX, list_scenes
    from pipeline.vectorize import vectorize_scene, write_summary

    cfg = _cfg(args)
    masks = list_scenes(args.out / "masks")
    if not masks:
        raise InputError(f"{args.out / 'masks'}: no predicted masks; run `make predict` first")
    suffix = VECTOR_SUFFIX[cfg.vectors.format]
    status = run_stage_batch(
        "vectors", vectorize_scene, masks,
        outputs=lambda m: [args.out / "cars" / f"{m.stem}{suffix}"],
        extra_inputs=[args.settings] if args.settings else [],
        args=(args.out,), kwargs={"cfg": cfg.vectors}, cfg=cfg.distributed,
        force=args.force, log_dir=args.out / "logs")
    write_summary(args.out)
    return status


def cmd_batch(args) -> int:
    from pipeline.batch import build_batch

    cfg = _cfg(args)
    path = build_batch(args.images, args.out, model_dir=args.model_dir, cfg=cfg,
                       zones=args.zones, settings=args.settings, force=args.force)
    log.info("batch catalog: %s", path)
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate

    cfg = _cfg(args)
    path = evaluate(args.out, args.truth, cfg=cfg.evaluate)
    log.info("metrics: %s", path)
    return 0


def cmd_report(args) -> int:
    from pipeline.report import build_report

    cfg = _cfg(args)
    path = build_report(args.dst, model_dir=args.model_dir, out_dir=args.out, data_dir=args.data,
                        cfg=cfg.report)
    log.info("report: %s", path)
    return 0


# === Parser ===

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Find cars in GeoTIFFs: tile, rasterize labels, train a U-Net, predict, "
                    "vectorize, evaluate, report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = sub.add_parser("settings", help="write a stage's settings file only if it changed")
    p.add_argument("stage", choices=sorted(STAGE_SECTIONS))
    p.add_argument("dst", type=Path)
    _common(p)
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("sample", help="generate sample scenes, labels and truth into DATA")
    p.add_argument("data", type=Path, help="data root (raw/, incoming/, truth/ are written)")
    p.add_argument("--force", action="store_true", help="overwrite an existing sample")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("tile", help="cut every scene in IMAGES into chips")
    p.add_argument("images", type=Path, help="folder of GeoTIFF scenes")
    p.add_argument("chips", type=Path, help="chips folder (chips/<scene>/<chip>.tif)")
    p.add_argument("--settings", type=Path, help="settings file this run depends on")
    _common(p)
    _batch(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("masks", help="rasterize car labels into a mask per chip")
    p.add_argument("chips", type=Path, help="chips folder from `tile`")
    p.add_argument("labels", type=Path, help="folder of vector label files")
    p.add_argument("masks", type=Path, help="masks folder (masks/<scene>/<chip>.tif)")
    p.add_argument("--settings", type=Path, help="settings file this run depends on")
    _common(p)
    _batch(p)
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("index", help="chip index with split and band statistics")
    p.add_argument("chips", type=Path)
    p.add_argument("masks", type=Path)
    _common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("train", help="train the U-Net into MODEL_DIR")
    p.add_argument("chips", type=Path)
    p.add_argument("masks", type=Path)
    p.add_argument("model_dir", type=Path)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="probability and mask COGs for every scene in IMAGES")
    p.add_argument("images", type=Path, help="folder of GeoTIFF scenes to predict")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output root (probability/, masks/)")
    p.add_argument("--settings", type=Path, help="settings file this run depends on")
    _common(p)
    _batch(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("vectors", help="one polygon per car for every predicted scene")
    p.add_argument("--out", type=Path, required=True, help="output root (reads masks/)")
    p.add_argument("--settings", type=Path, help="settings file this run depends on")
    _common(p)
    _batch(p)
    p.set_defaults(func=cmd_vectors)

    p = sub.add_parser("batch", help="batch products: one car layer, mosaics, counts, STAC")
    p.add_argument("--images", type=Path, required=True, help="folder of the batch's GeoTIFFs")
    p.add_argument("--out", type=Path, required=True,
                   help="output root (reads probability/, masks/, cars/; writes batch/)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--zones", type=Path, default=None,
                   help="polygons to count cars in (any vector format and CRS)")
    p.add_argument("--settings", type=Path, help="settings file this run depends on")
    _common(p)
    _batch(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("evaluate", help="pixel and object metrics against ground truth")
    p.add_argument("--out", type=Path, required=True, help="output root of predictions")
    p.add_argument("--truth", type=Path, required=True, help="ground-truth car footprints")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="HTML report with plots and overlays")
    p.add_argument("dst", type=Path, help="report folder (index.html is written there)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None, help="data root, for sample overlays")
    _common(p)
    p.set_defaults(func=cmd_report)
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
        # TensorFlow's C++ banner and Dask's worker start/stop narration are noise to a GIS
        # user; --debug keeps them. Dask reads this variable at import, in every worker too.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        return args.func(args)
    except InputError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: still one line, traceback on --debug
        if args.debug:
            raise
        print(f"error: {args.command}: {exc.__class__.__name__}: {exc} (rerun with --debug "
              "for the traceback)", file=sys.stderr)
        return 1
