"""Chip dataset: reading, weights at nodata, positive sampling, augmentation, throughput."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from shapely.geometry import box
from skimage.draw import polygon as draw_polygon

from pipeline.config import AugmentConfig
from pipeline.dataset import (
    ChipDataset,
    ChipRecord,
    box_corner_weights,
    box_labels_wanted,
    data_fingerprint,
    measure_throughput,
    read_chip,
    read_index,
    read_stats,
)
from pipeline.errors import InputError

EPSG = 32633
GSD = 0.15


def _car(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pixel coordinates of a rotated rectangle about 10 x 5 px."""
    cy, cx = rng.uniform(8, size - 8, 2)
    angle = rng.uniform(0, np.pi)
    length, width = rng.uniform(8, 12), rng.uniform(4, 6)
    u = np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-u[1], u[0]])
    corners = np.array([c * length / 2 * u + s * width / 2 * v
                        for c, s in ((1, 1), (1, -1), (-1, -1), (-1, 1))])
    return draw_polygon(cy + corners[:, 1], cx + corners[:, 0], (size, size))


def make_chips(root: Path, *, n: int = 24, size: int = 64, seed: int = 0,
               weights: bool = True, val_every: int = 4) -> tuple[Path, Path]:
    """Write a tiny chips/masks layout as tile + rasterize would: bright or dark cars on grey.

    Every third chip has no cars; every fifth has a nodata strip (image 0, mask 255).
    """
    rng = np.random.default_rng(seed)
    chips_dir, masks_dir = root / "chips", root / "masks"
    rows, pixels = [], []
    for k in range(n):
        scene = f"scene{k % 2}"
        row_off, col_off = (k // 2) * size, 0
        chip = f"{scene}_r{row_off:05d}_c{col_off:05d}"
        image = rng.normal(120, 12, (3, size, size))
        mask = np.zeros((size, size), np.uint8)
        if k % 3:
            for _ in range(rng.integers(1, 4)):
                rr, cc = _car(rng, size)
                image[:, rr, cc] = rng.choice([215.0, 30.0]) + rng.normal(0, 5, (3, 1))
                mask[rr, cc] = 1
        if k % 5 == 0:
            image[:, :, -8:] = 0
            mask[:, -8:] = 255
        image = np.clip(image, 1, 255).astype(np.uint8)
        if k % 5 == 0:
            image[:, :, -8:] = 0
        transform = Affine(GSD, 0, 500000 + col_off * GSD, 0, -GSD, 4000000 - row_off * GSD)
        profile = dict(driver="GTiff", width=size, height=size, crs=f"EPSG:{EPSG}",
                       transform=transform)
        (chips_dir / scene).mkdir(parents=True, exist_ok=True)
        (masks_dir / scene).mkdir(parents=True, exist_ok=True)
        with rasterio.open(chips_dir / scene / f"{chip}.tif", "w", count=3, dtype="uint8",
                           nodata=0, **profile) as dst:
            dst.write(image)
        with rasterio.open(masks_dir / scene / f"{chip}.tif", "w", count=1, dtype="uint8",
                           nodata=255, **profile) as dst:
            dst.write(mask, 1)
        if weights:
            weight = np.where(mask == 255, 0, 1 + (mask == 1)).astype(np.float32)
            with rasterio.open(masks_dir / scene / f"{chip}.weight.tif", "w", count=1,
                               dtype="float32", **profile) as dst:
                dst.write(weight, 1)
        valid = mask != 255
        pixels.append(image[:, valid])
        x0, y0 = transform @ (0, size)
        x1, y1 = transform @ (size, 0)
        rows.append({"chip": chip, "scene": scene, "row_off": row_off, "col_off": col_off,
                     "width": size, "height": size, "valid_fraction": float(valid.mean()),
                     "gsd": GSD, "car_pixels": int((mask == 1).sum()),
                     "split": "val" if k % val_every == val_every - 1 else "train",
                     "geometry": box(x0, y0, x1, y1)})
    gpd.GeoDataFrame(rows, crs=f"EPSG:{EPSG}").to_file(chips_dir / "index.gpkg", driver="GPKG")
    allpix = np.concatenate(pixels, axis=1).astype(np.float64)
    stats = {"bands": [1, 2, 3], "dtype": "uint8", "mean": allpix.mean(axis=1).tolist(),
             "std": allpix.std(axis=1).tolist(), "gsd": GSD}
    (chips_dir / "stats.json").write_text(json.dumps(stats))
    return chips_dir, masks_dir


@pytest.fixture
def chips(tmp_path) -> tuple[Path, Path]:
    return make_chips(tmp_path)


def test_index_and_stats_are_read(chips):
    records = read_index(*chips)
    assert len(records) == 24
    assert {r.split for r in records} == {"train", "val"}
    assert all(r.weight is not None for r in records)
    stats = read_stats(chips[0])
    assert len(stats["mean"]) == 3 and 100 < stats["mean"][0] < 160


def test_missing_mask_is_one_clear_error(chips):
    records = read_index(*chips)
    records[3].mask.unlink()
    with pytest.raises(InputError, match=records[3].chip):
        read_index(*chips)


def test_nodata_pixels_get_zero_weight(chips):
    records = read_index(*chips)
    stats = read_stats(chips[0])
    # Chip 10 (scene0, row 5) has cars and the nodata strip.
    record = next(r for r in records if r.chip == "scene0_r00320_c00000")
    image, mask, weight = read_chip(record, stats)
    assert image.dtype == np.float32 and image.shape == (64, 64, 3)
    assert (mask[:, -8:] == 255).all()
    assert (weight[:, -8:] == 0).all() and (weight[:, :-8] > 0).all()
    # Gap weights are read when asked for, all ones otherwise.
    assert weight.max() == 2
    _, _, plain = read_chip(record, stats, use_weights=False)
    assert set(np.unique(plain)) == {0.0, 1.0}


def test_batches_pack_target_and_weight_and_augment_consistently(chips):
    records = read_index(*chips)
    stats = read_stats(chips[0])
    data = ChipDataset(records, stats, batch_size=6, augment=AugmentConfig(),
                       positive_fraction=0.5, steps=4, seed=1)
    x, y = data[0]
    assert x.shape == (6, 64, 64, 3) and y.shape == (6, 64, 64, 2)
    target, weight = y[..., 0], y[..., 1]
    assert set(np.unique(target)) <= {0.0, 1.0}
    # Targets only where the weight is positive or zero, never outside 0/1, and the same
    # (epoch, batch) always gives the same batch.
    x2, y2 = data[0]
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # Cars remain bright or dark after augmentation: target pixels differ from the grey mean.
    assert np.abs(x[..., 0][target == 1]).mean() > 1.0
    assert (weight >= 0).all()


def test_positive_fraction_controls_the_mix(chips):
    records = read_index(*chips)
    stats = read_stats(chips[0])
    for pf, lo, hi in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.3, 0.7)):
        data = ChipDataset(records, stats, batch_size=50, positive_fraction=pf, steps=2)
        picked = [records[i].car_pixels > 0 for i in data.batch_indices(0)]
        assert lo <= np.mean(picked) <= hi


def test_validation_order_covers_every_chip_once(chips):
    records = read_index(*chips)
    data = ChipDataset(records, read_stats(chips[0]), batch_size=5, shuffle=False)
    assert len(data) == 5
    seen = [i for b in range(len(data)) for i in data.batch_indices(b)]
    assert seen == list(range(24))


def test_fingerprint_changes_with_the_data(chips):
    records = read_index(*chips)
    before = data_fingerprint(records)
    assert data_fingerprint(read_index(*chips)) == before
    # A chip moved to another split changes it; so does a mask rewritten to another size.
    index = gpd.read_file(chips[0] / "index.gpkg")
    index.loc[0, "split"] = "val"
    index.to_file(chips[0] / "index.gpkg", driver="GPKG")
    moved = data_fingerprint(read_index(*chips))
    assert moved != before
    profile = rasterio.open(records[1].mask).profile
    with rasterio.open(records[1].mask, "w", **{**profile, "compress": "deflate"}) as dst:
        dst.write(np.ones((64, 64), np.uint8), 1)
    assert data_fingerprint(read_index(*chips)) not in (before, moved)


def test_throughput_is_measured(chips):
    data = ChipDataset(read_index(*chips), read_stats(chips[0]), batch_size=4,
                       augment=AugmentConfig(), steps=3)
    assert measure_throughput(data, batches=3) > 0


OFF = dict(flips=False, scale_rotate=False, color=False, exposure=False, haze=False,
           shadows=False, blur_noise=False)


def test_rotation_and_scale_fill_is_ignored_and_masks_stay_labels(chips):
    records = read_index(*chips)
    stats = read_stats(chips[0])
    aug = AugmentConfig(**{**OFF, "scale_rotate": True})
    data = ChipDataset(records, stats, batch_size=8, augment=aug, positive_fraction=1.0,
                       steps=6, seed=3, use_weights=False)
    filled = 0
    for b in range(6):
        x, y = data[b]
        target, weight = y[..., 0], y[..., 1]
        assert set(np.unique(target)) <= {0.0, 1.0}
        assert set(np.unique(weight)) <= {0.0, 1.0}  # nearest: no blended weights
        # Pixels brought in from outside the chip carry no weight and no car.
        outside = weight == 0
        assert (target[outside] == 0).all()
        filled += int(outside.sum())
    assert filled > 0  # any-angle rotation and zoom-out bring in ignored corners


def test_photometric_augmentations_leave_labels_alone(chips):
    records = read_index(*chips)
    stats = read_stats(chips[0])
    plain = ChipDataset(records, stats, batch_size=8, augment=AugmentConfig(**OFF),
                        positive_fraction=1.0, steps=2, seed=5)
    photo = ChipDataset(records, stats, batch_size=8, positive_fraction=1.0, steps=2, seed=5,
                        augment=AugmentConfig(**{**OFF, "color": True, "exposure": True,
                                                 "haze": True, "shadows": True,
                                                 "blur_noise": True}))
    (x0, y0), (x1, y1) = plain[0], photo[0]
    np.testing.assert_array_equal(y0, y1)
    assert np.abs(x1 - x0).mean() > 0.05
    assert np.isfinite(x1).all()


def test_augmentation_round_trips_radiometry(chips):
    # A horizontal flip through the [0, 1] radiometry round trip is an exact flip.
    records = read_index(*chips)
    stats = read_stats(chips[0])
    data = ChipDataset(records, stats, batch_size=1, augment=AugmentConfig(**OFF), steps=1)
    image, mask, weight = data.chip(1)
    import albumentations as A

    data.augmenter = A.Compose([A.HorizontalFlip(p=1.0)], additional_targets={"weight": "mask"})
    out, out_mask, _ = data._augment(image, mask, weight)
    np.testing.assert_allclose(out, image[:, ::-1], atol=1e-4)
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])


def test_random_crops_for_training_whole_chips_for_validation(chips):
    records = read_index(*chips)
    stats = read_stats(chips[0])
    train = ChipDataset(records, stats, batch_size=4, augment=AugmentConfig(), steps=2,
                        crop_size=32)
    x, y = train[0]
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, 32, 32, 2)
    val = ChipDataset(records, stats, batch_size=4, shuffle=False)
    assert val[0][0].shape == (4, 64, 64, 3)


def _mask_records(root: Path, masks: list[np.ndarray]) -> list[ChipRecord]:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for k, mask in enumerate(masks):
        path = root / f"m{k}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0],
                           count=1, dtype="uint8", crs=f"EPSG:{EPSG}", nodata=255,
                           transform=Affine(GSD, 0, 500000, 0, -GSD, 4000000)) as dst:
            dst.write(mask, 1)
        records.append(ChipRecord(chip=f"m{k}", scene="s", image=path, mask=path, weight=None,
                                  car_pixels=int((mask == 1).sum()), split="train"))
    return records


def test_box_labels_are_detected_and_their_corners_ignored(tmp_path):
    rng = np.random.default_rng(0)
    boxes, outlines = [], []
    for _ in range(4):
        m = np.zeros((64, 64), np.uint8)
        for r, c in ((5, 5), (5, 35), (35, 5), (35, 35)):
            h, w = rng.integers(10, 14), rng.integers(16, 24)
            m[r:r + h, c:c + w] = 1
        boxes.append(m)
        o = np.zeros((64, 64), np.uint8)
        for _ in range(3):
            rr, cc = _car(rng, 64)
            o[rr, cc] = 1
        outlines.append(o)
    assert box_labels_wanted(_mask_records(tmp_path / "b", boxes), "auto")
    assert not box_labels_wanted(_mask_records(tmp_path / "o", outlines), "auto")
    assert box_labels_wanted([], True) and not box_labels_wanted([], False)

    mask = np.zeros((40, 60), np.uint8)
    mask[10:22, 10:40] = 1  # a 12 x 30 px box
    weight = box_corner_weights(mask, np.ones(mask.shape, np.float32))
    assert weight[10, 10] == 0 and weight[21, 39] == 0  # corners: neither car nor background
    assert weight[10, 25] == 0 and weight[16, 10] == 0  # the edge band too
    assert weight[16, 25] == 1 and weight[15, 20] == 1  # the core stays a car
    assert (weight[mask == 0] == 1).all()
    assert 0.3 < np.mean(weight[10:22, 10:40] == 0) < 0.6


def test_overlapping_boxes_in_a_row_are_still_boxes():
    from pipeline.dataset import box_blobs

    row = np.zeros((64, 64), np.uint8)
    row[10:24, 5:35] = 1
    row[18:32, 30:60] = 1  # two boxes overlapping: one blob, still only axis-aligned edges
    assert len(box_blobs(row)) == 1
    weight = box_corner_weights(row, np.ones(row.shape, np.float32))
    assert weight[17, 20] == 1 and weight[10, 20] == 0
    rotated = np.zeros((64, 64), np.uint8)
    rr, cc = _car(np.random.default_rng(1), 64)
    rotated[rr, cc] = 1
    assert box_blobs(rotated) == []
