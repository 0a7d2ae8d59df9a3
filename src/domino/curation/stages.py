"""The files of one curation stage and when it can be skipped or resumed.

Stage `i` named `s` writes, under the curation directory:
    {i:02d}_{s}.jsonl          records that passed (the next stage's input)
    {i:02d}_{s}.dropped.jsonl  records that did not, each with `dropped: {stage, reason, detail}`
    {i:02d}_{s}.meta.json      fingerprint, complete flag, counts
The fingerprint hashes the input file's content, the stage's config and whatever else decides
its output (reference/eval files, model). A complete stage with the same fingerprint is skipped;
an incomplete one with the same fingerprint is resumed (LLM stages append per record, so only
records without a verdict are processed); a different fingerprint starts the stage over. A last
line torn by a crash is cut off before the files are read (`recover`, domino.core.records'
one recovery rule), and that record is decided again.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from domino.core.provenance import json_hash
from domino.core.records import iter_jsonl, recover_torn_tail, write_jsonl, write_text_atomic

log = logging.getLogger(__name__)
VERSION = 1  # bump when a stage's semantics change: invalidates every stage output


def stage_fingerprint(*parts: Any) -> str:
    """What a stage's output depends on (its input's hash, its config, ...), with VERSION."""
    return json_hash([VERSION, *parts])


class StageFiles:
    def __init__(self, root: str | Path, index: int, name: str):
        self.root, self.index, self.name = Path(root), index, name
        stem = f"{index:02d}_{name}"
        self.kept = self.root / f"{stem}.jsonl"
        self.dropped = self.root / f"{stem}.dropped.jsonl"
        self.meta_path = self.root / f"{stem}.meta.json"

    def meta(self) -> dict | None:
        if not self.meta_path.exists():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except json.JSONDecodeError:
            return None  # torn by a crash mid-write (never: writes are atomic) -> redo

    def status(self, fp: str) -> str:
        """`done`, `partial` (resume) or `new` (any stale files removed)."""
        meta = self.meta()
        if meta and meta.get("fingerprint") == fp:
            if meta.get("complete") and self.kept.exists() and self.dropped.exists():
                return "done"
            return "partial"
        if meta or self.kept.exists() or self.dropped.exists():
            log.warning("curation stage %s: input or config changed (fingerprint %s -> %s), redoing it",
                        self.name, (meta or {}).get("fingerprint"), fp)
        self.reset()
        return "new"

    def recover(self) -> None:
        """Cut a torn last line off the kept/dropped files of an interrupted model stage."""
        for p in (self.kept, self.dropped):
            recover_torn_tail(p)

    def reset(self) -> None:
        for p in (self.kept, self.dropped, self.meta_path):
            p.unlink(missing_ok=True)

    def begin(self, fp: str, info: dict) -> None:
        self._t0 = time.time()
        self.write_meta({"stage": self.name, "fingerprint": fp, "complete": False, **info,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def finish(self, fp: str, info: dict, extra: dict | None = None) -> dict:
        started = (self.meta() or {}).get("started")
        meta = {"stage": self.name, "fingerprint": fp, "complete": True, **info, **self.count(),
                **(extra or {}), "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.time() - self._t0, 2) if hasattr(self, "_t0") else None}
        self.write_meta(meta)
        return meta

    def write_all(self, kept: list[dict], dropped: list[dict]) -> None:
        write_jsonl(self.dropped, dropped)
        write_jsonl(self.kept, kept)

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        for p in (self.kept, self.dropped):
            if p.exists():
                ids.update(r["id"] for _, r in iter_jsonl(p, required=("id",)))
        return ids

    def count(self) -> dict:
        n_out = sum(1 for _ in iter_jsonl(self.kept)) if self.kept.exists() else 0
        reasons: Counter = Counter()
        if self.dropped.exists():
            for _, r in iter_jsonl(self.dropped):
                reasons[(r.get("dropped") or {}).get("reason", "?")] += 1
        return {"n_out": n_out, "n_dropped": sum(reasons.values()), "reasons": dict(reasons.most_common())}

    def write_meta(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.meta_path, json.dumps(meta, indent=2, default=str))
