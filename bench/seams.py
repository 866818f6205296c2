"""Seam check with a trained model: a crop predicted on its own vs. the same pixels of the whole
scene predicted at once.

    python -m bench.seams MODEL_DIR SCENE.tif [--offset 64] [--size 512] [--out DIR]

The crop starts at a multiple of 64 px, so its windows fall elsewhere than the whole scene's;
with seam-free blending the car pixels agree (IoU close to 1) farther than one overlap from the
crop's edges. Writes ``seams.json`` into ``--out`` (default ``reports/bench``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window


def run(model_dir: Path, scene: Path, *, offset: int = 64, size: int = 512) -> dict:
    """Predict ``scene`` and a crop of it at (offset, 2*offset); compare the car masks."""
    from pipeline.config import PredictConfig
    from pipeline.predict import predict_scene

    cfg = PredictConfig()
    with tempfile.TemporaryDirectory(prefix="seams-") as tmp:
        tmp = Path(tmp)
        crop_path = tmp / "crop" / "crop.tif"
        crop_path.parent.mkdir()
        with rasterio.open(scene) as src:
            size = min(size, src.width - 2 * offset, src.height - offset)
            win = Window(2 * offset, offset, size, size)
            profile = src.profile
            profile.update(width=size, height=size, transform=src.window_transform(win))
            with rasterio.open(crop_path, "w", **profile) as dst:
                dst.write(src.read(window=win))
        _, whole_mask = predict_scene(scene, model_dir, tmp / "whole", cfg=cfg)
        _, crop_mask = predict_scene(crop_path, model_dir, tmp / "cropout", cfg=cfg)
        with rasterio.open(whole_mask) as w, rasterio.open(crop_mask) as c:
            whole = w.read(1, window=win)
            crop = c.read(1)
    margin = cfg.overlap
    inner = (slice(margin, size - margin),) * 2
    a, b = whole[inner] == 1, crop[inner] == 1
    union = np.logical_or(a, b).sum()
    return {"scene": str(scene), "model": str(model_dir), "crop_offset_px": [offset, 2 * offset],
            "crop_size_px": size, "margin_px": margin, "car_pixels_whole": int(a.sum()),
            "car_pixels_crop": int(b.sum()),
            "iou": float(np.logical_and(a, b).sum() / union) if union else 1.0,
            "pixels_differing": int((a != b).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--offset", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args()
    result = run(args.model_dir, args.scene, offset=args.offset, size=args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seams.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
