"""Stage caching: a stage's folder is reused when the inputs that made it are unchanged.

Each finished artifact folder holds `stage.json` with a key: a hash of the config sections and
upstream artifact keys the stage depends on. The folder is written atomically, so `stage.json`
exists only in complete folders; a killed stage simply runs again next time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

STAMP = "stage.json"


def cache_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """Content hash of a file, for keys that should follow data rather than how it was made. Read
    once per process while the file is unchanged on disk: a run's stages key the same data file
    several times (reward, SFT, PPO's prompts), and a preference set can be hundreds of MB."""
    st = os.stat(path)
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: an edited file is read again
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def is_fresh(folder: str | Path, key: str) -> bool:
    stamp = Path(folder) / STAMP
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def source_identity(source: str | Path | None) -> Any:
    """What a data setting contributes to a key: a local file by its contents (edited in place, the
    stage runs again; saved again unchanged, or moved, it is reused), anything else (a hub dataset
    id, a dataset folder) as written."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return ["file", file_digest(path)] if path.is_file() else str(source)


def model_identity(source: str | Path) -> Any:
    """What a model setting contributes to a key: one of our artifacts by its key, a GGUF file by its
    contents (replaced in place, the stages built on it run again), a folder or hub id as written."""
    key = read_key(source)
    if key:
        return key
    return source_identity(source) if str(source).endswith(".gguf") else str(source)


def read_key(folder: str | Path) -> str | None:
    try:
        return json.loads((Path(folder) / STAMP).read_text()).get("key")
    except (OSError, json.JSONDecodeError):
        return None


def stamp(folder: str | Path, key: str, **info: Any) -> None:
    (Path(folder) / STAMP).write_text(json.dumps({"key": key, **info}, indent=2, sort_keys=True, default=str))
