"""The output directory of a synthesis run, and how a rerun continues it.

`samples.jsonl` is appended and flushed record by record. `samples.meta.json` beside it stores the
fingerprint of everything that decides what sample i is (method, domain tokens, backbone,
sampling settings, seed, engine settings) but not `n`: rerunning the same command continues
where it stopped, a larger `n` extends the set, and a different configuration refuses instead of
mixing two distributions in one file (unless overwrite=true, which starts over). The run holds the
directory's lock (domino.core.locking) while it writes: a second writer is refused, not interleaved.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from domino.core.provenance import json_hash
from domino.core.records import JsonlStore, iter_jsonl, write_text_atomic

log = logging.getLogger(__name__)
SAMPLES = "samples.jsonl"
META = "samples.meta.json"
DATASET = "samples_dataset"


def sample_id(method: str, index: int) -> str:
    return f"{method}-{index:07d}"


class SampleStore:
    """Open (or continue) the samples of one configuration in `out_dir`."""

    def __init__(self, out_dir: str | Path, inputs: dict[str, Any], meta: dict[str, Any],
                 overwrite: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path, self.meta_path = self.dir / SAMPLES, self.dir / META
        self.fingerprint = json_hash(inputs)
        if overwrite:
            for p in (self.path, self.meta_path):
                p.unlink(missing_ok=True)
            shutil.rmtree(self.dir / DATASET, ignore_errors=True)
        elif self.meta_path.exists():
            old = json.loads(self.meta_path.read_text())
            if old.get("fingerprint") != self.fingerprint:
                diff = _diff(old.get("inputs", {}), inputs)
                raise FileExistsError(
                    f"{self.path} was produced by a different configuration (fingerprint "
                    f"{old.get('fingerprint')} != {self.fingerprint}; differs in: {', '.join(diff) or '?'}). "
                    "Use another output_dir, or overwrite=true to delete it and start over.")
        elif self.path.exists() and self.path.stat().st_size > 0:
            raise FileExistsError(f"{self.path} exists without {META}: cannot tell which configuration "
                                  "produced it. Use another output_dir, or overwrite=true.")
        if not self.meta_path.exists():
            write_text_atomic(self.meta_path, json.dumps(
                {"fingerprint": self.fingerprint, "inputs": inputs, **meta,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))
        self._store = JsonlStore(self.path, key="id")  # cuts a line torn by a crash; unique ids
        self.done: set[str] = self._store.keys

    def write(self, rec: dict[str, Any]) -> None:
        if not self._store.add(rec):
            raise ValueError(f"sample {rec['id']} is already in {self.path}")

    def close(self) -> None:
        self._store.close()

    def sort_by_index(self) -> bool:
        """Put the file's lines in sample-index order (stable; an atomic rewrite, only when they
        are not): continuous batching writes each sample as it finishes. True if it rewrote."""
        if not self.path.exists():
            return False
        rows = [(rec.get("source", {}).get("index", 0), line) for line, rec in iter_jsonl(self.path)]
        order = [i for i, _ in rows]
        if order == sorted(order):
            return False
        lines = self.path.read_text(encoding="utf-8").split("\n")  # iter_jsonl's line numbers: \n only
        write_text_atomic(self.path, "".join(lines[ln - 1] + "\n" for _, ln in sorted(rows, key=lambda r: r[0])))
        return True

    def update_meta(self, **fields: Any) -> None:
        meta = json.loads(self.meta_path.read_text())
        meta.update(fields)
        write_text_atomic(self.meta_path, json.dumps(meta, indent=2, default=str))

    def save_dataset(self) -> Path:
        """The samples as a `datasets` dataset on disk (`datasets.load_from_disk`)."""
        from datasets import Dataset
        recs = [r for _, r in iter_jsonl(self.path)]
        out = self.dir / DATASET
        shutil.rmtree(out, ignore_errors=True)
        # nested provenance is kept as a JSON string: per-method keys differ, Arrow wants one schema
        Dataset.from_list([{**r, "source": json.dumps(r.get("source", {}), sort_keys=True)} for r in recs]
                          ).save_to_disk(str(out))
        return out


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
            out.append(f"{prefix}{k} ({va!r} -> {vb!r})")
    return out
