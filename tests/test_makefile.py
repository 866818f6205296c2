"""The make interface from INTERFACE.md: every target listed by `make help`, dry runs wire paths."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["install", "sample", "tiles", "masks", "train", "predict", "vectors", "batch", "suggest",
           "evaluate", "report", "all", "base", "demo", "bench", "test", "clean", "help"]


def run_make(*args: str) -> str:
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def test_help_lists_every_target_with_one_line():
    out = run_make("help")
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    missing = [t for t in TARGETS if t not in listed]
    assert not missing, f"make help misses {missing}"
    for var in ("DATA", "CONFIG", "SET", "RUN", "MODEL_DIR", "IMAGES", "TRUTH", "OUT",
                "DASK_SCHEDULER", "WORKERS", "ZONES"):
        assert var in out


def test_variables_reach_the_commands(tmp_path):
    images = tmp_path / "my batch"  # a space in a folder name must survive the quoting
    images.mkdir()
    out = run_make("-n", "predict", f"IMAGES={images}", f"OUT={tmp_path}/out",
                   f"MODEL_DIR={tmp_path}/m", "SET=predict.tta=true tile.bands=[1, 2, 3]",
                   "DASK_SCHEDULER=tcp://s:8786", "WORKERS=3")
    predict = [line for line in out.splitlines() if " -m pipeline run predict " in line]
    assert len(predict) == 1
    cmd = predict[0]
    for part in (f"--images '{images}'", f"--model-dir '{tmp_path}/m'",
                 f"--out '{tmp_path}/out'",
                 "--sets 'predict.tta=true tile.bands=[1, 2, 3]'",
                 "--scheduler 'tcp://s:8786'", "--workers 3"):
        assert part in cmd, part
    # predict never trains: its one command runs the predict target alone.
    assert cmd.split(" -m pipeline run ")[1].startswith("predict --data ")
    assert len([ln for ln in out.splitlines() if " -m pipeline " in ln]) == 1


def test_several_targets_run_as_one_chain(tmp_path):
    """`make predict vectors batch`: one command runs the three (so a failed scene in predict
    does not stop vectors and batch for the others); the other recipes do nothing."""
    out = run_make("-n", "predict", "vectors", "batch", f"OUT={tmp_path}/out")
    runs = [ln for ln in out.splitlines() if " -m pipeline " in ln]
    assert len(runs) == 1 and " -m pipeline run predict vectors batch --data " in runs[0]
