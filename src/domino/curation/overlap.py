"""Stages 4 and 5: overlap with texts a sample must not copy.

- memorisation (against the references the domain tokens were trained on): a sample is a
  near-copy when the fraction of its word n-grams found in one reference, or its longest common
  substring of words with one reference (as a fraction of the sample's words), reaches a
  threshold. The substring is computed only for the references sharing most n-grams (on words:
  a 300-word text against another costs about a millisecond, characters would be ~30x more).
- decontamination (against every evaluation set that will be used): a sample is contaminated
  when it shares any word n-gram (n = 13 or 10 are common) with an evaluation item; every match
  is listed (sample, set, item, field, the shared n-gram).
Word tokens are lowercased \\w+ runs, so formatting and punctuation never hide a copy.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from difflib import SequenceMatcher
from typing import Iterable

from domino.curation.text import check, drop, ngrams, words


# ------------------------------------------------------------------------- memorisation
class ReferenceIndex:
    def __init__(self, references: list[dict], n: int = 8):
        self.n, self.refs = n, references
        self._words = [words(r["text"]) for r in references]
        self._index: dict[tuple, set[int]] = defaultdict(set)
        for i, toks in enumerate(self._words):
            grams = list(ngrams(toks, n)) if len(toks) >= n else ([tuple(toks)] if toks else [])
            for g in grams:
                self._index[g].add(i)

    def score(self, text: str, lcs_candidates: int = 5) -> dict:
        """Best n-gram overlap and longest-common-substring ratio over the references, and which
        reference gave each. LCS is computed only for the references sharing most n-grams."""
        toks = words(text)
        grams = list(ngrams(toks, self.n)) if len(toks) >= self.n else ([tuple(toks)] if toks else [])
        hits: Counter = Counter()
        for g in set(grams):
            for i in self._index.get(g, ()):
                hits[i] += 1
        n_grams = max(len(set(grams)), 1)
        # most hits first, ties to the reference listed first: the Counter's insertion order follows
        # a set of strings, i.e. the process's hash seed (most_common breaks ties by insertion)
        ranked = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))
        best_ng, best_ng_ref = 0.0, None
        if ranked:
            i, c = ranked[0]
            best_ng, best_ng_ref = c / n_grams, self.refs[i]["id"]
        best_lcs, best_lcs_ref = 0.0, None
        for i, _ in ranked[:lcs_candidates]:
            r = self._words[i]
            m = SequenceMatcher(None, toks, r, autojunk=False).find_longest_match(0, len(toks), 0, len(r))
            ratio = m.size / max(len(toks), 1)
            if ratio > best_lcs:
                best_lcs, best_lcs_ref = ratio, self.refs[i]["id"]
        return {"ngram_overlap": round(best_ng, 4), "ngram_ref": best_ng_ref,
                "lcs_ratio": round(best_lcs, 4), "lcs_ref": best_lcs_ref}


def memorisation_filter(records: Iterable[dict], references: list[dict], n: int = 8,
                        max_ngram_overlap: float = 0.5, max_lcs_ratio: float = 0.5,
                        lcs_candidates: int = 5) -> tuple[list[dict], list[dict]]:
    index = ReferenceIndex(references, n)
    kept, dropped = [], []
    for rec in records:
        s = index.score(rec["text"], lcs_candidates)
        if s["ngram_overlap"] >= max_ngram_overlap:
            dropped.append(drop(rec, "memorisation", "ngram_overlap", s))
        elif s["lcs_ratio"] >= max_lcs_ratio:
            dropped.append(drop(rec, "memorisation", "longest_common_substring", s))
        else:
            kept.append(check(rec, "memorisation", {"ok": True, **{k: s[k] for k in ("ngram_overlap", "lcs_ratio")}}))
    return kept, dropped


# ------------------------------------------------------------------------- decontamination
class EvalIndex:
    """Word n-grams of every evaluation item. An item shorter than n words contributes itself
    whole (if it has at least `min_words`), so a short benchmark prompt is still caught."""

    def __init__(self, n: int = 13, min_words: int = 6):
        self.n, self.min_words = n, min_words
        self._index: dict[tuple, list[tuple[str, str, str]]] = defaultdict(list)
        self.sizes: set[int] = set()
        self.items: Counter = Counter()

    def add(self, eval_set: str, item_id: str, field: str, text: str) -> None:
        toks = words(text or "")
        if len(toks) >= self.n:
            grams, size = set(ngrams(toks, self.n)), self.n
        elif len(toks) >= self.min_words:
            grams, size = {tuple(toks)}, len(toks)
        else:
            return
        self.sizes.add(size)
        self.items[eval_set] += 1
        where = (eval_set, str(item_id), field)
        for g in grams:
            if where not in self._index[g]:
                self._index[g].append(where)

    def matches(self, text: str) -> list[dict]:
        """One entry per evaluation item (and field) sharing an n-gram with `text`: how many
        n-grams, and the first maximal shared span of words."""
        toks = words(text)
        starts: dict[tuple, list[int]] = {}
        sizes: dict[tuple, int] = {}
        for size in sorted(self.sizes):
            for i in range(len(toks) - size + 1):
                for where in self._index.get(tuple(toks[i:i + size]), ()):
                    starts.setdefault(where, []).append(i)
                    sizes[where] = size
        out = []
        for where, ss in starts.items():
            a = b = ss[0]
            for x in ss[1:]:
                if x != b + 1:
                    break
                b = x
            out.append({"eval_set": where[0], "eval_id": where[1], "field": where[2],
                        "n_shared": len(set(ss)), "span": " ".join(toks[a:b + sizes[where]])})
        return sorted(out, key=lambda m: (m["eval_set"], m["eval_id"], m["field"]))


def decontaminate(records: Iterable[dict], index: EvalIndex) -> tuple[list[dict], list[dict], list[dict]]:
    """(kept, dropped, matches): every (sample, evaluation item) pair sharing an n-gram."""
    kept, dropped, all_matches = [], [], []
    for rec in records:
        ms = index.matches(rec["text"])
        if ms:
            all_matches += [{"sample_id": rec["id"], **m} for m in ms]
            dropped.append(drop(rec, "decontaminate", "contaminated",
                                {"matches": ms[:20], "n_matches": len(ms)}))
        else:
            kept.append(check(rec, "decontaminate", "clean"))
    return kept, dropped, all_matches
