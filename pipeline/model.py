"""The U-Net and the model bundle (``model.keras`` + ``metadata.json``) that train writes and
predict reads. Only ``keras.*`` APIs, so the same code runs on TensorFlow, JAX and PyTorch."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import warnings
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
    read_json_if_any,
    temp_dir,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
BUNDLE_VERSION = 1
BUNDLE_FILES = (MODEL_FILE, METADATA_FILE)
# A complete new bundle waiting to be moved into place; its existence is the commit point.
COMMIT_DIR = ".bundle-commit"
PREVIOUS_DIR = "previous"  # the bundle a retraining replaced, kept so nothing is lost
TRAIN_LOCK = LOCK_FILE  # held (flock) by the process training into MODEL_DIR


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


# === Inference helpers ===

def receptive_field(model) -> int | None:
    """Side in input pixels of the region that one output pixel of ``model`` depends on.

    Walks the functional graph (nested models included) with the usual recurrence: a kxk
    convolution or pooling adds ``(k - 1) * jump`` pixels, a stride multiplies the jump (the
    input pixels between neighbouring outputs), an up-sampling divides it; where branches meet
    (U-Net skips), the larger field wins. Predict sizes its window overlap from this, so a pixel
    is only taken from windows that see all of its context.

    Returns:
        The receptive field's side in pixels, or None when the graph holds a layer it does not
        know how to measure (a custom layer that mixes pixels).
    """
    try:
        field, _ = _field_of(model, 1.0, 1.0)
    except _UnknownLayerError:
        return None
    return int(math.ceil(field))


class _UnknownLayerError(Exception):
    pass


# Layers that keep every pixel's value a function of that pixel alone (or of the same pixel of
# several inputs): they leave the receptive field as it is.
_POINTWISE = ("InputLayer", "Activation", "BatchNormalization", "Dropout", "SpatialDropout2D",
              "Concatenate", "Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum",
              "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "LayerNormalization",
              "GroupNormalization", "Rescaling", "Normalization", "Identity", "Lambda",
              "GaussianNoise", "GaussianDropout", "Cropping2D", "ZeroPadding2D", "Dense")


def _pair(value) -> int:
    return int(max(value)) if isinstance(value, (tuple, list)) else int(value)


def _field_of(model, field_in: float, jump_in: float) -> tuple[float, float]:
    """(field, jump) of ``model``'s first output given its inputs' (field, jump)."""
    state = {id(t): (field_in, jump_in) for t in model.inputs}
    for layer in model.layers:
        ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        known = [state[id(t)] for t in ins if id(t) in state]
        if not known:
            if type(layer).__name__ == "InputLayer":
                continue
            raise _UnknownLayerError(layer.name)
        field, jump = max(known)
        kind = type(layer).__name__
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):  # a nested model
            field, jump = _field_of(layer, field, jump)
        elif kind == "Conv2DTranspose":
            stride = _pair(layer.strides)
            field += (math.ceil(_pair(layer.kernel_size) / stride) - 1) * jump
            jump /= stride
        elif kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
            field += (_pair(layer.kernel_size) - 1) * _pair(layer.dilation_rate) * jump
            jump *= _pair(layer.strides)
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            field += (_pair(layer.pool_size) - 1) * jump
            jump *= _pair(layer.strides)
        elif kind == "UpSampling2D":
            jump /= _pair(layer.size)
        elif kind not in _POINTWISE:
            raise _UnknownLayerError(layer.name)
        outs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        for t in outs:
            state[id(t)] = (field, jump)
    return state[id(model.outputs[0])]


# === Inference precision ===

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FIRST_LAYER_FLOAT32 = True  # /proc/cpuinfo flags of CPUs with bf16 arithmetic


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The instruction-set flags /proc/cpuinfo reports; None where that cannot be read.

    Read once per process: every scene's ``get_bundle`` asks, and the CPU does not change.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets (AVX-512 BF16, AMX) this CPU reports; [] if none or unknown."""
    flags = _cpu_flags() or frozenset()
    return [f for f in BF16_FLAGS if f in flags]


def cpu_lacks_avx512() -> bool:
    """Whether this CPU is known to have no AVX-512 (most laptops and many cloud CPUs).

    TensorFlow's PyPI build runs a U-Net about 3x slower there than ONNX Runtime or OpenVINO
    (``bench.engines`` on an AVX2 EPYC: 8.0 s vs 2.6-3.1 s per 2048^2 window), while with
    AVX-512 its oneDNN kernels are within 1.2x of them. Unknown (not Linux) counts as having it.
    """
    flags = _cpu_flags()
    return flags is not None and "avx512f" not in flags


def resolve_precision(precision: str) -> str:
    """The precision predict runs at: 'float32' or 'bfloat16'.

    ``auto`` picks bfloat16 where it pays and stays faithful: the TensorFlow backend on a CPU
    with bf16 instructions and no GPU (measured in ``bench.precision`` with the trained demo
    model: about 1.5x the float32 speed end to end, probabilities within 2/254 at 99.9% of
    pixels, object F1 within 0.005). Elsewhere, and whenever that cannot be established,
    float32. An explicit ``bfloat16`` is honoured anywhere (without the instructions it is
    emulated and slow).
    """
    if precision != "auto":
        return precision
    if keras_backend() != "tensorflow" or not cpu_bf16_flags() or _tensorflow_gpu():
        return "float32"
    return "bfloat16"


def with_precision(model, precision: str):
    """``model`` itself for float32, or a copy computing in ``mixed_bfloat16`` for bfloat16.

    The copy is rebuilt from the model's config with every layer's dtype policy set to
    ``mixed_bfloat16`` (variables stay float32, so the weights carry over bit for bit), except
    the layers that produce the outputs: the sigmoid head keeps computing in float32, as in
    training, so probabilities are not rounded to bf16's 8 bits; and the layers that read the
    image (``FIRST_LAYER_FLOAT32``): bf16 holds normalised pixels to 1/64 near 2-4, coarser than
    one grey level, and keeping that one thin convolution exact halved the pixels whose
    probability moved by more than 2/254 on the demo model.
    """
    if precision == "float32":
        return model
    if precision != "bfloat16":
        raise ValueError(f"unknown precision {precision!r}")

    exact = {t._keras_history.operation.name for t in model.outputs}
    if FIRST_LAYER_FLOAT32:
        inputs = {id(t) for t in model.inputs}
        for layer in model.layers:
            ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
            if type(layer).__name__ != "InputLayer" and any(id(t) in inputs for t in ins):
                exact.add(layer.name)
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["name"] not in exact:
            layer["config"]["dtype"] = "mixed_bfloat16"
    fast = model.__class__.from_config(config)
    fast.set_weights(model.get_weights())
    return fast


# === Inference engine ===

ENGINE_CACHE = ".engine-cache"  # beside model.keras; one folder per engine and model digest


def resolve_engine(engine: str, precision: str = "float32") -> str:
    """The engine predict runs for a resolved ``precision``; an explicit engine as it is.

    ``auto``, measured with ``bench.engines`` on 2-core EPYCs (ms per 2048^2 window):

    - bfloat16: Keras. It keeps the first layer and the head in float32, which keeps
      probabilities within 2/254 at 99.9% of pixels; OpenVINO's bf16 hint rounds the whole graph
      and missed that (``bench.precision``).
    - a GPU that TensorFlow sees: Keras (the exported engines here run on the CPU).
    - OpenVINO where its package is installed: float32 matches Keras to 1e-6 and runs 1.4x
      Keras on an AVX-512 CPU (2147 vs 2973 ms), 3.1x on an AVX2 one (2629 vs 8027 ms).
    - ONNX Runtime (a core dependency) on a CPU without AVX-512: exact too, 2.6x Keras there
      (3108 vs 8027 ms). With AVX-512 it is only 0.75-1.2x Keras (slower under load), so
      Keras float32 stays.
    """
    if engine != "auto":
        return engine
    if precision == "bfloat16" or _tensorflow_gpu():
        return "keras"
    import importlib.util

    if importlib.util.find_spec("openvino"):
        return "openvino"
    # On TensorFlow only: the numbers above are TensorFlow's; JAX's XLA compiles for the CPU.
    if (cpu_lacks_avx512() and keras_backend() == "tensorflow"
            and importlib.util.find_spec("onnxruntime")):
        return "onnxruntime"
    return "keras"


def keras_backend() -> str:
    """The Keras backend of this process ('tensorflow', 'jax', 'torch')."""
    import keras

    return keras.backend.backend()


def _tensorflow_gpu() -> bool:
    """Whether Keras runs on TensorFlow with a GPU it can see."""
    if keras_backend() != "tensorflow":
        return False
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001 - a broken GPU probe: no GPU to use
        return False


class OpenVINOModel:
    """An OpenVINO compiled model with the one Keras method predict uses, ``predict_on_batch``."""

    def __init__(self, compiled, precision: str):
        self.compiled = compiled
        self.precision = precision

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.compiled(np.ascontiguousarray(x, dtype=np.float32))[0])


FALLBACK_CACHE = "carseg-engine-cache"  # under $TMPDIR where the bundle folder is read-only
CACHE_RECORD = "export.json"  # in each export's folder: the model's and the files' sha256


def cached_export(model, model_path: Path, engine: str, filename: str) -> Path:
    """``model`` exported for ``engine`` ('openvino' or 'onnxruntime'), built once per model.

    The export (Keras' ``model.export``) is cached in ``.engine-cache/<engine>-<sha256 of
    model.keras>/filename`` beside the model, so it is built once per model, not per process: a
    Dask worker finds it ready, and a retrained model (another digest) gets its own. It is
    exported into a temporary folder and renamed into place, so a reader never sees half an
    export and two processes that race both end up with a complete one. Where the bundle's
    folder is read-only the cache goes to ``$TMPDIR/carseg-engine-cache``, used only while it
    is private to this user (:func:`_private_folder`); else a private folder of this process.

    An export is used only when its record (:data:`CACHE_RECORD`) names this model's sha256 and
    every file still has the sha256 recorded when it was built: another model's graph planted
    there, or a truncated file, is rebuilt with a warning, never run.
    """
    model_sha = file_sha256(model_path)
    roots = [Path(model_path).parent / ENGINE_CACHE]
    fallback = Path(tempfile.gettempdir()) / FALLBACK_CACHE
    for root in roots + [fallback]:
        if root == fallback and not _private_folder(root):
            continue
        target = root / f"{engine}-{model_sha[:16]}"
        if _export_ok(target, filename, model_sha, engine):
            return target / filename
        try:
            _build_export(model, root, target, engine, filename, model_sha)
        except OSError:  # a read-only bundle folder: the next root
            continue
        return target / filename
    root = Path(tempfile.mkdtemp(prefix="carseg-engine-"))  # 0700, this process's alone
    atexit.register(shutil.rmtree, root, True)
    target = root / f"{engine}-{model_sha[:16]}"
    _build_export(model, root, target, engine, filename, model_sha)
    return target / filename


def _private_folder(root: Path) -> bool:
    """Create ``root`` 0700, or check that it is this user's own folder that nobody else may
    write: in a shared temp folder another user could plant an export that this process would
    run (or swap in a link to one)."""
    try:
        root.mkdir(mode=0o700)
        os.chmod(root, 0o700)  # whatever the umask
        return True
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(root)
    why = ("is not a folder" if not stat.S_ISDIR(st.st_mode)
           else f"is owned by user {st.st_uid}, not {os.getuid()}" if st.st_uid != os.getuid()
           else "is writable by group or others" if st.st_mode & 0o022 else None)
    if why:
        log.warning("%s: %s; not used as the engine cache (a private folder of this process "
                    "is used instead)", root, why)
    return why is None


def _export_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CACHE_RECORD}


def _export_ok(target: Path, filename: str, model_sha: str, engine: str) -> bool:
    """Whether ``target`` holds a complete export of the model with digest ``model_sha``."""
    if not target.exists():
        return False
    record = read_json_if_any(target / CACHE_RECORD) or {}
    files = record.get("files") or {}
    if record.get("model_sha256") != model_sha:
        why = "has no record of its model" if not record else "was built from another model"
    elif filename not in files or _export_files(target) != files:
        why = "is truncated or changed since it was built (sha256 differs)"
    else:
        return True
    log.warning("%s: the cached %s export %s; rebuilding it", target, engine, why)
    return False


def _build_export(model, root: Path, target: Path, engine: str, filename: str,
                  model_sha: str) -> None:
    """Export into a scratch folder, record the digests, and rename it onto ``target`` (a bad
    export there is moved aside first)."""
    root.mkdir(parents=True, exist_ok=True)
    # The swept scratch folder: a killed export leaves nothing behind for long.
    with temp_dir(root) as scratch:
        tmp = scratch / "export"
        tmp.mkdir()
        # The exporters' own deprecation chatter (tf2onnx on NumPy 2) is not the user's to
        # read: stderr keeps the pipeline's lines.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if engine == "onnxruntime":
                # Explicit signature: the loaded functional model was never called, and its
                # input (None, None, None, bands) keeps batch, height and width dynamic.
                model.export(str(tmp / filename), format="onnx", verbose=False,
                             input_signature=list(model.inputs))
            else:
                model.export(str(tmp / filename), format=engine, verbose=False)
        (tmp / CACHE_RECORD).write_text(json.dumps(
            {"engine": engine, "model_sha256": model_sha, "files": _export_files(tmp)},
            indent=2, sort_keys=True) + "\n")
        if target.exists():
            with contextlib.suppress(OSError):  # another process may be replacing it too
                os.replace(target, scratch / "stale")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use its export
            if not _export_ok(target, filename, model_sha, engine):
                raise


def openvino_model(model, model_path: Path, precision: str) -> OpenVINOModel:
    """Compile ``model`` with OpenVINO for the CPU, at ``precision`` ('float32' or 'bfloat16').

    The OpenVINO IR (``model.xml``) comes from ``cached_export``.
    """
    import openvino as ov

    xml = cached_export(model, model_path, "openvino", "model.xml")
    core = ov.Core()
    hint = "bf16" if precision == "bfloat16" else "f32"
    compiled = core.compile_model(core.read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return OpenVINOModel(compiled, precision)


class ONNXRuntimeModel:
    """An ONNX Runtime session with the one Keras method predict uses, ``predict_on_batch``."""

    precision = "float32"

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return np.asarray(self.session.run(None, feed)[0])


def process_threads() -> int:
    """The cores this process may use, for an engine's thread pool.

    On a Dask worker its share (``OMP_NUM_THREADS``, set by ``distributed.worker_env``), so N
    workers do not oversubscribe the CPU N times; else the CPUs the process may run on.
    """
    with contextlib.suppress(KeyError, ValueError):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def onnxruntime_model(model, model_path: Path, precision: str) -> ONNXRuntimeModel:
    """Run ``model`` with ONNX Runtime on the CPU, float32 only (its CPU kernels have no bf16).

    The ONNX graph (``model.onnx``, batch, height and width dynamic) comes from
    ``cached_export``. One inference call uses the process's cores (``process_threads``), one
    operator at a time (the U-Net's operators are large; parallel operators only contend).
    """
    if precision != "float32":
        raise ValueError(f"ONNX Runtime runs float32 only, not {precision}")
    import onnxruntime as ort

    path = cached_export(model, model_path, "onnxruntime", "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = process_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    return ONNXRuntimeModel(session)
