"""Atomic writes: a failure leaves the old file or nothing, never half a file."""

import os
import subprocess
import sys

import numpy as np
import pytest
from affine import Affine
from conftest import write_scene

from pipeline.errors import InputError, OutputConflict
from pipeline.files import TEMP_DIR, atomic_dir, atomic_path
from pipeline.io import read_vector
from pipeline.layout import check_outputs_apart
from pipeline.scenes import list_scenes, open_scene, scene_name


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.tif"
    with atomic_path(target) as tmp:
        # Same suffix (so drivers follow it), in a hidden folder no listing sees.
        assert tmp.suffix == target.suffix and tmp.parent.parent.name == TEMP_DIR
        assert list_scenes(target.parent) == []
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.tif"]


def test_atomic_dir_swaps_whole_folder(tmp_path):
    target = tmp_path / "scene"
    target.mkdir()
    (target / "stale.tif").write_text("x")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a.tif").write_text("a")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["stale.tif"]
    with atomic_dir(target) as tmp:
        (tmp / "a.tif").write_text("a")
    assert sorted(p.name for p in target.iterdir()) == ["a.tif"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


def test_open_scene_errors_name_the_file(tmp_path):
    bad = tmp_path / "notatiff.tif"
    bad.write_text("hello")
    with pytest.raises(InputError, match="notatiff.tif: not a readable GeoTIFF"):
        open_scene(bad)
    with pytest.raises(InputError, match="missing.tif: file not found"):
        open_scene(tmp_path / "missing.tif")
    # A name starting with a dot is a scene like any other (it used to be skipped silently).
    (tmp_path / ".hidden.tif").write_text("")
    assert list_scenes(tmp_path) == [tmp_path / ".hidden.tif", bad]


def test_scene_names_any_file_name_a_gis_folder_holds(tmp_path):
    names = ["city.2026.tile7.tif", "my scene.TIF", "-dash.tiff", "straße ü.Tif", "x.tif.aux.xml",
             "notes.txt"]
    for n in names:
        (tmp_path / n).write_text("")
    scenes = list_scenes(tmp_path)
    assert [scene_name(p) for p in scenes] == ["-dash", "city.2026.tile7", "my scene",
                                               "straße ü"]


def test_two_scenes_with_one_name_are_refused_naming_both(tmp_path):
    (tmp_path / "a.tif").write_text("")
    (tmp_path / "a.tiff").write_text("")
    with pytest.raises(InputError, match=r"a\.tif and a\.tiff: two scenes with the same name"):
        list_scenes(tmp_path)


def test_temporaries_of_a_killed_writer_are_swept_by_the_next(tmp_path):
    # A real process dies (SIGKILL) inside atomic_path: its temporary stays hidden, and the
    # next write into the folder removes it.
    code = ("import os, signal, sys; from pipeline.files import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'out.tif')!r}) as t:\n"
            "    t.write_text('half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ}, check=False)
    assert proc.returncode == -9
    assert list((tmp_path / TEMP_DIR).rglob("*.tif"))  # left behind, but hidden
    assert list_scenes(tmp_path) == []
    with atomic_path(tmp_path / "other.tif") as tmp:
        tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tif"]


def test_file_names_gdal_would_parse_are_written_as_given(tmp_path):
    import geopandas as gpd
    import shapely

    from pipeline.io import write_vector

    cars = gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs=32633)
    path = write_vector(cars, tmp_path / "site;2.gpkg", layer="cars")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site;2.gpkg"]
    assert len(read_vector(path)) == 1


def test_outputs_apart_from_each_other(tmp_path):
    with pytest.raises(OutputConflict, match="MODEL_DIR and REPORTS/RUN"):
        check_outputs_apart({"MODEL_DIR": tmp_path / "m", "REPORTS/RUN": tmp_path / "m"}, {})
    with pytest.raises(OutputConflict, match="OUT/evaluation and MODEL_DIR"):
        check_outputs_apart({"OUT/evaluation": tmp_path / "o" / "evaluation",
                             "MODEL_DIR": tmp_path / "o" / "evaluation" / "m"}, {})
    # An output beside an input file (a truth or zones file) is fine.
    check_outputs_apart({"OUT/masks": tmp_path / "p" / "out" / "masks"},
                        {"TRUTH": tmp_path / "p" / "truth.gpkg"})


def test_outputs_over_inputs_are_refused(tmp_path):
    images = tmp_path / "X" / "masks"
    with pytest.raises(OutputConflict, match="OUT/masks would write into or over IMAGES"):
        check_outputs_apart({"OUT/masks": tmp_path / "X" / "masks"}, {"IMAGES": images})
    with pytest.raises(OutputConflict, match="MODEL_DIR"):
        check_outputs_apart({"MODEL_DIR": images / "m"}, {"IMAGES": images})
    with pytest.raises(OutputConflict):
        check_outputs_apart({"OUT/cars": tmp_path / "X"}, {"IMAGES": images})
    # Siblings are fine.
    check_outputs_apart({"OUT/masks": tmp_path / "X" / "out" / "masks"}, {"IMAGES": images})


def test_rotated_grid_is_georeferenced(tmp_path):
    # 90 degrees: a = e = 0, which used to be refused as "has no geotransform".
    rotated = Affine(0, 0.15, 500000, 0.15, 0, 4000000)
    path = write_scene(tmp_path / "r.tif", np.ones((3, 32, 32), np.uint8), transform=rotated)
    with open_scene(path) as src:
        assert src.transform == rotated


def test_truncated_tiff_says_so(tmp_path):
    path = write_scene(tmp_path / "t.tif", np.random.default_rng(0).integers(
        1, 255, (3, 256, 256), dtype=np.uint8), tiled=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    from pipeline.config import TileConfig
    from pipeline.stages.tile import tile_scene
    with pytest.raises(InputError, match="t.tif: .*truncated or corrupt"):
        tile_scene(path, tmp_path / "chips", cfg=TileConfig(chip_size=64, overlap=0))


def test_geojson_in_metres_without_crs_is_refused(tmp_path):
    path = tmp_path / "labels.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                    '"properties": {}, "geometry": {"type": "Polygon", "coordinates": '
                    '[[[500000, 4000000], [500004, 4000000], [500004, 4000002], '
                    '[500000, 4000000]]]}}]}')
    with pytest.raises(InputError, match="labels.geojson: coordinates .* not degrees"):
        read_vector(path)
