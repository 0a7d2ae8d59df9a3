"""Data-quality metrics for synthetic text: pure functions over token lists and embedding matrices.

Text metrics take lists of tokens (see `tokenize`). Embedding metrics take float arrays of shape
(n, d). Costs, with n, m the set sizes, d the embedding width, L the tokens per text:

    distinct-n                O(n·L)
    self-BLEU (m texts)       O(m·L + m²)        one pass over n-grams, top-2 counts per n-gram
    n-gram memorisation       O(n·L + postings)  inverted index over the references' n-grams
    Fréchet distance          O(min(n,m)·n·m + ...) dual form if min(n,m) < d, else O(d³ + (n+m)·d²)
    MMD², precision/recall/
    density/coverage, NN sims O((n+m)²·d)        pairwise distances
    Vendi score               O(min(n,d)³ + n·d·min(n,d))  eigenvalues of the n×n or d×d Gram matrix
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

# words (letters/digits/underscore runs) and single punctuation characters; whitespace is dropped
TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """Regex tokenisation: `\\w+` runs and single non-space punctuation characters."""
    return TOKEN_RE.findall(text.lower() if lowercase else text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ---------------------------------------------------------------- diversity: text
def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float:
    """Corpus-level distinct-n (Li et al., 2016): unique n-grams / total n-grams over all texts.
    0.0 when there are no n-grams at all."""
    total, seen = 0, set()
    for toks in token_lists:
        grams = ngrams(toks, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def _bleu_from_counts(matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int,
                      eps: float = 1e-9) -> float:
    """BLEU with add-one smoothing of the n>1 precisions (Lin & Och 2004, 'smoothing 2' in
    Chen & Cherry 2014). The unigram precision is not smoothed, so a hypothesis sharing no token
    with its references scores ~0 (a zero p1 is floored at `eps`)."""
    if hyp_len == 0:
        return 0.0
    logp = 0.0
    for i, (m, t) in enumerate(zip(matches, totals)):
        p = (m + 1) / (t + 1) if i > 0 else (m / t if t else 0.0)
        logp += math.log(max(p, eps))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(logp / len(matches))


def bleu(hyp: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU of `hyp` against several references: clipped counts (max over references),
    uniform weights up to `max_n`, brevity penalty against the closest reference length."""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        h = Counter(ngrams(hyp, n))
        best: Counter = Counter()
        for r in refs:
            for g, c in Counter(ngrams(r, n)).items():
                if g in h and c > best[g]:
                    best[g] = c
        matches.append(sum(min(c, best[g]) for g, c in h.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    ref_len = min((len(r) for r in refs), key=lambda L: (abs(L - len(hyp)), L)) if refs else 0
    return _bleu_from_counts(matches, totals, len(hyp), ref_len)


def self_bleu(token_lists: Sequence[Sequence[str]], max_n: int = 4, subsample: int | None = 200,
              seed: int = 0) -> float:
    """Mean BLEU of each text against all the others (Zhu et al., 2018, Texygen), on a seeded
    subsample of `subsample` texts so the value does not drift with corpus size. Exact: the clipped
    reference count of an n-gram is the maximum over the *other* texts, found from each n-gram's
    two largest counts, so no pair is visited. nan with fewer than 2 texts."""
    idx = np.arange(len(token_lists))
    if subsample is not None and len(idx) > subsample:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), subsample, replace=False))
    toks = [list(token_lists[i]) for i in idx]
    if len(toks) < 2:
        return float("nan")
    lens = np.array([len(t) for t in toks])
    counts = [[Counter(ngrams(t, n)) for n in range(1, max_n + 1)] for t in toks]
    top2: list[dict] = []  # per order: n-gram -> [(count1, owner1), count2]
    for n in range(max_n):
        best: dict = {}
        for j, c in enumerate(counts):
            for g, k in c[n].items():
                b = best.get(g)
                if b is None:
                    best[g] = [k, j, 0]
                elif k > b[0]:
                    best[g] = [k, j, b[0]]
                elif k > b[2]:
                    b[2] = k
        top2.append(best)
    scores = []
    for i, t in enumerate(toks):
        matches, totals = [], []
        for n in range(max_n):
            m = 0
            for g, k in counts[i][n].items():
                c1, owner, c2 = top2[n][g]
                m += min(k, c2 if owner == i else c1)
            matches.append(m)
            totals.append(max(len(t) - n, 0))
        others = np.delete(lens, i)
        gap = np.abs(others - len(t))
        ref_len = int(others[gap == gap.min()].min())
        scores.append(_bleu_from_counts(matches, totals, len(t), ref_len))
    return float(np.mean(scores))


# ---------------------------------------------------------------- diversity: embeddings
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def vendi_score(x: np.ndarray, normalize: bool = True, dual: bool | None = None) -> float:
    """Vendi score (Friedman & Dieng, 2023) with the cosine kernel: exp of the Shannon entropy of
    the eigenvalues of K/n, K = X̂X̂ᵀ. The nonzero eigenvalues of X̂X̂ᵀ/n equal those of X̂ᵀX̂/n,
    so the d×d form is used when d < n. Ranges from 1 (all identical) to n (all orthogonal)."""
    x = l2_normalize(x) if normalize else np.asarray(x, np.float64)
    n = len(x)
    if n == 0:
        return float("nan")
    dual = x.shape[1] < n if dual is None else dual  # dual: the d×d form
    gram = (x.T @ x) if dual else (x @ x.T)
    lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()  # = 1 already for unit rows; guards unnormalised input
    return float(np.exp(-(lam * np.log(lam)).sum()))


# ---------------------------------------------------------------- alignment: distribution distances
def frechet_distance(x: np.ndarray, y: np.ndarray, method: str = "auto") -> float:
    """Fréchet distance between Gaussians fitted to x and y (as in FID, Heusel et al., 2017):
    ‖μx−μy‖² + tr Σx + tr Σy − 2 tr (ΣxΣy)^½.
    tr (ΣxΣy)^½ is the nuclear norm of XcYcᵀ/√((n−1)(m−1)) (the eigenvalues of ΣxΣy are the
    squared singular values of that n×m matrix), used when min(n, m) < d: exact, and free of the
    matrix square root of a rank-deficient d×d matrix. Otherwise Σx^½ Σy Σx^½ via eigh.
    `method`: auto | dual | primal (the two agree; tests compare them)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m, d = len(x), len(y), x.shape[1]
    if n < 2 or m < 2:
        return float("nan")
    xc, yc = x - x.mean(0), y - y.mean(0)
    mean_term = float(((x.mean(0) - y.mean(0)) ** 2).sum())
    tr_x, tr_y = (xc ** 2).sum() / (n - 1), (yc ** 2).sum() / (m - 1)
    if method not in ("auto", "dual", "primal"):
        raise ValueError(f"method={method!r}")
    if method == "dual" or (method == "auto" and min(n, m) < d):
        cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        sx, sy = xc.T @ xc / (n - 1), yc.T @ yc / (m - 1)
        w, v = np.linalg.eigh(sx)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sy @ root), 0, None)).sum()
    return float(max(mean_term + tr_x + tr_y - 2 * cross, 0.0))


def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0.0, None)


def median_bandwidth(z: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median heuristic (Gretton et al., 2012): σ = median pairwise Euclidean distance (i≠j),
    on a seeded subsample of at most `max_points` points."""
    z = np.asarray(z, np.float64)
    if len(z) > max_points:
        z = z[np.random.default_rng(seed).choice(len(z), max_points, replace=False)]
    d = sq_dists(z, z)[np.triu_indices(len(z), 1)]
    return float(np.sqrt(np.median(d))) if d.size else 1.0


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None, unbiased: bool = True) -> float:
    """Squared MMD with the RBF kernel k(a,b) = exp(−‖a−b‖²/(2σ²)); σ = `bandwidth`, or the median
    heuristic on the pooled sample when None. The unbiased U-statistic (Gretton et al., 2012,
    eq. 3) drops the diagonals of Kxx and Kyy; it is ~0 for two samples of one distribution and
    can be slightly negative. For x = y it equals −(2/n)(1 − mean off-diagonal k) ∈ [−2/n, 0]."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return float("nan")
    sigma = bandwidth if bandwidth is not None else median_bandwidth(np.concatenate([x, y]))
    g = 1.0 / (2 * max(sigma, 1e-12) ** 2)
    kxx, kyy, kxy = (np.exp(-g * sq_dists(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    if unbiased:
        sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    else:
        sxx, syy = kxx.mean(), kyy.mean()
    return float(sxx + syy - 2 * kxy.mean())


# ---------------------------------------------------------------- coverage: k-NN balls
def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row of x."""
    d = np.sqrt(sq_dists(x, x))
    np.fill_diagonal(d, np.inf)
    k = min(k, len(x) - 1)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al., 2019) and density and coverage (Naeem et al.,
    2020, 'Reliable Fidelity and Diversity Metrics for Generative Models'), with k-NN balls:
      precision: share of fake points inside some real point's k-NN ball (radius among reals);
      recall:    share of real points inside some fake point's k-NN ball (radius among fakes);
      density:   (1/(k·m)) Σ_j #real balls containing fake j (can exceed 1);
      coverage:  share of real points whose ball holds at least one fake point.
    k is clipped to set size − 1. Distances are Euclidean on the rows as given."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) < 2 or len(fake) < 2:
        return {key: float("nan") for key in ("precision", "recall", "density", "coverage")}
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = np.sqrt(sq_dists(real, fake))          # (n_real, n_fake)
    inside = d < r_real[:, None]
    k_eff = min(k, len(real) - 1)
    return {"precision": float(inside.any(0).mean()),
            "recall": float((d < r_fake[None, :]).any(1).mean()),
            "density": float(inside.sum() / (k_eff * len(fake))),
            "coverage": float(inside.any(1).mean())}


# ---------------------------------------------------------------- memorisation
def nn_cosine(x: np.ndarray, refs: np.ndarray, block: int = 4096) -> np.ndarray:
    """Per row of x: the highest cosine similarity to any row of refs."""
    xr, rr = l2_normalize(x), l2_normalize(refs)
    if len(rr) == 0:
        return np.full(len(xr), np.nan)
    if len(xr) == 0:
        return np.zeros(0)
    return np.concatenate([(xr[i:i + block] @ rr.T).max(1) for i in range(0, len(xr), block)])


def ngram_overlap(samples: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], n: int = 8
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the highest share of its distinct n-grams found in one reference (containment,
    max over references), and that reference's index (−1 if none shares an n-gram). A text shorter
    than n tokens is compared as a single n-gram of its own length, so a short exact copy still
    scores 1."""
    index: dict[int, dict] = defaultdict(lambda: defaultdict(set))  # order -> n-gram -> ref ids

    def grams(toks, order):
        return set(ngrams(toks, order)) if len(toks) >= order else set()

    def order_of(toks):
        return min(n, len(toks))

    ref_grams = [set(ngrams(r, n)) for r in refs]
    for j, g in enumerate(ref_grams):
        for t in g:
            index[n][t].add(j)
    best, arg = np.zeros(len(samples)), np.full(len(samples), -1)
    for i, toks in enumerate(samples):
        o = order_of(toks)
        if o == 0:
            continue
        if o < n and o not in index:  # short sample: index the references at its own order once
            for j, r in enumerate(refs):
                for t in grams(r, o):
                    index[o][t].add(j)
        mine = grams(toks, o)
        hits: Counter = Counter()
        for t in mine:
            hits.update(index[o].get(t, ()))
        if hits:
            j, c = max(hits.items(), key=lambda kv: (kv[1], -kv[0]))
            best[i], arg[i] = c / len(mine), j
    return best, arg
