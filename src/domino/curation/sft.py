"""Stage 9: curated records -> supervised fine-tuning data.

- `chat` (default): {"id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  (an optional system message first): the project's sft record.
- `alpaca`: {"id", "instruction", "input", "output"}.
Written as sft.jsonl and as a `datasets` dataset on disk (datasets.load_from_disk).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from domino.core.generation.chat import messages

FORMATS = ("chat", "alpaca")


def to_sft(rec: dict, fmt: str = "chat", user_template: str = "{text}", system: str | None = None) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"sft.format={fmt!r}: expected one of {FORMATS}")
    if not rec.get("response"):
        raise ValueError(f"curated record {rec.get('id')!r} has no response: enable the responses stage")
    prompt = user_template.format(text=rec["text"])
    if fmt == "alpaca":
        return {"id": rec["id"], "instruction": prompt, "input": "", "output": rec["response"]}
    return {"id": rec["id"], "messages": messages(prompt, system, rec["response"])}


def save_dataset(records: list[dict], out: str | Path) -> Path:
    from datasets import Dataset
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(records).save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
