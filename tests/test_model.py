"""The model bundle is replaced as one unit: never new weights beside old metadata."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.bundle import (
    BUNDLE_FILES,
    COMMIT_DIR,
    METADATA_FILE,
    MODEL_FILE,
    PREVIOUS_DIR,
    check_bundle,
    load_bundle,
    save_bundle,
)
from pipeline.errors import InputError
from pipeline.files import TEMP_DIR
from pipeline.model import build_unet


def _metadata(threshold: float) -> dict:
    return {"bands": [1, 2, 3], "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
            "chip_size": 32, "threshold": threshold, "dtype": "uint8", "size_multiple": 2}


@pytest.fixture(scope="module")
def models():
    return [build_unet(3, depth=1, base_filters=2, name=f"m{i}") for i in range(2)]


class _FailingSave:
    """A model whose save dies halfway (disk full, kill), after writing part of the file."""

    def __init__(self, model):
        self.model = model

    def save(self, path):
        self.model.save(path)
        with open(path, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")


def test_failed_save_leaves_the_old_bundle_whole(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    before = (tmp_path / MODEL_FILE).read_bytes()
    with pytest.raises(OSError):
        save_bundle(_FailingSave(models[1]), _metadata(0.7), tmp_path)
    assert (tmp_path / MODEL_FILE).read_bytes() == before
    assert json.loads((tmp_path / METADATA_FILE).read_text())["threshold"] == 0.3
    check_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BUNDLE_FILES)


def test_crash_after_the_commit_point_is_finished_by_the_next_reader(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    other = tmp_path.parent / "other"
    save_bundle(models[1], _metadata(0.7), other)
    # The state a kill leaves between the commit rename and the moves: metadata moved, the
    # model not yet.
    commit = tmp_path / COMMIT_DIR
    commit.mkdir()
    shutil.copy(other / MODEL_FILE, commit / MODEL_FILE)
    (tmp_path / PREVIOUS_DIR).mkdir()
    shutil.move(tmp_path / METADATA_FILE, tmp_path / PREVIOUS_DIR / METADATA_FILE)
    shutil.copy(other / METADATA_FILE, tmp_path / METADATA_FILE)
    metadata = check_bundle(tmp_path)
    assert metadata["threshold"] == 0.7
    assert not commit.exists()
    assert json.loads((tmp_path / PREVIOUS_DIR / METADATA_FILE).read_text())["threshold"] == 0.3
    assert load_bundle(tmp_path).threshold == 0.7


def test_retraining_keeps_the_previous_bundle(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    save_bundle(models[1], _metadata(0.7), tmp_path)
    assert check_bundle(tmp_path)["threshold"] == 0.7
    assert check_bundle(tmp_path / PREVIOUS_DIR)["threshold"] == 0.3
    assert not (tmp_path / TEMP_DIR).exists()


def test_weights_from_another_training_are_refused(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    save_bundle(models[1], _metadata(0.7), tmp_path / "b")
    shutil.copy(tmp_path / "b" / MODEL_FILE, tmp_path / MODEL_FILE)
    with pytest.raises(InputError, match="model.keras: does not match metadata.json"):
        check_bundle(tmp_path)


def test_truncated_model_file_says_so(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    data = (tmp_path / MODEL_FILE).read_bytes()
    (tmp_path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.keras: not a complete Keras model file"):
        load_bundle(tmp_path)


def test_missing_model_says_what_to_run(tmp_path):
    with pytest.raises(InputError, match="model.keras: no model; run `make train`"):
        check_bundle(tmp_path)


# === The metadata is checked on load (issue 21) ===

def _edit_metadata(model_dir, **changes) -> None:
    path = model_dir / METADATA_FILE
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.2])
def test_a_threshold_outside_0_1_is_one_line_naming_the_field(tmp_path, models, threshold):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    _edit_metadata(tmp_path, threshold=threshold)
    with pytest.raises(InputError) as err:
        load_bundle(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / METADATA_FILE}: threshold: ")
    assert len(message.splitlines()) == 1


def test_a_band_with_std_0_says_std_0(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    _edit_metadata(tmp_path, normalization={"mean": [0, 0, 0], "std": [1, 0, 1]})
    with pytest.raises(InputError) as err:
        check_bundle(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / METADATA_FILE}: normalization.std: band 2 has std 0")
    assert "no valid pixel" not in message and len(message.splitlines()) == 1


def test_metadata_without_model_sha256_is_refused(tmp_path, models):
    save_bundle(models[0], _metadata(0.3), tmp_path)
    _edit_metadata(tmp_path, model_sha256=None)
    with pytest.raises(InputError, match=r"metadata.json: model_sha256: Field required"):
        check_bundle(tmp_path)


def test_a_bundle_train_writes_loads_and_names_its_weights(tmp_path, models):
    from pipeline.bundle import read_metadata
    from pipeline.files import file_sha256

    save_bundle(models[0], _metadata(0.3), tmp_path)
    assert read_metadata(tmp_path)["model_sha256"] == file_sha256(tmp_path / MODEL_FILE)
    assert load_bundle(tmp_path).threshold == 0.3
