"""Run a stage over a batch of scenes: skip the ones that are up to date, send the rest to Dask.

The default is an embedded ``LocalCluster`` sized to the machine; ``distributed.scheduler`` (make
``DASK_SCHEDULER=tcp://host:8786``) sends the same tasks to an existing cluster. A failing scene is
retried, then reported; the other scenes complete. Outputs are written atomically by the stages,
so a failed scene leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DistributedConfig
from pipeline.errors import InputError, first_line
from pipeline.files import progress_bar, stage_log, write_json
from pipeline.scenes import scene_name

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What happened to each item of a batch: seconds taken, or the error it ended with."""

    done: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def run_one(func: Callable, item: Any, args: tuple, kwargs: dict) -> float:
    """Run ``func(item, *args, **kwargs)`` and return its wall time in seconds.

    Bad input (InputError) is deterministic, so it is returned as a message, not raised:
    retrying it would only repeat the same failure.
    """
    start = time.perf_counter()
    try:
        func(item, *args, **kwargs)
    except InputError as exc:
        return f"{exc}"  # type: ignore[return-value]
    except Exception as exc:
        # A full disk does not get better by retrying: the scene's one line says so. GDAL does
        # not always chain the reason into the exception, so the output folder is looked at.
        full = _full_disk([a for a in args if isinstance(a, Path)])
        if first_line(exc) == "no space left on device" or full is not None:
            return f"{full or item}: no space left on device"  # type: ignore[return-value]
        raise
    return time.perf_counter() - start


# Below this much free space, a failed write is taken to be a full disk.
FULL_DISK_BYTES = 1 << 20


def _full_disk(folders: list[Path]) -> Path | None:
    import shutil

    for folder in folders:
        if folder.is_dir() and shutil.disk_usage(folder).free < FULL_DISK_BYTES:
            return folder
    return None


# How long to wait for an existing scheduler before telling the user it is not there.
CONNECT_TIMEOUT = "20s"


def _client(cfg: DistributedConfig, n_items: int | None = None):
    from dask.distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            return Client(cfg.scheduler, timeout=CONNECT_TIMEOUT), None
        except (OSError, TimeoutError) as exc:
            raise InputError(f"{cfg.scheduler}: no Dask scheduler answers at this address "
                             f"({exc.__class__.__name__}); start one with `dask scheduler` or "
                             "leave DASK_SCHEDULER empty for a local cluster") from None
    workers = cfg.workers or os.cpu_count() or 1
    # More workers than scenes would only start processes (each loading the model) that idle.
    workers = min(workers, n_items) if n_items else workers
    cluster = LocalCluster(n_workers=workers, threads_per_worker=cfg.threads_per_worker,
                           processes=True, dashboard_address=None, env=worker_env(workers),
                           silence_logs=_dask_log_level())
    return Client(cluster), cluster


def _dask_log_level() -> int:
    """The level Dask's config asks for (the CLI sets "critical" unless --debug).

    A LocalCluster sets its nannies' and workers' loggers to this; its own default (WARNING)
    would let a shutdown's heartbeat traceback through.
    """
    import dask

    level = logging.getLevelName(str(dask.config.get("logging.distributed", "warning")).upper())
    return level if isinstance(level, int) else logging.WARNING


def worker_env(workers: int) -> dict[str, str]:
    """Environment of each local worker process: its share of the cores, and quiet.

    Each worker loads its own TensorFlow, which by default takes every core (and, on a GPU,
    all its memory): N workers would oversubscribe the CPU N times.
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return {"OMP_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads,
            "TF_NUM_INTEROP_THREADS": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true",
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
            "DASK_LOGGING__DISTRIBUTED": os.environ.get("DASK_LOGGING__DISTRIBUTED", "critical")}


def run_batch(func: Callable, items: Sequence[Any], *, args: tuple = (), kwargs: dict | None = None,
              cfg: DistributedConfig, name: Callable[[Any], str] = lambda i: Path(i).stem,
              prepare: Callable[[], None] | None = None) -> BatchResult:
    """Run ``func`` on every item, on Dask when there is more than one worker's worth of work.

    ``prepare`` (e.g. a quiet import of Keras) runs once in this process or on every worker.
    """
    kwargs = kwargs or {}
    result = BatchResult()
    serial = cfg.scheduler is None and (len(items) <= 1 or (cfg.workers or os.cpu_count()) == 1)
    progress = _progress(len(items), getattr(func, "__name__", "batch"))
    if serial:
        if prepare is not None:
            prepare()
        for item in items:
            for attempt in range(cfg.retries + 1):
                try:
                    outcome = run_one(func, item, args, kwargs)
                    break
                except Exception as exc:  # retried, then reported; other scenes go on
                    outcome = exc
                    log.warning("%s: attempt %d failed: %s", name(item), attempt + 1,
                                first_line(exc))
                    log.debug("%s", traceback.format_exc())
            _record(result, name(item), outcome)
            progress.update()
        progress.close()
        return result

    from dask.distributed import as_completed

    client, cluster = _client(cfg, len(items))
    # A fresh token per batch: a long-lived cluster must never hand back an earlier batch's
    # result for a key it still holds.
    token = uuid.uuid4().hex[:8]
    try:
        if prepare is not None:
            client.run(prepare)
        futures = {client.submit(run_one, func, item, args, kwargs, pure=False,
                                 retries=cfg.retries,
                                 key=f"{func.__name__}-{name(item)}-{token}"): name(item)
                   for item in items}
        for i, future in enumerate(as_completed(futures), 1):
            key = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # the task's own exception, after its retries
                outcome = exc
            _record(result, key, outcome)
            progress.update()
            log.info("%s: %s (%d of %d)", key,
                     "done" if key in result.done else "failed", i, len(futures))
    finally:
        progress.close()
        client.close()
        if cluster is not None:
            cluster.close()
    # Report in batch order, not in the order the workers happened to finish.
    order = {name(item): i for i, item in enumerate(items)}
    result.done = dict(sorted(result.done.items(), key=lambda kv: order.get(kv[0], 0)))
    result.failed = dict(sorted(result.failed.items(), key=lambda kv: order.get(kv[0], 0)))
    return result


def _progress(total: int, desc: str):
    return progress_bar(total, desc, "scene")


def _record(result: BatchResult, key: str, outcome: Any) -> None:
    if isinstance(outcome, float):
        result.done[key] = outcome
    elif isinstance(outcome, BaseException):
        result.failed[key] = f"{outcome.__class__.__name__}: {first_line(outcome)}"
    else:
        result.failed[key] = str(outcome)


def run_items(stage: str, func: Callable, items: Sequence[Any], *, args: tuple, kwargs: dict,
              cfg: DistributedConfig, name: Callable[[Any], str] = scene_name,
              log_dir: Path | None = None, prepare: Callable[[], None] | None = None
              ) -> BatchResult:
    """Run a per-scene stage over ``items`` (the stale ones; :mod:`pipeline.runner` chose them).

    Each finished item's time, or its error, goes to ``log_dir/<scene>.<stage>.json`` for the
    summary table, and each error to stderr as one line.
    """
    # Heavy set-up (importing Keras) only when there is work, and on every worker.
    result = run_batch(func, items, args=args, kwargs=kwargs, cfg=cfg, name=name,
                       prepare=prepare)
    if log_dir is not None:
        for key, seconds in result.done.items():
            write_json(stage_log(log_dir, key, stage), {"scene": key, "seconds": seconds,
                                                       "status": "ok"})
        for key, error in result.failed.items():
            write_json(stage_log(log_dir, key, stage), {"scene": key, "error": error,
                                                       "status": "failed"})
    for key, error in result.failed.items():
        print(f"error: {stage}: {key}: {error}", file=sys.stderr)
    return result
