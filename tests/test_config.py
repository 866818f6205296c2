"""Settings: YAML + --set overrides + validation, and the per-stage stamps Make relies on."""

from pathlib import Path

import pytest

from pipeline.config import Config, load_config, settings_digest, stage_settings
from pipeline.errors import InputError
from pipeline.files import write_if_changed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)
    assert cfg.tile.chip_size > cfg.tile.overlap


def test_default_yaml_documents_every_setting():
    text = (ROOT / "configs" / "default.yaml").read_text()
    cfg = Config()
    for section in type(cfg).model_fields:
        for key in type(getattr(cfg, section)).model_fields:
            assert f"{key}:" in text, f"{section}.{key} missing from default.yaml"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "tile.bands=[3,2,1]", "train.max_minutes=null",
                             "predict.tta=true", "distributed.scheduler=tcp://h:8786"])
    assert cfg.train.epochs == 3
    assert cfg.tile.bands == [3, 2, 1]
    assert cfg.train.max_minutes is None
    assert cfg.predict.tta is True
    assert cfg.distributed.scheduler == "tcp://h:8786"


def test_misspelled_key_fails_with_its_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(InputError, match=r"c.yaml: train.epocs"):
        load_config(path)


def test_invalid_value_and_bad_override():
    with pytest.raises(InputError, match="tile.chip_size"):
        load_config(None, ["tile.chip_size=-4"])
    with pytest.raises(InputError, match="expected dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        load_config(bad)


def test_train_settings_do_not_touch_tiling_stamp(tmp_path):
    base = load_config(None)
    changed = load_config(None, ["train.epochs=99"])
    assert stage_settings(base, "tile") == stage_settings(changed, "tile")
    assert stage_settings(base, "train") != stage_settings(changed, "train")
    assert settings_digest(stage_settings(base, "train")) != settings_digest(
        stage_settings(changed, "train"))

    stamp = tmp_path / "tile.json"
    assert write_if_changed(stamp, stage_settings(base, "tile")) is True
    mtime = stamp.stat().st_mtime_ns
    assert write_if_changed(stamp, stage_settings(changed, "tile")) is False
    assert stamp.stat().st_mtime_ns == mtime


def test_set_values_may_hold_spaces():
    from pipeline.config import split_overrides

    overrides = split_overrides("tile.bands=[3, 2, 1] train.epochs=3")
    assert overrides == ["tile.bands=[3, 2, 1]", "train.epochs=3"]
    cfg = load_config(Path("configs/default.yaml"), overrides)
    assert cfg.tile.bands == [3, 2, 1] and cfg.train.epochs == 3
    with pytest.raises(InputError, match="expected dotted.key=value"):
        split_overrides("[1, 2] tile.bands=3")


def test_errors_blame_the_override_not_the_file(tmp_path):
    with pytest.raises(InputError, match=r"^--set tile.chip_sise: unknown setting"):
        load_config(Path("configs/default.yaml"), ["tile.chip_sise=128"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tile: {chip_sise: 128}\n")
    with pytest.raises(InputError, match=r"bad.yaml: tile.chip_sise: unknown setting"):
        load_config(bad, ["train.epochs=2"])


def test_inconsistent_settings_fail_up_front():
    with pytest.raises(InputError, match=r"--set tile.overlap: tile.overlap \(256\) must be "
                                         r"smaller than tile.chip_size \(256\)"):
        load_config(Path("configs/default.yaml"), ["tile.overlap=256"])


def test_a_key_given_twice_is_refused(tmp_path):
    bad = tmp_path / "twice.yaml"
    bad.write_text("train:\n  epochs: 3\n  epochs: 30\n")
    with pytest.raises(InputError, match=r"twice.yaml: line 3: epochs given twice"):
        load_config(bad)
