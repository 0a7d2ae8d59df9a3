"""Where the texts a sample must not copy come from: the references the domain tokens were
trained on (memorisation) and every evaluation set that will be used (decontamination).

A synthesis run records them in its lineage.json (domino.core.lineage), the one provenance channel
curation reads: a run from a domain prompt inherits the training run's references.jsonl and
heldout.jsonl; a baseline run (few_shot, zero_shot, magpie) names its domain config, from which the
same split is rebuilt here; both name the backbone the samples were drawn from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from domino.core import lineage
from domino.core.provenance import file_sha256
from domino.core.records import iter_jsonl, read_jsonl

log = logging.getLogger(__name__)
BENCHMARK_FORMATS = ("humaneval", "mbpp", "livecodebench", "codecontests")


def run_sources(samples_path: str | Path) -> dict[str, Any]:
    """{"references": path|records|None, "heldout": path|records|None, "backbone": dict|None,
    "fingerprint": str|None, "backbone_unknown": bool} from the lineage.json of the run that wrote
    `samples_path` (all None for a file without one). A lineage that names another sample file of the
    directory is not this file's; one whose sample file has the same name is (the directory was moved
    or copied)."""
    lin = lineage.read(samples_path)
    if lin.get("samples") and Path(lin["samples"]).name != Path(samples_path).name:
        lin = {}
    out = {"references": lin.get("references"), "heldout": lin.get("heldout"), "backbone": lin.get("backbone"),
           "fingerprint": lin.get("samples_fingerprint"),
           # written before lineage.json named the backbone: the samples' model is unknown here
           "backbone_unknown": bool(lin.get("samples")) and "backbone" not in lin}
    if out["references"] is None and lin.get("domain"):
        from domino.core.domains import load_domain
        out["references"], out["heldout"] = load_domain(**lin["domain"])
    out["heldout"] = _unless_empty(out["heldout"], lineage.lineage_path(samples_path))
    return out


def _unless_empty(held: str | list | None, lineage_file: Path) -> str | list | None:
    """A domain without a held-out split (domain=jsonl with every record a reference) leaves an empty
    heldout.jsonl: there is nothing to decontaminate against, which is a note, not an error."""
    empty = held is not None and (len(held) == 0 if isinstance(held, list) else
                                  Path(held).exists() and not any(True for _ in iter_jsonl(held)))
    if not empty:
        return held
    log.warning("curation: the run behind %s has an empty held-out split (%s): decontamination skips it",
                lineage_file, held if not isinstance(held, list) else "no held-out records")
    return None


def load_texts(spec: str | Path | list[dict] | None, what: str) -> list[dict] | None:
    """Records with `id` and `text` from a path (.jsonl) or a list already in memory."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what}: no such file {path}")
        recs = read_jsonl(path, required=("text",))
    else:
        recs = list(spec)
    return [{"id": str(r.get("id", r.get("task_id", i))), "text": r["text"]} for i, r in enumerate(recs)]


def eval_set_spec(spec: str | dict) -> dict:
    """Normalise an eval-set entry: "humaneval" | "<file>.jsonl" | {name, format, path, fields}."""
    if isinstance(spec, str):
        spec = {"format": spec} if spec in BENCHMARK_FORMATS else {"format": "jsonl", "path": spec}
    spec = dict(spec)
    fmt = spec.get("format", "jsonl")
    if fmt not in BENCHMARK_FORMATS + ("jsonl",):
        raise ValueError(f"decontaminate eval set {spec}: format must be jsonl or one of {BENCHMARK_FORMATS}")
    if fmt == "jsonl" and not spec.get("path") and spec.get("records") is None:
        raise ValueError(f"decontaminate eval set {spec}: format=jsonl needs a path")
    default_fields = ["text"] if fmt == "jsonl" else ["prompt", "canonical_solution"]
    name = spec.get("name") or (Path(spec["path"]).stem if spec.get("path") and fmt == "jsonl" else fmt)
    return {"name": name, "format": fmt, "path": spec.get("path"), "fields": list(spec.get("fields") or default_fields),
            "limit": spec.get("limit"), "records": spec.get("records")}


def load_eval_items(spec: dict) -> list[tuple[str, str, str]]:
    """(item id, field, text) of one normalised eval-set spec. A benchmark is read with the
    evaluation stage's own reader, so decontamination sees exactly what evaluation measures."""
    if spec["format"] == "jsonl":
        if spec.get("records") is not None:
            recs = list(spec["records"])
        else:
            path = Path(spec["path"]).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"decontaminate eval set {spec['name']!r}: no such file {path}")
            recs = read_jsonl(path)
        recs = [{**r, "id": r.get("id", r.get("task_id", i))} for i, r in enumerate(recs)]
    else:
        from domino.core.benchmarks import load_benchmark
        recs = [{**p, "id": p["task_id"]} for p in load_benchmark(spec["format"], spec.get("path"))]
    if spec.get("limit"):
        recs = recs[: int(spec["limit"])]
    out = []
    for r in recs:
        for f in spec["fields"]:
            v = r.get(f)
            if isinstance(v, str) and v.strip():
                out.append((str(r["id"]), f, v))
    if not out:
        raise ValueError(f"decontaminate eval set {spec['name']!r}: no text in fields {spec['fields']}")
    return out


def describe(spec: Any) -> Any:
    """What a source contributes to a stage fingerprint: a path and its content hash, or the
    hash of in-memory records."""
    import hashlib
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        p = Path(spec).expanduser()
        return {"path": str(p), "sha256": file_hash(p) if p.exists() else None}
    if isinstance(spec, dict):
        return {k: describe(v) if k in ("path", "records") else v for k, v in spec.items()}
    blob = json.dumps(list(spec), sort_keys=True, default=str).encode()
    return {"records_sha256": hashlib.sha256(blob).hexdigest()[:16]}


def file_hash(path: str | Path) -> str:
    return file_sha256(path)[:16]
