"""The report: renders in headless Chromium with all its images; degrades when pieces are missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from conftest import GSD, ORIGIN, TRANSFORM, UTM, write_scene
from shapely.geometry import box

from pipeline.config import EvaluateConfig, ReportConfig, VectorConfig
from pipeline.stages.evaluate import evaluate
from pipeline.stages.report import build_report, scene_path
from pipeline.stages.vectorize import vectorize_scene, write_summary

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def car_px(row, col, h=30, w=13):
    x0, y0 = ORIGIN[0] + col * GSD, ORIGIN[1] - row * GSD
    return box(x0, y0 - h * GSD, x0 + w * GSD, y0)


@pytest.fixture
def run_dirs(tmp_path, rng):
    """A model dir, a predicted and evaluated output root and a data root with the scene."""
    model_dir, out, data = tmp_path / "models" / "r1", tmp_path / "out", tmp_path / "data"
    model_dir.mkdir(parents=True)
    epochs = np.arange(5)
    lines = ["epoch,iou,loss,val_iou,val_loss"] + [
        f"{e},{0.3 + 0.1 * e},{1 / (e + 1)},{0.25 + 0.1 * e},{1.2 / (e + 1)}" for e in epochs]
    (model_dir / "history.csv").write_text("\n".join(lines) + "\n")
    (model_dir / "metadata.json").write_text(json.dumps(
        {"threshold": 0.5, "gsd": 0.15, "bands": [1, 2, 3], "chip_size": 64,
         "val_metrics": {"iou": 0.61, "loss": 0.2}}))
    shape = (160, 160)
    cars = [car_px(10, 10), car_px(60, 60), car_px(100, 20), car_px(20, 120)]
    truth = [cars[0], cars[1], car_px(120, 120)]  # two found, one missed; cars[2:] are FPs
    mask = rasterio.features.rasterize([(c, 1) for c in cars], out_shape=shape,
                                       transform=TRANSFORM, dtype="uint8")
    prob = np.where(mask == 1, 220, 15).astype(np.uint8)
    rgb = rng.integers(60, 120, size=(3, *shape), dtype=np.uint8)
    rgb[:, mask == 1] = 200
    write_scene(data / "incoming" / "s1.tif", rgb)
    write_scene(data / "raw" / "images" / "t1.tif", rgb)
    (data / "raw" / "labels").mkdir(parents=True)
    gpd.GeoDataFrame(geometry=cars, crs=UTM).to_crs(4326).to_file(
        data / "raw" / "labels" / "cars.gpkg")
    write_scene(out / "masks" / "s1.tif", mask[None], nodata=255)
    write_scene(out / "probability" / "s1.tif", prob[None], nodata=255)
    vectorize_scene(out / "masks" / "s1.tif", out, cfg=VectorConfig())
    (out / "logs").mkdir()
    for stage in ("predict", "vectors"):
        (out / "logs" / f"s1.{stage}.json").write_text('{"seconds": 1.0, "status": "ok"}')
    write_summary(out)
    gpd.GeoDataFrame(geometry=truth, crs=UTM).to_crs(3857).to_file(tmp_path / "truth.gpkg")
    evaluate(out, tmp_path / "truth.gpkg", cfg=EvaluateConfig())
    return model_dir, out, data


def _img_sources(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def test_report_has_every_piece(tmp_path, run_dirs):
    model_dir, out, data = run_dirs
    dst = tmp_path / "reports" / "r1"
    dst.mkdir(parents=True)
    (dst / "settings.json").write_text("{}")  # Make's file in the report folder must survive
    index = build_report(dst, model_dir=model_dir, out_dir=out, data_dir=data,
                         cfg=ReportConfig(crops=3, crop_size=64))
    assert index == dst / "index.html"
    text = index.read_text()
    sources = _img_sources(index)
    assert {"fig_training.png", "fig_thresholds.png", "fig_cars_per_scene.png",
            "fig_crops_s1.png"} <= set(sources)
    for src in sources:
        assert (dst / src).stat().st_size > 1000
    assert "could not draw" not in text
    # pipeline.stages.sample is the project's own: the training-scene figure is always drawn.
    assert "fig_training_scene.png" in sources
    assert "is not available" not in text
    assert "no evaluation" not in text.lower()
    assert "<td>s1</td>" in text  # per-scene table
    assert (dst / "settings.json").exists()
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_without_truth_or_model(tmp_path):
    out = tmp_path / "out"
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 10:23] = 1
    write_scene(out / "masks" / "s1.tif", mask[None], nodata=255)
    vectorize_scene(out / "masks" / "s1.tif", out, cfg=VectorConfig())
    write_summary(out)
    dst = tmp_path / "report"
    index = build_report(dst, model_dir=tmp_path / "nomodel", out_dir=out, data_dir=None,
                         cfg=ReportConfig())
    text = index.read_text()
    assert "no evaluation: no ground truth" in text
    assert "no training history" in text
    assert "no model metadata" in text
    assert "RGB scene not found" in text
    assert _img_sources(index) == ["fig_cars_per_scene.png"]


CHECK_JS = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'imgcheck';
  out.textContent = JSON.stringify([...document.images].map(
      i => [i.getAttribute('src'), i.complete ? i.naturalWidth : -1]));
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_chromium(tmp_path, run_dirs):
    if CHROMIUM is None:  # a skip outside CI; .ci/run installs chromium, and CI=1 fails a skip
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    model_dir, out, data = run_dirs
    dst = tmp_path / "reports" / "r1"
    index = build_report(dst, model_dir=model_dir, out_dir=out, data_dir=data,
                         cfg=ReportConfig(crops=2, crop_size=64))
    # A copy with a load-time probe: the report itself stays free of test code.
    check = dst / "check.html"
    check.write_text(index.read_text().replace("</body>", CHECK_JS + "</body>"))
    profile = tmp_path / "chromium-profile"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,2000"]
    dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom",
                          check.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) >= 4
    assert all(width > 0 for _, width in images), images

    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", index.as_uri()], capture_output=True,
                   timeout=60, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_scene_path_lookup(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    elsewhere = write_scene(tmp_path / "batch" / "s1.tif", np.ones((3, 16, 16), np.uint8))
    assert scene_path("s1", out, data) is None
    incoming = write_scene(data / "incoming" / "s1.tif", np.ones((3, 16, 16), np.uint8))
    assert scene_path("s1", out, data) == incoming
    prob = write_scene(out / "probability" / "s1.tif", np.zeros((1, 16, 16), np.uint8))
    with rasterio.open(prob, "r+") as dst:
        dst.update_tags(SOURCE=str(elsewhere))
    assert scene_path("s1", out, data) == elsewhere


@pytest.mark.parametrize("with_zones", [False, True])
def test_report_batch_section(tmp_path, with_zones):
    from test_batch import (
        FLIGHT,
        HEIGHT,
        STEP,
        WIDTH,
        burn,
        flight_cars,
        write_identity_scene,
        write_model,
    )

    from pipeline.config import Config
    from pipeline.stages.batch import build_batch

    truth = burn(flight_cars(np.random.default_rng(5)), (HEIGHT, WIDTH), FLIGHT)
    write_identity_scene(tmp_path, "north", truth, 0)
    write_identity_scene(tmp_path, "south", truth, STEP)
    write_model(tmp_path / "model")
    zones = None
    if with_zones:
        zones = tmp_path / "zones.gpkg"
        x0, y0 = FLIGHT.c, FLIGHT.f
        gpd.GeoDataFrame({"name": ["lot 1", "lot 2"]},
                         geometry=[box(x0, y0 - 40, x0 + 80, y0),
                                   box(x0 + 80, y0 - 40, x0 + 190, y0)],
                         crs=UTM).to_file(zones, layer="zones")
    out = tmp_path / "out"
    build_batch(tmp_path / "images", out, model_dir=tmp_path / "model", cfg=Config(), zones=zones)
    index = build_report(tmp_path / "report", model_dir=tmp_path / "model", out_dir=out,
                         data_dir=None, cfg=ReportConfig(crops=0))
    page = index.read_text()
    assert "<h2>Batch</h2>" in page
    assert "fig_batch_map.png" in _img_sources(index)
    assert (tmp_path / "report" / "fig_batch_map.png").stat().st_size > 5000
    assert "<td>north</td><td>south</td>" in page  # the seam row
    assert ("lot 2" in page) == with_zones
    assert "could not draw" not in page
