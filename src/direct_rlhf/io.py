"""File I/O with the two guarantees every stage relies on.

1. Reading: a bad line is reported as `file:line: problem` (UserError), never a traceback.
2. Writing: nothing is half-written. Files and whole folders are written next to their final
   place and renamed into it (`os.replace` is atomic on one filesystem), so a killed process
   leaves either the old artifact or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; blank lines are skipped; `required` keys must be present."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                for key in required:
                    if key not in row:
                        raise UserError(f"{path}:{lineno}: missing field '{key}'")
                row["_line"] = lineno
                rows.append(row)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return rows


def dumps(row: dict[str, Any]) -> str:
    """One canonical JSON line: sorted keys, so identical data gives identical bytes."""
    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")},
                      ensure_ascii=False, sort_keys=True)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; returns how many."""
    n = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.

    The old folder (if any) is moved aside first and deleted after the rename, so at every
    instant `path` is either absent, the old complete folder, or the new complete folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
