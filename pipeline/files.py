"""Files the pipeline writes: atomic writes, swept temporaries, staged folders, locks, JSON.

Every output is written to a temporary name beside its target and moved into place with
``os.replace``: a crash leaves the old file or nothing, never half a file. One writer per
output folder at a time (:func:`folder_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, InputNotFound

log = logging.getLogger(__name__)

# === Atomic writes ===
# Temporaries live in a hidden folder beside their target, one subfolder per process, so no
# scene or chip listing ever sees them, and writers that put their own temporaries beside the
# file they write (rio-cogeo's tmpXXXX.tif) stay inside it too. A crashed process's subfolder
# is removed by the next writer into that folder.
TEMP_DIR = ".carseg-tmp"
_HOST = socket.gethostname().replace("-", "_")
_swept: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(folder: Path | str) -> int:
    """Remove the temporaries that crashed processes on this host left in ``folder``."""
    root = Path(folder) / TEMP_DIR
    removed = 0
    if not root.is_dir():
        return 0
    for entry in root.iterdir():
        host, _, rest = entry.name.partition("-")
        pid = rest.partition("-")[0]
        if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
            _remove(entry)
            removed += 1
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty: another process may be writing
    return removed


@contextlib.contextmanager
def temp_dir(parent: Path | str) -> Iterator[Path]:
    """A private scratch folder under ``parent/.carseg-tmp/``, removed on exit (or next run)."""
    parent = Path(parent)
    if parent not in _swept:
        sweep_temporaries(parent)
        _swept.add(parent)
    scratch = parent / TEMP_DIR / f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for _ in range(3):  # a sweeper in another process may remove the empty parent meanwhile
        try:
            scratch.mkdir(parents=True)
            break
        except FileNotFoundError:
            continue
    try:
        yield scratch
    finally:
        _remove(scratch)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path for ``target``; move it onto ``target`` only on success.

    The temporary keeps the target's suffix, so GDAL/OGR pick the right driver, but not its
    name: GDAL reads some characters of a file name (``;``) as options. Writers name layers
    explicitly (:func:`write_vector`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(target.parent) as scratch:
        tmp = scratch / f"part{target.suffix}"
        yield tmp
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, owned: Collection[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder for ``target``; swap it in for ``target`` on success.

    Args:
        owned: the names in ``target`` that this writer owns (None: all of them). Any other
            entry of the old folder (a user's note in OUT/evaluation) is carried over into
            the new one, never deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(target.parent) as scratch:
        tmp = scratch / target.name
        tmp.mkdir()
        yield tmp
        _swap_in(tmp, target, scratch / f"{target.name}.old", owned)  # .old goes with scratch


def _swap_in(new: Path, target: Path, old: Path, owned: Collection[str] | None) -> None:
    """Put folder ``new`` in place of ``target``; the replaced folder goes to ``old``."""
    if target.exists():
        if owned is not None:
            for entry in target.iterdir():
                if entry.name not in owned and not (new / entry.name).exists():
                    os.replace(entry, new / entry.name)
        os.replace(target, old)
    os.replace(new, target)


# A folder staged beside its target (same depth, so relative paths written inside it hold
# after the move): `.carseg-stage-<host>-<pid>-<token>-<name>`, swept like TEMP_DIR.
STAGE_PREFIX = ".carseg-stage-"


@contextlib.contextmanager
def staged_dir(target: Path | str, *, owned: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; swap it in for ``target`` as one unit.

    For a set of products that must change together (the batch's layers, mosaics and the
    catalog listing them): a failure part-way leaves the previous set whole. ``owned`` as
    in :func:`atomic_dir`.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for entry in parent.glob(f"{STAGE_PREFIX}*"):  # left by a killed run on this host
        host, pid = (entry.name[len(STAGE_PREFIX):].split("-") + ["", ""])[:2]
        if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
            _remove(entry)
    token = f"{STAGE_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new, old = parent / f"{token}-{target.name}", parent / f"{token}-old"
    new.mkdir()
    try:
        yield new
        _swap_in(new, target, old, owned)
    finally:
        _remove(new)
        _remove(old)


# === One writer per output folder ===
# Held (flock) by the process writing into a folder: CHIPS (tile, index), MASKS, OUT (predict,
# vectors, batch, evaluate), MODEL_DIR (train), a report folder. One name for every stage, so any
# two writers of one folder wait for each other, whichever stages they are; hidden, and no
# scene, chip or vector listing takes it for an output.
LOCK_FILE = ".carseg.lock"


@contextlib.contextmanager
def folder_lock(folder: Path | str, stage: str, *, doing: str = "written",
                level: int = logging.WARNING) -> Iterator[Path]:
    """Hold ``folder/.carseg.lock``: one process writing into ``folder`` at a time.

    A second run of a stage on the same folder (two ``make all`` started together) waits for
    the first, with one warning naming the folder and the other process, and then finds its
    scenes up to date: the outcome of running the two one after the other, and neither fails
    for a mere overlap. ``flock`` is released by the OS when its holder ends in any way,
    ``kill -9`` included, so the lock is never stale; the file stays, and only says who holds
    it while it is held. Taking it writes that name, so a command looks at whether it has
    anything to do before taking it: a rerun with nothing to do neither waits nor writes.

    A process takes at most one folder lock at a time (no stage nests two), so two runs can
    never deadlock.

    Args:
        folder: the output folder (created if need be).
        stage: the stage's name, for the warning.
        doing: what the holder does to the folder, for the warning ("is being <doing> by").
        level: of that line (INFO where waiting is the normal course, not an overlap to note).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.log(level, "%s: %s is being %s by %s; waiting for it to finish", stage, folder,
                    doing, _lock_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _lock_holder(fd: int) -> str:
    """Who holds a folder lock, as its holder wrote it ("process 123 on host").

    The file keeps the text of an earlier holder (one killed -9, say) until the new holder,
    just after taking the lock, writes its own; a holder named there that is dead on this host
    is such a leftover, so it is read again for a moment before saying "another process".
    """
    host = socket.gethostname()
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        words = text.split()
        if len(words) == 4 and words[0] == "process" and words[1].isdigit():
            if words[3] != host or _pid_alive(int(words[1])):
                return text
        time.sleep(0.05)
    return "another process"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def stage_log(log_dir: Path | str, scene: str, stage: str) -> Path:
    """``OUT/logs/<scene>.<stage>.json``: one scene's time or error in one batch stage."""
    return Path(log_dir) / f"{scene}.{stage}.json"


def write_json(path: Path | str, data: Any) -> Path:
    """Write JSON atomically (sorted keys, so identical data gives identical bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path | str, *, missing: str) -> Any:
    """Read a JSON file the pipeline wrote.

    Raises:
        InputError: the file is absent (``missing`` says what to run) or not valid JSON.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path}: not valid JSON") from None


def read_json_if_any(path: Path | str, default: Any = None) -> Any:
    """Read a JSON file the pipeline wrote where its absence is normal (a first run, no
    evaluation yet): ``default`` when it is absent or unreadable (a warning says which)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable; taken as absent", path)
        return default


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def json_differs(path: Path | str, data: Any) -> bool:
    """Whether :func:`write_if_changed` would write ``data`` to ``path`` (absent or other)."""
    path = Path(path)
    return not path.exists() or path.read_text() != _json_text(data)


def write_if_changed(path: Path | str, data: Any) -> bool:
    """Write JSON only when its content differs, so Make sees a new mtime only on real change."""
    if not json_differs(path, data):
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(_json_text(data))
    return True


def progress_bar(total: int, desc: str, unit: str):
    """A bar with an ETA for a long loop on a terminal; silent in logs, CI and make output."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False,
                disable=total < 2 or not sys.stderr.isatty())


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
