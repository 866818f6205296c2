"""``python -m bench``: run the benchmark suite, one JSON per benchmark plus ``summary.md``.

    python -m bench [--config FILE] [--set key=value ...] [--only NAME] [--quick] [--out DIR]

Each benchmark module has ``run(workdir, **sizes) -> dict``; its result is written to
``OUT/<name>.json`` together with the machine it was measured on. A benchmark that fails is
recorded with its error and the others still run; the exit status is then 1.

``checks`` trains a small stand-in model inside the bench (fixed seed, a 1.5-minute budget;
``bench.bench_checks``) and runs the two checks that need a trained model on it: ``bench.seams``
(a crop at an unaligned offset predicts like the whole scene) and ``bench.precision`` (bfloat16 /
OpenVINO / ONNX Runtime against Keras float32: probabilities, object F1 and speed). Both also
run on their own against any model: ``python -m bench.seams MODEL SCENE``, ``python -m
bench.precision MODEL IMAGES --truth TRUTH``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Dask narrates every worker start and stop (here and in the workers, which inherit this).
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

log = logging.getLogger("bench")

# name -> (module, keyword arguments for --quick). Full runs use each module's defaults.
BENCHMARKS: dict[str, tuple[str, dict]] = {
    "tiling": ("bench.bench_tiling", {"size": 1024, "repeats": 1}),
    # Quick: a small U-Net, as exporting and tracing the default one is most of a smoke run.
    "predict": ("bench.bench_predict", {"sizes": (128,), "throughput_size": 128,
                                         "unet": {"depth": 2, "base_filters": 8},
                                         "probe_default_memory": False,
                                         "repeats": 1}),
    # Quick: tile_scene keeps Keras out of the Dask workers, which would cost more than the work.
    "distributed": ("bench.bench_distributed",
                    {"scenes": 4, "size": 256, "repeats": 1, "stage": "tile"}),
    "train": ("bench.bench_train",
              {"chip_size": 64, "batch_size": 4, "steps": 2, "depth": 2, "base_filters": 8,
               "chips": 8}),
    "checks": ("bench.bench_checks", {"minutes": 0.1, "repeats": 1, "windows": (256,),
                                       "width": 400, "height": 352}),
    # Quick: two small scenes, a tiny U-Net for a few seconds; the full run is 3 x 1.5 minutes.
    "label_efficiency": ("bench.label_efficiency",
                         {"minutes": 0.1, "shares": (0.3, 1.0),
                          "sample": {"train_scenes": 2, "incoming_scenes": 1, "width": 384,
                                     "height": 384},
                          "extra": ("train.depth=2", "train.base_filters=4",
                                    "train.batch_size=4")}),
}


def run_benchmark(name: str, out_dir: Path, *, quick: bool, cfg=None) -> tuple[Path, bool]:
    """Run one benchmark in a scratch folder and write ``out_dir/<name>.json``.

    Returns:
        The JSON path and whether the benchmark succeeded.
    """
    from bench.harness import write_result

    module_name, quick_kwargs = BENCHMARKS[name]
    kwargs = dict(quick_kwargs) if quick else {}
    start = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        params = inspect.signature(module.run).parameters
        # Pass only the sizes this module's run() takes, so modules can evolve independently.
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        if cfg is not None and "cfg" in params:
            kwargs["cfg"] = cfg
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            result = module.run(Path(tmp), **kwargs)
        ok = True
    except Exception as exc:  # one broken benchmark must not hide the others' numbers
        log.error("%s failed: %s", name, exc)
        log.debug("%s", traceback.format_exc())
        result, ok = {"error": f"{exc.__class__.__name__}: {exc}"}, False
    result = {"quick": quick, "wall_s": round(time.perf_counter() - start, 2), **result}
    return write_result(out_dir, name, result), ok


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, path + ".")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            rows.append((path, value))
    return rows


# Result keys that are inputs or bookkeeping rather than measurements.
_SKIP = ("quick", "size", "sizes", "scenes", "repeats", "workers", "depth", "base_filters",
         "batch_size", "chip_size", "timed_steps", "params", "loader_threads", "overlap",
         "window", "steps")


def write_summary(out_dir: Path, paths: list[Path]) -> Path:
    """Write ``summary.md``: the machine, then one table row per measured number."""
    from bench.harness import machine_info, read_result
    from pipeline.files import atomic_path

    machine = machine_info()
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        f"Measured {machine['date']} on {machine['platform']}, {machine['cpu_model']} "
        f"({' '.join(machine['cpu_flags']) or 'no AVX'}), {machine['cpu_count']} CPUs, "
        f"{machine['memory_gb']} GB RAM, Keras backend {machine['keras_backend']}.",
        "",
        f"Versions: {versions}.",
        "",
        "Times are medians of several runs; ratios compare against a reference measured in the "
        "same run. Each JSON file beside this one holds the full result.",
        "",
        "| benchmark | measure | value |",
        "| --- | --- | --- |",
    ]
    for path in paths:
        result = read_result(path)
        name = result.get("benchmark", path.stem)
        if "error" in result:
            lines.append(f"| {name} | error | {result['error']} |")
            continue
        for key, value in _flatten({k: v for k, v in result.items() if k != "machine"}):
            if key.split(".")[-1] in _SKIP:
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {name} | {key} | {shown} |")
    target = Path(out_dir) / "summary.md"
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="settings YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=None,
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"), help="result folder")
    parser.add_argument("--debug", action="store_true", help="log tracebacks of failures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from pipeline.config import load_config
    from pipeline.errors import InputError

    try:
        cfg = load_config(args.config, args.overrides)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = args.only or list(BENCHMARKS)
    paths, failed = [], []
    for name in names:
        log.info("benchmark %s%s", name, " (quick)" if args.quick else "")
        path, ok = run_benchmark(name, args.out, quick=args.quick, cfg=cfg)
        paths.append(path)
        if not ok:
            failed.append(name)
    summary = write_summary(args.out, paths)
    log.info("results: %s", summary)
    if failed:
        print(f"error: benchmarks failed: {', '.join(failed)} (see {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
