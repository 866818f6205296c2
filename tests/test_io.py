"""Atomic writes: a failure leaves the old file or nothing, never half a file."""

import pytest

from pipeline.io import InputError, atomic_dir, atomic_path, list_scenes, open_scene


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
        assert tmp.suffix == ".tif" and tmp.parent == target.parent
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
    (tmp_path / ".hidden.tif").write_text("")
    assert list_scenes(tmp_path) == [bad]
