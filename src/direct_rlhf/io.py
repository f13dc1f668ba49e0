"""File I/O with the two guarantees every stage relies on.

1. Reading: a bad line is reported as `file:line: problem` (UserError), never a traceback.
2. Writing: nothing is half-written. Files and whole folders are written next to their final
   place and renamed into it (`os.replace` is atomic on one filesystem), so a killed process
   leaves either the old artifact or the new one.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, streamed (a preference file can be hundreds of MB);
    bytes that are not UTF-8 are reported by line and offset in the file. A byte-order mark at the
    start of the file (Windows editors write one) is not part of the first line."""
    path, offset = Path(path), 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {offset + err.start}); "
                                f"re-save the file as UTF-8") from None
            offset += len(raw)


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; blank lines are skipped; `required` keys must be present."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows = []
    for lineno, line in text_lines(path):
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


# Files that mark a folder as one direct-rlhf wrote (a stage folder, checkpoint or toy world):
# only such a folder, or an empty one, is replaced by `atomic_dir`.
ARTIFACT_MARKERS = ("stage.json", "run_info.json", "manifest.json")


@contextlib.contextmanager
def _os_errors_as_user_errors(path: Path) -> Iterator[None]:
    """A place we cannot write (read-only, a file where a folder must be, no space) is the user's
    to fix: one line naming it, not a traceback."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{path}: cannot write here ({err.strerror or err})") from None


def check_writable_dir(path: str | Path) -> Path:
    """Check, before any work, that `path` is or can become a folder we can write into; returns
    it absolute. Probes the nearest existing folder with a real temporary file, because a
    permission check says nothing about read-only mounts or immutable folders."""
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{probe}: is not a folder, so {path} cannot be made")
    with _os_errors_as_user_errors(probe):
        fd, tmp = tempfile.mkstemp(prefix=".direct-rlhf-probe.", dir=probe)
        os.close(fd)
        os.remove(tmp)
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it over `path`."""
    path = Path(os.path.abspath(path))
    with _os_errors_as_user_errors(path):
        if path.is_dir():
            raise UserError(f"{path}: is a folder, where a file is to be written")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)
    try:
        yield tmp
        with _os_errors_as_user_errors(path):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_replaceable(path: str | Path) -> None:
    """`atomic_dir` replaces a folder whole: refuse one that is not ours, so that `--out ~/work`
    or `--out .` can never delete a user's files."""
    path = Path(os.path.abspath(path))
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder; choose another --out")
    if path == Path.cwd() or path in Path.cwd().parents:
        raise UserError(f"{path}: is the current folder or one above it; choose a new folder for --out")
    if any(path.iterdir()) and not any((path / m).is_file() for m in ARTIFACT_MARKERS):
        raise UserError(f"{path}: a folder with files direct-rlhf did not write; it would be replaced, so "
                        f"choose a new or empty folder (or remove it yourself)")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.

    The old folder (if any) is moved aside first and deleted after the rename, so at every
    instant `path` is either absent, the old complete folder, or the new complete folder. Only a
    folder direct-rlhf wrote (or an empty one) is replaced (`check_replaceable`).
    """
    path = Path(os.path.abspath(path))
    check_replaceable(path)
    with _os_errors_as_user_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o755)
    try:
        yield tmp
        old = None
        with _os_errors_as_user_errors(path):
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
