"""Faithfulness of fast inference: bfloat16 vs float32 with a trained model on real scenes.

    python -m bench.precision MODEL_DIR IMAGES_DIR [--truth TRUTH.gpkg] [--repeats 3] [--out DIR]

Every scene in ``IMAGES_DIR`` is predicted with Keras in float32 (the reference) and with each
fast path: Keras bfloat16, OpenVINO float32 / bf16 where OpenVINO is installed, and ONNX Runtime
float32 where it is installed (same window and overlap). The stored probability rasters are
compared pixel by pixel with the reference (in 1/254 steps: p99, p99.9, max, share of pixels
more than 2 steps apart; target: at most 2 steps at 99.9% of pixels), the car masks by IoU,
and, with ``--truth``, the object F1 of the full chain (vectors + evaluate) (target: F1 differs by
at most 0.005). Wall times (medians of alternating runs) give the end-to-end speed-ups on this
machine.
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

TARGET_P999 = 2  # 1/254 steps
TARGET_F1 = 0.005


def _object_f1(out_dir: Path, truth: Path) -> float:
    from pipeline.config import EvaluateConfig, VectorConfig
    from pipeline.scenes import list_scenes
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.vectorize import vectorize_scene, write_summary

    for mask in list_scenes(out_dir / "masks"):
        vectorize_scene(mask, out_dir, cfg=VectorConfig())
    write_summary(out_dir)
    metrics = json.loads(evaluate(out_dir, truth, cfg=EvaluateConfig()).read_text())
    return float(metrics["overall"]["object"]["f1"])


def _variants() -> dict[str, tuple[str, str]]:
    """name -> (engine, precision): the float32 Keras reference first, then the fast paths."""
    import importlib.util

    out = {"keras_float32": ("keras", "float32"), "keras_bfloat16": ("keras", "bfloat16")}
    if importlib.util.find_spec("openvino"):
        out.update(openvino_float32=("openvino", "float32"),
                   openvino_bfloat16=("openvino", "bfloat16"))
    if importlib.util.find_spec("onnxruntime"):
        out.update(onnxruntime_float32=("onnxruntime", "float32"))  # float32 only
    return out


def _read_outputs(out: Path, scene: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with rasterio.open(out / "probability" / f"{scene.stem}.tif") as ds:
        prob, tags = ds.read(1).astype(np.int16), ds.tags()
    with rasterio.open(out / "masks" / f"{scene.stem}.tif") as ds:
        mask = ds.read(1)
    return prob, mask, tags


def run(model_dir: Path, images: Path, *, truth: Path | None = None, repeats: int = 3,
        window: int | None = None) -> dict:
    """Predict every scene of ``images`` with each engine and precision; compare (module doc)."""
    from pipeline.config import PredictConfig
    from pipeline.engines import cpu_bf16_flags
    from pipeline.scenes import list_scenes
    from pipeline.stages.predict import predict_scene

    scenes = list_scenes(images)
    # The defaults (auto: measured once here, then the chosen engine) against each by name.
    variants = {**_variants(), "default_auto": ("auto", "auto")}
    sizes = {"window": window} if window else {}  # default: predict.window's own
    cfgs = {n: PredictConfig(engine=e, precision=p, **sizes) for n, (e, p) in variants.items()}
    result: dict = {"model": str(model_dir), "images": str(images),
                    "cpu_bf16_flags": cpu_bf16_flags(), "reference": "keras_float32",
                    "target_p999": TARGET_P999, "target_f1_diff": TARGET_F1,
                    "default": PredictConfig().model_dump(include={"engine", "precision"}),
                    "variants": {}}
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        outs = {n: Path(tmp) / n for n in variants}
        times: dict[str, list[float]] = {n: [] for n in variants}
        for scene in scenes:  # warm: model load, export and tracing for every variant
            for n in variants:
                predict_scene(scene, model_dir, outs[n], cfg=cfgs[n])
        for _ in range(repeats):  # alternate, so other load hits every variant alike
            for n in variants:
                start = time.perf_counter()
                for scene in scenes:
                    predict_scene(scene, model_dir, outs[n], cfg=cfgs[n])
                times[n].append(time.perf_counter() - start)
        f1 = {n: _object_f1(outs[n], truth) for n in variants} if truth is not None else {}
        ref_s = statistics.median(times["keras_float32"])
        for n in variants:
            diffs, ious = [], []
            for scene in scenes:
                p_ref, m_ref, _ = _read_outputs(outs["keras_float32"], scene)
                p, m, tags = _read_outputs(outs[n], scene)
                used = (tags.get("engine"), tags.get("precision"))
                keep = p_ref != 255
                diffs.append(np.abs(p_ref - p)[keep])
                a, b = m_ref[keep] == 1, m[keep] == 1
                union = np.logical_or(a, b).sum()
                ious.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
            d = np.concatenate(diffs)
            row = {"engine_used": used[0], "precision_used": used[1],
                   "seconds": round(statistics.median(times[n]), 3),
                   "speedup": round(ref_s / statistics.median(times[n]), 3),
                   "p99": float(np.percentile(d, 99)), "p999": float(np.percentile(d, 99.9)),
                   "max": int(d.max()), "share_over_2": round(float((d > 2).mean()), 6),
                   "mask_iou_min": round(min(ious), 5)}
            ok = row["p999"] <= TARGET_P999
            if f1:
                row["object_f1"] = round(f1[n], 5)
                row["object_f1_diff"] = round(abs(f1[n] - f1["keras_float32"]), 5)
                ok = ok and row["object_f1_diff"] <= TARGET_F1
            row["ok"] = ok
            result["variants"][n] = row
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
