"""Seams and precision on a model trained inside the bench (``python -m bench --only checks``).

``bench.seams`` (a crop at an unaligned offset predicts like the whole scene) and
``bench.precision`` (bfloat16 / OpenVINO against Keras float32: probabilities and object F1)
need a trained model: an untrained U-Net's probabilities sit near 0.5 everywhere, so neither
check would say anything. This module makes one, end to end through the pipeline's own stages,
small enough for a CPU bench: the synthetic sample (fixed seed), chips, masks, and a small U-Net
(depth 3, so the pooling lattice is 8 px and the unaligned offsets matter) trained for a fixed
wall-clock budget with a fixed seed. Then both checks run on the sample's incoming scene with
its truth. The model is a stand-in: the numbers say whether stitching and fast precision are
faithful, not how well cars are found.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bench.harness import prepare_chips

log = logging.getLogger(__name__)


def trained_model(workdir: Path, *, minutes: float = 1.5, width: int = 640, height: int = 512,
                  depth: int = 3, base_filters: int = 8, seed: int = 0) -> dict:
    """Sample -> chips -> masks -> index -> train; returns paths and what it cost.

    Returns:
        ``{"model": model dir, "incoming": incoming scenes dir, "truth": truth file,
        "train_s": seconds, "val_object_f1": the validation object F1 or None}``.
    """
    import keras

    from pipeline.config import Config
    from pipeline.files import read_json
    from pipeline.stages.sample import make_sample
    from pipeline.stages.train import train

    workdir = Path(workdir)
    cfg = Config(
        sample={"seed": seed, "train_scenes": 2, "incoming_scenes": 1, "width": width,
                "height": height},
        tile={"chip_size": 128, "overlap": 16, "seed": seed},
        train={"depth": depth, "base_filters": base_filters, "batch_size": 8,
               "max_minutes": minutes, "seed": seed},
    )
    data = workdir / "data"
    make_sample(data, cfg=cfg.sample)
    model = workdir / "model"
    chips, masks = prepare_chips(data, workdir, cfg)
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    train(chips, masks, model, cfg=cfg)
    train_s = time.perf_counter() - start
    meta = read_json(model / "metadata.json", missing="training wrote no metadata.json")
    post = meta.get("postprocess", {})
    return {"model": model, "incoming": data / "incoming", "truth": data / "truth" / "cars.gpkg",
            "train_s": round(train_s, 1), "val_object_f1": post.get("object_f1")}


def run(workdir: Path, *, minutes: float = 1.5, repeats: int = 3,
        windows: tuple = (None, 256), width: int = 640, height: int = 512) -> dict:
    """Train the stand-in model, then run ``bench.seams`` and ``bench.precision`` on it.

    Args:
        workdir: scratch folder.
        minutes: training budget (wall clock).
        repeats: timed runs per precision variant (medians).
        windows: inference windows for the seams check (None = the default window; a small one
            puts several windows, and their seams, inside the crop).
        width, height: size of the sample's scenes in pixels.
    """
    from bench import precision, seams
    from pipeline.config import PredictConfig
    from pipeline.scenes import list_scenes

    made = trained_model(workdir, minutes=minutes, width=width, height=height)
    scene = list_scenes(made["incoming"])[0]
    result: dict = {"model": {"train_s": made["train_s"],
                              "val_object_f1": made["val_object_f1"], "minutes": minutes}}
    # Offsets: (128, 64) is on the 8 px pooling lattice but between windows; (100, 37) is not
    # on it at all. Both crops must predict like the whole scene.
    result["seams"] = seams.run(made["model"], scene, offsets=((128, 64), (100, 37)),
                                windows=windows, precision=PredictConfig().precision)
    # At predict's default window, unless only small ones are asked for (a quick run: auto's
    # one-time measurement then times the small window too).
    window = None if None in windows else max(windows)
    result["precision"] = precision.run(made["model"], made["incoming"], truth=made["truth"],
                                        repeats=repeats, window=window)
    result["seams_ok"] = result["seams"]["ok"]
    result["precision_ok"] = all(v["ok"] for v in result["precision"]["variants"].values())
    return result


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
        print(json.dumps(run(Path(tmp), minutes=minutes), indent=2, default=str))  # noqa: T201
