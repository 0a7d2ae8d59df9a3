"""Where an artifact came from: one flat record per output directory (`lineage.json`) that grows as
the data moves through the stages, so any output can be traced back to the domain prompt and the
references behind it, and a later stage can find what an earlier one left (evaluation finds the
held-out split of the training run behind an adapter).

    train        -> <run>/lineage.json        train_run, domain_prompt, domain_prompt_digest,
                                              references, heldout, reference_fingerprint, backbone_id
    synthesize   -> <out>/lineage.json        + samples, samples_method, samples_fingerprint
    curate       -> <out>/lineage.json        + curation_input, curated, sft (null without responses)
    finetune     -> <adapter>/lineage.json    + sft_sha256, adapter

Paths are absolute; a missing lineage (a file made by hand) reads as {}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from domino.core.records import read_json_object, write_text_atomic

FILE = "lineage.json"


def lineage_path(artifact: str | os.PathLike) -> Path:
    """The lineage file describing `artifact` (a directory, or a file in one)."""
    p = Path(artifact).expanduser()
    return p / FILE if p.is_dir() else p.with_name(FILE)


def read(artifact: str | os.PathLike | None) -> dict[str, Any]:
    if not artifact:
        return {}
    path = lineage_path(artifact)
    if not path.exists():
        return {}
    return read_json_object(path, "delete it or rerun the stage that wrote it")


def write(out_dir: str | os.PathLike, *parents: dict[str, Any], **fields: Any) -> Path:
    """<out_dir>/lineage.json = each parent's lineage, then `fields` (later wins), replacing what
    was there: a stage that starts over (overwrite=true, another ckpt into the same output_dir)
    leaves no key of its earlier inputs behind. Written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    for p in parents:
        record.update(p)
    record.update({k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in fields.items()})
    path = out_dir / FILE
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True, default=str))
    return path


def heldout_of(artifact: str | os.PathLike | None) -> str | None:
    """The held-out split of the training run behind `artifact` (an adapter, an SFT set, samples)."""
    held = read(artifact).get("heldout")
    return str(held) if held else None
