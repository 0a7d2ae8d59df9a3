"""Stage 3: near-duplicate removal with MinHash LSH (datasketch).

LSH only proposes candidates; the decision is the exact Jaccard similarity of the two shingle
sets, so "drop at >= threshold" is exact and the probabilistic part can only cost recall. To keep
that cost small, the LSH index is built at a lower threshold (threshold - recall_margin) with
false negatives weighted over false positives; the stage reports the resulting probability that
a pair exactly at the threshold becomes a candidate (about 0.998 with the defaults).
Records are visited in input order and compared with the records kept so far (greedy
clustering): the first of a cluster survives.
"""
from __future__ import annotations

from typing import Iterable

from domino.curation.text import check, drop, norm_key, words


def shingles(text: str, unit: str = "word", size: int = 5) -> set[str]:
    """Word `size`-grams (or character `size`-grams of the collapsed text). A text shorter than
    one shingle is a single shingle of itself, so it can still match an identical short text."""
    if unit == "word":
        toks = words(text)
        if len(toks) < size:
            return {" ".join(toks)} if toks else set()
        return {" ".join(toks[i:i + size]) for i in range(len(toks) - size + 1)}
    if unit == "char":
        t = norm_key(text)
        if len(t) < size:
            return {t} if t else set()
        return {t[i:i + size] for i in range(len(t) - size + 1)}
    raise ValueError(f"near_dup.shingle={unit!r}: expected word or char")


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def near_dedup(records: Iterable[dict], threshold: float = 0.8, shingle: str = "word",
               shingle_size: int = 5, num_perm: int = 128, recall_margin: float = 0.1,
               fn_weight: float = 0.9, seed: int = 1) -> tuple[list[dict], list[dict], dict]:
    from datasketch import MinHash, MinHashLSH
    if not 0 < threshold <= 1:
        raise ValueError(f"near_dup.threshold={threshold} must be in (0, 1]")
    lsh = MinHashLSH(threshold=max(0.05, threshold - recall_margin), num_perm=num_perm,
                     weights=(1 - fn_weight, fn_weight))
    stats = {"lsh_bands": lsh.b, "lsh_rows": lsh.r,
             "candidate_prob_at_threshold": round(1 - (1 - threshold ** lsh.r) ** lsh.b, 4)}
    kept_sh: dict[str, set[str]] = {}
    kept, dropped = [], []
    for rec in records:
        sh = shingles(rec["text"], shingle, shingle_size)
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode() for s in sh])
        best_id, best = None, 0.0
        for cand in lsh.query(m):
            j = jaccard(sh, kept_sh[cand])
            if j > best or (j == best and best_id is not None and cand < best_id):
                best_id, best = cand, j
        if best_id is not None and best >= threshold:
            dropped.append(drop(rec, "near_dup", "near_duplicate",
                                {"near_duplicate_of": best_id, "jaccard": round(best, 4)}))
            continue
        lsh.insert(rec["id"], m)
        kept_sh[rec["id"]] = sh
        kept.append(check(rec, "near_dup", "unique"))
    return kept, dropped, stats
