"""SFT records -> token ids with assistant-only labels, optional packing, and the DataModule.

Assistant spans are found in character space, not by re-tokenising prefixes: the conversation is
rendered once with the backbone's chat template, and for every assistant turn i the template is
also rendered up to turn i with `add_generation_prompt=True` (where the reply starts) and through
turn i (where the turn ends). Inside that region the labelled characters run from the reply's
content to the end of the end-of-turn token (the tokenizer's eos, e.g. `<|im_end|>`); whatever the
template puts after it (SmolLM2/Qwen: a newline) is not trained. Tokens are labelled when their
character offsets overlap that span, so a token that merges template text with the first
character of the reply (e.g. "\\n\\n" when a reply starts with a newline) is labelled too. This
works for any template with the prefix property (rendering a conversation prefix gives a prefix
of the full rendering) and needs no `{% generation %}` markers, which SmolLM2's template lacks.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from domino.core.batching import resumable_loader
from domino.core.provenance import file_sha256 as sha256_file  # noqa: F401 (the finetune provenance hash)
from domino.core.records import RecordError, iter_jsonl

log = logging.getLogger(__name__)
IGNORE = -100
ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------- records
def validate_record(rec: dict, source: str | os.PathLike, line: int) -> list[dict]:
    """The record's messages, checked: an optional leading system message, then user/assistant
    turns alternating, starting with user and ending with assistant, every content a non-empty
    string."""
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(source, line, "`messages` must be a non-empty list of {role, content}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(source, line, f"messages[{j}] must be an object with `role` and `content`")
        if m["role"] not in ROLES:
            raise RecordError(source, line, f"messages[{j}].role={m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise RecordError(source, line, f"messages[{j}].content must be a non-empty string")
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    want = ["user", "assistant"] * (len(turns) // 2 + 1)
    got = [m["role"] for m in turns]
    if not got or got != want[: len(got)] or got[-1] != "assistant":
        raise RecordError(source, line, f"roles {[m['role'] for m in msgs]}: expected [system,] then "
                                        "user/assistant alternating, ending with assistant")
    return msgs


def load_sft(path: str | os.PathLike) -> list[dict]:
    """Read and validate an SFT JSONL file; every bad record raises with file:line."""
    out = []
    for line, rec in iter_jsonl(path, required=("messages",)):
        msgs = validate_record(rec, path, line)
        out.append({"id": rec.get("id", f"line{line}"), "messages": msgs, "line": line})
    if not out:
        raise RecordError(path, None, "no SFT records (the file is empty)")
    return out


# ---------------------------------------------------------------------------- tokenisation
def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the [start, end) characters to train on."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the backbone's tokenizer has no chat template; SFT needs one")
    full = _render(tokenizer, messages)
    eot = tokenizer.eos_token
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise ValueError("the chat template does not render conversation prefixes as prefixes of "
                             "the whole conversation; assistant spans cannot be located")
        region = full[len(before):len(through)]
        content = m["content"]
        at = region.find(content)
        if at < 0:  # templates that strip replies
            content = content.strip()
            at = max(0, region.find(content))
        start = len(before) + at
        stop = len(through)
        if eot:
            k = region.find(eot, at + len(content))
            if k >= 0:
                stop = len(before) + k + len(eot)
        else:
            stop = len(before) + len(region.rstrip())
        spans.append((start, stop))
    return full, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_chat(tokenizer, messages: list[dict], max_len: int | None = None) -> Encoded:
    """Token ids of the chat-formatted conversation; labels are the ids on assistant spans, -100
    elsewhere. Cut to max_len tokens (the caller reports how many were cut)."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    j = 0
    for t, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and b > spans[j][0] and a < spans[j][1] and b > a:
            labels[t] = ids[t]
    cut = max_len is not None and len(ids) > max_len
    if cut:
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels, cut)


def encode_records(tokenizer, records: list[dict], max_len: int, what: str = "records") -> list[Encoded]:
    """Encode every record; one warning names how many were truncated (and how many of those lost
    every assistant token, which then contribute nothing to the loss)."""
    out = [encode_chat(tokenizer, r["messages"], max_len) for r in records]
    cut = [e for e in out if e.truncated]
    if cut:
        empty = sum(all(x == IGNORE for x in e.labels) for e in cut)
        log.warning("%d of %d SFT %s are longer than max_len=%d tokens and were truncated%s", len(cut),
                    len(out), what, max_len,
                    f" ({empty} of them lost their whole assistant reply)" if empty else "")
    return out


# ---------------------------------------------------------------------------- packing & batches
@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(examples: list[Encoded], max_len: int) -> list[Row]:
    """First-fit-decreasing packing into rows of at most max_len tokens. Position ids restart at 0
    for every example; the first label of each example is -100 so no token is ever predicted
    from the previous example's last position. With position ids that restart and no 2-D
    attention mask, transformers builds a block-diagonal causal mask (sdpa/eager) or uses varlen
    kernels (flash-attention 2), so attention does not cross example boundaries either."""
    rows: list[list[Encoded]] = []
    space: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(e)
                space[r] -= n
                break
        else:
            rows.append([e])
            space.append(max_len - n)
    out = []
    for members in rows:
        ids, labels, pos = [], [], []
        for e in members:
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:]
            pos += list(range(len(e.input_ids)))
        out.append(Row(ids, labels, pos))
    return out


def as_rows(examples: list[Encoded]) -> list[Row]:
    return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


class Rows(Dataset):
    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


class Collate:
    """Right-pad rows. Unpacked: a 2-D attention mask. Packed: no mask (see `pack`); padding gets
    its own position block, so it forms a separate "sequence" nobody attends to."""

    def __init__(self, pad_id: int, packed: bool):
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, rows: list[Row]) -> dict:
        T = max(len(r.input_ids) for r in rows)
        B = len(rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        pos = torch.arange(T).repeat(B, 1)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            ids[b, :n] = torch.tensor(r.input_ids)
            labels[b, :n] = torch.tensor(r.labels)
            pos[b, :n] = torch.tensor(r.position_ids)
            pos[b, n:] = torch.arange(T - n)
            mask[b, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        if not self.packed:
            batch["attention_mask"] = mask
        return batch


def split(records: list[dict], val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded held-out split; at least one record always stays in training."""
    n_val = max(0, min(int(val_size), len(records) - 1))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [records[i] for i in keep], [records[i] for i in val]


class SFTDataModule(L.LightningDataModule):
    def __init__(self, tokenizer, train: list[dict], val: list[dict], max_len: int = 1024,
                 batch_size: int = 4, packing: bool = False, shuffle: bool = True, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.batch_size, self.shuffle, self.num_workers, self.seed = batch_size, shuffle, num_workers, seed
        self.packing = packing
        tr = encode_records(tokenizer, train, max_len, "training records")
        va = encode_records(tokenizer, val, max_len, "validation records") if val else []
        self.n_train_tokens = sum(len(e.input_ids) for e in tr)
        self.n_label_tokens = sum(sum(x != IGNORE for x in e.labels) for e in tr)
        self.train_rows = pack(tr, max_len) if packing else as_rows(tr)
        self.val_rows = pack(va, max_len) if packing else as_rows(va)
        self.collate = Collate(tokenizer.pad_token_id, packing)
        log.info("SFT data: %d training records (%d rows, %d tokens, %d trained), %d validation records",
                 len(tr), len(self.train_rows), self.n_train_tokens, self.n_label_tokens, len(va))

    def train_dataloader(self) -> DataLoader:
        # order = f(seed, pass), and Lightning stores the loader's position in every checkpoint: a
        # resumed run sees the batches the uninterrupted one would have (core/batching.py)
        return resumable_loader(Rows(self.train_rows), self.batch_size, self.seed, self.trainer,
                                shuffle=self.shuffle, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return DataLoader(Rows(self.val_rows), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers)
