"""The CLI contract: --help on every stage, one clear line and a non-zero exit on bad input."""

import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main

STAGES = ["sample", "tile", "masks", "index", "train", "predict", "vectors", "batch", "suggest",
          "evaluate", "report", "settings", "scenes", "paths"]


def test_every_stage_has_help(capsys):
    for stage in STAGES:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([stage, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "--config" in out and "--set" in out, stage


def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    code = main(["tile", str(tmp_path / "images"), str(tmp_path / "chips")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: {tmp_path / 'images'}: no GeoTIFF scenes (.tif/.tiff) to tile"]
    assert not (tmp_path / "chips").exists()


def test_bad_setting_is_one_line(tmp_path, capsys):
    code = main(["settings", "tile", str(tmp_path / "s.json"), "--set", "tile.chip_sise=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tile.chip_sise" in err[0]
    assert not (tmp_path / "s.json").exists()


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0
    for stage in STAGES:
        assert stage in proc.stdout


def test_labels_outside_every_scene_are_refused_before_training(tmp_path, capsys):
    import geopandas as gpd
    import numpy as np
    from conftest import UTM, write_scene
    from shapely.geometry import box

    write_scene(tmp_path / "images" / "s.tif", np.full((3, 64, 64), 90, np.uint8))
    labels = tmp_path / "labels" / "cars.gpkg"
    labels.parent.mkdir()
    # Right CRS, wrong place: 10 km away from the scene.
    gpd.GeoDataFrame(geometry=[box(510000, 4000000, 510004, 4000002)], crs=UTM).to_file(labels)
    set_chips = ["--set", "tile.chip_size=32", "--set", "tile.overlap=0", "--workers", "1"]
    assert main(["tile", str(tmp_path / "images"), str(tmp_path / "chips"), *set_chips]) == 0
    code = main(["masks", str(tmp_path / "chips"), str(tmp_path / "labels"),
                 str(tmp_path / "masks"), "--images", str(tmp_path / "images"), *set_chips])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: {tmp_path / 'labels'}: no chip holds a car")
