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

from pipeline.errors import InputError
from pipeline.files import read_json
from pipeline.geo import NODATA
from pipeline.io import INDEX_FILE, STATS_FILE, gdal_safe_name

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("chip", "scene", "row_off", "col_off", "width", "height", "valid_fraction",
                 "gsd", "car_pixels", "split")
IGNORE = NODATA  # mask pixels with no loss: nodata, padding, fill brought in by rotation


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
        with gdal_safe_name(path) as safe:  # any folder name (";" is OGR syntax)
            table = pyogrio.read_dataframe(safe, read_geometry=False)
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


def _haze_class():
    import albumentations as A

    class Haze(A.ImageOnlyTransform):
        """A flat veil of bright, slightly bluish light: ``(1 - a) * image + a * veil``."""

        def __init__(self, strength: tuple[float, float] = (0.05, 0.3), p: float = 0.5):
            super().__init__(p=p)
            self.strength = strength

        def get_params(self):
            a = self.py_random.uniform(*self.strength)
            veil = [self.py_random.uniform(0.75, 0.9) for _ in range(2)]
            return {"a": a, "veil": veil + [min(veil[-1] + 0.05, 1.0)]}

        def apply(self, img, a=0.0, veil=(0.8, 0.8, 0.85), **params):
            bands = img.shape[-1]
            colour = np.resize(np.asarray(veil, np.float32), bands)
            return ((1 - a) * img + a * colour).astype(img.dtype)

        def get_transform_init_args_names(self):
            return ("strength",)

    return Haze


def build_augmenter(augment, bands: int, seed: int):
    """An albumentations pipeline for (image, mask, weight), groups switched by ``augment``.

    Images arrive as radiometry in [0, 1] (see ``ChipDataset``), so exposure, white balance,
    haze and JPEG act on the values a camera records, not on z-scores. Masks and weights move
    with the image through geometric transforms using nearest interpolation; pixels brought in
    from outside the chip get mask 255 (ignored), and their weight is zeroed afterwards in
    ``ChipDataset``. Returns None when every group is off.

    What real flights vary and the sample does not: exposure and gamma, white balance (per-band
    gains), haze, the camera's blur, noise and JPEG, shadows of buildings and trees, and the GSD
    (scale jitter of ``scale_limit``, +-20% by default: 0.12-0.18 m for 0.15 m chips).
    """
    import albumentations as A

    ops = []
    if augment.flips:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if augment.scale_rotate:
        s, r = augment.scale_limit, augment.rotate_limit
        ops.append(A.Affine(scale=(1 - s, 1 + s), rotate=(-r, r), interpolation=1,
                            mask_interpolation=0, fill=0.0, fill_mask=IGNORE, p=0.7))
    if augment.exposure:
        ops.append(A.RandomGamma(gamma_limit=(70, 140), p=0.4))
        # Per-band gains = white balance; one gain for the chip, not per pixel.
        ops.append(A.MultiplicativeNoise(multiplier=(0.85, 1.15), per_channel=True,
                                         elementwise=False, p=0.5))
    if augment.color:
        ops.append(A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.25,
                                              p=0.6))
        if bands == 3:  # hue is only defined for RGB
            ops.append(A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15,
                                            val_shift_limit=0, p=0.3))
    if augment.haze:
        ops.append(_haze_class()(strength=(0.05, 0.3), p=0.25))
    if augment.shadows and bands == 3:
        ops.append(A.RandomShadow(shadow_roi=(0, 0, 1, 1), num_shadows_limit=(1, 2),
                                  shadow_dimension=5, shadow_intensity_range=(0.3, 0.6),
                                  p=0.3))
    if augment.blur_noise:
        ops.append(A.OneOf([A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=1.0),
                            A.Downscale(scale_range=(0.5, 0.8), p=1.0)], p=0.3))
        ops.append(A.GaussNoise(std_range=(0.005, 0.03), p=0.3))
        if bands == 3:
            ops.append(A.ImageCompression(quality_range=(40, 90), p=0.3))
    if not ops:
        return None
    return A.Compose(ops, additional_targets={"weight": "mask"}, seed=seed)


# === Box labels ===

# A blob outline with at most this many corners per 100 px of boundary has axis-aligned edges
# (a box, or overlapping boxes in a row); a rasterized rotated outline steps every few pixels.
BOX_CORNERS_PER_100PX = 12.0
# 'auto' calls labels boxes when at least this share of the car blobs looked at are boxy.
BOX_SHARE = 0.8
# Share of a box's short side, from its edge inward, that the loss ignores (the car's own edge
# lies somewhere in there when the car is not axis-aligned).
BOX_EDGE_BAND = 0.2


def _boxy(blob: np.ndarray) -> bool:
    """Whether a blob's outline has only long axis-aligned edges (boxes, not staircases)."""
    from rasterio import features

    rings = [g["coordinates"] for g, _ in features.shapes(blob.astype(np.uint8), mask=blob)]
    corners = sum(len(ring) - 1 for poly in rings for ring in poly)
    padded = np.pad(blob, 1)
    perimeter = int(np.sum(padded[1:, :] != padded[:-1, :]) + np.sum(padded[:, 1:] != padded[:, :-1]))
    return perimeter > 0 and corners * 100.0 / perimeter <= BOX_CORNERS_PER_100PX


def box_blobs(mask: np.ndarray) -> list[tuple[slice, slice]]:
    """Bounding slices of the car blobs in ``mask`` that are boxes (or rows of boxes)."""
    from scipy import ndimage

    comps, _ = ndimage.label(mask == 1)
    out = []
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if min(h, w) >= 4 and _boxy(comps[sl] == i):
            out.append(sl)
    return out


def box_labels_wanted(records: list[ChipRecord], mode, *, sample: int = 40) -> bool:
    """Whether to treat car labels as boxes: ``mode`` True/False, or 'auto' from the masks.

    'auto' looks at up to ``sample`` chips with cars: labels are boxes when most car blobs
    (not touching a chip edge, where a cut could look boxy) have only long axis-aligned edges.
    Rotated car outlines at random headings almost never do; boxes overlapping in a parking
    row still do.
    """
    if mode != "auto":
        return bool(mode)
    import rasterio
    from scipy import ndimage

    boxes = blobs = 0
    for r in [r for r in records if r.car_pixels > 0][:sample]:
        with rasterio.open(r.mask) as src:
            mask = src.read(1)
        comps, n = ndimage.label(mask == 1)
        inner = [sl for sl in ndimage.find_objects(comps)
                 if sl is not None and sl[0].start > 0 and sl[1].start > 0
                 and sl[0].stop < mask.shape[0] and sl[1].stop < mask.shape[1]]
        blobs += len(inner)
        found = {(b[0].start, b[1].start) for b in box_blobs(mask)}
        boxes += sum((sl[0].start, sl[1].start) in found for sl in inner)
    wanted = blobs >= 5 and boxes >= BOX_SHARE * blobs
    log.info("labels: %d of %d car blobs are axis-aligned boxes: %s", boxes,
             blobs, "box labels" if wanted else "outlines")
    return wanted


def box_corner_weights(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Zero the weight where a box label says "car" but a car at another heading would not be.

    A car at any heading inside its axis-aligned box covers the box's middle but rarely its
    corners or the whole of its edges; teaching "car" there would teach boxes. The loss ignores
    (weight 0) the pixels of each boxy blob within ``BOX_EDGE_BAND`` of the short side from its
    edge, and for a single box also its corners outside the inscribed ellipse; the core stays a
    car and everything outside the boxes stays background.
    """
    from scipy import ndimage

    weight = weight.copy()
    for sl in box_blobs(mask):
        blob = mask[sl] == 1
        h, w = blob.shape
        depth = ndimage.distance_transform_edt(np.pad(blob, 1))[1:-1, 1:-1]
        band = blob & (depth <= max(1.0, BOX_EDGE_BAND * min(h, w)))
        if blob.all():  # one box: its corners too
            yy = (np.arange(h) + 0.5 - h / 2) / (h / 2)
            xx = (np.arange(w) + 0.5 - w / 2) / (w / 2)
            band |= (yy[:, None] ** 2 + xx[None, :] ** 2) > 1.0
        view = weight[sl]
        view[band] = 0.0
    return weight


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
                 use_multiprocessing: bool = False, crop_size: int | None = None,
                 box_labels: bool = False, dtype: str = "uint8"):
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
        self.crop_size = crop_size
        self.box_labels = box_labels
        self.bands = len(normalization["mean"])
        mean = np.asarray(normalization["mean"], np.float32)
        std = np.asarray(normalization["std"], np.float32)
        # Augmentation works on radiometry scaled to [0, 1]: the dtype's range for 8 bits, a
        # range that holds nearly every value for other data.
        full = 255.0 if dtype == "uint8" else float(np.max(mean + 5 * std))
        self._mean, self._std, self._full = mean, std, max(full, 1e-6)
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
        for j, i in enumerate(indices):
            image, mask, weight = self.chip(i)
            if self.box_labels:
                weight = box_corner_weights(mask, weight)
            if self.crop_size and self.crop_size < min(mask.shape):
                image, mask, weight = self._crop(image, mask, weight, idx, j)
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

    def _crop(self, image, mask, weight, idx: int, j: int):
        rng = np.random.default_rng([self.seed, self.epoch, idx, j, 7])
        size = self.crop_size
        r = int(rng.integers(0, mask.shape[0] - size + 1))
        c = int(rng.integers(0, mask.shape[1] - size + 1))
        return (image[r:r + size, c:c + size], mask[r:r + size, c:c + size],
                weight[r:r + size, c:c + size])

    def _augment(self, image, mask, weight):
        raw = (image * self._std + self._mean) / self._full
        unit = np.clip(raw, 0.0, 1.0).astype(np.float32)
        out = self.augmenter(image=unit, mask=mask, weight=weight)
        image = (out["image"].astype(np.float32) * self._full - self._mean) / self._std
        return image.astype(np.float32), out["mask"], out["weight"]


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
