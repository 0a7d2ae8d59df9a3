"""JSON Lines I/O: every bad record is reported with its file and line, and writers append and
flush as they go so a crashed stage loses nothing it had produced.

One recovery rule for every append-only file (samples, curation model stages, completions): a
last line without its newline was being written when the process died; it is cut off when the
file is opened for appending, with a warning naming the file, and the record is produced again.
`JsonlStore` adds a unique key per record, so a resumed or repeated write never duplicates one:

    from domino.core.records import JsonlStore
    with JsonlStore(path, key=lambda r: (r["task_id"], r["sample_idx"]), keep_records=True) as store:
        store.add(rec)          # False (and nothing written) when that key is already there
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A record that cannot be used, with the place it came from."""

    def __init__(self, source: str | os.PathLike, line: int | None, message: str):
        where = f"{source}:{line}" if line is not None else str(source)
        super().__init__(f"{where}: {message}")
        self.source, self.line = str(source), line


def _json_msg(e: json.JSONDecodeError) -> str:
    # some of json's messages end in "at" ("Unterminated string starting at"): no "at at column"
    return e.msg[:-3] if e.msg.endswith(" at") else e.msg


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(path, lineno, f"not valid UTF-8: byte {raw[e.start:e.start + 1]!r} at column "
                                        f"{e.start + 1} (byte offset {offset + e.start} in the file)") from None


def iter_jsonl(path: str | os.PathLike, required: Iterable[str] = (),
               skip_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record). Blank lines are skipped; anything else that is not a JSON
    object (or not UTF-8), or lacks a required field, raises RecordError naming file, line and
    column. `skip_torn_tail`: a last line without its newline that does not parse (a crashed
    writer's) is skipped with a warning instead, leaving the file as it is (readers of another
    run's file; a writer cuts it with recover_torn_tail)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    required = tuple(required)
    offset = 0
    with _open_bytes(path) as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            raw = _decode(raw_bytes, path, lineno, offset)
            offset += len(raw_bytes)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                if skip_torn_tail and not raw_bytes.endswith(b"\n"):
                    log.warning("%s:%d: skipping a torn last line (%d bytes without a newline, left by an "
                                "interrupted write)", path, lineno, len(raw_bytes))
                    return
                torn = "" if raw_bytes.endswith(b"\n") else (
                    "; it is the last line and has no newline: the writer was interrupted (rerun it to finish)")
                # the column in this line: json counts a failure at the line's end (a missing
                # brace) on the next line of its input, after the newline
                col = min(e.pos, len(raw.rstrip("\r\n"))) + 1
                if raw.strip() in ("[", "[{") or (raw.lstrip().startswith("[") and lineno == 1):
                    raise RecordError(path, lineno, "this is a JSON array, not JSON Lines (one object per line): "
                                                    "write one object per line, or give the file a .json name "
                                                    "where a .json list is read") from None
                raise RecordError(path, lineno, f"malformed JSON ({_json_msg(e)} at column {col}){torn}") from None
            if isinstance(rec, list) and lineno == 1:
                raise RecordError(path, lineno, "a JSON array on one line, not JSON Lines (one object per line): "
                                                "write one object per line, or give the file a .json name where "
                                                "a .json list is read")
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
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise RecordError(path, line, f"not valid UTF-8: byte {raw[e.start:e.start + 1]!r} at byte offset "
                                          f"{e.start}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, f"malformed JSON ({_json_msg(e)} at column {e.colno})") from None
        if not isinstance(data, list):
            raise RecordError(path, None, "a .json reference file must hold a list of objects")
        for i, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise RecordError(path, i, f"item {i} is not a JSON object")
            yield i, rec
    else:
        yield from iter_jsonl(path)


def read_json_object(path: str | os.PathLike, hint: str = "the file is damaged or truncated") -> dict:
    """A JSON file holding one object (metadata, lineage); any other content is an error naming
    the file and `hint` (what to do about it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {hint}")
    return data


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole file so that a reader (or a rerun after a kill) sees the old or the new
    content, never a truncated one: temp file beside it, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def publish_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, names: Iterable[str]) -> None:
    """Copy the files `names` of `src_dir` into `dst_dir`, replacing it whole: they are copied into
    `<dst_dir>.tmp` first and renamed, so a reader (or a rerun after a kill) finds all of them or
    no `dst_dir`. A missing file raises FileNotFoundError before `dst_dir` is touched."""
    import shutil
    src, dst = Path(src_dir), Path(dst_dir)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in names:
        shutil.copy2(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


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
        fh.flush()
        os.fsync(fh.fileno())  # the rename must never publish a file whose content is not on disk
    os.replace(tmp, path)
    return n


class JsonlAppender:
    """Append records one at a time, flushed (and fsynced every `sync_every`) so that a crash
    loses at most the record being written. A torn last line from a previous crash is cut off
    on open (recover_torn_tail)."""

    def __init__(self, path: str | os.PathLike, sync_every: int = 16):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover_torn_tail(self.path)
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


def recover_torn_tail(path: str | os.PathLike) -> int:
    """Cut a last line that lacks its newline (a write interrupted by a crash) and say so in the
    log. Returns the number of bytes dropped (0: the file was whole, or does not exist)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # scan back to the last newline in blocks: a file can be large, its torn line is not
        pos, cut = size, 0
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            block = fh.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        fh.seek(0)
        line = fh.read(cut).count(b"\n") + 1
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s:%d: dropped a torn last line (%d bytes without a newline, left by an interrupted "
                "write); that record is produced again", path, line, size - cut)
    return size - cut


def _key_fn(key: str | Callable[[dict], Hashable]) -> Callable[[dict], Hashable]:
    if callable(key):
        return key
    return lambda rec: rec[key]


class JsonlStore:
    """An append-only JSONL file of records with a unique key each: the one store every resumable
    stage writes through. Opening it recovers a torn tail (recover_torn_tail) and reads the keys
    already there (a duplicate key in the file is an error naming its line); `add` writes a record
    only if its key is new, so a resumed run, or records reused from an earlier run, can never be
    written twice. `keep_records=True` also keeps the records themselves (`records`, by key)."""

    def __init__(self, path: str | os.PathLike, key: str | Callable[[dict], Hashable] = "id",
                 keep_records: bool = False, sync_every: int = 16):
        self.path = Path(path)
        self._key = _key_fn(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.n_recovered_bytes = recover_torn_tail(self.path)
        self.keys: set = set()
        self.records: dict = {}
        if self.path.exists():
            for lineno, rec in iter_jsonl(self.path):
                try:
                    k = self._key(rec)
                except (KeyError, TypeError) as e:
                    raise RecordError(self.path, lineno, f"record has no key ({e}); present: {sorted(rec)}") from None
                if k in self.keys:
                    raise RecordError(self.path, lineno, f"duplicate record {k!r}")
                self.keys.add(k)
                if keep_records:
                    self.records[k] = rec
        self._keep = keep_records
        self._sync_every = sync_every
        self._appender: JsonlAppender | None = None  # opened on the first add: reading holds no handle
        self.path.touch(exist_ok=True)  # the file exists from the start, empty if nothing is added

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, rec: dict) -> Hashable:
        return self._key(rec)

    def add(self, rec: dict[str, Any]) -> bool:
        """Append `rec` unless its key is already stored; True when it was written."""
        k = self._key(rec)
        if k in self.keys:
            return False
        if self._appender is None:
            self._appender = JsonlAppender(self.path, sync_every=self._sync_every)
        self._appender.write(rec)
        self.keys.add(k)
        if self._keep:
            self.records[k] = rec
        return True

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
