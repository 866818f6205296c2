"""Faithfulness of fast inference: bfloat16 vs float32 with a trained model on real scenes.

    python -m bench.precision MODEL_DIR IMAGES_DIR [--truth TRUTH.gpkg] [--repeats 3] [--out DIR]

Every scene in ``IMAGES_DIR`` is predicted at ``predict.precision=float32`` and ``bfloat16`` (same
window and overlap); the stored probability rasters are compared pixel by pixel (in 1/254 steps:
p99, p99.9, max, share of pixels more than 2 steps apart; target: at most 2 steps at 99.9% of
pixels), the car masks by IoU, and, with ``--truth``, the object F1 of the full chain
(vectors + evaluate) under both (target: F1 differs by at most 0.005). Wall times of the two
predictions (medians of alternating runs) give the end-to-end speed-up on this machine.
Writes ``precision.json`` into ``--out`` (default ``reports/bench``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

PRECISIONS = ("float32", "bfloat16")
TARGET_P999 = 2  # 1/254 steps
TARGET_F1 = 0.005


def _object_f1(out_dir: Path, truth: Path) -> float:
    from pipeline.config import EvaluateConfig, VectorConfig
    from pipeline.evaluate import evaluate
    from pipeline.io import list_scenes
    from pipeline.vectorize import vectorize_scene, write_summary

    for mask in list_scenes(out_dir / "masks"):
        vectorize_scene(mask, out_dir, cfg=VectorConfig())
    write_summary(out_dir)
    metrics = json.loads(evaluate(out_dir, truth, cfg=EvaluateConfig()).read_text())
    return float(metrics["overall"]["object"]["f1"])


def run(model_dir: Path, images: Path, *, truth: Path | None = None, repeats: int = 3) -> dict:
    """Predict every scene of ``images`` at both precisions and compare (see module doc)."""
    from pipeline.config import PredictConfig
    from pipeline.io import list_scenes
    from pipeline.model import cpu_bf16_flags
    from pipeline.predict import predict_scene

    scenes = list_scenes(images)
    cfgs = {p: PredictConfig(precision=p) for p in PRECISIONS}
    result: dict = {"model": str(model_dir), "images": str(images), "cpu_bf16_flags":
                    cpu_bf16_flags(), "target_p999": TARGET_P999, "target_f1_diff": TARGET_F1,
                    "scenes": {}}
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        outs = {p: Path(tmp) / p for p in PRECISIONS}
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for scene in scenes:  # warm: model load and tracing at both precisions
            for p in PRECISIONS:
                predict_scene(scene, model_dir, outs[p], cfg=cfgs[p])
        for _ in range(repeats):
            for p in PRECISIONS:
                start = time.perf_counter()
                for scene in scenes:
                    predict_scene(scene, model_dir, outs[p], cfg=cfgs[p])
                times[p].append(time.perf_counter() - start)
        diffs = []
        for scene in scenes:
            probs, masks = {}, {}
            for p in PRECISIONS:
                with rasterio.open(outs[p] / "probability" / f"{scene.stem}.tif") as ds:
                    probs[p] = ds.read(1).astype(np.int16)
                    assert ds.tags()["precision"] == p, ds.tags()
                with rasterio.open(outs[p] / "masks" / f"{scene.stem}.tif") as ds:
                    masks[p] = ds.read(1)
            keep = probs["float32"] != 255
            d = np.abs(probs["float32"] - probs["bfloat16"])[keep]
            diffs.append(d)
            a, b = masks["float32"][keep] == 1, masks["bfloat16"][keep] == 1
            union = np.logical_or(a, b).sum()
            result["scenes"][scene.name] = {
                "p99": float(np.percentile(d, 99)), "p999": float(np.percentile(d, 99.9)),
                "max": int(d.max()), "share_over_2": round(float((d > 2).mean()), 6),
                "mask_iou": round(float(np.logical_and(a, b).sum() / union), 5) if union else 1.0,
            }
        d = np.concatenate(diffs)
        result["all"] = {"p99": float(np.percentile(d, 99)),
                         "p999": float(np.percentile(d, 99.9)), "max": int(d.max()),
                         "share_over_2": round(float((d > 2).mean()), 6)}
        result["seconds"] = {p: round(statistics.median(t), 3) for p, t in times.items()}
        result["speedup_bf16"] = round(result["seconds"]["float32"]
                                       / result["seconds"]["bfloat16"], 3)
        ok = result["all"]["p999"] <= TARGET_P999
        if truth is not None:
            f1 = {p: _object_f1(outs[p], truth) for p in PRECISIONS}
            result["object_f1"] = {p: round(v, 5) for p, v in f1.items()}
            result["object_f1_diff"] = round(abs(f1["float32"] - f1["bfloat16"]), 5)
            ok = ok and result["object_f1_diff"] <= TARGET_F1
        result["ok"] = ok
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--truth", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args()
    result = run(args.model_dir, args.images, truth=args.truth, repeats=args.repeats)
    from bench.harness import write_result

    write_result(args.out, "precision", result)
    print(json.dumps(result, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
