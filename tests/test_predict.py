"""Sliding-window prediction: known answers, window independence, nodata, edges and bad input."""

from __future__ import annotations

import json
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import keras
import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rio_cogeo.cogeo import cog_validate

from pipeline.bundle import save_bundle
from pipeline.config import PredictConfig
from pipeline.errors import InputError
from pipeline.model import build_unet, receptive_field
from pipeline.stages.predict import (
    CONTEXT_SHARE,
    Geometry,
    _frame_axis,
    _StripReader,
    axis_weight,
    encode,
    get_bundle,
    lattice_phase,
    predict_grid,
    predict_scene,
    window_geometry,
)
from tests.conftest import GSD, PINNED, TRANSFORM, UTM, write_scene


def _metadata(**extra) -> dict:
    meta = dict(bands=[1, 2, 3], dtype="uint8",
                normalization={"mean": [0.0] * 3, "std": [255.0] * 3},
                gsd=GSD, chip_size=32, size_multiple=1, threshold=0.5, data_fingerprint="test")
    meta.update(extra)
    return meta


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> Path:
    """A model whose output is band 1 / 255: the prediction must reproduce the input."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 1, activation=None)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.array([1.0, 0.0, 0.0], np.float32).reshape(1, 1, 3, 1),
                      np.zeros(1, np.float32)])
    model_dir = tmp_path_factory.mktemp("identity")
    save_bundle(model, _metadata(), model_dir)
    return model_dir


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> tuple[Path, object]:
    """One 5x5 convolution + sigmoid: translation-equivariant, 2 px of edge effect."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 5, padding="same",
                                                    activation="sigmoid")(inputs))
    model_dir = tmp_path_factory.mktemp("conv")
    meta = _metadata(normalization={"mean": [127.0] * 3, "std": [40.0] * 3}, chip_size=32)
    save_bundle(model, meta, model_dir)
    return model_dir, model


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(1), dict(crs=ds.crs, transform=ds.transform, shape=(ds.height, ds.width),
                                tags=ds.tags(), nodata=ds.nodata)


def _scene(rng, rows: int, cols: int, dtype=np.uint8) -> np.ndarray:
    return rng.integers(1, 255, size=(3, rows, cols)).astype(dtype)


def test_blend_weights_are_a_partition_of_unity():
    # Two windows of 32 at stride 24: across the overlap the two weights sum to exactly 1.
    left = axis_weight(0, 32, 56, 8)
    right = axis_weight(24, 32, 56, 8)
    total = np.zeros(56)
    total[:32] += left
    total[24:] += right
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert left[0] == 1.0 and right[-1] == 1.0  # true scene edges keep full weight
    assert right[0] == 0.0 and left[-1] == 0.0  # inner edges (padding artefacts) get none


def test_bundle_is_loaded_once_per_process(identity_model):
    assert get_bundle(identity_model) is get_bundle(identity_model)


def test_identity_model_reproduces_input(tmp_path, rng, identity_model):
    data = _scene(rng, 70, 95)
    scene = write_scene(tmp_path / "in" / "scene.tif", data, nodata=None)
    prob_path, mask_path = predict_scene(scene, identity_model, tmp_path / "out",
                                         cfg=PredictConfig(**PINNED, window=32, overlap=8, batch_size=3))
    assert prob_path == tmp_path / "out" / "probability" / "scene.tif"
    assert mask_path == tmp_path / "out" / "masks" / "scene.tif"
    prob, info = _read(prob_path)
    expected = np.rint(data[0] / 255.0 * 254).astype(np.uint8)
    np.testing.assert_array_equal(prob, expected)
    mask, minfo = _read(mask_path)
    np.testing.assert_array_equal(mask, (data[0] / 255.0 >= 0.5).astype(np.uint8))
    for i in (info, minfo):
        assert i["crs"] == UTM and i["transform"] == TRANSFORM and i["shape"] == (70, 95)
        assert i["nodata"] == 255
    assert info["tags"]["threshold"] == "0.5" and info["tags"]["data_fingerprint"] == "test"
    assert info["tags"]["model"].endswith("model.keras")
    assert cog_validate(prob_path)[0] and cog_validate(mask_path)[0]
    with rasterio.open(prob_path) as ds:
        assert ds.compression.name.lower() == "deflate"
    # The intermediates are gone: only the two output folders remain.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["masks", "probability"]


def test_large_output_has_overviews(tmp_path, rng, identity_model):
    data = rng.integers(1, 255, size=(3, 1100, 1300)).astype(np.uint8)
    scene = write_scene(tmp_path / "big.tif", data, nodata=None)
    prob_path, mask_path = predict_scene(scene, identity_model, tmp_path / "out",
                                         cfg=PredictConfig(**PINNED, window=256, overlap=64))
    np.testing.assert_array_equal(_read(prob_path)[0], np.rint(data[0] / 255 * 254))
    for path, resampling in ((prob_path, "AVERAGE"), (mask_path, "NEAREST")):
        assert cog_validate(path)[0]
        with rasterio.open(path) as ds:
            assert ds.overviews(1) and ds.tags()["OVERVIEW_RESAMPLING"] == resampling
            assert "255 = nodata" in ds.descriptions[0]
            if resampling == "NEAREST":
                overview = ds.read(1, out_shape=(ds.height // 2, ds.width // 2))
                assert set(np.unique(overview)) <= {0, 1}


def test_tta_and_threshold_override(tmp_path, rng, identity_model):
    data = _scene(rng, 40, 50)
    scene = write_scene(tmp_path / "scene.tif", data, nodata=None)
    prob_path, mask_path = predict_scene(
        scene, identity_model, tmp_path / "out",
        cfg=PredictConfig(**PINNED, window=16, overlap=4, tta=True, threshold=0.25))
    np.testing.assert_array_equal(_read(prob_path)[0], np.rint(data[0] / 255 * 254))
    np.testing.assert_array_equal(_read(mask_path)[0], data[0] / 255.0 >= 0.25)
    assert _read(mask_path)[1]["tags"]["threshold"] == "0.25"


def test_nodata_pixels_come_out_as_nodata(tmp_path, rng, identity_model):
    data = _scene(rng, 60, 60)
    data[:, 10:30, 20:45] = 0  # nodata = 0 in every band
    data[0, 40:45, 5:10] = 0  # only one band zero: still valid
    scene = write_scene(tmp_path / "scene.tif", data, nodata=0)
    prob_path, mask_path = predict_scene(scene, identity_model, tmp_path / "out",
                                         cfg=PredictConfig(**PINNED, window=16, overlap=6))
    prob, mask = _read(prob_path)[0], _read(mask_path)[0]
    hole = np.zeros((60, 60), bool)
    hole[10:30, 20:45] = True
    assert (prob[hole] == 255).all() and (mask[hole] == 255).all()
    np.testing.assert_array_equal(prob[~hole], np.rint(data[0][~hole] / 255 * 254))
    assert (prob[40:45, 5:10] == 0).all()


def _whole_scene(model, data: np.ndarray, mean: float, std: float) -> np.ndarray:
    image = (np.moveaxis(data, 0, -1).astype(np.float32) - mean) / std
    return np.asarray(model.predict_on_batch(image[None]))[0, ..., 0]


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(40, 150), cols=st.integers(40, 150), window=st.integers(16, 64),
       overlap_frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_windows_equal_whole_scene(conv_model, rows, cols, window, overlap_frac, seed):
    """Predicting through any windows equals applying the model to the whole scene at once."""
    model_dir, model = conv_model
    overlap = 4 + int(overlap_frac * (window // 2 - 4))
    data = _scene(np.random.default_rng(seed), rows, cols)
    with tempfile.TemporaryDirectory() as tmp:
        scene = write_scene(Path(tmp) / "scene.tif", data, nodata=None)
        prob_path, _ = predict_scene(scene, model_dir, Path(tmp) / "out",
                                     cfg=PredictConfig(**PINNED, window=window, overlap=overlap))
        prob = _read(prob_path)[0].astype(np.float64) / 254
    whole = _whole_scene(model, data, 127.0, 40.0)
    diff = np.abs(prob - whole)[2:-2, 2:-2]
    assert diff.max() <= 1 / 254 + 1e-6, (window, overlap, np.unravel_index(diff.argmax(),
                                                                            diff.shape))


@pytest.mark.parametrize("crop_rows, crop_cols", [(128, 192), (150, 203)])
def test_crop_gives_same_result_as_whole_scene(tmp_path, rng, crop_rows, crop_cols):
    """A crop offset by a multiple of 64 px predicts like the scene, one overlap from its edges.

    The 150 x 203 crop ends off the U-Net's pooling lattice, so its last windows must stay on it.
    """
    keras.utils.set_random_seed(3)
    model = build_unet(3, depth=2, base_filters=4)
    model_dir = tmp_path / "unet"
    save_bundle(model, _metadata(normalization={"mean": [127.0] * 3, "std": [50.0] * 3},
                                 chip_size=64, size_multiple=4), model_dir)
    data = _scene(rng, 256, 360)
    overlap = 32
    cfg = PredictConfig(**PINNED, overlap=overlap)
    whole = write_scene(tmp_path / "whole.tif", data, nodata=None)
    r0, c0 = 64, 128
    crop_t = TRANSFORM @ Affine.translation(c0, r0)
    crop = write_scene(tmp_path / "crop.tif", data[:, r0:r0 + crop_rows, c0:c0 + crop_cols].copy(),
                       transform=crop_t, nodata=None)
    pw, mw = predict_scene(whole, model_dir, tmp_path / "out", cfg=cfg)
    pc, mc = predict_scene(crop, model_dir, tmp_path / "out", cfg=cfg)
    assert _read(pc)[1]["transform"] == crop_t
    inner = (slice(r0 + overlap, r0 + crop_rows - overlap),
             slice(c0 + overlap, c0 + crop_cols - overlap))
    crop_inner = (slice(overlap, crop_rows - overlap), slice(overlap, crop_cols - overlap))
    p_whole = _read(pw)[0][inner].astype(int)
    p_crop = _read(pc)[0][crop_inner].astype(int)
    assert np.abs(p_whole - p_crop).max() <= 2
    m_whole, m_crop = _read(mw)[0][inner], _read(mc)[0][crop_inner]
    decided = np.abs(p_whole - 127) > 2  # away from the 0.5 threshold
    np.testing.assert_array_equal(m_whole[decided], m_crop[decided])


def test_one_pixel_scene(tmp_path, identity_model):
    data = np.full((3, 1, 1), 200, np.uint8)
    scene = write_scene(tmp_path / "tiny.tif", data, nodata=None)
    prob_path, mask_path = predict_scene(scene, identity_model, tmp_path / "out",
                                         cfg=PredictConfig(**PINNED))
    prob, info = _read(prob_path)
    assert info["shape"] == (1, 1) and prob[0, 0] == round(200 / 255 * 254)
    assert _read(mask_path)[0][0, 0] == 1


def test_all_nodata_scene(tmp_path, identity_model):
    scene = write_scene(tmp_path / "empty.tif", np.zeros((3, 50, 40), np.uint8), nodata=0)
    prob_path, mask_path = predict_scene(scene, identity_model, tmp_path / "out",
                                         cfg=PredictConfig(**PINNED, window=16, overlap=4))
    for path in (prob_path, mask_path):
        assert (_read(path)[0] == 255).all()
        assert cog_validate(path)[0]


def test_other_gsd_is_resampled_and_returned_on_input_grid(tmp_path, identity_model):
    # A smooth ramp at twice the model's GSD: the answer is still band1 on the input grid.
    yy, xx = np.mgrid[0:60, 0:80]
    band = (40 + xx + 2 * yy).astype(np.uint8)
    data = np.stack([band, band, band])
    transform = Affine(2 * GSD, 0, 500000, 0, -2 * GSD, 4000000)
    scene = write_scene(tmp_path / "coarse.tif", data, transform=transform, nodata=None)
    prob_path, _ = predict_scene(scene, identity_model, tmp_path / "out",
                                 cfg=PredictConfig(**PINNED, window=32, overlap=8))
    prob, info = _read(prob_path)
    assert info["transform"] == transform and info["shape"] == (60, 80)
    expected = np.rint(band / 255 * 254)
    assert np.abs(prob[1:-1, 1:-1] - expected[1:-1, 1:-1]).max() <= 2
    assert (prob != 255).all()


def _failure(tmp_path, scene, model_dir, match) -> tuple[str, list[Path]]:
    """Predict a bad scene; return the InputError's message and every file left in the output."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match) as err:
        predict_scene(scene, model_dir, out, cfg=PredictConfig(**PINNED, window=16, overlap=4))
    return str(err.value), [p for p in out.rglob("*") if p.is_file()]


def test_corrupt_tiff_is_refused(tmp_path, identity_model):
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 50)
    message, leftovers = _failure(tmp_path, bad, identity_model, "not a readable GeoTIFF")
    assert "\n" not in message and str(bad) in message
    assert leftovers == []  # no output, no intermediate, no temporary file


def test_truncated_tiff_is_refused(tmp_path, rng, identity_model):
    scene = write_scene(tmp_path / "trunc.tif", _scene(rng, 200, 200), nodata=None)
    blob = scene.read_bytes()
    scene.write_bytes(blob[: len(blob) * 2 // 3])
    message, leftovers = _failure(tmp_path, scene, identity_model, "trunc.tif")
    assert "\n" not in message and str(scene) in message
    assert leftovers == []  # no output, no intermediate, no temporary file


def test_missing_crs_is_refused(tmp_path, rng, identity_model):
    scene = write_scene(tmp_path / "nocrs.tif", _scene(rng, 20, 20), crs=None)
    message, leftovers = _failure(tmp_path, scene, identity_model, "no CRS")
    assert "\n" not in message and str(scene) in message
    assert leftovers == []  # no output, no intermediate, no temporary file


def test_too_few_bands_is_refused(tmp_path, rng, identity_model):
    scene = write_scene(tmp_path / "two.tif", _scene(rng, 20, 20)[:2].copy())
    message, leftovers = _failure(tmp_path, scene, identity_model, "2 band")
    assert "\n" not in message and str(scene) in message
    assert leftovers == []  # no output, no intermediate, no temporary file


def test_wrong_dtype_is_refused(tmp_path, rng, identity_model):
    scene = write_scene(tmp_path / "u16.tif", _scene(rng, 20, 20, np.uint16))
    message, leftovers = _failure(tmp_path, scene, identity_model, "uint16.*uint8")
    assert "\n" not in message and str(scene) in message
    assert leftovers == []  # no output, no intermediate, no temporary file


def test_encode_quantises_and_marks_nodata():
    prob = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    q, m = encode(prob, 0.5)
    assert q.tolist() == [[0, 127, 254, 255]] and m.tolist() == [[0, 1, 1, 255]]


# === Every input works exactly (issue 12, predict side) ===

def test_masked_pixels_stay_out_of_a_resampled_scene(tmp_path, identity_model):
    """A scene at another GSD with an internal mask: masked pixels never reach the result.

    The warped grid used to drop the mask, so the garbage under it (250) was predicted as if
    valid and bled into the valid pixels next to it when the probability was brought back.
    """
    data = np.full((3, 60, 80), 60, np.uint8)
    data[:, 20:40, 30:50] = 250  # garbage under the mask
    valid = np.full((60, 80), 255, np.uint8)
    valid[20:40, 30:50] = 0
    path = tmp_path / "masked.tif"
    profile = dict(driver="GTiff", width=80, height=60, count=3, dtype="uint8", crs=UTM,
                   transform=Affine(2 * GSD, 0, 500000, 0, -2 * GSD, 4000000), tiled=True,
                   blockxsize=16, blockysize=16)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.write_mask(valid)
    prob_path, _ = predict_scene(path, identity_model, tmp_path / "out",
                                 cfg=PredictConfig(**PINNED, window=32, overlap=8))
    prob = _read(prob_path)[0]
    assert (prob[valid == 0] == 255).all()
    expected = round(60 / 255 * 254)
    assert np.abs(prob[valid == 255].astype(int) - expected).max() <= 1


def _mixed_dtype_vrt(tmp_path, rng) -> Path:
    """A VRT whose band 2 is uint16 while bands 1 and 3 are uint8 (a GeoTIFF cannot mix them)."""
    base = write_scene(tmp_path / "base.tif", _scene(rng, 20, 20), nodata=None)
    with rasterio.open(base) as src:
        gt = ", ".join(repr(v) for v in src.transform.to_gdal())
        wkt = src.crs.to_wkt()
    bands = "".join(
        f'<VRTRasterBand dataType="{dtype}" band="{i}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">base.tif</SourceFilename>'
        f'<SourceBand>{i}</SourceBand></SimpleSource></VRTRasterBand>'
        for i, dtype in ((1, "Byte"), (2, "UInt16"), (3, "Byte")))
    vrt = tmp_path / "mixed.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="20" rasterYSize="20"><SRS>{wkt}</SRS>'
                   f'<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>')
    return vrt


def test_dtype_is_checked_on_every_band_the_model_reads(tmp_path, rng, identity_model):
    vrt = _mixed_dtype_vrt(tmp_path, rng)
    with rasterio.open(vrt) as ds:
        assert ds.dtypes == ("uint8", "uint16", "uint8")
    message, leftovers = _failure(tmp_path, vrt, identity_model, "band 2 is uint16.*uint8")
    assert "\n" not in message and str(vrt) in message
    assert leftovers == []


def test_extra_bands_are_named_in_the_log(tmp_path, rng, identity_model, caplog):
    """A 4-band scene given to a 3-band model says which bands are used and which are not."""
    data = rng.integers(1, 255, size=(4, 40, 40)).astype(np.uint8)
    scene = tmp_path / "rgbn.tif"  # red, green, blue and an undefined (near-infrared) band
    with rasterio.open(scene, "w", driver="GTiff", width=40, height=40, count=4, dtype="uint8",
                       crs=UTM, transform=TRANSFORM, photometric="RGB") as dst:
        dst.write(data)
    with caplog.at_level("INFO", logger="pipeline.stages.predict"):
        prob_path, _ = predict_scene(scene, identity_model, tmp_path / "out",
                                     cfg=PredictConfig(**PINNED, window=32, overlap=8))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("rgbn.tif" in w and "bands [1, 2, 3]" in w and "band(s) [4]" in w
               for w in warnings), warnings
    np.testing.assert_array_equal(_read(prob_path)[0], np.rint(data[0] / 255 * 254))
    # An alpha band is a mask, not an unused data band: no warning for RGBA.
    caplog.clear()
    rgba = tmp_path / "rgba.tif"
    with rasterio.open(rgba, "w", driver="GTiff", width=40, height=40, count=4, dtype="uint8",
                       crs=UTM, transform=TRANSFORM, photometric="RGB", alpha="YES") as dst:
        dst.write(np.concatenate([data[:3], np.full((1, 40, 40), 255, np.uint8)]))
    with caplog.at_level("INFO", logger="pipeline.stages.predict"):
        predict_scene(rgba, identity_model, tmp_path / "out2",
                      cfg=PredictConfig(**PINNED, window=32, overlap=8))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("reads bands [1, 2, 3]" in r.getMessage() for r in caplog.records)


# === Stitching that does not depend on where the windows fall (issue 14) ===

@pytest.fixture(scope="module")
def small_unet(tmp_path_factory) -> Path:
    """A seeded 2-level U-Net (receptive field 44 px, pools on a 4 px lattice) as a bundle."""
    keras.utils.set_random_seed(3)
    model = build_unet(3, depth=2, base_filters=4)
    model_dir = tmp_path_factory.mktemp("unet2")
    save_bundle(model, _metadata(normalization={"mean": [127.0] * 3, "std": [50.0] * 3},
                                 chip_size=64, size_multiple=4), model_dir)
    return model_dir


def test_receptive_field_of_the_unet():
    # 3x3 convs add 2 px x jump, 2x2 pools 1 px x jump: depth 1 = 1 + 4 + 1 + 8 + 4.
    assert receptive_field(build_unet(3, depth=1, base_filters=4)) == 18
    assert receptive_field(build_unet(3, depth=4, base_filters=4)) == 200


def test_overlap_comes_from_the_receptive_field():
    meta = _metadata(size_multiple=16, chip_size=256)
    geom = window_geometry(PredictConfig(), meta, 200)
    assert geom.window == 2048  # not the 256 px training chip
    assert geom.overlap % 16 == 0 and geom.window % 16 == 0
    assert geom.margin >= 200 / 2 * CONTEXT_SHARE  # the dropped edge covers the context
    assert window_geometry(PredictConfig(), meta, 100).overlap < geom.overlap
    explicit = window_geometry(PredictConfig(window=100, overlap=40), meta, 200)
    assert (explicit.window, explicit.overlap) == (112, 48)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 3000), phase=st.integers(0, 15), window=st.sampled_from([64, 256, 1024]))
def test_windows_shrink_to_the_scene_and_stay_on_the_lattice(length, phase, window):
    geom = Geometry(window=window, overlap=32, margin=12, multiple=16, receptive_field=None)
    size, starts = _frame_axis(length, phase, geom)
    # One lattice step of slack over the window, for the frame's phase (see _frame_axis).
    assert size % 16 == 0 and size <= window + 16 and all(s % 16 == 0 for s in starts)
    assert starts[-1] + size >= phase + length  # covered
    assert size - 16 < phase + length or len(starts) > 1  # no window all padding
    assert len(starts) == 1 or starts[-1] < phase + length - geom.overlap


@pytest.mark.parametrize("phase", [1, 5, 15])
def test_a_window_sized_scene_off_the_lattice_is_one_window(phase):
    # The default 2048 px window over a 2048 px scene whose origin is 5 px off the lattice was
    # two 1104 px windows a side (4 windows, 1.16x the pixels); one step of slack keeps it one.
    geom = Geometry(window=2048, overlap=160, margin=48, multiple=16, receptive_field=None)
    assert _frame_axis(2048, phase, geom) == (2064, [0])
    # Past the slack the count grows as before, and the windows shrink to fit.
    size, starts = _frame_axis(2048 + 16, phase, geom)
    assert len(starts) == 2 and size < 2048


@pytest.mark.parametrize("offset", [(37, 23), (64, 128)])
def test_unaligned_crop_predicts_like_the_whole_scene(tmp_path, rng, small_unet, offset):
    """A crop at any whole-pixel offset, windows falling elsewhere, equals the whole scene.

    (37, 23) is not a multiple of the U-Net's 4 px pooling lattice: the crop's windows are
    anchored to the map's lattice, so they still pool the same 2x2 blocks. With a margin of half
    the receptive field (22 px) every kept pixel sees its whole context: equal up to rounding.
    """
    data = _scene(rng, 200, 260)
    cfg = PredictConfig(engine="keras", window=96, overlap=56, precision="float32")
    whole = write_scene(tmp_path / "whole.tif", data, nodata=None)
    r0, c0 = offset
    rows, cols = 200 - r0 - 10, 260 - c0 - 10
    crop = write_scene(tmp_path / "crop.tif", data[:, r0:r0 + rows, c0:c0 + cols].copy(),
                       transform=TRANSFORM @ Affine.translation(c0, r0), nodata=None)
    p_whole = _read(predict_scene(whole, small_unet, tmp_path / "a", cfg=cfg)[0])[0]
    p_crop = _read(predict_scene(crop, small_unet, tmp_path / "b", cfg=cfg)[0])[0]
    edge = 22  # half the receptive field: closer to the crop's edge, the crop lacks context
    a = p_whole[r0 + edge:r0 + rows - edge, c0 + edge:c0 + cols - edge].astype(int)
    b = p_crop[edge:rows - edge, edge:cols - edge].astype(int)
    assert np.abs(a - b).max() <= 1


def test_bfloat16_keeps_weights_and_a_float32_head(small_unet, tmp_path, rng):
    """bfloat16 inference: same float32 weights, float32 sigmoid head, probabilities close."""
    exact = get_bundle(small_unet, "float32")
    fast = get_bundle(small_unet, "bfloat16")
    assert fast.metadata["inference_precision"] == "bfloat16"
    assert fast.model.get_layer("car_prob").dtype_policy.name == "float32"
    # The layer reading the image stays exact too (bf16 would merge neighbouring grey levels).
    assert fast.model.get_layer("enc0_conv1").dtype_policy.name == "float32"
    assert fast.model.get_layer("enc0_conv2").dtype_policy.name == "mixed_bfloat16"
    for w_exact, w_fast in zip(exact.model.get_weights(), fast.model.get_weights(), strict=True):
        np.testing.assert_array_equal(w_exact, w_fast)
    x = (rng.random((2, 64, 64, 3), dtype=np.float32) - 0.5) * 4
    p_exact = np.asarray(exact.model.predict_on_batch(x))
    p_fast = np.asarray(fast.model.predict_on_batch(x))
    assert p_fast.dtype == np.float32
    assert 0 < np.abs(p_exact - p_fast).max() < 0.05  # rounded, but not another model
    scene = write_scene(tmp_path / "s.tif", _scene(rng, 40, 40), nodata=None)
    prob_path, _ = predict_scene(scene, small_unet, tmp_path / "o",
                                 cfg=PredictConfig(engine="keras", precision="bfloat16"))
    assert _read(prob_path)[1]["tags"]["precision"] == "bfloat16"


# === Each engine by name, and auto's choice on described CPUs (issue 25) ===

# Every engine and precision predict.engine / predict.precision offer, on every machine (all
# are installed: ONNX Runtime is a core dependency, OpenVINO is in the dev extras). The engine
# must be the one asked for: a fallback to Keras fails (tests/conftest.py) and is named here.
ENGINES = [("keras", "float32"), ("keras", "bfloat16"), ("onnxruntime", "float32"),
           ("openvino", "float32"), ("openvino", "bfloat16")]


@pytest.mark.parametrize(("engine", "precision"), ENGINES)
def test_each_engine_runs_as_asked_and_predicts_like_keras_float32(small_unet, tmp_path, rng,
                                                                    engine, precision):
    bundle = get_bundle(small_unet, precision, engine)
    assert (bundle.metadata["inference_engine"], bundle.metadata["inference_precision"]) == (
        engine, precision)
    assert bundle.receptive_field == 44  # measured on the Keras graph, whatever runs it
    exact = get_bundle(small_unet, "float32", "keras").model
    # Windows of two sizes: an exported graph keeps height and width free.
    for shape in ((2, 64, 64, 3), (1, 48, 80, 3)):
        x = (rng.random(shape, dtype=np.float32) - 0.5) * 4
        diff = np.abs(np.asarray(bundle.model.predict_on_batch(x))
                      - np.asarray(exact.predict_on_batch(x))).max()
        # float32 engines agree to rounding; bfloat16 is rounded, but not another model.
        assert diff < (1e-4 if precision == "float32" else 0.05), (engine, precision, diff)
    scene = write_scene(tmp_path / "s.tif", _scene(rng, 70, 90), nodata=None)
    prob_path, _ = predict_scene(scene, small_unet, tmp_path / "o",
                                 cfg=PredictConfig(window=48, overlap=16, engine=engine,
                                                   precision=precision))
    tags = _read(prob_path)[1]["tags"]
    assert (tags["engine"], tags["precision"]) == (engine, precision)


# CPU descriptions as /proc/cpuinfo's flags line gives them (None: no flags line, not Linux).
# Which engine predict's auto takes is measured (tests/test_engine_choice.py); training's
# mixed precision still follows the CPU's description.
SAPPHIRE_RAPIDS = frozenset({"sse4_2", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
ICE_LAKE = frozenset({"sse4_2", "avx2", "fma", "avx512f"})
ZEN3 = frozenset({"sse4_2", "avx2", "fma"})


def _describe(monkeypatch, flags, *, gpu=False, backend="tensorflow"):
    """Make pipeline.engines see this CPU, GPU and Keras backend."""
    import pipeline.engines as model
    import pipeline.stages.train as train

    monkeypatch.setattr(model, "cpu_flags", lambda: flags)
    monkeypatch.setattr(model, "tensorflow_gpu", lambda: gpu and backend == "tensorflow")
    monkeypatch.setattr(model, "keras_backend", lambda: backend)
    monkeypatch.setattr(train, "gpu_visible", lambda: gpu)


# (description, gpu, backend) -> train.mixed_precision auto. Written out, not recomputed.
AUTO_TRAINING = [
    ((SAPPHIRE_RAPIDS, False, "tensorflow"), "mixed_bfloat16"),
    ((SAPPHIRE_RAPIDS, True, "tensorflow"), "mixed_float16"),
    ((SAPPHIRE_RAPIDS, False, "jax"), None),
    ((ICE_LAKE, False, "tensorflow"), None),
    ((ZEN3, False, "tensorflow"), None),
    ((ZEN3, True, "tensorflow"), "mixed_float16"),
    ((None, False, "tensorflow"), None),
]


@pytest.mark.parametrize(("described", "expected"), AUTO_TRAINING)
def test_training_precision_follows_the_described_cpu(monkeypatch, described, expected):
    """train.mixed_precision auto: float16 on a GPU, bfloat16 on a CPU with bf16 instructions
    (TensorFlow), else float32; explicit settings as they are."""
    from pipeline.stages.train import training_policy

    flags, gpu, backend = described
    _describe(monkeypatch, flags, gpu=gpu, backend=backend)
    assert training_policy("auto") == expected
    assert training_policy("off") is None
    assert training_policy("bf16") == "mixed_bfloat16"
    assert training_policy("on") == "mixed_float16"


def test_cpu_flags_are_read_from_the_flags_line(monkeypatch):
    """The description auto reads: /proc/cpuinfo's first flags line; None without one."""
    import pipeline.engines as model

    texts = {"x86": "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n",
             "arm": "processor\t: 0\nFeatures\t: fp asimd\n"}
    for kind, expected in (("x86", {"fpu", "avx2", "avx512f", "avx512_bf16"}), ("arm", None)):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, _t=texts[kind], **k: _t)
        model.cpu_flags.cache_clear()
        try:
            assert model.cpu_flags() == (frozenset(expected) if expected else None)
        finally:
            monkeypatch.undo()
            model.cpu_flags.cache_clear()


@pytest.mark.engine_fallback
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_an_engine_that_fails_falls_back_to_keras_with_a_warning(small_unet, tmp_path, rng,
                                                                 monkeypatch, caplog, engine):
    """A broken export (here: a file that is no model) still predicts, with Keras, and says so
    at WARNING: the fallback is never silent."""
    import logging

    import pipeline.engines as model
    from pipeline.stages.predict import _cached_bundle

    def broken_export(_model, _path, name, filename):
        bad = tmp_path / "broken" / filename
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(b"not a model")
        return bad

    monkeypatch.setattr(model, "cached_export", broken_export)
    _cached_bundle.cache_clear()
    caplog.set_level(logging.WARNING, logger="pipeline.stages.predict")
    try:
        bundle = get_bundle(small_unet, "float32", engine)
        scene = write_scene(tmp_path / "s.tif", _scene(rng, 40, 40), nodata=None)
        prob_path, _ = predict_scene(scene, small_unet, tmp_path / "o",
                                     cfg=PredictConfig(engine=engine, precision="float32"))
    finally:
        _cached_bundle.cache_clear()  # the next test builds the real engine again
    assert bundle.metadata["inference_engine"] == "keras"
    assert _read(prob_path)[1]["tags"]["engine"] == "keras"
    name = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}[engine]
    assert [r.levelname for r in caplog.records
            if f"{name} unavailable" in r.getMessage() and "using Keras" in r.getMessage()] == [
        "WARNING"]
    exact = _read(predict_scene(scene, small_unet, tmp_path / "k",
                                cfg=PredictConfig(**PINNED))[0])[0]
    assert np.abs(_read(prob_path)[0].astype(int) - exact).max() <= 1


def test_openvino_export_is_cached_beside_the_model(small_unet, tmp_path, rng):
    from pipeline.bundle import MODEL_FILE
    from pipeline.engines import ENGINE_CACHE
    from pipeline.files import file_sha256

    get_bundle(small_unet, "bfloat16", "openvino")
    digest = file_sha256(small_unet / MODEL_FILE)[:16]
    cached = small_unet / ENGINE_CACHE / f"openvino-{digest}"
    assert (cached / "model.xml").exists() and (cached / "model.bin").exists()
    assert not [p for p in (small_unet / ENGINE_CACHE).iterdir() if p.name.startswith(".")]


# === ONNX Runtime engine (issue 14): float32, its export cached beside the model ===

@pytest.fixture(scope="module")
def ort_unet(small_unet, tmp_path_factory) -> Path:
    """small_unet's bundle in a folder of its own, exported for ONNX Runtime once per module."""
    from pipeline.bundle import BUNDLE_FILES

    model_dir = tmp_path_factory.mktemp("unet2_ort")
    for name in BUNDLE_FILES:
        shutil.copy2(small_unet / name, model_dir / name)
    assert get_bundle(model_dir, "float32", "onnxruntime").metadata["inference_engine"] == (
        "onnxruntime")
    return model_dir


def _onnx_export(model_dir: Path, root: Path | None = None) -> Path:
    from pipeline.bundle import MODEL_FILE
    from pipeline.engines import ENGINE_CACHE
    from pipeline.files import file_sha256

    digest = file_sha256(model_dir / MODEL_FILE)[:16]
    return (root or model_dir / ENGINE_CACHE) / f"onnxruntime-{digest}" / "model.onnx"


def test_onnxruntime_predicts_like_keras_float32(ort_unet, tmp_path, rng):
    bundle = get_bundle(ort_unet, "auto", "onnxruntime")  # auto is float32 on ONNX Runtime
    assert bundle.metadata["inference_engine"] == "onnxruntime"
    assert bundle.metadata["inference_precision"] == "float32"
    assert bundle.receptive_field == 44  # measured on the Keras graph
    scene = write_scene(tmp_path / "s.tif", _scene(rng, 90, 70), nodata=None)
    # Windows of several sizes (96 and the clipped edges): the graph's height and width are free.
    cfgs = {e: PredictConfig(window=48, overlap=16, engine=e, precision="float32")
            for e in ("onnxruntime", "keras")}
    p_ort, p_keras = (_grid(scene, ort_unet, cfg) for cfg in cfgs.values())
    assert np.abs(p_ort - p_keras).max() < 1e-4
    assert np.ptp(p_keras) > 1e-3  # a real comparison, not two constants
    prob_path, _ = predict_scene(scene, ort_unet, tmp_path / "o", cfg=cfgs["onnxruntime"])
    tags = _read(prob_path)[1]["tags"]
    assert (tags["engine"], tags["precision"]) == ("onnxruntime", "float32")
    exact = _read(predict_scene(scene, ort_unet, tmp_path / "k", cfg=cfgs["keras"])[0])[0]
    assert np.abs(_read(prob_path)[0].astype(int) - exact).max() <= 1


def test_onnxruntime_export_is_cached_per_model(ort_unet, tmp_path, rng):
    from pipeline.bundle import read_metadata
    from pipeline.stages.predict import _cached_bundle

    cached = _onnx_export(ort_unet)
    built = cached.stat().st_mtime_ns
    _cached_bundle.cache_clear()  # as a fresh process (a Dask worker) would find it
    assert get_bundle(ort_unet, "float32", "onnxruntime").metadata["inference_engine"] == (
        "onnxruntime")
    assert cached.stat().st_mtime_ns == built  # reused, not exported again
    assert not [p for p in cached.parent.parent.iterdir() if p.name.startswith(".")]
    # Retrained in place (other weights, another sha256): a new export of the new weights.
    keras.utils.set_random_seed(4)
    retrained = build_unet(3, depth=2, base_filters=4)
    meta = {k: v for k, v in read_metadata(ort_unet).items() if k != "model_sha256"}
    model_dir = tmp_path / "m"
    shutil.copytree(ort_unet, model_dir)
    save_bundle(retrained, meta, model_dir)
    bundle = get_bundle(model_dir, "float32", "onnxruntime")
    assert bundle.metadata["inference_engine"] == "onnxruntime"
    assert _onnx_export(model_dir) != _onnx_export(ort_unet)
    assert _onnx_export(model_dir).exists() and (model_dir / cached.relative_to(ort_unet)).exists()
    x = rng.standard_normal((2, 32, 48, 3), dtype=np.float32)
    expected = np.asarray(retrained.predict_on_batch(x))
    assert np.abs(bundle.model.predict_on_batch(x) - expected).max() < 1e-4


def test_onnxruntime_cache_falls_back_to_the_temp_folder(ort_unet, tmp_path, monkeypatch):
    """A bundle folder that cannot hold the cache (read-only) gets it in the temp folder."""
    import os

    from pipeline.bundle import BUNDLE_FILES
    from pipeline.engines import ENGINE_CACHE

    model_dir = tmp_path / "ro"
    model_dir.mkdir()
    for name in BUNDLE_FILES:
        shutil.copy2(ort_unet / name, model_dir / name)
    # chmod alone does not stop root (CI containers); a file in the cache folder's place does.
    (model_dir / ENGINE_CACHE).write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    os.chmod(model_dir, 0o555)
    try:
        bundle = get_bundle(model_dir, "float32", "onnxruntime")
    finally:
        os.chmod(model_dir, 0o755)
    assert bundle.metadata["inference_engine"] == "onnxruntime"
    assert _onnx_export(model_dir, tmp_path / "tmp" / "carseg-engine-cache").exists()
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([*BUNDLE_FILES, ENGINE_CACHE])


# === The engine cache is verified (issue 21) ===

def _retrained(ort_unet: Path, model_dir: Path):
    """ort_unet's bundle retrained in ``model_dir``: other weights, another sha256."""
    from pipeline.bundle import read_metadata

    keras.utils.set_random_seed(11)
    model = build_unet(3, depth=2, base_filters=4)
    meta = {k: v for k, v in read_metadata(ort_unet).items() if k != "model_sha256"}
    save_bundle(model, meta, model_dir)
    return model


def _runs_like(bundle, model, rng) -> bool:
    x = rng.standard_normal((1, 32, 32, 3), dtype=np.float32)
    return float(np.abs(bundle.model.predict_on_batch(x) - model.predict_on_batch(x)).max()) < 1e-4


def test_another_models_export_planted_in_the_cache_is_rebuilt(ort_unet, tmp_path, rng, caplog):
    model_dir = tmp_path / "m"
    model = _retrained(ort_unet, model_dir)
    planted = _onnx_export(model_dir)  # this model's slot, holding ort_unet's graph and record
    shutil.copytree(_onnx_export(ort_unet).parent, planted.parent)
    with caplog.at_level("WARNING"):
        bundle = get_bundle(model_dir, "float32", "onnxruntime")
    assert "built from another model; rebuilding it" in caplog.text
    assert _runs_like(bundle, model, rng)
    caplog.clear()
    planted.with_name("export.json").unlink()  # no record at all: rebuilt too
    from pipeline.stages.predict import _cached_bundle

    _cached_bundle.cache_clear()
    with caplog.at_level("WARNING"):
        assert _runs_like(get_bundle(model_dir, "float32", "onnxruntime"), model, rng)
    assert "has no record of its model" in caplog.text


def test_a_truncated_export_in_the_cache_is_rebuilt(ort_unet, tmp_path, rng, caplog):
    model_dir = tmp_path / "m"
    shutil.copytree(ort_unet, model_dir)
    cached = _onnx_export(model_dir)
    whole = cached.read_bytes()
    cached.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        bundle = get_bundle(model_dir, "float32", "onnxruntime")
    assert "truncated or changed" in caplog.text
    # A fresh export (not byte for byte the first: tf2onnx numbers its nodes), recorded.
    from pipeline.files import file_sha256

    record = json.loads(cached.with_name("export.json").read_text())
    assert record["files"]["model.onnx"] == file_sha256(cached)
    assert cached.stat().st_size > len(whole) // 2
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    assert _runs_like(bundle, model, rng)


def _readonly_bundle(ort_unet: Path, tmp_path: Path, monkeypatch) -> Path:
    from pipeline.bundle import BUNDLE_FILES
    from pipeline.engines import ENGINE_CACHE

    model_dir = tmp_path / "ro"
    model_dir.mkdir()
    for name in BUNDLE_FILES:
        shutil.copy2(ort_unet / name, model_dir / name)
    (model_dir / ENGINE_CACHE).write_text("")  # no cache beside the bundle (see above)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return model_dir


def test_the_fallback_cache_is_created_private(ort_unet, tmp_path, monkeypatch):
    model_dir = _readonly_bundle(ort_unet, tmp_path, monkeypatch)
    get_bundle(model_dir, "float32", "onnxruntime")
    root = tmp_path / "tmp" / "carseg-engine-cache"
    assert (root.stat().st_mode & 0o777) == 0o700
    assert _onnx_export(model_dir, root).exists()


@pytest.mark.parametrize("unsafe", ["group-writable", "another user's"])
def test_a_fallback_cache_others_can_write_is_not_used(ort_unet, tmp_path, monkeypatch, rng,
                                                       caplog, unsafe):
    import os

    model_dir = _readonly_bundle(ort_unet, tmp_path, monkeypatch)
    # Another model's graph with a record forged to name this model: only the folder's
    # owner and mode can tell it was planted.
    other = tmp_path / "other"
    _retrained(ort_unet, other)
    get_bundle(other, "float32", "onnxruntime")
    root = tmp_path / "tmp" / "carseg-engine-cache"
    slot = _onnx_export(model_dir, root).parent
    shutil.copytree(_onnx_export(other).parent, slot)
    record = json.loads((slot / "export.json").read_text())
    from pipeline.bundle import MODEL_FILE
    from pipeline.files import file_sha256

    record["model_sha256"] = file_sha256(model_dir / MODEL_FILE)
    (slot / "export.json").write_text(json.dumps(record))
    if unsafe == "group-writable":
        os.chmod(root, 0o777)
    else:
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chmod(root, 0o700)
        os.chown(root, 65534, 65534)
    with caplog.at_level("WARNING"):
        bundle = get_bundle(model_dir, "float32", "onnxruntime")
    assert f"{root}: " in caplog.text and "not used as the engine cache" in caplog.text
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    assert _runs_like(bundle, model, rng)


def test_engines_bench_times_every_engine_against_keras_float32(ort_unet):
    from bench.engines import run

    result = run(model=ort_unet, window=64, batch=2, repeats=1)
    assert result["batch"] == [2, 64, 64, 3]
    rows = result["variants"]
    assert rows["keras_float32"]["max_abs_diff"] == 0 and rows["keras_float32"]["speedup"] == 1
    ort = rows["onnxruntime_float32"]
    assert (ort["engine_used"], ort["precision_used"]) == ("onnxruntime", "float32")
    assert ort["max_abs_diff"] < 1e-4 and ort["ms_per_batch"] > 0
    assert 0 < rows["keras_bfloat16"]["max_abs_diff"] < 0.05  # rounded, not another model

@pytest.mark.engine_fallback
def test_onnxruntime_missing_falls_back_to_keras_with_a_log_line(ort_unet, tmp_path, rng,
                                                                 monkeypatch, caplog):
    import logging
    import sys

    from pipeline.stages.predict import _cached_bundle

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    _cached_bundle.cache_clear()
    caplog.set_level(logging.INFO, logger="pipeline.stages.predict")
    scene = write_scene(tmp_path / "s.tif", _scene(rng, 40, 40), nodata=None)
    prob_path, _ = predict_scene(scene, ort_unet, tmp_path / "o",
                                 cfg=PredictConfig(engine="onnxruntime", precision="float32"))
    _cached_bundle.cache_clear()  # the next test imports onnxruntime again
    assert _read(prob_path)[1]["tags"]["engine"] == "keras"
    assert any("ONNX Runtime unavailable" in r.getMessage() and "using Keras" in r.getMessage()
               for r in caplog.records)

def test_engine_threads_are_the_process_share_of_cores(monkeypatch):
    """A Dask worker's share (OMP_NUM_THREADS from worker_env), else the CPUs it may run on."""
    import os

    from pipeline.distributed import worker_env
    from pipeline.engines import process_threads

    monkeypatch.setenv("OMP_NUM_THREADS", worker_env(2)["OMP_NUM_THREADS"])
    assert process_threads() == max(1, (os.cpu_count() or 1) // 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert process_threads() == len(os.sched_getaffinity(0))

def test_onnxruntime_with_bfloat16_is_a_one_line_settings_error(ort_unet):
    from pydantic import ValidationError

    from pipeline.config import load_config

    with pytest.raises(InputError, match=r"^--set predict.engine: predict.engine onnxruntime "
                       r"runs float32 only: set predict.precision to float32 or auto"):
        load_config(Path("configs/default.yaml"),
                    ["predict.engine=onnxruntime", "predict.precision=bfloat16"])
    with pytest.raises(ValidationError, match="onnxruntime runs float32 only"):
        PredictConfig(engine="onnxruntime", precision="bfloat16")
    with pytest.raises(InputError, match="onnxruntime runs float32 only"):
        get_bundle(ort_unet, "bfloat16", "onnxruntime")
    cfg = load_config(Path("configs/default.yaml"), ["predict.engine=onnxruntime"]).predict
    assert (cfg.engine, cfg.precision) == ("onnxruntime", "auto")  # auto: float32 there

def test_normalize_into_equals_the_bundle_normalisation(rng):
    """Predict normalises windows in place; the values must be training's, bit for bit."""
    from pipeline.model import normalize
    from pipeline.stages.predict import normalize_into

    norm = {"mean": [90.5, 101.25, 77.0], "std": [40.1, 38.7, 52.3]}
    strip = rng.integers(0, 256, (3, 40, 70), dtype=np.uint8)
    image = strip.transpose(1, 2, 0)[:, 5:37]  # a window of a (bands, rows, cols) strip
    out = np.full((40, 32, 3), np.nan, dtype=np.float32)
    normalize_into(image, *(np.asarray(norm[k], dtype=np.float32) for k in ("mean", "std")), out)
    np.testing.assert_array_equal(out, normalize(image, norm))


# === Memory flat in the scene's size: chunks of windows, overlap seams (issue 14) ===

def _grid(path: Path, model_dir: Path, cfg: PredictConfig, **kwargs) -> np.ndarray:
    """predict_grid's float probability for a scene, gathered from the blocks it emits."""
    bundle = get_bundle(model_dir, cfg.precision, cfg.engine)
    geometry = window_geometry(cfg, bundle.metadata, bundle.receptive_field)
    with rasterio.open(path) as src:
        out = np.full((src.height, src.width), -1.0, np.float32)

        def emit(row: int, col: int, prob: np.ndarray) -> None:
            block = out[row:row + prob.shape[0], col:col + prob.shape[1]]
            assert (block == -1).all()  # every pixel emitted once
            block[:] = prob

        predict_grid(_StripReader(src, path, bundle.bands), bundle, geometry=geometry,
                     phase=lattice_phase(src.transform, geometry.multiple),
                     batch_size=kwargs.pop("batch_size", cfg.batch_size), tta=cfg.tta,
                     emit=emit, **kwargs)
    assert (out != -1).all()
    return out


def test_chunks_blend_bit_for_bit_like_one_strip(tmp_path, rng, small_unet):
    """Blending in column chunks with carried overlaps changes no bit of the probability.

    The scene is off the pooling lattice (the frame is padded on both sides), has a nodata
    block that kills whole windows (so batches hold fewer windows) and a nodata column.
    """
    data = _scene(rng, 150, 700)
    data[:, 10:120, 150:400] = 0
    data[:, :, 650:655] = 0
    scene = write_scene(tmp_path / "s.tif", data, transform=TRANSFORM @ Affine.translation(37, 23))
    cfg = PredictConfig(engine="keras", window=96, precision="float32")
    strip = _grid(scene, small_unet, cfg, batch_size=3, chunk_cols=10**9)
    chunked = _grid(scene, small_unet, cfg, batch_size=3, chunk_cols=64)
    np.testing.assert_array_equal(strip, chunked)
    assert np.isnan(chunked[10:120, 150:400]).all() and np.isfinite(chunked[130:, :600]).all()


@pytest.mark.parametrize("col, cols", [(-7, 20), (3, 30), (-12, 30), (0, 5)])
def test_reader_block_equals_the_padded_strip(tmp_path, rng, col, cols):
    """A block read by columns is the same block of the whole strip padded by reflection."""
    data = _scene(rng, 6, 5)
    data[:, 2, 1] = 0  # one nodata pixel
    path = write_scene(tmp_path / "s.tif", data)
    with rasterio.open(path) as src:
        reader = _StripReader(src, path, [1, 2, 3])
        full, full_valid = reader.read(-2, 10)
        block, valid = reader.read(-2, 10, col, cols)
    pad = (max(0, -col), max(0, col + cols - 5))
    padded = np.pad(full, ((0, 0), (0, 0), pad), mode="symmetric")
    padded_valid = np.pad(full_valid, ((0, 0), pad), constant_values=False)
    x = slice(col + pad[0], col + pad[0] + cols)
    np.testing.assert_array_equal(block, padded[:, :, x])
    np.testing.assert_array_equal(valid, padded_valid[:, x])
    assert not valid[2 + 2, 1 - col] if 0 <= 1 - col < cols else True


def test_memory_is_flat_in_the_scene_width(tmp_path, rng, identity_model):
    """Peak allocations of predict_grid barely grow from a 1000 to an 8000 px wide scene.

    One strip of window rows as wide as the scene grew eightfold; chunks of windows hold the
    same memory whatever the width, bar the overlap-row seam.
    """
    cfg = PredictConfig(**PINNED, window=256, overlap=8)
    peaks = []
    for width in (1000, 8000):
        scene = write_scene(tmp_path / f"w{width}.tif", _scene(rng, 300, width))
        get_bundle(identity_model, cfg.precision, cfg.engine)  # loaded outside the measurement
        tracemalloc.start()
        try:
            _grid(scene, identity_model, cfg, batch_size=1, chunk_cols=512)
            # The gathered output is the test's, not predict_grid's: leave it out.
            peaks.append(tracemalloc.get_traced_memory()[1] - 300 * width * 4)
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_reflected_columns_as_slices_equal_the_gather():
    """``_runs`` (the strip reader's reflected columns as slices) picks what fancy indexing
    picks, for scenes narrower than, as wide as and wider than the frame, at every offset."""
    from pipeline.stages.predict import _runs

    rng = np.random.default_rng(0)
    for width in (1, 2, 3, 5, 17, 100):
        for col in range(-2 * width - 3, width + 3):
            for cols in (1, 2, 7, width, 3 * width + 5):
                frame = np.mod(np.arange(col, col + cols), 2 * width)
                source = np.where(frame < width, frame, 2 * width - 1 - frame)
                pick = source - source.min()
                strip = rng.integers(0, 255, (2, 3, int(pick.max()) + 1))
                runs = _runs(pick)
                assert len(runs) <= 3 or width < cols / 2  # a few slices, not one per column
                sliced = np.concatenate([strip[:, :, r] for r in runs], axis=2)
                np.testing.assert_array_equal(sliced, strip[:, :, pick])
