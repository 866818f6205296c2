"""Train the car U-Net on the chips and masks, and write the model bundle.

Loss: binary cross-entropy weighted per pixel (0 on ignore pixels, the U-Net gap weight between
touching cars when ``train.use_gap_weights``), plus an optional soft Dice term. The weight travels
packed in ``y_true`` (channel 1), so the loss is a plain ``loss(y_true, y_pred)`` in ``keras.ops``
and runs unchanged on TensorFlow, JAX and PyTorch.

A time budget (``train.max_minutes``) shapes the whole run, not just its end: the learning rate
warms up and decays (cosine) to the end of the budget rather than of ``epochs``; an epoch is a
validation interval sized from a measured step time so validation runs about
``train.validations`` times; the best weights are kept by object F1 (``train.select_by``); and
the budget keeps room for choosing the post-processing afterwards.

After training, the threshold and the minimum car area are chosen on the validation chips by
object F1 at IoU 0.5 (``pipeline.postprocess``) and stored in ``metadata.json``
(``threshold``, ``postprocess``), with each validation car's mean probability and whether it
matched a true car (``validation_cars``), for calibration.

Resume: every epoch writes ``MODEL_DIR/checkpoint/`` (model with optimizer state, the best
weights so far, epoch, best validation score, early-stopping counter, training time, epoch
length, and a fingerprint of the settings and the data). Running ``train`` again with the same
settings and data continues from there; a larger ``train.epochs`` extends a finished run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.calibration import fit_calibration
from pipeline.config import Config, settings_digest
from pipeline.dataset import (
    ChipDataset,
    ChipRecord,
    data_fingerprint,
    read_index,
    read_stats,
)
from pipeline.errors import InputError
from pipeline.files import atomic_path, read_json_if_any, temp_dir, write_json
from pipeline.scores import for_ranking, prf

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.csv"
THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)
# Settings that do not change what a resumed run would learn: they may differ between the
# interrupted run and the one that continues it.
RESUME_FREE = ("epochs", "max_minutes", "early_stopping_patience", "mixed_precision",
               "cache_in_memory", "validations")
# The learning rate decays to this share of its peak at the end of the run.
FINAL_LR_SHARE = 0.01
# Without a measured step time, a training step is taken to cost this many forward passes.
TRAIN_STEP_FORWARDS = 6.0
# Post-processing search cost in unsplit scoring passes (postprocess.choose: 7 coarse unsplit
# passes and 3 split ones at about 10 times the cost).
SEARCH_PASSES = 40
# Training runs at least 1 / VAL_SHARE_CAP times as long as validation between validations.
VAL_SHARE_CAP = 0.25
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
    """IoU, F1, precision and recall from pixel counts (pipeline.scores: NaN where undefined)."""
    return {k: v for k, v in prf(tp, fp, fn).items() if k in ("iou", "f1", "precision", "recall")}


def evaluate(model, data: ChipDataset, thresholds: np.ndarray, chips: list | None = None
             ) -> tuple[np.ndarray, float]:
    """Confusion counts per threshold and the weighted BCE over a validation dataset.

    Pixels with mask 255 (weight 0) are left out of every count. When ``chips`` is a list, each
    real (not padding) chip's ``(prob, mask)`` is appended to it for object scoring, with the
    mask 255 where the chip is ignored.
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
        if chips is not None:
            real = len(data.batch_indices(i))  # the padded tail of the last batch is no chip
            for k in range(real):
                mask = np.where(valid[k], target[k], 255).astype(np.uint8)
                chips.append((prob[k].astype(np.float16), mask))
    return counts, loss_sum / max(weight_sum, 1e-6)


def learning_rate_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of the run, then cosine decay to
    ``FINAL_LR_SHARE * peak`` at ``progress`` 1 (progress is a share of the budget or steps)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * max(progress / warmup, 0.01)
    rest = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return peak * (FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * rest)))


# === Callbacks ===

def _callback_base():
    import keras

    return keras.callbacks.Callback


class ValidationCheckpoint(_callback_base()):
    """Each epoch: validation scores, best weights, checkpoint, patience.

    Scores: pixel IoU/F1/precision/recall at 0.5 and object F1 at IoU 0.5 (threshold 0.5,
    ``vectors.min_area_m2``); ``select_by`` says which keeps the best weights. It writes
    ``val_*`` and ``minutes`` (training time so far) into the epoch logs (so CSVLogger and
    TensorBoard record them) and must come first in the callback list. Early stopping is done
    here rather than with ``keras.callbacks.EarlyStopping`` because its counter has to survive a
    resume.
    """

    def __init__(self, val: ChipDataset, ckpt_dir: Path, state: dict, patience: int | None,
                 *, select_by: str = "iou", gsd: float | None = None, vectors=None,
                 envelopes: bool = False):
        super().__init__()
        self.val = val
        self.ckpt_dir = ckpt_dir
        self.state = state
        self.patience = patience
        self.select_by = select_by
        self.gsd = gsd
        self.vectors = vectors
        self.envelopes = envelopes  # box labels: cars matched by their boxes
        self.started = time.monotonic()
        self.elapsed0 = float(state.get("elapsed_s", 0.0))
        # Seconds of the last validation's forward passes and object scoring at one threshold.
        self.forward_s = self.objects_s = 0.0

    def final_search_s(self) -> float:
        """What choosing the post-processing after training will take, from the last
        validation: one more pass of the chips, and object scoring (``SEARCH_PASSES``)."""
        return self.forward_s + SEARCH_PASSES * self.objects_s

    def on_epoch_end(self, epoch, logs=None):
        from pipeline.postprocess import object_f1

        logs = logs if logs is not None else {}
        chips: list | None = [] if self.gsd and self.vectors is not None else None
        t0 = time.monotonic()
        counts, val_loss = evaluate(self.model, self.val, np.array([0.5]), chips)
        metrics = scores(*counts[0])
        t1 = time.monotonic()
        if chips is not None:
            metrics["object_f1"] = object_f1(chips, gsd=self.gsd, cfg=self.vectors,
                                             envelopes=self.envelopes)
        self.forward_s, self.objects_s = t1 - t0, time.monotonic() - t1
        logs["val_loss"] = val_loss
        for key, value in metrics.items():
            logs[f"val_{key}"] = value
        state = self.state
        state["epoch"] = epoch + 1
        state["elapsed_s"] = self.elapsed0 + time.monotonic() - self.started
        logs["minutes"] = state["elapsed_s"] / 60
        key = self.select_by if self.select_by in metrics else "iou"
        # Pixel IoU breaks ties (object F1 is often 1.0 or 0.0 on tiny validation sets).
        score = [for_ranking(metrics[key]), for_ranking(metrics["iou"])]
        best = state.get("best_score", [state["best_iou"], state["best_iou"]])
        if score > best:
            state.update(best_score=score, best_iou=metrics["iou"], best_epoch=epoch, wait=0)
            # Keras insists on the `.weights.h5` ending: a scratch file of that name, swept
            # after a kill like every temporary.
            with temp_dir(self.ckpt_dir) as scratch:
                self.model.save_weights(scratch / "best.weights.h5")
                os.replace(scratch / "best.weights.h5", self.ckpt_dir / "best.weights.h5")
        else:
            state["wait"] += 1
        if self.patience and state["wait"] >= self.patience:
            log.info("early stop: validation %s has not improved for %d epochs", key,
                     state["wait"])
            state["stopped_early"] = True
            self.model.stop_training = True
        # The full model (with optimizer state) is written before the state file, so a state
        # file always points at a complete checkpoint.
        with atomic_path(self.ckpt_dir / "last.keras") as tmp:
            self.model.save(tmp)
        write_json(self.ckpt_dir / "state.json", state)
        log.info("epoch %d (%.1f min): val IoU %.4f, object F1 %s (best epoch %d)", epoch,
                 logs["minutes"], metrics["iou"],
                 f"{metrics['object_f1']:.4f}" if "object_f1" in metrics else "-",
                 state["best_epoch"])


class LearningRate(_callback_base()):
    """Set the learning rate before each step: warm-up, then cosine decay to the end of the
    time budget (``budget_s``, training time carried over a resume included) or, without a
    budget, to the end of ``total_steps``. A budget-driven run thus ends with a small learning
    rate whenever the budget ends, instead of being cut in the middle of a step-based schedule.
    """

    def __init__(self, peak: float, warmup: float, *, total_steps: int, first_step: int,
                 budget_s: float | None, elapsed_s: float):
        super().__init__()
        self.peak, self.warmup = peak, warmup
        self.total_steps, self.step = max(total_steps, 1), first_step
        self.budget_s, self.elapsed_s = budget_s, elapsed_s
        self.started = time.monotonic()

    def progress(self) -> float:
        if self.budget_s:
            return (self.elapsed_s + time.monotonic() - self.started) / self.budget_s
        return self.step / self.total_steps

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = learning_rate_at(self.progress(), self.peak,
                                                              self.warmup)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(learning_rate_at(self.progress(), self.peak,
                                                           self.warmup))


class TimeBudget(_callback_base()):
    """End training at the end of the step in progress once ``minutes`` have passed, less
    ``reserve()`` seconds: the time that choosing the post-processing on the validation chips
    will take after training, so the whole ``train`` stage keeps to the budget."""

    def __init__(self, minutes: float, reserve=None):
        super().__init__()
        self.start = time.monotonic()
        self.budget_s = minutes * 60
        self.reserve = reserve or (lambda: 0.0)
        self.spent = False

    @property
    def deadline(self) -> float:
        return self.start + self.budget_s - self.reserve()

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
    from pipeline.engines import cpu_runs_bf16

    if setting == "on" or (setting == "auto" and gpu_visible()):
        return "mixed_float16"
    if setting == "bf16" or (setting == "auto" and cpu_runs_bf16()):
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

    state_file = ckpt_dir / "state.json"
    if not state_file.exists() or not (ckpt_dir / "last.keras").exists():
        return None
    state = read_json_if_any(state_file)
    if not isinstance(state, dict):
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

    from pipeline.bundle import save_bundle

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
    if t.crop_size and t.crop_size % multiple:
        raise InputError(f"train.crop_size {t.crop_size} is not a multiple of "
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


def _auto_steps(model, train_data: ChipDataset, val_batches: int, t) -> int | None:
    """Batches per epoch so that validation runs about ``t.validations`` times in the budget.

    The step time is estimated from a timed forward pass of a training batch (on a CPU a
    training step with augmentation costs about ``TRAIN_STEP_FORWARDS`` of them; measured on a
    2-core machine), and each validation's own cost (``val_batches`` forward passes) is taken
    out of its interval. Validation by steps rather than by epochs means the best weights are
    caught however few passes over the chips the budget allows. None when there is no budget
    or ``steps_per_epoch`` is set.
    """
    if not t.max_minutes or t.steps_per_epoch:
        return None
    x, _ = train_data[0]
    model.predict_on_batch(x)  # traces the function; not timed
    start = time.perf_counter()
    model.predict_on_batch(x)
    forward_s = max(time.perf_counter() - start, 1e-4)
    # A validation is its forward passes plus about as long again scoring objects.
    step_s, val_s = TRAIN_STEP_FORWARDS * forward_s, 2 * val_batches * forward_s
    interval_s = t.max_minutes * 60 / t.validations - val_s
    # Validation never takes more than 1 / (1 + VAL_SHARE_CAP^-1) of the time: on a slow
    # machine with a large validation set, fewer validations rather than no training.
    steps = max(interval_s, val_s / VAL_SHARE_CAP) / step_s
    return int(min(max(steps, 5), 100_000))


def _run(chips_dir, model_dir, cfg, records, train_recs, val_recs, stats, normalization,
         fingerprint, bands, save_bundle) -> Path:
    import keras

    from pipeline.dataset import box_labels_wanted
    from pipeline.postprocess import choose, choose_truncated

    t = cfg.train
    cache = t.cache_in_memory and _fits_in_memory(records, bands)
    # Box labels are recognised whatever the loss does with them (train.box_labels): a car at
    # its true heading fills only part of its box, so validation then matches cars by their
    # boxes (envelope IoU), as anyone scoring against box labels does.
    labels_are_boxes = box_labels_wanted(train_recs, "auto")
    boxes = labels_are_boxes if t.box_labels == "auto" else bool(t.box_labels)
    train_data = ChipDataset(train_recs, normalization, batch_size=t.batch_size,
                             augment=t.augment, positive_fraction=t.positive_fraction,
                             steps=t.steps_per_epoch, use_weights=t.use_gap_weights,
                             cache=cache, seed=t.seed, crop_size=t.crop_size,
                             box_labels=boxes, dtype=str(stats.get("dtype", "uint8")))
    # Validation scores the plain 0/1 target on valid pixels; gap weights play no part there.
    val_data = ChipDataset(val_recs, normalization, batch_size=t.batch_size, shuffle=False,
                           use_weights=False, cache=cache, seed=t.seed, pad_last=True)
    gsd = stats.get("gsd") or cfg.tile.gsd or _chip_gsd(val_recs[0])
    ckpt_dir = model_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = _load_checkpoint(ckpt_dir, fingerprint)
    resumed = state is not None
    if not resumed:
        state = {"epoch": 0, "best_iou": -1.0, "best_epoch": -1, "wait": 0,
                 "stopped_early": False, "fingerprint": fingerprint, "elapsed_s": 0.0}
    initial_epoch = int(state["epoch"])
    # Sampling and augmentation draw from (seed, epoch, batch): a resumed run goes on with the
    # epochs it had not seen rather than repeating epoch 0's batches.
    train_data.epoch = initial_epoch

    with distribution_scope():
        model = build_model(bands, cfg)
        # A plain float: the LearningRate callback sets it before every step.
        model.compile(optimizer=keras.optimizers.Adam(t.learning_rate),
                      loss=make_loss(t.dice_weight))
        if resumed:
            # Weights and optimizer state from the last checkpoint; the optimizer's variables
            # must exist before they can be filled.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(ckpt_dir / "last.keras")
            log.info("resuming from epoch %d (best val IoU %.4f)", initial_epoch,
                     state["best_iou"])
        else:
            from pipeline.stages.base import start_weights

            # Fine-tuning from the base (or another bundle) when the U-Net has its shape;
            # kept in the checkpoint state so a resumed run records the same start.
            state["init"] = start_weights(model, t.init)
    steps = state.get("steps_per_epoch") or _auto_steps(model, train_data,
                                                           len(val_data), t)
    if steps:
        # Kept in the state so a resumed run walks the same epochs.
        train_data.steps = state["steps_per_epoch"] = int(steps)
        log.info("time budget %.1f min: %d steps per epoch (validation about %d times)",
                 t.max_minutes or 0, steps, t.validations)

    history = model_dir / HISTORY_FILE
    if resumed:
        _truncate_history(history, initial_epoch)
    elif history.exists():
        history.unlink()
    checkpoint = ValidationCheckpoint(val_data, ckpt_dir, state, t.early_stopping_patience,
                                      select_by=t.select_by, gsd=gsd, vectors=cfg.vectors,
                                      envelopes=labels_are_boxes)
    callbacks = [checkpoint,
                 LearningRate(t.learning_rate, t.warmup_fraction,
                              total_steps=t.epochs * len(train_data),
                              first_step=initial_epoch * len(train_data),
                              budget_s=t.max_minutes * 60 if t.max_minutes else None,
                              elapsed_s=float(state.get("elapsed_s", 0.0))),
                 keras.callbacks.CSVLogger(str(history), append=resumed)]
    if t.max_minutes:
        callbacks.append(TimeBudget(t.max_minutes, reserve=checkpoint.final_search_s))
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
    started = time.monotonic()
    val_chips: list = []
    counts, _ = evaluate(model, val_data, THRESHOLDS, val_chips)
    post = choose(val_chips, gsd=gsd, cfg=cfg.vectors, envelopes=labels_are_boxes)
    # The cut-car rule from the labels at the scene's edge (labellers differ on cut cars).
    borders = scene_borders(chips_dir, val_data.records)
    truncated = choose_truncated(
        [(prob, mask, border) for (prob, mask), border in zip(val_chips, borders, strict=True)],
        gsd=gsd, cfg=cfg.vectors, post=post, envelopes=labels_are_boxes)
    threshold = post["threshold"]
    k = int(np.argmin(np.abs(THRESHOLDS - threshold)))
    val_metrics = scores(*counts[k])
    log.info("threshold %.2f, min area %.1f m2, min mean probability %.2f (chosen by object F1 "
             "%.4f, P %.3f R %.3f): val pixel IoU %.4f; %.0f s", threshold, post["min_area_m2"],
             post["min_mean_prob"], post["object_f1"],
             post["precision"], post["recall"], val_metrics["iou"],
             time.monotonic() - started)
    metadata = {
        "bands": list(cfg.tile.bands),
        "dtype": stats.get("dtype", "uint8"),
        "normalization": normalization,
        "gsd": stats.get("gsd", cfg.tile.gsd),
        "chip_size": cfg.tile.chip_size,
        "size_multiple": 2 ** t.depth,
        "threshold": threshold,
        # Post-processing chosen on the validation chips by object F1 at IoU 0.5: vectors are
        # meant to drop cars under min_area_m2 or with a mean probability under min_mean_prob.
        "postprocess": {"threshold": threshold, "min_area_m2": post["min_area_m2"],
                        "min_mean_prob": post["min_mean_prob"],
                        # None: no cut car on the validation chips; vectors keeps its default.
                        "min_truncated_area_m2": truncated["min_truncated_area_m2"],
                        "truncated": {k: v for k, v in truncated.items()
                                      if k != "min_truncated_area_m2"},
                        "chosen_by": "object F1 at IoU 0.5 on the validation chips",
                        "object_f1": post["object_f1"], "precision": post["precision"],
                        "recall": post["recall"], "tp": post["tp"], "fp": post["fp"],
                        "fn": post["fn"], "table": post["table"]},
        "validation_cars": post["validation_cars"],
        # Calibrated per-car probabilities give the batch's counts an honest interval.
        "calibration": fit_calibration(post["validation_cars"]["mean_prob"],
                                       post["validation_cars"]["matched"],
                                       n_true=post["tp"] + post["fn"]),
        "train_config": {"train": t.model_dump(mode="json"),
                         "tile": cfg.tile.model_dump(mode="json"),
                         "labels": cfg.labels.model_dump(mode="json")},
        "val_metrics": {**val_metrics, "threshold": threshold,
                        "object_f1": post["object_f1"],
                        "object_precision": post["precision"],
                        "object_recall": post["recall"], "min_area_m2": post["min_area_m2"],
                        "min_mean_prob": post["min_mean_prob"],
                        "best_epoch": int(state["best_epoch"]),
                        "epochs_run": int(state["epoch"]),
                        "train_minutes": round(float(state.get("elapsed_s", 0.0)) / 60, 2),
                        "box_labels": bool(boxes),
                        "labels_are_boxes": bool(labels_are_boxes),
                        "object_match": "envelope IoU 0.5" if labels_are_boxes else "IoU 0.5",
                        "val_chips": len(val_recs), "train_chips": len(train_recs)},
        "init": state.get("init", {"from": "scratch"}),
        "versions": _versions(),
        "data_fingerprint": data_fingerprint(records),
        "keras_backend": _backend(),
    }
    # The bundle model carries no optimizer or loss: safe-mode loading needs no custom objects.
    return save_bundle(_inference_model(model, bands, cfg), metadata, model_dir,
                       validation=validation_images(val_recs))


# Validation chips kept in the bundle for the engine choice's faithfulness check: enough cars
# that "the same cars" means something, few enough to keep the bundle small (~1 MB at 256 px).
VALIDATION_CHIPS = 16


def validation_images(records: list[ChipRecord], limit: int = VALIDATION_CHIPS) -> np.ndarray:
    """The raw pixels of the ``limit`` validation chips holding most car pixels (chips, rows,
    cols, bands): where an engine's rounding could change a car, not empty asphalt."""
    import rasterio
    from rasterio.plot import reshape_as_image

    chosen = sorted(records, key=lambda r: -r.car_pixels)[:limit]
    shapes, images = set(), []
    for record in chosen:
        with rasterio.open(record.image) as src:
            images.append(reshape_as_image(src.read()))
        shapes.add(images[-1].shape)
    if len(shapes) != 1:  # chips all share the chip size; anything else is not a probe set
        return np.zeros((0, 0, 0, 0), np.uint8)
    return np.stack(images)


def scene_borders(chips_dir: Path, records: list[ChipRecord]) -> list[tuple[bool, ...]]:
    """Which sides (top, bottom, left, right) of each chip lie on its scene's border.

    The scene's extent is that of its chips (``index.gpkg``): tiling shifts the last chip of a
    row or column back to end at the scene's edge, so the extent is the scene's own unless
    that chip was skipped as mostly nodata, where the nodata marks the edge instead.
    """
    import pyogrio

    from pipeline.io import INDEX_FILE, gdal_safe_name

    with gdal_safe_name(Path(chips_dir) / INDEX_FILE) as safe:
        table = pyogrio.read_dataframe(safe, read_geometry=False)
    table["row_end"] = table["row_off"] + table["height"]
    table["col_end"] = table["col_off"] + table["width"]
    extent = table.groupby("scene").agg(r0=("row_off", "min"), c0=("col_off", "min"),
                                        r1=("row_end", "max"), c1=("col_end", "max"))
    rows = table.set_index(["scene", "chip"])
    out = []
    for rec in records:
        chip, ext = rows.loc[(rec.scene, rec.chip)], extent.loc[rec.scene]
        out.append((bool(chip.row_off <= ext.r0), bool(chip.row_end >= ext.r1),
                    bool(chip.col_off <= ext.c0), bool(chip.col_end >= ext.c1)))
    return out


def _chip_gsd(record: ChipRecord) -> float:
    import rasterio

    from pipeline.geo import pixel_size

    with rasterio.open(record.image) as src:
        return float(pixel_size(src.transform))


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

