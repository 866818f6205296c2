"""Training throughput: the input pipeline's chips/s next to the train step's chips/s.

The input pipeline is ``pipeline.dataset.ChipDataset`` (GeoTIFF chips, masks and gap weights,
albumentations on) at the training batch size; the train step is ``model.train_on_batch`` on one
batch already in memory. When the pipeline delivers fewer chips per second than the step
consumes, training is input-bound and more loader workers (or caching) pay off.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from bench.harness import median_time

log = logging.getLogger(__name__)

NORMALIZATION = {"mean": [90.0, 90.0, 90.0], "std": [40.0, 40.0, 40.0]}


def on_accelerator() -> bool:
    """True when Keras' backend sees a GPU (or TPU)."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return jax.default_backend() != "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except ImportError:
        return False
    return False


def make_chips(folder: Path, *, n: int, size: int, seed: int = 0, bands: int = 3) -> list:
    """Write ``n`` chip/mask/weight GeoTIFF triples and return their ``ChipRecord`` s.

    Half of the chips hold a few bright car-sized boxes (mask 1 there), so positive sampling has
    both kinds to draw from; a band of 255 along one edge plays the nodata padding.
    """
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    from pipeline.dataset import ChipRecord

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "chips").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"bench_r{i:05d}_c00000"
        image = rng.integers(60, 110, size=(bands, size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if i % 2 == 0:
            for _ in range(max(1, size // 64)):
                r, c = rng.integers(0, size - size // 8, 2)
                image[:, r:r + size // 16, c:c + size // 8] = 220
                mask[r:r + size // 16, c:c + size // 8] = 1
        mask[:, -max(1, size // 32):] = 255
        weight = np.where(mask == 255, 0, 1 + (mask == 0) * 0.5).astype(np.float32)
        transform = Affine(0.15, 0, 500000 + i * size * 0.15, 0, -0.15, 4000000)
        common = dict(driver="GTiff", width=size, height=size, crs=CRS.from_epsg(32633),
                      transform=transform, compress="deflate")
        paths = {k: folder / ("chips" if k == "image" else "masks") / f"{name}{s}"
                 for k, s in (("image", ".tif"), ("mask", ".tif"), ("weight", ".weight.tif"))}
        with rasterio.open(paths["image"], "w", count=bands, dtype="uint8", nodata=0,
                           **common) as dst:
            dst.write(image)
        with rasterio.open(paths["mask"], "w", count=1, dtype="uint8", nodata=255,
                           **common) as dst:
            dst.write(mask, 1)
        with rasterio.open(paths["weight"], "w", count=1, dtype="float32", **common) as dst:
            dst.write(weight, 1)
        records.append(ChipRecord(chip=name, scene="bench", image=paths["image"],
                                  mask=paths["mask"], weight=paths["weight"],
                                  car_pixels=int((mask == 1).sum()), split="train"))
    return records


def build_model(*, bands: int, depth: int, base_filters: int, learning_rate: float = 1e-3,
                mixed_precision: bool | str = False):
    """The U-Net compiled the way training compiles it (Adam, weighted BCE).

    ``mixed_precision``: False (float32), True (mixed_float16) or a Keras policy name.
    """
    import keras

    from pipeline.model import build_unet
    from pipeline.stages.train import make_loss

    if isinstance(mixed_precision, str):
        policy = mixed_precision
    else:
        policy = "mixed_float16" if mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_unet(bands, depth=depth, base_filters=base_filters)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=make_loss())
    finally:
        # The policy is global; leave float32 behind for whoever builds the next model.
        keras.mixed_precision.set_global_policy("float32")
    return model


def train_step_chips_per_s(model, x: np.ndarray, y: np.ndarray, *, steps: int,
                           warmup: int = 1) -> float:
    """Chips per second of ``train_on_batch`` on one in-memory batch (compile excluded)."""
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    # Force the last (possibly asynchronous) step to finish before the clock stops.
    float(np.asarray(loss if not isinstance(loss, list | tuple) else loss[0]))
    return steps * len(x) / (time.perf_counter() - start)


def input_chips_per_s(dataset, *, batches: int, repeats: int = 3) -> float:
    """Chips per second that the dataset's ``__getitem__`` delivers, median of ``repeats``."""
    dataset[0]  # fills the in-memory cache as the first epoch would
    n = min(batches, len(dataset))

    def one_pass():
        for i in range(n):
            dataset[i]

    seconds = median_time(one_pass, repeats)
    return n * dataset.batch_size / seconds


def run(workdir: Path, *, chip_size: int = 256, batch_size: int | None = None,
        steps: int | None = None, depth: int | None = None, base_filters: int | None = None,
        chips: int = 48) -> dict:
    """Measure input-pipeline and train-step chips/s at one batch size.

    Defaults: the default U-Net (``TrainConfig``) at 256x256 and its batch size on an
    accelerator; on a CPU the batch is 4 chips and only 2 timed steps, so the suite stays short.

    Returns:
        ``{"chip_size", "batch_size", "input_chips_per_s", "input_chips_per_s_no_augment",
        "train_step_chips_per_s", "input_to_step_ratio", "input_bound", ...}``.
    """
    from pipeline.config import AugmentConfig, TrainConfig
    from pipeline.dataset import ChipDataset

    tc = TrainConfig()
    accel = on_accelerator()
    batch_size = batch_size or (tc.batch_size if accel else 4)
    steps = steps or (20 if accel else 2)
    depth = depth or tc.depth
    base_filters = base_filters or tc.base_filters
    records = make_chips(Path(workdir) / "train_chips", n=chips, size=chip_size)

    def dataset(augment):
        return ChipDataset(records, NORMALIZATION, batch_size=batch_size, augment=augment,
                           positive_fraction=tc.positive_fraction, steps=max(steps, 4),
                           cache=True, seed=0)

    augmented = dataset(AugmentConfig())
    input_rate = input_chips_per_s(augmented, batches=max(steps, 4))
    plain_rate = input_chips_per_s(dataset(None), batches=max(steps, 4))

    model = build_model(bands=3, depth=depth, base_filters=base_filters)
    x, y = augmented[0]
    step_rate = train_step_chips_per_s(model, x, y, steps=steps)
    # bfloat16 on this CPU (train.mixed_precision: bf16 / auto with AVX-512 BF16 or AMX):
    # alternate float32 and bfloat16 steps so other load hits both alike.
    bf16 = {}
    if not accel:
        from pipeline.engines import cpu_bf16_flags

        fast = build_model(bands=3, depth=depth, base_filters=base_filters,
                           mixed_precision="mixed_bfloat16")
        train_step_chips_per_s(fast, x, y, steps=1)  # compile outside the timing
        rates = {"float32": [], "bfloat16": []}
        for _ in range(3):
            rates["float32"].append(train_step_chips_per_s(model, x, y, steps=steps, warmup=0))
            rates["bfloat16"].append(train_step_chips_per_s(fast, x, y, steps=steps, warmup=0))
        f32, b16 = (float(np.median(rates[k])) for k in ("float32", "bfloat16"))
        bf16 = {"cpu_bf16_flags": cpu_bf16_flags(),
                "train_step_chips_per_s_float32": round(f32, 3),
                "train_step_chips_per_s_bf16": round(b16, 3),
                "bf16_speedup": round(b16 / f32, 3)}
    return {
        "chip_size": chip_size,
        "batch_size": batch_size,
        "depth": depth,
        "base_filters": base_filters,
        "params": int(model.count_params()),
        "timed_steps": steps,
        "accelerator": accel,
        "loader_threads": 1,
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "input_chips_per_s": round(input_rate, 2),
        "input_chips_per_s_no_augment": round(plain_rate, 2),
        "train_step_chips_per_s": round(step_rate, 3),
        "input_to_step_ratio": round(input_rate / step_rate, 3),
        "input_bound": bool(input_rate < step_rate),
        **bf16,
    }
