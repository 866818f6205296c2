"""``python -m pipeline STAGE ...``: one thin command per stage.

Each command parses its arguments, names the folders (:class:`pipeline.layout.Layout`) and
calls :func:`pipeline.runner.run_stage`, which owns the guard, the lock and freshness for every
entry point; known errors become one line on stderr. Heavy libraries (TensorFlow, Dask) are imported
inside the commands that need them, so ``--help`` and no-op reruns stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import STAGE_SECTIONS, Config, load_config, split_overrides, stage_settings
from pipeline.errors import InputError, first_line
from pipeline.files import write_if_changed
from pipeline.io import vector_file
from pipeline.layout import Layout
from pipeline.runner import (
    Job,
    check_layout,
    clean,
    run_base,
    run_stage,
    run_targets,
    run_train,
)
from pipeline.scenes import list_scenes, scene_name
from pipeline.stages.base import BASE_BUNDLE

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


def _job(args, layout: Layout, stage: str | None = None) -> Job:
    if stage is not None:
        layout = layout.with_settings(stage, getattr(args, "settings", None))
    return Job(layout, _cfg(args), force=getattr(args, "force", False), debug=args.debug)


# === Commands: each parses, names the paths, and goes through the stage runner ===

def cmd_scenes(args) -> int:
    """Print the scene names of a folder, one per line (the one list Make and the CLI share)."""
    scenes = list_scenes(args.folder)
    if args.any:
        return 0 if scenes else 1
    for path in scenes:
        print(scene_name(path))
    return 0


def _make_layout(args) -> Layout:
    return Layout.for_make(data=args.data, images=args.images, out=args.out,
                           model_dir=args.model_dir, truth=args.truth, zones=args.zones,
                           report=args.report)


def cmd_paths(args) -> int:
    """Refuse, before any work, outputs that would write into or over an input folder."""
    check_layout(_make_layout(args))
    return 0


def cmd_run(args) -> int:
    """Run make targets (several as one chain) on the layout of INTERFACE.md."""
    layout = _make_layout(args)
    job = _job(args, layout)
    status = run_targets(args.targets, job)
    if "all" in args.targets:
        _print_outputs(layout)
    return status


def _print_outputs(lay: Layout) -> None:
    print("outputs:")
    print(f"  model        {lay.model_dir}/model.keras (+ metadata.json)")
    print(f"  probability  {lay.out}/probability/<scene>.tif")
    print(f"  masks        {lay.out}/masks/<scene>.tif")
    print(f"  cars         {lay.out}/cars/<scene>.gpkg, {lay.summary}")
    print(f"  batch        {lay.out}/batch/ (cars.gpkg, cars.parquet, mosaics, counts, "
          "catalog.json)")
    print(f"  suggest      {lay.suggestions} (squares to label next)")
    if lay.truth is not None and vector_file(lay.truth).exists():
        print(f"  metrics      {lay.metrics}")
    print(f"  report       {lay.report}/index.html")


def cmd_clean(args) -> int:
    """Remove what the stages wrote (their manifests list it), and nothing else."""
    layout = _make_layout(args)
    check_layout(layout)
    removed = clean(layout)
    log.info("clean: removed %d files and folders the pipeline wrote", len(removed))
    return 0


def cmd_settings(args) -> int:
    """Write a stage's settings only when they changed."""
    cfg = _cfg(args)
    changed = write_if_changed(args.dst, stage_settings(cfg, args.stage))
    log.debug("%s settings %s", args.stage, "changed" if changed else "unchanged")
    return 0


def cmd_sample(args) -> int:
    return run_stage("sample", _job(args, Layout(data=args.data), "sample"))


def cmd_base(args) -> int:
    """The base model: generated scenes in DATA, trained in MODEL_DIR, shipped to --ship."""
    layout = Layout.for_make(data=args.data, model_dir=args.model_dir)
    return run_base(_job(args, layout), args.ship)


def cmd_tile(args) -> int:
    return run_stage("tile", _job(args, Layout(raw_images=args.images, chips=args.chips), "tile"))


def cmd_masks(args) -> int:
    layout = Layout(chips=args.chips, labels=args.labels, masks=args.masks,
                    raw_images=args.images)
    return run_stage("masks", _job(args, layout, "masks"))


def cmd_index(args) -> int:
    return run_stage("index", _job(args, Layout(chips=args.chips, masks=args.masks), "index"))


def cmd_train(args) -> int:
    layout = Layout(chips=args.chips, masks=args.masks, model_dir=args.model_dir,
                    raw_images=args.images)
    return run_train(_job(args, layout, "train"))


def cmd_predict(args) -> int:
    layout = Layout(images=args.images, model_dir=args.model_dir, out=args.out)
    return run_stage("predict", _job(args, layout, "predict"))


def cmd_vectors(args) -> int:
    return run_stage("vectors", _job(args, Layout(images=args.images, out=args.out), "vectors"))


def cmd_batch(args) -> int:
    layout = Layout(images=args.images, out=args.out, model_dir=args.model_dir, zones=args.zones)
    return run_stage("batch", _job(args, layout, "batch"))


def cmd_suggest(args) -> int:
    data = args.data
    layout = Layout(images=args.images, out=args.out, model_dir=args.model_dir,
                    raw_images=data / "raw" / "images" if data else None,
                    labels=data / "raw" / "labels" if data else None)
    return run_stage("suggest", _job(args, layout, "suggest"))


def cmd_evaluate(args) -> int:
    layout = Layout(out=args.out, truth=args.truth, images=args.images)
    return run_stage("evaluate", _job(args, layout, "evaluate"))


def cmd_report(args) -> int:
    layout = Layout(report=args.dst, model_dir=args.model_dir, out=args.out, data=args.data)
    return run_stage("report", _job(args, layout, "report"))


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


def _layout_flags(p: argparse.ArgumentParser) -> None:
    """The make variables' roots (INTERFACE.md); DATA's layout is derived (layout.Layout)."""
    p.add_argument("--data", type=Path, required=True, help="DATA: the data root")
    for flag, what in (("--images", "IMAGES: the batch to predict"), ("--out", "OUT"),
                       ("--model-dir", "MODEL_DIR"), ("--report", "the report folder"),
                       ("--truth", "TRUTH"), ("--zones", "ZONES")):
        p.add_argument(flag, type=Path, default=None, help=what)


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
    _layout_flags(p)
    _finish(p, cmd_paths, settings=None)

    p = sub.add_parser("run", help="run make targets on DATA/IMAGES/OUT, several as one chain")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="make targets: sample tiles masks train predict vectors batch suggest "
                        "evaluate report all")
    _layout_flags(p)
    _finish(p, cmd_run, settings=None, batch=True)

    p = sub.add_parser("clean", help="remove what the stages wrote (and nothing else)")
    _layout_flags(p)
    _finish(p, cmd_clean, settings=None)

    p = sub.add_parser("sample", help="generate sample scenes, labels and truth into DATA")
    p.add_argument("data", type=Path, help="data root (raw/, incoming/, truth/ are written)")
    _finish(p, cmd_sample, force="overwrite an existing sample")

    p = sub.add_parser("base", help="train the base model on generated scenes and ship it")
    p.add_argument("--data", type=Path, required=True, help="where the generated scenes go")
    p.add_argument("--model-dir", type=Path, required=True, help="where it trains")
    p.add_argument("--ship", type=Path, default=BASE_BUNDLE,
                   help=f"the bundle folder it is copied to (default {BASE_BUNDLE})")
    _finish(p, cmd_base, batch=True)

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

    p = sub.add_parser("suggest", help="squares to label next, ranked by the model's "
                                       "uncertainty (OUT/suggest/label_next.gpkg)")
    p.add_argument("--images", type=Path, required=True, help="folder of the batch's GeoTIFFs")
    p.add_argument("--out", type=Path, required=True,
                   help="output root (reads probability/; writes suggest/)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None,
                   help="data root: its training scenes (raw/images) are ranked too, against "
                        "their labels (raw/labels)")
    _finish(p, cmd_suggest, force="rank again even when up to date")

    p = sub.add_parser("evaluate", help="pixel and object metrics against ground truth")
    p.add_argument("--out", type=Path, required=True, help="output root of predictions")
    p.add_argument("--truth", type=Path, required=True, help="ground-truth car footprints")
    p.add_argument("--images", type=Path, default=None,
                   help="the batch's folder: evaluate its scenes (default: every mask in OUT)")
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
    for noisy in ("pyogrio", "rasterio", "matplotlib", "PIL", "distributed", "absl", "h5py",
                  "tornado", "asyncio"):
        # Libraries' INFO chatter ("Created 99 records") hides the pipeline's own lines; a
        # cluster shutting down (a missed heartbeat) logs tracebacks that are no error of ours.
        quiet = logging.CRITICAL if noisy in ("distributed", "tornado", "asyncio") \
            else logging.WARNING
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else quiet)
    if not args.debug:
        # GDAL's errors reach the user as the stage's one line (io.first_line); its own log
        # lines ("_tiffWriteProc: No space left on device.") would only repeat them.
        logging.getLogger("rasterio._err").setLevel(logging.CRITICAL)
        logging.getLogger("rasterio._env").setLevel(logging.CRITICAL)
    if not args.debug:
        # TensorFlow's C++ banner and Dask's worker start/stop narration are noise to a GIS
        # user; --debug keeps them. Dask reads this variable at import, in every worker too.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        # "critical", not "error": a worker missing a heartbeat while the cluster stops logs
        # its traceback at ERROR, and the task's own error reaches the user as its one line.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
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
