"""Intervals and the decision rule of the study (docs/study.md).

- A set's sampling noise: half-sampling. Each of `n` replicates draws half of the set's samples
  without replacement and recomputes the headline metrics against a fixed target and fixed
  training references. For a mean this replicate variance equals the variance of the full-size
  estimate exactly (the delete-n/2 jackknife's factor is 1); for the set-level metrics (MMD²,
  coverage, Vendi, distinct-n) it is the usual approximation. Resampling *with* replacement would
  duplicate samples, which every set-level metric reads as less diversity / more self-similarity.
- A trained configuration's number: the mean over training seeds of the per-seed metric; its noise
  floor is the range (max - min) over seeds; its 95% interval is mean ± 1.96·sd of the seed-mean of
  the replicates (sampling noise of the seed mean).
- A difference A - B counts only where |A - B| exceeds the larger seed range of the two AND its
  95% interval (mean difference ± 1.96·sd of the replicate differences) excludes 0.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Sequence

import numpy as np

from domino.data_quality import metrics as Q

# (metric key, embedding space or None when it does not depend on one, label, better, family)
HEADLINE = [
    ("mmd2", "backbone", "MMD² (backbone)", "↓", "alignment"),
    ("mmd2", "tfidf", "MMD² (TF-IDF)", "↓", "alignment"),
    ("coverage", "backbone", "coverage (backbone)", "↑", "alignment"),
    ("coverage", "tfidf", "coverage (TF-IDF)", "↑", "alignment"),
    ("mem_ngram_mean", None, "8-gram overlap with a training ref", "↓", "memorisation"),
    ("mem_cos_mean", "backbone", "NN cosine to train (backbone)", "↓", "memorisation"),
    ("mem_cos_mean", "tfidf", "NN cosine to train (TF-IDF)", "↓", "memorisation"),
    ("near_copy_share", "backbone", "near-copy share", "↓", "memorisation"),
    ("vendi", "backbone", "Vendi (backbone)", "↑", "diversity"),
    ("vendi", "tfidf", "Vendi (TF-IDF)", "↑", "diversity"),
    ("distinct_2", None, "distinct-2", "↑", "diversity"),
]


def metric_id(key: str, space: str | None) -> str:
    return f"{key}@{space}" if space else key


def bootstrap_set(emb: np.ndarray, target: np.ndarray, bandwidth: float, knn_k: int, per_sample: dict,
                  toks: Sequence[Sequence[str]], n: int, seed: int,
                  keys: Sequence[str] = ("mmd2", "coverage", "mem_ngram_mean", "mem_cos_mean",
                                         "near_copy_share", "vendi", "distinct_2")) -> dict[str, np.ndarray]:
    """(n,) replicate values of each metric in `keys` for one set (rows of `emb` = its samples, in the
    order of `per_sample` and `toks`)."""
    rng = np.random.default_rng(seed)
    m = len(emb)
    h = max(2, m // 2)
    idx = np.stack([rng.permutation(m)[:h] for _ in range(n)]) if m >= 2 else np.zeros((n, m), dtype=int)
    out: dict[str, np.ndarray] = {}
    two_s2 = 2 * bandwidth ** 2
    if "mmd2" in keys:
        kxx = np.exp(-Q.sq_dists(emb, emb) / two_s2)
        kxy_row = np.exp(-Q.sq_dists(emb, target) / two_s2).mean(1)
        kyy = np.exp(-Q.sq_dists(target, target) / two_s2)
        t = len(target)
        kyy_off = (kyy.sum() - np.trace(kyy)) / (t * (t - 1))
        vals = np.empty(n)
        for b in range(n):
            i = idx[b]
            sub = kxx[np.ix_(i, i)]
            vals[b] = (sub.sum() - np.trace(sub)) / (len(i) * (len(i) - 1)) + kyy_off - 2 * kxy_row[i].mean()
        out["mmd2"] = vals
    if "coverage" in keys:
        radii = Q.knn_radii(target, knn_k)
        inside = np.sqrt(Q.sq_dists(target, emb)) < radii[:, None]   # (target, samples)
        out["coverage"] = np.array([inside[:, idx[b]].any(1).mean() for b in range(n)])
    for key, arr in (("mem_ngram_mean", "ngram_overlap"), ("mem_cos_mean", "nn_cosine"),
                     ("near_copy_share", "near_copy")):
        if key in keys:
            out[key] = np.asarray(per_sample[arr], dtype=np.float64)[idx].mean(1)
    if "vendi" in keys:
        out["vendi"] = np.array([Q.vendi_score(emb[idx[b]]) for b in range(n)])
    if "distinct_2" in keys:
        out["distinct_2"] = np.array([Q.distinct_n([toks[j] for j in idx[b]], 2) for b in range(n)])
    return out


def interval(point: float, reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """point ± z·sd(replicates): the half-sample replicates' spread is the estimate's sampling sd."""
    reps = np.asarray(reps, np.float64)
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2 or not np.isfinite(point):
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    sd = float(reps.std(ddof=1))
    return float(point - z * sd), float(point + z * sd)


def summarise(per_seed: dict[int, float], reps: dict[int, np.ndarray], level: float) -> dict:
    """Seed mean, spread and the interval of the seed mean for one (config, metric)."""
    seeds = sorted(per_seed)
    vals = np.array([per_seed[s] for s in seeds], np.float64)
    mean = float(vals.mean())
    rep_mean = np.mean([reps[s] for s in seeds], axis=0)
    lo, hi = interval(mean, rep_mean, level)
    return {"mean": mean, "per_seed": {str(s): float(per_seed[s]) for s in seeds},
            "range": float(vals.max() - vals.min()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "ci": [lo, hi], "n_seeds": len(seeds), "_reps": rep_mean}


def compare(a: dict, b: dict, better: str, level: float) -> dict:
    """A vs B on one metric under the decision rule; `better` is the metric's ↑/↓."""
    diff = a["mean"] - b["mean"]
    lo, hi = interval(diff, a["_reps"] - b["_reps"], level)
    floor = max(a["range"], b["range"])
    excludes_zero = lo > 0 or hi < 0
    counts = bool(abs(diff) > floor and excludes_zero)
    if not counts:
        verdict = "none"
    else:
        verdict = "a" if (diff > 0) == (better == "↑") else "b"
    return {"diff": float(diff), "ci": [lo, hi], "noise_floor": float(floor), "exceeds_floor": bool(abs(diff) > floor),
            "ci_excludes_zero": bool(excludes_zero), "verdict": verdict}


def claims(comparisons: dict[str, dict], method: str, against: str) -> dict[str, dict]:
    """The paper's three claims for `method` vs `against`, from the verdicts of `compare`."""
    def verdicts(ids):
        return {i: comparisons[i]["verdict"] for i in ids if i in comparisons}

    align = [metric_id(k, s) for k, s, _, _, f in HEADLINE if f == "alignment"]
    mem = [metric_id(k, s) for k, s, _, _, f in HEADLINE if f == "memorisation"]
    cov_div = [metric_id(k, s) for k, s, _, _, f in HEADLINE if f == "diversity" or k == "coverage"]
    out = {}
    v = verdicts(align)
    out["alignment_at_least_as_good"] = {
        "holds": all(x != "b" for x in v.values()), "verdicts": v,
        "rule": f"no alignment metric detectably better for {against}"}
    v = verdicts(mem)
    out["less_memorisation"] = {
        "holds": any(x == "a" for x in v.values()) and all(x != "b" for x in v.values()), "verdicts": v,
        "rule": f"{method} detectably lower on >= 1 memorisation metric and higher on none"}
    v = verdicts(cov_div)
    out["more_coverage_or_diversity"] = {
        "holds": any(x == "a" for x in v.values()) and all(x != "b" for x in v.values()), "verdicts": v,
        "rule": f"{method} detectably higher on >= 1 of coverage/Vendi/distinct-2 and lower on none"}
    return out
