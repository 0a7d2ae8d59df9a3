"""Text primitives every filter shares: the normalised form used for hashing, word tokens and
n-grams, and the first two stages (normalise, exact dedup).

The stored `text` is only stripped; the collapsed form (`norm_key`) exists only to compare
texts, so a sample keeps its line breaks and indentation for the judge and the SFT data.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Iterator

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


def norm_key(text: str, lowercase: bool = True) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped (and lowercased): equal keys are
    exact duplicates up to formatting."""
    t = _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    return t.lower() if lowercase else t


def text_hash(text: str, lowercase: bool = True) -> str:
    return hashlib.sha256(norm_key(text, lowercase).encode()).hexdigest()


def words(text: str) -> list[str]:
    """Lowercased word tokens: punctuation and layout never decide an overlap."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i:i + n])


# ------------------------------------------------------------------------- stage 1: normalise
def normalise(records: Iterable[dict], min_chars: int = 1, max_chars: int | None = None,
              min_words: int = 0, max_words: int | None = None,
              drop_truncated: bool = False) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): `text` stripped; texts outside the length bounds dropped with a reason.
    `drop_truncated` drops samples the sampler cut at max_new_tokens (finish_reason=length)."""
    kept, dropped = [], []
    for rec in records:
        text = (rec.get("text") or "").strip()
        n_chars, n_words = len(text), len(words(text))
        reason = None
        if not text:
            reason = "empty"
        elif n_chars < min_chars or n_words < min_words:
            reason = "too_short"
        elif (max_chars is not None and n_chars > max_chars) or (max_words is not None and n_words > max_words):
            reason = "too_long"
        elif drop_truncated and rec.get("finish_reason") == "length":
            reason = "truncated"
        out = {**rec, "text": text}
        if reason:
            dropped.append(drop(out, "normalise", reason, {"chars": n_chars, "words": n_words}))
        else:
            kept.append(check(out, "normalise", "ok"))
    return kept, dropped


# ------------------------------------------------------------------------- stage 2: exact dedup
def exact_dedup(records: Iterable[dict], lowercase: bool = True) -> tuple[list[dict], list[dict]]:
    """Keep the first record of every normalised text; later copies name the one kept."""
    first: dict[str, str] = {}
    kept, dropped = [], []
    for rec in records:
        h = text_hash(rec["text"], lowercase)
        if h in first:
            dropped.append(drop(rec, "exact_dedup", "duplicate", {"duplicate_of": first[h]}))
        else:
            first[h] = rec["id"]
            kept.append(check(rec, "exact_dedup", "unique"))
    return kept, dropped


# ------------------------------------------------------------------------- verdict helpers
def check(rec: dict, stage: str, verdict) -> dict:
    """The record with `checks[stage] = verdict` (a copy: inputs are never mutated)."""
    return {**rec, "checks": {**(rec.get("checks") or {}), stage: verdict}}


def drop(rec: dict, stage: str, reason: str, detail: dict | None = None) -> dict:
    out = check(rec, stage, reason)
    out["dropped"] = {"stage": stage, "reason": reason, **({"detail": detail} if detail else {})}
    return out
