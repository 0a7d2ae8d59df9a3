"""JSON Lines I/O: every bad record is reported with its file and line, and writers append and
flush as they go so a crashed stage loses nothing it had produced."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


class RecordError(ValueError):
    """A record that cannot be used, with the place it came from."""

    def __init__(self, source: str | os.PathLike, line: int | None, message: str):
        where = f"{source}:{line}" if line is not None else str(source)
        super().__init__(f"{where}: {message}")
        self.source, self.line = str(source), line


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record). Blank lines are skipped; anything else that is not a JSON
    object, or lacks a required field, raises RecordError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    required = tuple(required)
    with _open_text(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise RecordError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise RecordError(path, lineno, f"missing field(s) {missing}; present: {sorted(rec)}")
            yield lineno, rec


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path, required)]


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(row number, record) from a .jsonl(.gz), .json (a list) or .parquet file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, rec
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, f"malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise RecordError(path, None, "a .json reference file must hold a list of objects")
        for i, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise RecordError(path, i, f"item {i} is not a JSON object")
            yield i, rec
    else:
        yield from iter_jsonl(path)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically (temp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


class JsonlAppender:
    """Append records one at a time, flushed (and fsynced every `sync_every`) so that a crash
    loses at most the record being written. A torn last line from a previous crash is cut off
    on open."""

    def __init__(self, path: str | os.PathLike, sync_every: int = 16):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._sync_every, self._since_sync = sync_every, 0

    def write(self, rec: dict[str, Any]) -> None:
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        self._since_sync += 1
        if self._since_sync >= self._sync_every:
            os.fsync(self._fh.fileno())
            self._since_sync = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1  # 0 when the only line is torn
        fh.truncate(cut)
