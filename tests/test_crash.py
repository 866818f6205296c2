"""kill -9 at several points of tile, masks, train, predict and vectors, then rerun: the outputs
equal an uninterrupted run's and nothing stray is left (no temporaries, no half files)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import ROOT

from pipeline.bundle import TRAIN_LOCK, check_bundle
from pipeline.files import TEMP_DIR
from pipeline.scenes import RESERVED_PREFIX


def _cli(root: Path, stage: str, config: Path, model_dir: Path) -> list[str]:
    data, out = root / "data", root / "data" / "processed"
    cmds = {
        "tile": ["tile", data / "raw/images", data / "interim/chips"],
        "masks": ["masks", data / "interim/chips", data / "raw/labels", data / "interim/masks"],
        "index": ["index", data / "interim/chips", data / "interim/masks"],
        "train": ["train", data / "interim/chips", data / "interim/masks", model_dir],
        "predict": ["predict", data / "incoming", "--model-dir", model_dir, "--out", out],
        "vectors": ["vectors", "--out", out],
    }
    return [sys.executable, "-m", "pipeline", *map(str, cmds[stage]), "--config", str(config),
            "-q"]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"


# Kill points by the stage's progress, not by the clock (a loaded machine shifts every clock):
# a condition on (root, model_dir, pid, start) that becomes true at that moment of the run, by
# what this process (started at ``start``, time.time_ns) has done, never by what an earlier
# attempt left: a kill while the interpreter starts is no kill mid-run.
Point = Callable[[Path, Path, int, int], bool]


def _writing(*parts: str) -> Point:
    """The process has a temporary of its own under one of these folders: mid-write."""
    def point(root: Path, model_dir: Path, pid: int, start: int) -> bool:
        for part in parts:
            folder = (model_dir if part == "MODEL" else root / "data" / part) / TEMP_DIR
            try:
                if any(e.name.split("-")[1:2] == [str(pid)] for e in os.scandir(folder)):
                    return True
            except (FileNotFoundError, NotADirectoryError):
                continue
        return False
    return point


def _done(pattern: str, n: int = 1) -> Point:
    """``n`` outputs matching ``pattern`` were completed by this run (written since it started;
    outputs are renamed into place, so their mtime is their writing): it is under way."""
    def point(root: Path, model_dir: Path, pid: int, start: int) -> bool:
        base = model_dir if pattern.startswith("MODEL/") else root / "data"
        done = 0
        for path in base.glob(pattern.removeprefix("MODEL/")):
            try:
                done += path.stat().st_mtime_ns >= start
            except FileNotFoundError:
                continue
        return done >= n
    return point


# Each stage is killed at two moments of its progress, then rerun to the end.
KILL_POINTS: dict[str, tuple[Point, ...]] = {
    "tile": (_writing("interim/chips"), _done("interim/chips/*/chips.gpkg")),
    "masks": (_writing("interim/masks"), _done("interim/masks/*/masks.json")),
    "index": (),
    # After the first epoch's checkpoint (the rerun resumes), then while the bundle is saved.
    "train": (_done("MODEL/checkpoint/state.json"), _writing("MODEL")),
    "predict": (_writing("processed", "processed/probability", "processed/masks"),
                _done("processed/masks/*.tif")),
    "vectors": (_writing("processed/cars"), _done("processed/cars/*.gpkg")),
}


def _kill_at(cmd: list[str], point: Point, root: Path, model_dir: Path) -> bool:
    """Run ``cmd`` and kill -9 it when ``point`` is reached; False when it finished first."""
    start = time.time_ns()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if point(root, model_dir, proc.pid, start):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _content(path: Path) -> str:
    """What a file holds, independent of timestamps inside it."""
    if path.suffix == ".tif":
        with rasterio.open(path) as src:
            return hashlib.sha256(src.read().tobytes() + str(src.transform).encode()).hexdigest()
    if path.suffix == ".gpkg":
        import geopandas as gpd

        gdf = gpd.read_file(path)
        return hashlib.sha256(gdf.drop(columns="geometry").to_csv().encode()
                              + b"".join(g.wkb for g in gdf.geometry)).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


# What the killed stages write (the shared clean run also has batch, evaluation and report).
COMPARED = ("interim/chips", "interim/masks", "processed/probability", "processed/masks",
            "processed/cars")


def _outputs(folder: Path) -> dict[str, str]:
    skip = ("logs", "settings")
    # A folder's lock and its stage manifests are bookkeeping, no output: they name the last
    # process that wrote there and the identities (inodes, mtimes) of the inputs it read.
    return {str(p.relative_to(folder)): _content(p) for part in COMPARED
            for p in sorted((folder / part).rglob("*"))
            if p.is_file() and not set(p.relative_to(folder).parts) & set(skip)
            and p.name != "summary.csv" and not p.name.startswith(RESERVED_PREFIX)}


def _strays(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*")
            if TEMP_DIR in p.parts or p.name.startswith("tmp") or ".tmp" in p.name
            or p.name.startswith(".predict-") or p.name.startswith(".bundle")]


@pytest.mark.slow
def test_kill_and_rerun_equals_uninterrupted(tiny_run, tmp_path):
    clean = tiny_run[0]  # the uninterrupted run (`make all`), with the same settings
    config = clean / "tiny.yaml"
    killed = tmp_path / "killed"
    for part in ("raw", "incoming"):
        shutil.copytree(clean / "data" / part, killed / "data" / part)

    hits = {}
    for stage, points in KILL_POINTS.items():
        # Predict with the clean run's model, so its outputs can be compared byte for byte;
        # training itself is checked for a whole, consistent bundle.
        model_dir = killed / "model" if stage == "train" else clean / "model"
        cmd = _cli(killed, stage, config, model_dir)
        hits[stage] = [_kill_at(cmd, point, killed, model_dir) for point in points]
        _run(cmd)

    # Every stage was really killed mid-run at least once (not only after it had finished).
    assert all(any(h) for s, h in hits.items() if s != "index"), hits
    assert _strays(killed) == []
    check_bundle(killed / "model")  # complete, and its weights match its metadata
    clean_out, killed_out = _outputs(clean / "data"), _outputs(killed / "data")
    assert clean_out.keys() == killed_out.keys()
    differ = [k for k in clean_out if clean_out[k] != killed_out[k]]
    assert differ == []
    # The stages really ran: chips, masks, predictions and cars are all there.
    for part in COMPARED:
        assert any(k.startswith(part) for k in killed_out), part
    with rasterio.open(next((killed / "data/processed/probability").glob("*.tif"))) as src:
        assert np.any(src.read(1) != 255)


def _holder(model_dir: Path) -> str:
    try:
        return (model_dir / TRAIN_LOCK).read_text()
    except FileNotFoundError:
        return ""


def _wait_for(condition: Callable[[], bool], what: str, procs=()) -> None:
    """Poll until ``condition()``; a process of ``procs`` that ends first fails the test (the
    per-test timeout bounds a hang; no assertion here is on the clock)."""
    while not condition():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"ended before {what}: {ended}"
        time.sleep(0.01)


@pytest.mark.slow
def test_two_trainings_into_one_model_dir_train_once(tiny_run, tmp_path):
    """A training killed -9 leaves no stale lock; of two trainings that overlap on a fresh
    MODEL_DIR, one trains and the other waits for it and finds the model up to date.

    The overlap is forced, not hoped for: the test holds the folder's train lock itself while
    it starts both, and lets go once both wait for it (each names the test as the holder)."""
    from pipeline.bundle import train_lock

    data, config = tiny_run[0] / "data", tiny_run[0] / "tiny.yaml"
    model_dir = tmp_path / "model"
    cmd = [sys.executable, "-m", "pipeline", "train", str(data / "interim/chips"),
           str(data / "interim/masks"), str(model_dir), "--settings",
           str(model_dir / "settings.json"), "--config", str(config)]

    dead = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: f"process {dead.pid} " in _holder(model_dir), "it took the lock", [dead])
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()

    logs = [tmp_path / f"train{i}.log" for i in range(2)]
    me = f"process {os.getpid()} "
    with train_lock(model_dir):
        procs = []
        for log in logs:
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                              stderr=fh))
        _wait_for(lambda: all("waiting for it to finish" in log.read_text() for log in logs),
                  "both waited for the test's lock", procs)
    for proc in procs:
        proc.wait()
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    for err in errs:
        line = next(ln for ln in err.splitlines() if "waiting" in ln)
        assert str(model_dir) in line and me in line, err  # the test, not the dead holder
        assert f"process {dead.pid} " not in err
    trainers = [e for e in errs if "train: no model in" in e]
    waiters = [e for e in errs if "is up to date" in e]
    assert len(trainers) == 1 and len(waiters) == 1, errs
    assert trainers != waiters
    check_bundle(model_dir)
    assert not (model_dir / "previous").exists()  # trained once: no bundle was replaced


def test_train_lock_waits_for_its_holder_and_is_never_stale(tmp_path, caplog):
    """The lock is taken only once its holder lets go (the test tells it when: no clock), and a
    holder killed -9 leaves a name in the file but no lock."""
    import threading

    from pipeline.bundle import train_lock

    hold = ("import sys\nfrom pipeline.bundle import train_lock\n"
            "with train_lock(sys.argv[1]):\n    sys.stdin.readline()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def holder() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], env=env,
                                stdin=subprocess.PIPE, text=True)
        _wait_for(lambda: f"process {proc.pid} " in _holder(tmp_path), "it took the lock", [proc])
        return proc

    # A holder killed -9 leaves the file with its name in it, but no lock: no wait.
    dead = holder()
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    caplog.set_level("WARNING")
    with train_lock(tmp_path):
        assert f"process {os.getpid()} " in _holder(tmp_path)
    assert "waiting" not in caplog.text

    # A live holder: the wait is announced with the folder and the process, and the lock is
    # taken only after the holder has been told to let go.
    alive = holder()
    told = threading.Event()
    taken_after_told: list[bool] = []

    def take() -> None:
        with train_lock(tmp_path):
            taken_after_told.append(told.is_set())

    taker = threading.Thread(target=take)
    taker.start()
    try:
        # Until the wait is announced, or (a lock that does not wait) the lock was taken.
        _wait_for(lambda: "waiting for it to finish" in caplog.text or taken_after_told,
                  "the wait was announced", [alive])
        # A lock that announced the wait but did not wait would be taken now: give it the
        # chance (this can only miss such a defect on a slow machine, never fail a good lock).
        taker.join(timeout=0.5)
        assert taken_after_told == [], "taken while its holder still held it"
        assert alive.poll() is None and taker.is_alive()  # still held: still waiting
    finally:
        told.set()
        alive.communicate("release\n")
        taker.join()
    assert taken_after_told == [True]
    assert f"{tmp_path} is being trained into by process {alive.pid} " in caplog.text
