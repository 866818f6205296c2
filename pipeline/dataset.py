"""Chips + masks + gap weights -> batches for Keras, with albumentations.

The training input is ``chips/index.gpkg`` (one row per chip with its split) and ``stats.json``
(per-band mean/std), both written by ``tile.build_index``. A batch is ``(x, y)`` with ``x`` the
normalised chips ``(B, H, W, bands)`` float32 and ``y`` packing two channels ``(B, H, W, 2)``:
channel 0 the car target (0/1) and channel 1 the per-pixel loss weight (0 on ignore pixels, the
gap weight elsewhere). Packing the weight into ``y_true`` keeps the loss a plain
``loss(y_true, y_pred)`` that behaves the same on TensorFlow, JAX and PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import INDEX_FILE, STATS_FILE, InputError, read_json

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("chip", "scene", "row_off", "col_off", "width", "height", "valid_fraction",
                 "gsd", "car_pixels", "split")
IGNORE = 255
# Augmented colours are computed on z-scores mapped into [0, 1] over +-ZSPAN standard deviations:
# albumentations' colour transforms expect [0, 1] floats, and 5 sigma keeps bright cars unclipped.
ZSPAN = 5.0


@dataclass(frozen=True)
class ChipRecord:
    """One chip on disk: its image, mask and optional gap weights."""

    chip: str
    scene: str
    image: Path
    mask: Path
    weight: Path | None
    car_pixels: int
    split: str


def read_stats(chips_dir: Path | str) -> dict:
    """Read ``stats.json`` (bands, dtype, per-band mean and std, gsd).

    Raises:
        InputError: missing, not JSON, or a std of zero (a constant band cannot be normalised).
    """
    path = Path(chips_dir) / STATS_FILE
    stats = read_json(path, missing="chip statistics not found; run `make masks` first")
    for key in ("mean", "std"):
        if key not in stats or not isinstance(stats[key], list) or not stats[key]:
            raise InputError(f"{path}: lacks a per-band '{key}' list")
    if len(stats["mean"]) != len(stats["std"]):
        raise InputError(f"{path}: 'mean' and 'std' differ in length")
    # A constant band (std 0) would divide by zero; treat it as unit spread instead.
    stats["std"] = [float(s) if s and s > 0 else 1.0 for s in stats["std"]]
    return stats


def read_index(chips_dir: Path | str, masks_dir: Path | str) -> list[ChipRecord]:
    """Read ``index.gpkg`` into chip records, checking that every chip and mask exists.

    Raises:
        InputError: index missing, lacking columns, empty, or naming files that are not there.
    """
    import pyogrio

    chips_dir, masks_dir = Path(chips_dir), Path(masks_dir)
    path = chips_dir / INDEX_FILE
    if not path.exists():
        raise InputError(f"{path}: chip index not found; run `make masks` first")
    try:
        table = pyogrio.read_dataframe(path, read_geometry=False)
    except Exception as exc:  # pyogrio raises several types for a broken file
        raise InputError(f"{path}: not a readable GeoPackage ({exc.__class__.__name__})") from None
    missing = [c for c in INDEX_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: index lacks columns {', '.join(missing)}")
    if table.empty:
        raise InputError(f"{path}: index has no chips; check tile.min_valid_fraction")
    records = []
    for row in table.sort_values(["scene", "chip"]).itertuples(index=False):
        image = chips_dir / row.scene / f"{row.chip}.tif"
        mask = masks_dir / row.scene / f"{row.chip}.tif"
        weight = masks_dir / row.scene / f"{row.chip}.weight.tif"
        for needed in (image, mask):
            if not needed.exists():
                raise InputError(f"{needed}: listed in {path} but not found; re-run `make masks`")
        records.append(ChipRecord(chip=str(row.chip), scene=str(row.scene), image=image,
                                  mask=mask, weight=weight if weight.exists() else None,
                                  car_pixels=int(row.car_pixels), split=str(row.split)))
    return records


def data_fingerprint(records: list[ChipRecord]) -> str:
    """Hash of the chip list (names, splits, car pixels) and file sizes: changes when data does.

    File sizes rather than contents keep this fast on thousands of chips; a re-tiling or
    re-rasterizing that changes any chip almost always changes a (compressed) file size.
    """
    digest = hashlib.sha256()
    for r in records:
        sizes = [p.stat().st_size if p is not None else -1 for p in (r.image, r.mask, r.weight)]
        digest.update(f"{r.scene}|{r.chip}|{r.split}|{r.car_pixels}|{sizes}\n".encode())
    return digest.hexdigest()[:16]


def read_chip(record: ChipRecord, normalization: dict, *, use_weights: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one chip as (normalised image (H, W, bands) float32, mask uint8, weight float32).

    The weight is 0 where the mask is 255 (nodata, padding), so those pixels never reach the
    loss; elsewhere it is the gap weight map when present and wanted, else 1.
    """
    import rasterio
    from rasterio.plot import reshape_as_image

    from pipeline.model import normalize

    try:
        with rasterio.open(record.image) as src:
            image = reshape_as_image(src.read())
        with rasterio.open(record.mask) as src:
            mask = src.read(1)
        weight = None
        if use_weights and record.weight is not None:
            with rasterio.open(record.weight) as src:
                weight = src.read(1).astype(np.float32)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{record.image}: unreadable chip or mask ({exc})") from None
    if image.shape[2] != len(normalization["mean"]):
        raise InputError(f"{record.image}: {image.shape[2]} bands, but stats.json has "
                         f"{len(normalization['mean'])}")
    if mask.shape != image.shape[:2]:
        raise InputError(f"{record.mask}: mask is {mask.shape}, chip is {image.shape[:2]}")
    if weight is None:
        weight = np.ones(mask.shape, np.float32)
    elif weight.shape != mask.shape:
        raise InputError(f"{record.weight}: weights are {weight.shape}, mask is {mask.shape}")
    weight = np.where(mask == IGNORE, 0.0, np.nan_to_num(weight, nan=0.0)).astype(np.float32)
    return normalize(image, normalization), mask, weight


def build_augmenter(augment, bands: int, seed: int):
    """An albumentations pipeline for (image, mask, weight), groups switched by ``augment``.

    Masks and weights move with the image through geometric transforms using nearest
    interpolation; pixels brought in from outside the chip get mask 255 (ignored), and their
    weight is zeroed afterwards in ``ChipDataset``. Returns None when every group is off.
    """
    import albumentations as A

    ops = []
    if augment.flips:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if augment.scale_rotate:
        ops.append(A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), interpolation=1,
                            mask_interpolation=0, fill=0.5, fill_mask=IGNORE, p=0.5))
    if augment.color:
        ops.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.5))
        if bands == 3:  # hue is only defined for RGB
            ops.append(A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=10,
                                            val_shift_limit=0, p=0.3))
    if augment.blur_noise:
        ops.append(A.OneOf([A.GaussianBlur(blur_limit=(3, 3), p=1.0),
                            A.GaussNoise(std_range=(0.005, 0.02), p=1.0)], p=0.3))
    if not ops:
        return None
    return A.Compose(ops, additional_targets={"weight": "mask"}, seed=seed)


def _keras_pydataset():
    import keras

    return keras.utils.PyDataset


class ChipDataset(_keras_pydataset()):
    """A ``keras.utils.PyDataset`` of chip batches.

    Training mode (``augment`` given) samples ``steps`` batches per epoch with the requested
    share of chips that contain cars, and augments them; evaluation mode (``augment=None``,
    ``shuffle=False``) walks every chip once in order (``pad_last`` fills the last batch with
    zero-weight chips). Chips stream from disk, or are held in
    RAM after the first read when ``cache`` is true.
    """

    def __init__(self, records: list[ChipRecord], normalization: dict, *, batch_size: int,
                 augment=None, positive_fraction: float | None = None,
                 steps: int | None = None, shuffle: bool = True, use_weights: bool = True,
                 cache: bool = True, seed: int = 0, pad_last: bool = False, workers: int = 1,
                 use_multiprocessing: bool = False):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing)
        if not records:
            raise ValueError("ChipDataset needs at least one chip")
        self.records = list(records)
        self.normalization = normalization
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction
        self.shuffle = shuffle
        self.use_weights = use_weights
        self.cache = cache
        self.seed = seed
        self.pad_last = pad_last
        self.epoch = 0
        self.bands = len(normalization["mean"])
        self.augmenter = (build_augmenter(augment, self.bands, seed)
                          if augment is not None else None)
        self.steps = steps or math.ceil(len(self.records) / batch_size)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.positives = [i for i, r in enumerate(self.records) if r.car_pixels > 0]
        self.negatives = [i for i, r in enumerate(self.records) if r.car_pixels <= 0]

    def __len__(self) -> int:
        return self.steps

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def chip(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chip ``i`` as (image, mask, weight), from the cache when it is there."""
        if i in self._cache:
            return self._cache[i]
        item = read_chip(self.records[i], self.normalization, use_weights=self.use_weights)
        if self.cache:
            self._cache[i] = item
        return item

    def batch_indices(self, idx: int) -> list[int]:
        """Which chips make batch ``idx``: a deterministic draw from (seed, epoch, idx)."""
        n = len(self.records)
        if not self.shuffle:
            return list(range(idx * self.batch_size, min(n, (idx + 1) * self.batch_size)))
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        pf = self.positive_fraction
        if pf is None or not self.positives or not self.negatives:
            return rng.integers(0, n, self.batch_size).tolist()
        # Each slot holds a chip with cars with probability pf, so small batches still mix.
        is_pos = rng.random(self.batch_size) < pf
        pos = rng.choice(self.positives, self.batch_size)
        neg = rng.choice(self.negatives, self.batch_size)
        return np.where(is_pos, pos, neg).tolist()

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        indices = self.batch_indices(idx)
        if self.augmenter is not None:
            # Re-seeded per batch so a given (epoch, batch) always gets the same augmentation,
            # which keeps resumed runs and worker threads reproducible.
            self.augmenter.set_random_seed(int(hash((self.seed, self.epoch, idx)) % 2**31))
        images, targets = [], []
        for i in indices:
            image, mask, weight = self.chip(i)
            if self.augmenter is not None:
                image, mask, weight = self._augment(image, mask, weight)
            target = (mask == 1).astype(np.float32)
            weight = np.where(mask == IGNORE, 0.0, weight).astype(np.float32)
            images.append(image)
            targets.append(np.stack([target, weight], axis=-1))
        if self.pad_last and len(images) < self.batch_size:
            # A full-size last batch of zero weight: one batch shape means one compiled
            # predict function, and the padding counts nowhere.
            extra = self.batch_size - len(images)
            images += [np.zeros_like(images[0])] * extra
            targets += [np.zeros_like(targets[0])] * extra
        return np.stack(images).astype(np.float32), np.stack(targets)

    def _augment(self, image, mask, weight):
        unit = np.clip((image + ZSPAN) / (2 * ZSPAN), 0.0, 1.0).astype(np.float32)
        out = self.augmenter(image=unit, mask=mask, weight=weight)
        image = (out["image"].astype(np.float32) * (2 * ZSPAN) - ZSPAN).astype(np.float32)
        return image, out["mask"], out["weight"]


def measure_throughput(dataset: ChipDataset, *, batches: int = 5, warmup: int = 1) -> float:
    """Chips per second that ``dataset.__getitem__`` delivers (the input pipeline alone).

    The warm-up batches fill the in-memory cache when it is on, as a real epoch would.
    """
    for i in range(min(warmup, len(dataset))):
        dataset[i]
    start = time.perf_counter()
    chips = 0
    for i in range(batches):
        x, _ = dataset[i % len(dataset)]
        chips += len(x)
    return chips / max(time.perf_counter() - start, 1e-9)
