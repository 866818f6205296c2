"""Run a stage over a batch of scenes: skip the ones that are up to date, send the rest to Dask.

The default is an embedded ``LocalCluster`` sized to the machine; ``distributed.scheduler`` (make
``DASK_SCHEDULER=tcp://host:8786``) sends the same tasks to an existing cluster. A failing scene is
retried, then reported; the other scenes complete. Outputs are written atomically by the stages,
so a failed scene leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DistributedConfig
from pipeline.io import InputError, write_json

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What happened to each item of a batch: seconds taken, or the error it ended with."""

    done: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def is_fresh(outputs: Sequence[Path], inputs: Sequence[Path]) -> bool:
    """True when every output exists and is newer than every existing input (Make's rule)."""
    try:
        oldest_output = min(Path(p).stat().st_mtime for p in outputs)
    except (FileNotFoundError, ValueError):
        return False
    newest_input = max((Path(p).stat().st_mtime for p in inputs if Path(p).exists()), default=0)
    return oldest_output >= newest_input


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
    return time.perf_counter() - start


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
                           processes=True, dashboard_address=None)
    return Client(cluster), cluster


def run_batch(func: Callable, items: Sequence[Any], *, args: tuple = (), kwargs: dict | None = None,
              cfg: DistributedConfig, name: Callable[[Any], str] = lambda i: Path(i).stem
              ) -> BatchResult:
    """Run ``func`` on every item, on Dask when there is more than one worker's worth of work."""
    kwargs = kwargs or {}
    result = BatchResult()
    serial = cfg.scheduler is None and (len(items) <= 1 or (cfg.workers or os.cpu_count()) == 1)
    if serial:
        for item in items:
            for attempt in range(cfg.retries + 1):
                try:
                    outcome = run_one(func, item, args, kwargs)
                    break
                except Exception as exc:  # retried, then reported; other scenes go on
                    outcome = exc
                    log.warning("%s: attempt %d failed: %s", name(item), attempt + 1, exc)
                    log.debug("%s", traceback.format_exc())
            _record(result, name(item), outcome)
        return result

    from dask.distributed import as_completed

    client, cluster = _client(cfg, len(items))
    # A fresh token per batch: a long-lived cluster must never hand back an earlier batch's
    # result for a key it still holds.
    token = uuid.uuid4().hex[:8]
    try:
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
            log.info("%s: %s (%d of %d)", key,
                     "done" if key in result.done else "failed", i, len(futures))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    # Report in batch order, not in the order the workers happened to finish.
    order = {name(item): i for i, item in enumerate(items)}
    result.done = dict(sorted(result.done.items(), key=lambda kv: order.get(kv[0], 0)))
    result.failed = dict(sorted(result.failed.items(), key=lambda kv: order.get(kv[0], 0)))
    return result


def _record(result: BatchResult, key: str, outcome: Any) -> None:
    if isinstance(outcome, float):
        result.done[key] = outcome
    elif isinstance(outcome, BaseException):
        result.failed[key] = f"{outcome.__class__.__name__}: {outcome}"
    else:
        result.failed[key] = str(outcome)


def run_stage_batch(stage: str, func: Callable, items: Sequence[Path], *,
                    outputs: Callable[[Path], list[Path]], extra_inputs: Sequence[Path],
                    args: tuple, kwargs: dict, cfg: DistributedConfig, force: bool = False,
                    log_dir: Path | None = None, prepare: Callable[[], None] | None = None
                    ) -> int:
    """Run a per-scene stage over the stale items; return the CLI exit status.

    An item is stale when one of its outputs is missing or older than the item itself or one of
    ``extra_inputs`` (model, settings, labels). Each finished item's time, or its error, goes to
    ``log_dir/<scene>.<stage>.json`` for the summary table.
    """
    stale = [i for i in items if force or not is_fresh(outputs(i), [i, *extra_inputs])]
    if not stale:
        log.info("%s: all %d up to date", stage, len(items))
        return 0
    log.info("%s: %d of %d to do", stage, len(stale), len(items))
    if prepare is not None:
        prepare()  # heavy set-up (importing Keras) only when there is work
    name = (lambda i: i.parent.name) if stage == "masks" else (lambda i: Path(i).stem)
    result = run_batch(func, stale, args=args, kwargs=kwargs, cfg=cfg, name=name)
    if log_dir is not None:
        for key, seconds in result.done.items():
            write_json(log_dir / f"{key}.{stage}.json", {"scene": key, "seconds": seconds,
                                                        "status": "ok"})
        for key, error in result.failed.items():
            write_json(log_dir / f"{key}.{stage}.json", {"scene": key, "error": error,
                                                        "status": "failed"})
    for key, error in result.failed.items():
        print(f"error: {stage}: {key}: {error}", file=__import__("sys").stderr)
    return 2 if result.failed else 0
