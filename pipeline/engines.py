"""Engines and precisions that run a trained U-Net: Keras float32/bfloat16, OpenVINO and ONNX
Runtime, with verified exported graphs cached per model (``auto`` is chosen by measurement in
:mod:`pipeline.engine_choice`)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.files import (
    file_sha256,
    read_json_if_any,
    temp_dir,
)

log = logging.getLogger(__name__)


# === Inference precision ===

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FIRST_LAYER_FLOAT32 = True  # /proc/cpuinfo flags of CPUs with bf16 arithmetic


@functools.cache
def cpu_flags() -> frozenset[str] | None:
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
    flags = cpu_flags() or frozenset()
    return [f for f in BF16_FLAGS if f in flags]


def cpu_runs_bf16() -> bool:
    """Whether bf16 arithmetic is native here for training: the TensorFlow backend on a CPU
    with AVX-512 BF16 or AMX and no GPU (``train.mixed_precision: auto``). Prediction does not
    ask: it measures (:mod:`pipeline.engine_choice`)."""
    return keras_backend() == "tensorflow" and bool(cpu_bf16_flags()) and not tensorflow_gpu()


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


def keras_backend() -> str:
    """The Keras backend of this process ('tensorflow', 'jax', 'torch')."""
    import keras

    return keras.backend.backend()


def tensorflow_gpu() -> bool:
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
    for root in cache_roots(model_path):
        target = root / f"{engine}-{model_sha[:16]}"
        if _export_ok(target, filename, model_sha, engine):
            return target / filename
        try:
            _build_export(model, root, target, engine, filename, model_sha)
        except OSError:  # a read-only bundle folder: the next root
            continue
        return target / filename
    root = process_cache()
    target = root / f"{engine}-{model_sha[:16]}"
    _build_export(model, root, target, engine, filename, model_sha)
    return target / filename


def cache_roots(model_path: Path) -> Iterator[Path]:
    """Where a model's engine cache may live, best first: ``.engine-cache`` beside the model,
    then ``$TMPDIR/carseg-engine-cache`` while it is private to this user. A caller that
    cannot write one (OSError) tries the next, and after them :func:`process_cache`."""
    yield Path(model_path).parent / ENGINE_CACHE
    fallback = Path(tempfile.gettempdir()) / FALLBACK_CACHE
    if _private_folder(fallback):
        yield fallback


@functools.cache
def process_cache() -> Path:
    """A private (0700) folder of this process alone, removed when it ends."""
    root = Path(tempfile.mkdtemp(prefix="carseg-engine-"))
    atexit.register(shutil.rmtree, root, True)
    return root


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


# predict.engine value -> (name for the log, builder of a model with ``predict_on_batch``).
EXPORTED_ENGINES = {"openvino": ("OpenVINO", openvino_model),
                    "onnxruntime": ("ONNX Runtime", onnxruntime_model)}


def engine_model(model, model_path: Path, engine: str, precision: str):
    """``model`` (Keras float32, loaded from ``model_path``) ready to run on ``engine`` at
    ``precision``; raises whatever the engine raises when it cannot."""
    if engine in EXPORTED_ENGINES:
        return EXPORTED_ENGINES[engine][1](model, model_path, precision)
    if engine != "keras":
        raise ValueError(f"unknown engine {engine!r}")
    return with_precision(model, precision)
