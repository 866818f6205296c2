"""The U-Net and the model bundle (``model.keras`` + ``metadata.json``) that train writes and
predict reads. Only ``keras.*`` APIs, so the same code runs on TensorFlow, JAX and PyTorch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import InputError, InputNotFound, first_line, read_json, temp_dir

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
BUNDLE_VERSION = 1
BUNDLE_FILES = (MODEL_FILE, METADATA_FILE)
# A complete new bundle waiting to be moved into place; its existence is the commit point.
COMMIT_DIR = ".bundle-commit"
PREVIOUS_DIR = "previous"  # the bundle a retraining replaced, kept so nothing is lost


def build_unet(
    bands: int = 3,
    *,
    depth: int = 4,
    base_filters: int = 32,
    batch_norm: bool = True,
    dropout: float = 0.1,
    name: str = "car_unet",
):
    """Build a U-Net that maps (H, W, bands) float images to (H, W, 1) car probability.

    H and W are left open so the same model predicts windows of any size divisible by
    ``2**depth``. The head is a 1x1 sigmoid convolution computed in float32, so mixed precision
    never rounds probabilities or the loss.
    """
    import keras
    from keras import layers

    def conv_block(x, filters: int, prefix: str):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                              kernel_initializer="he_normal", name=f"{prefix}_conv{i}")(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"{prefix}_bn{i}")(x)
            x = layers.Activation("relu", name=f"{prefix}_relu{i}")(x)
        return x

    inputs = keras.Input(shape=(None, None, bands), name="image")
    x = inputs
    skips = []
    # === Encoder ===
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    # === Bottleneck ===
    x = conv_block(x, base_filters * 2**depth, "bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    # === Decoder ===
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, padding="same",
                                   name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = conv_block(x, base_filters * 2**level, f"dec{level}")
    # === Head ===
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="car_prob")(x)
    return keras.Model(inputs, outputs, name=name)


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """Scale a (rows, cols, bands) image to float32 with the bundle's per-band mean and std."""
    mean = np.asarray(normalization["mean"], dtype=np.float32)
    std = np.asarray(normalization["std"], dtype=np.float32)
    return (image.astype(np.float32) - mean) / std


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

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Normalise a (rows, cols, bands) image the way training did."""
        return normalize(image, self.metadata["normalization"])


REQUIRED_METADATA = ("bands", "normalization", "chip_size", "threshold", "dtype")


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_bundle(model, metadata: dict, model_dir: Path | str) -> Path:
    """Replace the bundle (``model.keras`` + ``metadata.json``) as one unit; returns the model.

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
        # The metadata names its weights, so a mismatched pair is caught on load.
        metadata = {"bundle_version": BUNDLE_VERSION, **metadata,
                    "model_sha256": file_sha256(staged / MODEL_FILE)}
        (staged / METADATA_FILE).write_text(
            json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(staged, model_dir / COMMIT_DIR)
    recover_bundle(model_dir)
    return model_dir / MODEL_FILE


def recover_bundle(model_dir: Path | str) -> None:
    """Finish a bundle replacement that a crash interrupted after its commit point."""
    model_dir = Path(model_dir)
    commit = model_dir / COMMIT_DIR
    if not commit.is_dir():
        return
    previous = model_dir / PREVIOUS_DIR
    # Metadata first, model last: the model's mtime marks a complete bundle for Make.
    for name in (METADATA_FILE, MODEL_FILE):
        new = commit / name
        if not new.exists():
            continue  # already moved before the crash
        if (model_dir / name).exists():
            previous.mkdir(exist_ok=True)
            os.replace(model_dir / name, previous / name)
        os.replace(new, model_dir / name)
    commit.rmdir()


def read_metadata(model_dir: Path | str) -> dict:
    """Read and check a bundle's metadata without loading Keras."""
    recover_bundle(model_dir)
    path = Path(model_dir) / METADATA_FILE
    metadata = read_json(path, missing="model metadata not found; run `make train` first "
                                       "(or `make demo`, then use RUN=demo)")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise InputError(f"{path}: model metadata lacks {', '.join(missing)}")
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
    expected = metadata.get("model_sha256")
    if expected and file_sha256(model_path) != expected:
        raise InputError(f"{model_path}: does not match {METADATA_FILE} (its sha256 differs); "
                         "the bundle's two files come from different trainings")
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
