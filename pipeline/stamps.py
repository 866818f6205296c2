"""Freshness by identity: what each output was made from, and the one rule that says it is stale.

A stage's manifest (``<folder>/.carseg.<stage>.json``, beside the folder's lock) lists, for each
item it made (a scene, or ``"*"`` for a stage with one set of outputs), the files it wrote and
what they were made from: each input file's identity, the digest of the stage's settings and,
where a model is involved, the model's sha256. An item is fresh when every output it lists is
there and every input is the same as when it was made.

"The same" is decided by content, not by time: a file whose size, mtime, inode and ctime are
all unchanged is the same file; where any of those moved (``cp -p`` over a scene, ``mv``,
``rsync -a``, an unzip, a copied project), its sha256 decides. So a scene replaced by another
file with an older mtime is redone, and a project copied elsewhere is not. Make's mtime rule
(``touch`` redoes) does not hold here: ``--force`` redoes on purpose.

The manifest is also the list of what the pipeline wrote: pruning and ``make clean`` remove only
the files a manifest names, never anything else a user keeps in an output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.files import file_sha256, read_json_if_any, write_json

MANIFEST_VERSION = 1
# The one item of a stage with one set of outputs (index, train, batch, evaluate, report).
STAGE_ITEM = "*"
# Files of the stage as a whole (its settings stamp, summary.csv): listed so clean finds them,
# never planned, never pruned as "gone".
STAGE_FILES = ".files"


def manifest_path(folder: Path | str, stage: str) -> Path:
    """``<folder>/.carseg.<stage>.json``: hidden, so no scene or vector listing takes it."""
    return Path(folder) / f".carseg.{stage}.json"


def digest(data: Any) -> str:
    """A stable fingerprint of JSON-able data (settings, a list of names)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def identity(path: Path | str) -> dict | None:
    """What makes a file the file it is: its stat and its content hash (None when absent).

    Inputs are files (a folder's stage writes an index file last, and that file is the input).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns, "sha256": file_sha256(path)}


def same(recorded: Any, path: Path | str) -> bool:
    """Whether the file at ``path`` is the one ``recorded`` by :func:`identity`.

    The hash is read only when the stat changed, so a rerun with nothing to do reads no data.
    """
    path = Path(path)
    if recorded is None:
        return not path.exists()
    if not isinstance(recorded, dict):
        return False
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not path.is_file() or st.st_size != recorded.get("size"):
        return False
    if (st.st_mtime_ns, st.st_ino, st.st_ctime_ns) == (
            recorded.get("mtime_ns"), recorded.get("ino"), recorded.get("ctime_ns")):
        return True
    return file_sha256(path) == recorded.get("sha256")


@dataclass
class Made:
    """One item of a manifest: the outputs (relative to the manifest's folder) and their
    sources (``inputs``: role -> identity, or a digest string for settings and models)."""

    outputs: list[str]
    inputs: dict[str, Any] | None = None  # None: started, never finished (so stale)

    def fresh(self, inputs: dict[str, Any], root: Path) -> bool:
        """Whether these outputs exist and were made from exactly ``inputs``.

        Args:
            inputs: role -> a Path (compared by identity) or a string (compared as is).
        """
        if self.inputs is None or set(self.inputs) != set(inputs):
            return False
        if not all((root / o).exists() for o in self.outputs):
            return False
        for role, now in inputs.items():
            was = self.inputs[role]
            if isinstance(now, Path):
                if not same(was, now):
                    return False
            elif was != now:
                return False
        return True


def record(inputs: dict[str, Any]) -> dict[str, Any]:
    """The identities of ``inputs`` (role -> Path or string) as a manifest stores them."""
    return {role: identity(v) if isinstance(v, Path) else v for role, v in inputs.items()}


@dataclass
class Manifest:
    """A stage's record of what it wrote into one folder, and from what."""

    folder: Path
    stage: str
    items: dict[str, Made] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return manifest_path(self.folder, self.stage)

    @classmethod
    def load(cls, folder: Path | str, stage: str) -> Manifest:
        folder = Path(folder)
        data = read_json_if_any(manifest_path(folder, stage), default=None)
        manifest = cls(folder, stage)
        if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION:
            for key, entry in data.get("items", {}).items():
                manifest.items[key] = Made(list(entry.get("outputs", [])), entry.get("inputs"))
        return manifest

    def save(self) -> Path:
        data = {"version": MANIFEST_VERSION, "stage": self.stage,
                "items": {k: {"outputs": m.outputs, "inputs": m.inputs}
                          for k, m in sorted(self.items.items())}}
        if not self.items:
            self.path.unlink(missing_ok=True)
            return self.path
        current = read_json_if_any(self.path, default=None)
        if current != json.loads(json.dumps(data, default=str)):
            write_json(self.path, data)
        return self.path

    def fresh(self, key: str, inputs: dict[str, Any]) -> bool:
        made = self.items.get(key)
        return made is not None and made.fresh(inputs, self.folder)

    def owned(self) -> set[str]:
        """Every output path (relative) that some item of this manifest lists."""
        return {o for m in self.items.values() for o in m.outputs}

    def forget(self, key: str, *, keep: set[str] = frozenset()) -> list[Path]:
        """Remove item ``key`` and delete the outputs it lists (but not those in ``keep``)."""
        made = self.items.pop(key, None)
        if made is None:
            return []
        removed = []
        for rel in made.outputs:
            if rel in keep or rel in self.owned():
                continue  # another item (or the new run) still lists it
            path = self.folder / rel
            if remove_path(path):
                removed.append(path)
        return removed


def remove_path(path: Path) -> bool:
    """Delete one file or folder the pipeline wrote; True when something was removed."""
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path)
        return True
    return False


def prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``stop`` while they are empty."""
    folder, stop = Path(folder), Path(stop)
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)
