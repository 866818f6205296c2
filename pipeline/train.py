"""Train the car U-Net on the chips and masks, and write the model bundle.

Loss: binary cross-entropy weighted per pixel (0 on ignore pixels, the U-Net gap weight between
touching cars when ``train.use_gap_weights``), plus an optional soft Dice term. The weight travels
packed in ``y_true`` (channel 1), so the loss is a plain ``loss(y_true, y_pred)`` in ``keras.ops``
and runs unchanged on TensorFlow, JAX and PyTorch.

Resume: every epoch writes ``MODEL_DIR/checkpoint/`` (model with optimizer state, the best
weights so far, epoch, best validation IoU, early-stopping counter, and a fingerprint of the
settings and the data). Running ``train`` again with the same settings and data continues from
there; a larger ``train.epochs`` extends a finished run.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import Config, settings_digest
from pipeline.dataset import (
    ChipDataset,
    ChipRecord,
    data_fingerprint,
    read_index,
    read_stats,
)
from pipeline.io import InputError, atomic_path, write_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.csv"
THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)
# Settings that do not change what a resumed run would learn: they may differ between the
# interrupted run and the one that continues it.
RESUME_FREE = ("epochs", "max_minutes", "early_stopping_patience", "mixed_precision",
               "cache_in_memory")
# Chips held in RAM only while they take less than this share of the machine's memory.
CACHE_SHARE = 0.25


# === Loss ===

def make_loss(dice_weight: float = 0.0):
    """Weighted BCE (+ ``dice_weight`` x soft Dice) on ``y_true = [target, weight]``.

    The BCE is the weighted mean over the batch's pixels, ``sum(w * bce) / sum(w)``: with all
    weights 1 it equals ``keras.losses.binary_crossentropy`` averaged over the batch, and pixels
    with weight 0 (mask 255) contribute nothing to either sum.
    """
    from keras import ops

    def car_loss(y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        target = ops.cast(y_true[..., 0:1], "float32")
        weight = ops.cast(y_true[..., 1:2], "float32")
        # A target at an ignored pixel may hold anything; keep it a valid probability.
        target = ops.where(weight > 0, target, ops.zeros_like(target))
        bce = ops.binary_crossentropy(target, y_pred)
        loss = ops.sum(weight * bce) / ops.maximum(ops.sum(weight), 1e-6)
        if dice_weight:
            valid = ops.cast(weight > 0, "float32")
            inter = ops.sum(valid * target * y_pred)
            total = ops.sum(valid * target) + ops.sum(valid * y_pred)
            loss = loss + dice_weight * (1.0 - (2.0 * inter + 1.0) / (total + 1.0))
        return loss

    return car_loss


# === Metrics ===

def confusion(prob: np.ndarray, target: np.ndarray, valid: np.ndarray,
              thresholds: np.ndarray) -> np.ndarray:
    """(len(thresholds), 3) counts of true positives, false positives, false negatives."""
    p, t = prob[valid], target[valid].astype(bool)
    out = np.zeros((len(thresholds), 3), np.int64)
    for k, th in enumerate(thresholds):
        pred = p >= th
        out[k] = (np.sum(pred & t), np.sum(pred & ~t), np.sum(~pred & t))
    return out


def scores(tp: int, fp: int, fn: int) -> dict:
    """IoU, F1, precision and recall from pixel counts (1.0 when there is nothing to find)."""
    def ratio(a, b):
        return float(a / b) if b else 1.0

    return {"iou": ratio(tp, tp + fp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn)}


def evaluate(model, data: ChipDataset, thresholds: np.ndarray) -> tuple[np.ndarray, float]:
    """Confusion counts per threshold and the weighted BCE over a validation dataset.

    Pixels with mask 255 (weight 0) are left out of every count.
    """
    counts = np.zeros((len(thresholds), 3), np.int64)
    loss_sum = weight_sum = 0.0
    for i in range(len(data)):
        x, y = data[i]
        prob = np.asarray(model.predict_on_batch(x), dtype=np.float32)[..., 0]
        target, weight = y[..., 0], y[..., 1]
        valid = weight > 0
        counts += confusion(prob, target, valid, thresholds)
        p = np.clip(prob, 1e-7, 1 - 1e-7)
        bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
        loss_sum += float(np.sum(np.where(valid, weight * bce, 0.0)))
        weight_sum += float(np.sum(weight))
    return counts, loss_sum / max(weight_sum, 1e-6)


# === Callbacks ===

def _callback_base():
    import keras

    return keras.callbacks.Callback


class ValidationCheckpoint(_callback_base()):
    """Each epoch: validation IoU/F1/precision/recall at 0.5, best weights, checkpoint, patience.

    It writes ``val_*`` into the epoch logs (so CSVLogger and TensorBoard record them) and must
    come first in the callback list. Early stopping is done here rather than with
    ``keras.callbacks.EarlyStopping`` because its counter has to survive a resume.
    """

    def __init__(self, val: ChipDataset, ckpt_dir: Path, state: dict, patience: int):
        super().__init__()
        self.val = val
        self.ckpt_dir = ckpt_dir
        self.state = state
        self.patience = patience

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        counts, val_loss = evaluate(self.model, self.val, np.array([0.5]))
        metrics = scores(*counts[0])
        logs["val_loss"] = val_loss
        for key, value in metrics.items():
            logs[f"val_{key}"] = value
        state = self.state
        state["epoch"] = epoch + 1
        if metrics["iou"] > state["best_iou"]:
            state.update(best_iou=metrics["iou"], best_epoch=epoch, wait=0)
            # Keras insists on the `.weights.h5` ending, which atomic_path's name lacks.
            tmp = self.ckpt_dir / f".best.{os.getpid()}.tmp.weights.h5"
            self.model.save_weights(tmp)
            os.replace(tmp, self.ckpt_dir / "best.weights.h5")
        else:
            state["wait"] += 1
        if state["wait"] >= self.patience:
            log.info("early stop: validation IoU has not improved for %d epochs", state["wait"])
            state["stopped_early"] = True
            self.model.stop_training = True
        # The full model (with optimizer state) is written before the state file, so a state
        # file always points at a complete checkpoint.
        with atomic_path(self.ckpt_dir / "last.keras") as tmp:
            self.model.save(tmp)
        write_json(self.ckpt_dir / "state.json", state)
        log.info("epoch %d: val IoU %.4f (best %.4f at epoch %d)", epoch, metrics["iou"],
                 state["best_iou"], state["best_epoch"])


class TimeBudget(_callback_base()):
    """End training at the end of the step in progress once ``minutes`` have passed."""

    def __init__(self, minutes: float):
        super().__init__()
        self.deadline = time.monotonic() + minutes * 60
        self.spent = False

    def on_train_batch_end(self, batch, logs=None):
        if time.monotonic() >= self.deadline:
            if not self.spent:
                log.info("time budget spent: stopping after this step")
            self.spent = True
            self.model.stop_training = True


# === Devices ===

def training_policy(setting: str) -> str | None:
    """The Keras dtype policy for ``train.mixed_precision`` (None = float32).

    'on' is float16 (GPUs); 'bf16' is bfloat16, which needs no loss scaling; 'auto' picks float16
    on a GPU, bfloat16 on a CPU with bf16 instructions (AVX-512 BF16 / AMX, TensorFlow), else
    float32. The sigmoid head computes in float32 in every case (``build_unet``).
    """
    from pipeline.model import resolve_precision

    if setting == "on" or (setting == "auto" and gpu_visible()):
        return "mixed_float16"
    if setting == "bf16" or (setting == "auto" and resolve_precision("auto") == "bfloat16"):
        return "mixed_bfloat16"
    return None


def gpu_visible() -> bool:
    """Whether the active Keras backend sees a GPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return jax.devices()[0].platform == "gpu"
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
    except Exception:  # a broken driver is the same as no GPU for this decision
        return False
    return False


def _gpu_count() -> int:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(d.platform == "gpu" for d in jax.devices())
    return 0


def distribution_scope():
    """A context for building and compiling the model across several GPUs, when there are.

    Untested here (CI has no GPUs): JAX uses ``keras.distribution.DataParallel`` (set
    globally; batches are split across devices); TensorFlow uses ``MirroredStrategy``.
    PyTorch and single devices get a no-op context.
    """
    import contextlib

    import keras

    n = _gpu_count()
    if n <= 1:
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        log.info("data parallel on %d GPUs (JAX)", n)
        return contextlib.nullcontext()
    if backend == "tensorflow":
        import tensorflow as tf

        log.info("data parallel on %d GPUs (MirroredStrategy)", n)
        return tf.distribute.MirroredStrategy().scope()
    return contextlib.nullcontext()


# === Model ===

def build_model(bands: int, cfg: Config):
    """The U-Net from ``cfg.train``, optionally with a pretrained keras.applications encoder."""
    from pipeline.model import build_unet

    t = cfg.train
    if t.pretrained_encoder:
        return build_pretrained_unet(t.pretrained_encoder, bands, cfg)
    return build_unet(bands, depth=t.depth, base_filters=t.base_filters,
                      batch_norm=t.batch_norm, dropout=t.dropout)


def build_pretrained_unet(name: str, bands: int, cfg: Config, *, weights: str | None = "imagenet"):
    """A U-Net decoder on a keras.applications encoder with ImageNet weights.

    Skip connections are the last layer at each resolution (found on a probe copy built at the
    chip size); the decoder upsamples ``depth + 1`` times from the deepest used level. The
    encoder sees the same per-band z-scores as the plain U-Net (not its ImageNet preprocessing);
    fine-tuning absorbs the difference. ``weights=None`` builds it untrained (tests, offline).

    Raises:
        InputError: unknown encoder name, bands other than 3, or weights not downloadable.
    """
    import keras
    from keras import layers

    app = getattr(keras.applications, name, None)
    if app is None or not callable(app):
        raise InputError(f"train.pretrained_encoder: {name!r} is not a keras.applications model")
    if bands != 3:
        raise InputError(f"train.pretrained_encoder: ImageNet weights need 3 bands, got {bands}")
    depth = cfg.train.depth
    size = cfg.tile.chip_size
    try:
        encoder = app(include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as exc:  # URLError, HTTPError, OSError and more when offline
        raise InputError(
            f"~/.keras/models/: ImageNet weights for {name} could not be downloaded "
            f"({exc.__class__.__name__}); connect to the internet once, or place the weights "
            f"file keras.applications downloads for {name} in ~/.keras/models/") from None
    probe = app(include_top=False, weights=None, input_shape=(size, size, 3))
    last_at: dict[int, str] = {}
    for layer in probe.layers:
        shape = layer.output.shape if hasattr(layer, "output") else None
        if shape is None or len(shape) != 4 or shape[1] is None:
            continue
        stride = size // shape[1]
        if stride >= 2 and stride & (stride - 1) == 0:
            last_at[stride] = layer.name
    strides = sorted(last_at)[:depth + 1]
    inputs = encoder.input
    feats = [encoder.get_layer(last_at[s]).output for s in strides]
    x = feats[-1]
    filters = cfg.train.base_filters
    for level, skip in reversed(list(enumerate([inputs, *feats[:-1]]))):
        f = filters * 2 ** level
        x = layers.Conv2DTranspose(f, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skip])
        for i in (1, 2):
            x = layers.Conv2D(f, 3, padding="same", activation="relu",
                              name=f"dec{level}_conv{i}")(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="car_prob")(x)
    return keras.Model(inputs, outputs, name=f"car_unet_{name.lower()}")


# === Helpers ===

def _resume_settings(cfg: Config) -> dict:
    train = cfg.train.model_dump(mode="json")
    for key in RESUME_FREE:
        train.pop(key, None)
    return {"train": train, "tile": cfg.tile.model_dump(mode="json"),
            "labels": cfg.labels.model_dump(mode="json"), "backend": _backend()}


def _backend() -> str:
    import keras

    return keras.backend.backend()


def _fits_in_memory(records: list[ChipRecord], bands: int) -> bool:
    import rasterio

    with rasterio.open(records[0].image) as src:
        pixels = src.width * src.height
    need = len(records) * pixels * (bands * 4 + 1 + 4)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return need < CACHE_SHARE * total


def _tensorboard_available() -> bool:
    # keras.callbacks.TensorBoard writes through tf.summary, which needs both packages.
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


def _versions() -> dict:
    import keras
    import rasterio

    return {"keras": keras.__version__, "backend": keras.backend.backend(),
            "numpy": np.__version__, "rasterio": rasterio.__version__}


def _truncate_history(path: Path, epochs: int) -> None:
    """Keep only history rows of epochs before ``epochs`` (a kill may leave one extra row)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) < epochs]
    if len(kept) != len(rows):
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            csv.writer(fh).writerows(kept)


def _load_checkpoint(ckpt_dir: Path, fingerprint: str) -> dict | None:
    import json

    state_file = ckpt_dir / "state.json"
    if not state_file.exists() or not (ckpt_dir / "last.keras").exists():
        return None
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint in %s is for other settings or data: starting afresh", ckpt_dir)
        return None
    return state


def _split(records: list[ChipRecord]) -> tuple[list[ChipRecord], list[ChipRecord]]:
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not train:
        raise InputError("index.gpkg: no chips with split 'train'")
    if not val:
        # Without held-out chips the threshold and metrics come from training chips; say so.
        log.warning("no validation chips (split 'val'): validating on the training chips")
        val = train
    return train, val


# === Training ===

def train(chips_dir: Path, masks_dir: Path, model_dir: Path, *, cfg: Config) -> Path:
    """Train the U-Net on ``chips_dir``/``masks_dir`` and write the bundle into ``model_dir``.

    Args:
        chips_dir: ``DATA/interim/chips`` with ``index.gpkg``, ``stats.json`` and the chips.
        masks_dir: ``DATA/interim/masks`` with a mask (and optional ``.weight.tif``) per chip.
        model_dir: where ``model.keras``, ``metadata.json``, ``history.csv``, ``tensorboard/``
            and ``checkpoint/`` go.
        cfg: all settings; ``train``, ``tile`` and ``labels`` are used.

    Returns:
        The path of ``model.keras``.

    Raises:
        InputError: missing or inconsistent chips, masks, index or statistics.
    """
    import keras

    from pipeline.model import save_bundle

    chips_dir, masks_dir, model_dir = Path(chips_dir), Path(masks_dir), Path(model_dir)
    t = cfg.train
    stats = read_stats(chips_dir)
    records = read_index(chips_dir, masks_dir)
    bands = len(stats["mean"])
    if bands != len(cfg.tile.bands):
        raise InputError(f"{chips_dir / 'stats.json'}: {bands} bands, but tile.bands has "
                         f"{len(cfg.tile.bands)}; re-run `make tiles`")
    multiple = 2 ** t.depth
    if cfg.tile.chip_size % multiple:
        raise InputError(f"tile.chip_size {cfg.tile.chip_size} is not a multiple of "
                         f"2**train.depth = {multiple}")
    train_recs, val_recs = _split(records)
    normalization = {"mean": [float(m) for m in stats["mean"]],
                     "std": [float(s) for s in stats["std"]]}
    fingerprint = settings_digest({"settings": _resume_settings(cfg),
                                   "data": data_fingerprint(records)})

    keras.utils.set_random_seed(t.seed)
    previous_policy = keras.mixed_precision.global_policy().name
    policy = training_policy(t.mixed_precision)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        return _run(chips_dir, model_dir, cfg, records, train_recs, val_recs, stats,
                    normalization, fingerprint, bands, save_bundle)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _run(chips_dir, model_dir, cfg, records, train_recs, val_recs, stats, normalization,
         fingerprint, bands, save_bundle) -> Path:
    import keras

    t = cfg.train
    cache = t.cache_in_memory and _fits_in_memory(records, bands)
    train_data = ChipDataset(train_recs, normalization, batch_size=t.batch_size,
                             augment=t.augment, positive_fraction=t.positive_fraction,
                             steps=t.steps_per_epoch, use_weights=t.use_gap_weights,
                             cache=cache, seed=t.seed)
    # Validation scores the plain 0/1 target on valid pixels; gap weights play no part there.
    val_data = ChipDataset(val_recs, normalization, batch_size=t.batch_size, shuffle=False,
                           use_weights=False, cache=cache, seed=t.seed, pad_last=True)
    ckpt_dir = model_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = _load_checkpoint(ckpt_dir, fingerprint)
    resumed = state is not None
    if not resumed:
        state = {"epoch": 0, "best_iou": -1.0, "best_epoch": -1, "wait": 0,
                 "stopped_early": False, "fingerprint": fingerprint}
    initial_epoch = int(state["epoch"])
    # Sampling and augmentation draw from (seed, epoch, batch): a resumed run goes on with the
    # epochs it had not seen rather than repeating epoch 0's batches.
    train_data.epoch = initial_epoch

    with distribution_scope():
        model = build_model(bands, cfg)
        total_steps = max(1, t.epochs * len(train_data))
        schedule = keras.optimizers.schedules.CosineDecay(
            t.learning_rate, decay_steps=total_steps, alpha=0.01)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=make_loss(t.dice_weight))
        if resumed:
            # Weights and optimizer state (its step counter drives the schedule) from the
            # last checkpoint; the optimizer's variables must exist before they can be filled.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(ckpt_dir / "last.keras")
            log.info("resuming from epoch %d (best val IoU %.4f)", initial_epoch,
                     state["best_iou"])

    history = model_dir / HISTORY_FILE
    if resumed:
        _truncate_history(history, initial_epoch)
    elif history.exists():
        history.unlink()
    callbacks = [ValidationCheckpoint(val_data, ckpt_dir, state, t.early_stopping_patience),
                 keras.callbacks.CSVLogger(str(history), append=resumed)]
    if t.max_minutes:
        callbacks.append(TimeBudget(t.max_minutes))
    if _tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(str(model_dir / "tensorboard"),
                                                     write_graph=False, profile_batch=0))
    else:
        log.info("tensorflow or tensorboard not importable: no TensorBoard logs")

    if initial_epoch < t.epochs and not state.get("stopped_early"):
        model.fit(train_data, epochs=t.epochs, initial_epoch=initial_epoch,
                  callbacks=callbacks, verbose=1 if sys.stderr.isatty() else 2)
    else:
        log.info("checkpoint already at epoch %d of %d: nothing left to train",
                 initial_epoch, t.epochs)

    best = ckpt_dir / "best.weights.h5"
    if best.exists():
        model.load_weights(best)
    counts, _ = evaluate(model, val_data, THRESHOLDS)
    f1 = [scores(*c)["f1"] for c in counts]
    k = int(np.argmax(f1))
    threshold = float(THRESHOLDS[k])
    val_metrics = scores(*counts[k])
    log.info("threshold %.2f: val IoU %.4f F1 %.4f", threshold, val_metrics["iou"],
             val_metrics["f1"])
    metadata = {
        "bands": list(cfg.tile.bands),
        "dtype": stats.get("dtype", "uint8"),
        "normalization": normalization,
        "gsd": stats.get("gsd", cfg.tile.gsd),
        "chip_size": cfg.tile.chip_size,
        "size_multiple": 2 ** t.depth,
        "threshold": threshold,
        "train_config": {"train": t.model_dump(mode="json"),
                         "tile": cfg.tile.model_dump(mode="json"),
                         "labels": cfg.labels.model_dump(mode="json")},
        "val_metrics": {**val_metrics, "threshold": threshold,
                        "best_epoch": int(state["best_epoch"]),
                        "epochs_run": int(state["epoch"]),
                        "val_chips": len(val_recs), "train_chips": len(train_recs)},
        "versions": _versions(),
        "data_fingerprint": data_fingerprint(records),
        "keras_backend": _backend(),
    }
    # The bundle model carries no optimizer or loss: safe-mode loading needs no custom objects.
    return save_bundle(_inference_model(model, bands, cfg), metadata, model_dir)


def _inference_model(model, bands: int, cfg: Config):
    """A fresh uncompiled float32 copy of ``model``, so ``model.keras`` holds no custom loss
    and loads the same on a CPU (mixed precision is a training-time setting)."""
    import keras

    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        fresh = build_model(bands, cfg)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    fresh.set_weights(model.get_weights())
    return fresh

