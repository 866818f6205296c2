"""Forward-pass speed of each inference engine on the default U-Net, in ms per batch.

    python -m bench.engines [--model DIR] [--window 2048] [--batch N] [--repeats 5] [--out DIR]

The default-config U-Net (``TrainConfig`` defaults, untrained; ``bench.bench_predict``'s bundle),
or the bundle in ``--model`` (e.g. the demo's smaller U-Net; its engine caches go beside it),
gets one batch of windows as predict makes them: ``--window`` px windows (default: predict's own,
``predict.window``), as many as ``predict.batch_size`` and the ``MAX_BATCH_PIXELS`` cap allow
unless ``--batch`` says otherwise, normalised pixels of a synthetic scene. Each engine and
precision that ``bench.precision`` compares (Keras float32, the reference; Keras bfloat16;
OpenVINO float32 / bf16 and ONNX Runtime float32 where installed) runs it once to warm (export,
tracing), then ``repeats`` times, the engines in alternation so other load hits them alike.
Medians, the speed-up over Keras float32 and the largest probability difference from it; the
load average before and after says whether the machine was quiet. Only the model's arithmetic:
``bench.precision`` times the end-to-end path and measures faithfulness on a trained model.
Writes ``engines.json`` into ``--out`` (default ``reports/bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def run(*, model: Path | None = None, window: int | None = None, batch: int | None = None,
        repeats: int = 5, workdir: Path | None = None) -> dict:
    """Time one predict-shaped batch on every engine (module doc)."""
    from bench.bench_predict import NORMALIZATION, _default_bundle
    from bench.precision import _variants
    from pipeline.config import PredictConfig
    from pipeline.stages.predict import MAX_BATCH_PIXELS, get_bundle, window_geometry

    with tempfile.TemporaryDirectory(prefix="engines-", dir=workdir) as tmp:
        model_dir = model or Path(tmp) / "model"
        if model is None:
            _default_bundle(model_dir)
        cfg = PredictConfig(**({"window": window} if window else {}))
        bundles = {n: get_bundle(model_dir, p, e) for n, (e, p) in _variants().items()}
        ref = bundles["keras_float32"]
        side = window_geometry(cfg, ref.metadata, ref.receptive_field).window
        n = batch or max(1, min(cfg.batch_size, MAX_BATCH_PIXELS // side**2))
        rng = np.random.default_rng(0)
        pixels = rng.integers(60, 200, size=(n, side, side, 3)).astype(np.float32)
        x = ref.prepare(pixels) if model else (
            (pixels - np.float32(NORMALIZATION["mean"][0])) / np.float32(NORMALIZATION["std"][0]))
        load_before = os.getloadavg()
        probs = {k: np.asarray(b.model.predict_on_batch(x), np.float32) for k, b in bundles.items()}
        times: dict[str, list[float]] = {k: [] for k in bundles}
        for _ in range(repeats):
            for k, b in bundles.items():
                start = time.perf_counter()
                b.model.predict_on_batch(x)
                times[k].append(time.perf_counter() - start)
        load_after = os.getloadavg()
    ref_ms = 1000 * statistics.median(times["keras_float32"])
    rows = {}
    for k, b in bundles.items():
        ms = 1000 * statistics.median(times[k])
        diff = np.abs(probs[k] - probs["keras_float32"])
        rows[k] = {"engine_used": b.metadata["inference_engine"],
                   "precision_used": b.metadata["inference_precision"],
                   "ms_per_batch": round(ms, 1), "ms_all": [round(1000 * t, 1) for t in times[k]],
                   "speedup": round(ref_ms / ms, 3),
                   "mpix_per_s": round(n * side * side / 1e6 / (ms / 1000), 3),
                   "max_abs_diff": float(diff.max()),
                   "p999_abs_diff": float(np.percentile(diff, 99.9))}
    return {"model": str(model) if model else "default U-Net (untrained)",
            "batch": [n, side, side, 3], "repeats": repeats, "reference": "keras_float32",
            "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in load_after], "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args()
    result = run(model=args.model, window=args.window, batch=args.batch, repeats=args.repeats)
    from bench.harness import write_result

    write_result(args.out, "engines", result)
    print(json.dumps(result, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
