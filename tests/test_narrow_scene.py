"""A scene a few pixels wide or high (the sliver a tile grid leaves at a mosaic's edge) is
predicted like any other, not failed with a numpy broadcast error."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import GSD, PINNED, write_scene

from pipeline.config import PredictConfig
from pipeline.geo import PROB_SCALE


@pytest.mark.parametrize("shape", [(1, 1), (70, 3)])
def test_a_sliver_scene_is_predicted(tmp_path, shape):
    import keras

    from pipeline.bundle import save_bundle
    from pipeline.stages.predict import predict_scene

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same",
                                                    activation="sigmoid")(inputs))
    save_bundle(model, dict(bands=[1, 2, 3], dtype="uint8", gsd=GSD, chip_size=32,
                            normalization={"mean": [127.0] * 3, "std": [50.0] * 3},
                            size_multiple=1, threshold=0.5, data_fingerprint="test"),
                tmp_path / "model")
    image = np.random.default_rng(0).integers(1, 255, (3, *shape), dtype=np.uint8)
    scene = write_scene(tmp_path / "sliver.tif", image, tiled=False)
    predict_scene(scene, tmp_path / "model", tmp_path / "out",
                  cfg=PredictConfig(**PINNED, overlap=8))
    with rasterio.open(tmp_path / "out" / "probability" / "sliver.tif") as src:
        got = src.read(1).astype(int)
    assert got.shape == shape
    assert (got < 255).all()  # every pixel predicted, none left nodata
    if shape == (1, 1):  # one window the size of the scene: the model on the pixel itself
        x = (np.moveaxis(image, 0, -1).astype(np.float32) - 127.0) / 50.0
        want = np.asarray(model.predict_on_batch(x[None]))[0, :, :, 0]
        assert np.abs(got - np.rint(want * PROB_SCALE)).max() <= 1
