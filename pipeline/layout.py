"""Every path under DATA, OUT, MODEL_DIR and the report folder, by name.

The Makefile names the roots (``DATA``, ``IMAGES``, ``OUT``, ``MODEL_DIR``, ...); everything
below them is spelled out here once, so the CLI, the stage runner and the stages agree on where
each file lives. A stage run by hand gets only the roots its command names; the others are None.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import OutputConflict
from pipeline.io import VECTOR_SUFFIX

# Folders under OUT that the stages write (each with its stage in runner.STAGES).
PROBABILITY, OUT_MASKS, CARS, LOGS, SETTINGS, BATCH, EVALUATION, SUGGEST = (
    "probability", "masks", "cars", "logs", "settings", "batch", "evaluation", "suggest")
OUT_FOLDERS = (PROBABILITY, OUT_MASKS, CARS, BATCH, EVALUATION, SUGGEST, SETTINGS, LOGS)


@dataclass(frozen=True)
class Layout:
    """The roots of one run; the paths below them are properties and methods."""

    data: Path | None = None
    raw_images: Path | None = None  # labelled training scenes (DATA/raw/images)
    labels: Path | None = None  # their car footprints (DATA/raw/labels)
    chips: Path | None = None  # DATA/interim/chips
    masks: Path | None = None  # DATA/interim/masks
    model_dir: Path | None = None
    images: Path | None = None  # the batch (IMAGES)
    out: Path | None = None
    truth: Path | None = None
    zones: Path | None = None
    report: Path | None = None
    # Where each stage writes the settings it ran with (a user reads them; `--settings`).
    settings_files: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def for_make(cls, *, data: Path, images: Path | None = None, out: Path | None = None,
                 model_dir: Path | None = None, truth: Path | None = None,
                 zones: Path | None = None, report: Path | None = None) -> Layout:
        """The layout of INTERFACE.md from the make variables."""
        interim = data / "interim"
        settings = {"sample": interim / "settings" / "sample.json",
                    "tile": interim / "settings" / "tile.json",
                    "masks": interim / "settings" / "masks.json",
                    "index": interim / "settings" / "masks.json"}
        if model_dir is not None:
            settings["train"] = model_dir / "settings.json"
        if out is not None:
            settings.update({s: out / SETTINGS / f"{s}.json" for s in
                             ("predict", "vectors", "batch", "evaluate", "suggest")})
        if report is not None:
            settings["report"] = report / "settings.json"
        return cls(data=data, raw_images=data / "raw" / "images", labels=data / "raw" / "labels",
                   chips=interim / "chips", masks=interim / "masks", model_dir=model_dir,
                   images=images, out=out, truth=truth, zones=zones, report=report,
                   settings_files=tuple(settings.items()))

    def settings_file(self, stage: str) -> Path | None:
        return dict(self.settings_files).get(stage)

    def with_settings(self, stage: str, path: Path | None) -> Layout:
        return replace(self, settings_files=((stage, path),) if path else ())

    # === OUT ===
    def out_folder(self, name: str) -> Path:
        return self.out / name

    def probability(self, scene: str) -> Path:
        return self.out / PROBABILITY / f"{scene}.tif"

    def mask(self, scene: str) -> Path:
        return self.out / OUT_MASKS / f"{scene}.tif"

    def cars(self, scene: str, fmt: str) -> Path:
        return self.out / CARS / f"{scene}{VECTOR_SUFFIX[fmt]}"

    def log(self, scene: str, stage: str) -> Path:
        return self.out / LOGS / f"{scene}.{stage}.json"

    def find_cars(self, scene: str) -> Path | None:
        """The scene's car layer in OUT/cars, whatever its format; None when there is none."""
        for suffix in VECTOR_SUFFIX.values():
            path = self.out / CARS / f"{scene}{suffix}"
            if path.exists():
                return path
        return None

    @property
    def logs(self) -> Path:
        return self.out / LOGS

    @property
    def out_masks(self) -> Path:
        return self.out / OUT_MASKS

    @property
    def summary(self) -> Path:
        return self.out / CARS / "summary.csv"

    @property
    def metrics(self) -> Path:
        return self.out / EVALUATION / "metrics.json"

    @property
    def suggestions(self) -> Path:
        return self.out / SUGGEST / "label_next.gpkg"


def check_outputs_apart(outputs: dict[str, Path | str | None],
                        inputs: dict[str, Path | str | None]) -> None:
    """Refuse outputs that would write into or over an input, or into each other.

    Args:
        outputs: name (e.g. ``"OUT/masks"``) -> a folder the run writes into (and may replace).
        inputs: name (e.g. ``"IMAGES"``) -> a folder or file the run reads and must never write.

    Raises:
        OutputConflict: naming both places, before any work starts.
    """
    def nested(a: Path, b: Path) -> bool:
        return a == b or a in b.parents or b in a.parents

    outs = {name: Path(p).expanduser().resolve() for name, p in outputs.items() if p is not None}
    for out_name, o in outs.items():
        for in_name, src in inputs.items():
            if src is not None and nested(o, Path(src).expanduser().resolve()):
                raise OutputConflict(
                    f"{outputs[out_name]}: {out_name} would write into or over {in_name} "
                    f"({src}); choose an output folder apart from the inputs")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # e.g. MODEL_DIR inside OUT/evaluation, which evaluate replaces as a whole.
            if nested(outs[a], outs[b]):
                raise OutputConflict(
                    f"{outputs[a]}: {a} and {b} ({outputs[b]}) are the same folder or one holds "
                    "the other; give each its own folder")
