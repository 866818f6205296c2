"""Stitching consistency: a crop predicted on its own vs. the same pixels of the whole scene.

    python -m bench.seams MODEL_DIR SCENE.tif [--offset ROW COL ...] [--window N ...]
                          [--overlap N ...] [--out DIR]

Prediction must not depend on where the windows fall. A crop whose origin is NOT on the whole
scene's window lattice is predicted on its own and compared, probability by probability, with the
same pixels of the whole scene's prediction. Pixels near the crop's own edges legitimately differ
(the crop lacks the context beyond them), so the comparison keeps pixels farther than half the
model's receptive field from them (``edge_px``; and, where the crop is big enough, farther than one
window, ``far``).

Offsets: the U-Net max-pools, so it is shift-equivariant only for shifts that are multiples of
``2**depth`` (16 for the default model). (128, 64) is such a shift but falls between the windows of
a 1024 or 256 px lattice; predict anchors its windows to the map's pooling lattice (windows start
on multiples of ``2**depth`` of the map-wide pixel grid), so any whole-pixel offset, e.g. (100,
37), must agree as well. Writes ``seams.json`` into ``--out`` (default ``reports/bench``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

TARGET_P99 = 2  # in 1/254 steps of stored probability


def compare(whole: np.ndarray, crop: np.ndarray, edge: int) -> dict:
    """Statistics of |whole - crop| (uint8 probability, 255 = nodata) away from ``edge`` px."""
    rows, cols = crop.shape
    if rows <= 2 * edge or cols <= 2 * edge:
        return {"pixels": 0}
    inner = (slice(edge, rows - edge), slice(edge, cols - edge))
    a, b = whole[inner].astype(np.int16), crop[inner].astype(np.int16)
    keep = (a != 255) & (b != 255)
    diff = np.abs(a - b)[keep]
    cars_a, cars_b = a[keep] >= 127, b[keep] >= 127
    union = np.logical_or(cars_a, cars_b).sum()
    return {
        "pixels": int(keep.sum()),
        "p50": float(np.percentile(diff, 50)), "p99": float(np.percentile(diff, 99)),
        "p999": float(np.percentile(diff, 99.9)), "max": int(diff.max()),
        "share_over_2": round(float((diff > 2).mean()), 6),
        "car_iou": round(float(np.logical_and(cars_a, cars_b).sum() / union), 5) if union else 1.0,
    }


def run(model_dir: Path, scene: Path, *, offsets=((128, 64), (100, 37)), windows=(None,),
        overlaps=(None,), pad: int = 64, precision: str | None = None) -> dict:
    """Predict ``scene`` and crops of it at ``offsets`` (row, col) for each window and overlap.

    ``None`` in ``windows`` / ``overlaps`` means the setting's default (``PredictConfig``).
    The crop runs from the offset to ``pad`` px before the scene's far edges.
    """
    from pipeline.config import PredictConfig
    from pipeline.stages.predict import get_bundle, predict_scene, window_geometry

    bundle = get_bundle(model_dir, precision or PredictConfig().precision)
    field = bundle.receptive_field
    edge = math.ceil((field or 0) / 2)
    result: dict = {"scene": str(scene), "model": str(model_dir), "receptive_field_px": field,
                    "precision": bundle.metadata["inference_precision"],
                    "edge_px": edge, "target_p99": TARGET_P99, "runs": []}
    with tempfile.TemporaryDirectory(prefix="seams-") as tmp:
        tmp = Path(tmp)
        with rasterio.open(scene) as src:
            profile, height, width = src.profile, src.height, src.width
            crops = []
            for r, c in offsets:
                win = Window(c, r, width - c - pad, height - r - pad)
                path = tmp / f"crop_{r}_{c}" / "crop.tif"
                path.parent.mkdir()
                prof = dict(profile, width=win.width, height=win.height,
                            transform=src.window_transform(win))
                with rasterio.open(path, "w", **prof) as dst:
                    dst.write(src.read(window=win))
                crops.append(((r, c), win, path))
        for window in windows:
            for overlap in overlaps:
                kwargs = {k: v for k, v in (("window", window), ("overlap", overlap),
                                            ("precision", precision)) if v is not None}
                cfg = PredictConfig(**kwargs)
                geom = window_geometry(cfg, bundle.metadata, field)
                whole_prob, _ = predict_scene(scene, model_dir, tmp / "whole", cfg=cfg)
                with rasterio.open(whole_prob) as w:
                    whole = w.read(1)
                for (r, c), win, path in crops:
                    crop_prob, _ = predict_scene(path, model_dir, path.parent / "out", cfg=cfg)
                    with rasterio.open(crop_prob) as cp:
                        crop = cp.read(1)
                    part = whole[r:r + win.height, c:c + win.width]
                    run_ = {"window": geom.window, "overlap": geom.overlap,
                            "margin": geom.margin, "offset": [r, c],
                            "crop_px": [int(win.height), int(win.width)],
                            "beyond_edge": compare(part, crop, edge),
                            "beyond_window": compare(part, crop, geom.window)}
                    run_["ok"] = run_["beyond_edge"].get("p99", 0) <= TARGET_P99
                    result["runs"].append(run_)
    result["ok"] = all(r["ok"] for r in result["runs"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--offset", type=int, nargs=2, action="append", metavar=("ROW", "COL"))
    parser.add_argument("--window", type=int, action="append")
    parser.add_argument("--overlap", type=int, action="append")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args()
    result = run(args.model_dir, args.scene,
                 offsets=[tuple(o) for o in args.offset] if args.offset else ((128, 64), (100, 37)),
                 windows=args.window or (None,), overlaps=args.overlap or (None,),
                 precision=args.precision)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seams.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
