"""The model bundle (``model.keras`` + ``metadata.json``) that train writes and predict reads:
written as one unit, validated on every load, never new weights beside old metadata."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import InputError, InputNotFound, first_line
from pipeline.files import (
    LOCK_FILE,
    file_sha256,
    folder_lock,
    read_json,
    temp_dir,
)
from pipeline.model import normalize, receptive_field

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
# A few validation chips (raw pixels, as tiled): what ``predict.engine: auto`` checks a fast
# engine's faithfulness on (pipeline.engine_choice). Data, not weights: not in the sha256 pair.
VALIDATION_FILE = "validation.npz"
BUNDLE_VERSION = 1
BUNDLE_FILES = (MODEL_FILE, METADATA_FILE, VALIDATION_FILE)  # what save_bundle writes
# A complete new bundle waiting to be moved into place; its existence is the commit point.
COMMIT_DIR = ".bundle-commit"
PREVIOUS_DIR = "previous"  # the bundle a retraining replaced, kept so nothing is lost
TRAIN_LOCK = LOCK_FILE  # held (flock) by the process training into MODEL_DIR


@dataclass
class Bundle:
    """A trained model and everything predict needs to use it correctly."""

    model: Any
    metadata: dict
    path: Path

    @property
    def bands(self) -> list[int]:
        return list(self.metadata["bands"])

    @property
    def gsd(self) -> float | None:
        return self.metadata.get("gsd")

    @property
    def chip_size(self) -> int:
        return int(self.metadata["chip_size"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def multiple(self) -> int:
        """Window sizes must be a multiple of this (2 ** U-Net depth)."""
        return int(self.metadata.get("size_multiple", 1))

    @functools.cached_property
    def receptive_field(self) -> int | None:
        """Side in pixels of one output pixel's context (see ``receptive_field``)."""
        if "receptive_field" in self.metadata:  # measured before the model went to an engine
            return self.metadata["receptive_field"]
        return receptive_field(self.model)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Normalise a (rows, cols, bands) image the way training did."""
        return normalize(image, self.metadata["normalization"])


REQUIRED_METADATA = ("bands", "normalization", "chip_size", "threshold", "dtype")


class _Normalization(BaseModel):
    model_config = ConfigDict(extra="allow")

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float]) -> list[float]:
        # A constant band in the training chips gives std 0, and every pixel divided by it is
        # inf or NaN: said here, not later as a scene with "no valid pixel".
        for band, value in enumerate(std, start=1):
            if not value > 0:
                raise ValueError(f"band {band} has std {value:g} (std 0: the band is constant "
                                 "in the training chips); retrain with other bands or chips")
        return std


class BundleMetadata(BaseModel):
    """What ``metadata.json`` must hold for predict to use the model correctly; checked on
    every load, so a hand-edited or damaged bundle is one line, not wrong probabilities."""

    model_config = ConfigDict(extra="allow")

    bands: list[Any] = Field(min_length=1)
    dtype: str
    chip_size: int = Field(gt=0)
    threshold: float = Field(gt=0, lt=1)
    normalization: _Normalization
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_value_per_band(self) -> BundleMetadata:
        n = len(self.bands)
        if len(self.normalization.mean) != n or len(self.normalization.std) != n:
            raise ValueError(f"normalization has {len(self.normalization.mean)} means and "
                             f"{len(self.normalization.std)} stds for {n} bands")
        return self


def check_metadata(metadata: Any, path: Path) -> None:
    """Raise InputError naming ``path`` and the first bad field of a bundle's metadata."""
    try:
        BundleMetadata.model_validate(metadata)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "metadata"
        text = err["msg"].removeprefix("Value error, ")
        raise InputError(f"{path}: {field}: {text}") from None


def save_bundle(model, metadata: dict, model_dir: Path | str,
                validation: np.ndarray | None = None) -> Path:
    """Replace the bundle (``model.keras`` + ``metadata.json``) as one unit; returns the model.

    ``validation``: (chips, rows, cols, bands) raw validation chips kept beside the model in
    :data:`VALIDATION_FILE` (none: an empty set, so a retraining never leaves the previous
    model's chips behind).

    Both files are written into a staging folder, which is then renamed to ``.bundle-commit``
    (the commit point) and its files moved into place, the replaced ones into ``previous/``.
    A crash before the commit leaves the old bundle; after it, the next reader finishes the
    move (:func:`recover_bundle`). Never new weights beside old normalisation or threshold.
    """
    model_dir = Path(model_dir)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"bundle metadata lacks {missing}")
    model_dir.mkdir(parents=True, exist_ok=True)
    recover_bundle(model_dir)
    with temp_dir(model_dir) as scratch:
        staged = scratch / "bundle"
        staged.mkdir()
        model.save(staged / MODEL_FILE)
        np.savez_compressed(staged / VALIDATION_FILE, images=np.zeros((0, 0, 0, 0), np.uint8)
                            if validation is None else np.asarray(validation))
        # The metadata names its weights, so a mismatched pair is caught on load.
        metadata = {"bundle_version": BUNDLE_VERSION, **metadata,
                    "model_sha256": file_sha256(staged / MODEL_FILE)}
        (staged / METADATA_FILE).write_text(
            json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(staged, model_dir / COMMIT_DIR)
    recover_bundle(model_dir)
    return model_dir / MODEL_FILE


@contextlib.contextmanager
def train_lock(model_dir: Path | str) -> Iterator[Path]:
    """Hold ``MODEL_DIR/.carseg.lock``: one training per model folder at a time.

    A second ``make train``/``make all`` on the same folder waits for the first, saying so
    with the folder and the other process, and then finds the model up to date (it retrains
    only if its own settings differ); never stale after ``kill -9`` (:func:`folder_lock`).
    """
    with folder_lock(model_dir, "train", doing="trained into") as path:
        yield path


def recover_bundle(model_dir: Path | str) -> None:
    """Finish a bundle replacement that a crash interrupted after its commit point."""
    model_dir = Path(model_dir)
    commit = model_dir / COMMIT_DIR
    if not commit.is_dir():
        return
    previous = model_dir / PREVIOUS_DIR
    # Metadata first, model last: the model's mtime marks a complete bundle for Make.
    for name in (VALIDATION_FILE, METADATA_FILE, MODEL_FILE):
        new = commit / name
        if not new.exists():
            continue  # already moved before the crash
        if (model_dir / name).exists():
            previous.mkdir(exist_ok=True)
            os.replace(model_dir / name, previous / name)
        os.replace(new, model_dir / name)
    commit.rmdir()


def load_validation(model_dir: Path | str) -> np.ndarray | None:
    """The bundle's validation chips, (chips, rows, cols, bands); None where it has none (a
    bundle from before they were kept, or a training without validation chips) or the file
    cannot be read."""
    path = Path(model_dir) / VALIDATION_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        if path.exists():
            log.warning("%s: unreadable (%s); the bundle's validation chips are not used",
                        path, first_line(exc))
        return None
    return images if images.ndim == 4 and len(images) else None


def read_metadata(model_dir: Path | str) -> dict:
    """Read and check a bundle's metadata without loading Keras."""
    recover_bundle(model_dir)
    path = Path(model_dir) / METADATA_FILE
    metadata = read_json(path, missing="model metadata not found; run `make train` first "
                                       "(or `make demo`, then use RUN=demo)")
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: model metadata is not a JSON object")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise InputError(f"{path}: model metadata lacks {', '.join(missing)}")
    check_metadata(metadata, path)
    return metadata


def check_bundle(model_dir: Path | str) -> dict:
    """Check, without Keras, that a complete and consistent bundle is there; return metadata.

    Raises:
        InputError: no model, a truncated model file, or weights from another training run
            than the metadata.
    """
    model_dir = Path(model_dir)
    model_path = model_dir / MODEL_FILE
    recover_bundle(model_dir)
    if not model_path.exists():
        raise InputNotFound(f"{model_path}: no model; run `make train` first (or `make demo`, "
                            "then use RUN=demo)")
    metadata = read_metadata(model_dir)
    if not zipfile.is_zipfile(model_path):
        raise InputError(f"{model_path}: not a complete Keras model file (truncated or corrupt)")
    if file_sha256(model_path) != metadata["model_sha256"]:
        raise InputError(f"{model_path}: does not match {METADATA_FILE}'s model_sha256 (its "
                         "sha256 differs); the bundle's two files come from different trainings")
    return metadata


def load_bundle(model_dir: Path | str) -> Bundle:
    """Load ``model.keras`` (safe mode) and its metadata.

    Raises:
        InputError: the bundle is missing, incomplete or unreadable.
    """
    import keras

    model_dir = Path(model_dir)
    metadata = check_bundle(model_dir)
    model_path = model_dir / MODEL_FILE
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise InputError(f"{model_path}: cannot load the model ({exc.__class__.__name__}: "
                         f"{first_line(exc)})") from None
    return Bundle(model=model, metadata=metadata, path=model_dir)
