"""``predict.engine: auto`` and ``predict.precision: auto``, chosen by measurement.

No table of CPUs says which engine is fastest: the same U-Net runs 1.0-4x Keras float32 on
OpenVINO bf16 depending on whether the CPU has AMX, AVX-512 BF16 or neither, and the ranking of
the float32 engines flips with AVX-512 and with load. So on first use on a machine every
installed engine and precision runs one predict-shaped window of the model, and the fastest
one that gives the users the same cars as Keras float32 is taken (:func:`faithfulness`). The
record of that measurement (timings, faithfulness, the choice) is kept per CPU model, model
sha256, window and thread count beside the model (``.engine-cache/choice-<key>.json``), so
later runs read it; another CPU, another model or window, another thread share or another
engine version measures again. ``predict.engine`` / ``predict.precision`` set to a value
override it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import engines
from pipeline.engines import (
    cache_roots,
    cpu_bf16_flags,
    engine_model,
    keras_backend,
    process_cache,
    process_threads,
    tensorflow_gpu,
)
from pipeline.errors import first_line
from pipeline.files import file_sha256, folder_lock, read_json_if_any, write_json
from pipeline.geo import prob_to_uint8
from pipeline.scores import f1, for_ranking

log = logging.getLogger(__name__)

Candidate = tuple[str, str]  # (engine, precision)
REFERENCE: Candidate = ("keras", "float32")
ENGINES = ("keras", "openvino", "onnxruntime")
PRECISIONS = ("float32", "bfloat16")

# Faithful = the same cars as Keras float32 on the bundle's validation chips, as a user would
# see them: object F1 between the two >= 0.995, counts within 0.5%, and 99% of pixels within
# 2/254 of probability (the stored scale). Stricter pixel rules (p99.9 <= 2/254) ruled out
# OpenVINO bf16 that changed one blob in 315.
MIN_OBJECT_F1 = 0.995
MAX_COUNT_CHANGE = 0.005
MAX_P99_STEPS = 2
REPEATS = 3  # timed forward passes per candidate after one warm-up, alternating candidates
PROBE_BATCH = 4  # validation chips per forward pass
DEFAULT_GSD = 0.15  # m, for a bundle trained at no one GSD: only the car areas depend on it


@dataclass(frozen=True)
class Choice:
    """What ``auto`` resolved to, and the record it came from (for the log and the COG tags)."""

    engine: str
    precision: str
    record: dict
    path: Path | None

    @property
    def summary(self) -> str:
        """One line: the choice, its speed-up and faithfulness (for the log and COG tags)."""
        key = f"{self.engine} {self.precision}"
        if "reason" in self.record:
            return f"{key} ({self.record['reason']})"
        row = self.record.get("candidates", {}).get(key, {})
        ref = self.record.get("candidates", {}).get("keras float32", {})
        speed = (f"{ref['ms'] / row['ms']:.2f}x Keras float32"
                 if row.get("ms") and ref.get("ms") else "speed not measured")
        faith = row.get("faithfulness") or {}
        same = (f"object F1 {faith['object_f1']:.3f}, {faith['cars']} vs {faith['reference_cars']}"
                f" cars, p99 {faith['p99_steps']:g}/254 on {faith['chips']} chips"
                if faith else "")
        return f"{key}, {speed}" + (f"; {same}" if same else "")


def cpu_identity() -> dict:
    """The CPU a measurement holds for: its model name and its instruction-set flags."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    flags = sorted(engines.cpu_flags() or ())
    return {"model": name, "flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()}


def candidates(engine: str, precision: str) -> list[Candidate]:
    """The (engine, precision) pairs ``auto`` may choose from for these settings.

    An engine whose package is not installed is left out; so is bfloat16 where ``precision``
    is ``auto`` and the CPU has no bf16 instructions (emulated, it is slower, never faster);
    and ONNX Runtime at bfloat16 (its CPU kernels have none). An explicit value is honoured.
    """
    engines = ENGINES if engine == "auto" else (engine,)
    precisions = PRECISIONS if precision == "auto" else (precision,)
    out = []
    for e in engines:
        if e != "keras" and importlib.util.find_spec(e) is None:
            continue
        for p in precisions:
            if p == "bfloat16" and (e == "onnxruntime"
                                    or (precision == "auto" and not cpu_bf16_flags())):
                continue
            out.append((e, p))
    return out


def _versions() -> dict:
    out = {"keras_backend": keras_backend()}
    for package in ("keras", "tensorflow", "jax", "openvino", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


def choice_key(model_path: Path, allowed: list[Candidate], window: tuple[int, int, int],
               probe_chips: int) -> dict:
    """Everything a measurement depends on: a record holds only where all of it is the same."""
    return {"cpu": cpu_identity(), "model_sha256": file_sha256(model_path),
            "window": list(window), "threads": process_threads(), "versions": _versions(),
            "candidates": [" ".join(c) for c in allowed], "validation_chips": probe_chips}


def _cars(prob: np.ndarray, threshold: float, gsd: float, min_area_m2: float):
    """The cars a user gets from one chip's probabilities: blobs at ``threshold`` of at least
    ``min_area_m2`` (the model's post-processing), touching ones not split (both sides alike)."""
    from pipeline.config import VectorConfig
    from pipeline.postprocess import find_objects

    cfg, valid = VectorConfig().resolve(), np.ones(prob.shape, bool)
    blobs = find_objects(prob >= threshold, gsd=gsd, cfg=cfg, valid=valid, split=False)
    kept = np.isin(blobs.labels, np.flatnonzero(blobs.area_m2 >= min_area_m2) + 1)
    return find_objects(kept, gsd=gsd, cfg=cfg, valid=valid, split=False)


def faithfulness(reference: np.ndarray, probs: np.ndarray, *, threshold: float, gsd: float,
                 min_area_m2: float = 0.0) -> dict:
    """How close ``probs`` is to ``reference`` (both (chips, rows, cols) probabilities) as a
    user sees it: the cars (:func:`_cars`) matched at IoU 0.5, their counts, and the 99th
    percentile of the stored probability's difference (steps of 1/254)."""
    from pipeline.postprocess import partners

    steps = np.abs(prob_to_uint8(reference).astype(np.int16) - prob_to_uint8(probs))
    tp = n_ref = n_new = 0
    for ref, new in zip(reference, probs, strict=True):
        a = _cars(ref, threshold, gsd, min_area_m2)
        b = _cars(new, threshold, gsd, min_area_m2)
        partner, _ = partners(b, a)
        tp += int((partner >= 0).sum())
        n_ref, n_new = n_ref + len(a.area_m2), n_new + len(b.area_m2)
    score = for_ranking(f1(tp, n_new - tp, n_ref - tp))  # no cars in either: the same cars
    p99 = float(np.percentile(steps, 99)) if steps.size else 0.0
    ok = (score >= MIN_OBJECT_F1 and abs(n_new - n_ref) <= MAX_COUNT_CHANGE * n_ref
          and p99 <= MAX_P99_STEPS)
    return {"object_f1": round(score, 4), "cars": n_new, "reference_cars": n_ref,
            "p99_steps": p99, "max_steps": int(steps.max()) if steps.size else 0,
            "chips": len(reference), "faithful": bool(ok)}


def _run(model, x: np.ndarray, batch: int) -> np.ndarray:
    out = [np.asarray(model.predict_on_batch(x[k:k + batch]), np.float32)[..., 0]
           for k in range(0, len(x), batch)]
    return np.concatenate(out)


def measure(reference, models: dict[Candidate, object], probe: np.ndarray,
            window: np.ndarray, *, cars: dict, repeats: int = REPEATS) -> dict[str, dict]:
    """Time each model on ``window`` (one predict-shaped batch) and check it against
    ``reference`` (Keras float32) on ``probe`` (normalised validation chips).

    Returns, per candidate ("engine precision"): median ms per window batch, every timing,
    and its :func:`faithfulness`. The candidates run in turn, ``repeats`` rounds after a warm-up
    (tracing, compilation), so a load that comes and goes hits them alike.
    """
    expected = _run(reference, probe, PROBE_BATCH)
    rows = {}
    for cand, model in models.items():
        faith = (faithfulness(expected, _run(model, probe, PROBE_BATCH), **cars)
                 if cand != REFERENCE else None)
        model.predict_on_batch(window)  # warm
        rows[" ".join(cand)] = {"faithfulness": faith, "times_ms": []}
    for _ in range(repeats):
        for cand, model in models.items():
            start = time.perf_counter()
            model.predict_on_batch(window)
            rows[" ".join(cand)]["times_ms"].append(round(1000 * (time.perf_counter() - start), 1))
    for row in rows.values():
        row["ms"] = statistics.median(row["times_ms"])
    return rows


def pick(rows: dict[str, dict], allowed: list[Candidate]) -> Candidate:
    """The fastest allowed candidate that is faithful; Keras float32 if none is."""
    ok = [c for c in allowed if " ".join(c) in rows and (
        c == REFERENCE or (rows[" ".join(c)]["faithfulness"] or {}).get("faithful"))]
    return min(ok, key=lambda c: rows[" ".join(c)]["ms"]) if ok else REFERENCE


def _probe_and_window(bundle, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Normalised validation chips, a window batch of ``shape`` (n, side, side) made of them,
    and how many chips there were (0: a synthetic image of the training statistics)."""
    from pipeline.bundle import load_validation

    chips = load_validation(bundle.path)
    norm = bundle.metadata["normalization"]
    n, side, _ = shape
    if chips is None or chips.shape[-1] != len(norm["mean"]):
        rng = np.random.default_rng(0)
        mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])
        chips = rng.normal(mean, std, size=(PROBE_BATCH, 64, 64, len(mean)))
        count = 0
    else:
        count = len(chips)
    probe = np.stack([bundle.prepare(c) for c in chips]).astype(np.float32)
    # The window: the chips side by side, in turn, as many as it takes to cover it.
    down, across = -(-side // probe.shape[1]), -(-side // probe.shape[2])
    rows = [np.concatenate([probe[(r * across + c) % len(probe)] for c in range(across)], axis=1)
            for r in range(down)]
    mosaic = np.concatenate(rows, axis=0)[:side, :side]
    return probe, np.ascontiguousarray(np.broadcast_to(mosaic, (n,) + mosaic.shape)), count


def choose_engine(bundle, engine: str, precision: str, shape: tuple[int, int, int]) -> Choice:
    """Resolve ``auto`` in ``predict.engine`` / ``predict.precision`` for ``bundle`` (Keras,
    float32, as loaded) on windows of ``shape`` (n, side, side): from the record of an earlier
    measurement on this CPU where there is one, else by measuring (module doc)."""
    from pipeline.bundle import MODEL_FILE

    if tensorflow_gpu():  # the exported engines here run on the CPU
        allowed = [c for c in candidates(engine, precision) if c[0] == "keras"] or [REFERENCE]
        return Choice(*allowed[0], {"reason": "Keras on the GPU that TensorFlow sees"}, None)
    model_path = Path(bundle.path) / MODEL_FILE
    probe, window, chips = _probe_and_window(bundle, shape)
    allowed = candidates(engine, precision)
    if not chips:  # no validation chips: a lossy precision cannot be shown to keep the cars
        allowed = [c for c in allowed if c[1] == "float32"] or [REFERENCE]
    if len(allowed) == 1:
        return Choice(*allowed[0], {"reason": "the only candidate"}, None)
    key = choice_key(model_path, allowed, shape, chips)
    name = "choice-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    for root in [*cache_roots(model_path), process_cache()]:
        path = root / f"{name}.json"
        try:
            # Dask workers starting together: one measures, the others wait for its record.
            with folder_lock(root, "engine choice", doing="measured into", level=logging.INFO):
                record = read_json_if_any(path) or {}
                if record.get("key") != key or tuple(record.get("chosen", ())) not in (*allowed, REFERENCE):
                    record = _measure_record(bundle, allowed, probe, window, key, path)
                    write_json(path, record)
        except OSError:  # a read-only folder: the next one
            continue
        choice = Choice(*record["chosen"], record, path)
        log.info("predict: auto runs %s (measured on %s, %s; %s)", choice.summary,
                 key["cpu"]["model"], record.get("measured_at", "?"), path)
        return choice
    raise AssertionError("unreachable: the process cache is always writable")


def _measure_record(bundle, allowed: list[Candidate], probe: np.ndarray, window: np.ndarray,
                    key: dict, path: Path) -> dict:
    from pipeline.bundle import MODEL_FILE

    log.info("predict: measuring %s on %d x %d px windows, once for this CPU and model "
             "(cached in %s)", ", ".join(" ".join(c) for c in allowed), window.shape[1],
             window.shape[2], path.parent)
    models, failed = {REFERENCE: bundle.model}, {}
    for cand in allowed:
        if cand == REFERENCE:
            continue
        try:
            models[cand] = engine_model(bundle.model, Path(bundle.path) / MODEL_FILE, *cand)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot run is no candidate
            failed[" ".join(cand)] = first_line(exc)
            log.warning("predict: %s cannot run here (%s); not a candidate", " ".join(cand),
                        first_line(exc))
    load_before = os.getloadavg()
    post = bundle.metadata.get("postprocess") or {}
    cars = {"threshold": bundle.threshold, "gsd": bundle.gsd or DEFAULT_GSD,
            "min_area_m2": post.get("min_area_m2") or 0.0}
    rows = measure(bundle.model, models, probe, window, cars=cars)
    chosen = pick(rows, allowed)
    for cand, row in rows.items():
        log.info("predict: %-22s %8.0f ms per window batch%s", cand, row["ms"],
                 "" if row["faithfulness"] is None else
                 f", {'faithful' if row['faithfulness']['faithful'] else 'NOT faithful'} "
                 f"({row['faithfulness']})")
    return {"key": key, "chosen": list(chosen), "candidates": rows, "failed": failed,
            "load": [round(v, 2) for v in (*load_before, *os.getloadavg())],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
