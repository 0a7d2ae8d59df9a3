"""The data-quality report's numbers: options, the per-set metrics against the held-out target and
the training references, embeddings with their cache. Used by the data_quality stage (run.py) and by
the study's report, which scores its sample sets the same way.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from domino.core.config import plain
from domino.data_quality import metrics as Q
from domino.data_quality.embed import texts_fingerprint

log = logging.getLogger(__name__)

# (key, label, better direction) in table / plot order
METRICS = [("distinct_1", "distinct-1", "↑"), ("distinct_2", "distinct-2", "↑"),
           ("distinct_3", "distinct-3", "↑"), ("self_bleu", "self-BLEU", "↓"),
           ("vendi", "Vendi", "↑"), ("frechet", "Fréchet", "↓"), ("mmd2", "MMD²", "↓"),
           ("precision", "precision", "↑"), ("recall", "recall", "↑"), ("density", "density", "↑"),
           ("coverage", "coverage", "↑"), ("mem_ngram_mean", "max n-gram overlap", "↓"),
           ("mem_cos_mean", "NN cosine to train", "↓"), ("near_copy_share", "near-copy share", "↓")]


def defaults() -> dict[str, Any]:
    """The options of conf/quality/default.yaml (the one place they are written down); its cache_dir
    interpolates the run's paths, so a call outside Hydra caches nothing unless it says so."""
    from omegaconf import OmegaConf

    from domino.core.config import conf_dir
    d = OmegaConf.to_container(OmegaConf.load(conf_dir() / "quality" / "default.yaml").data_quality, resolve=False)
    d["cache_dir"] = None
    return d


def options(dq: Mapping | None) -> dict:
    out = defaults()
    for k, v in (plain(dq) or {}).items():
        if k not in out:
            raise ValueError(f"data_quality.{k}: unknown option; known: {sorted(out)}")
        out[k] = {**out[k], **v} if isinstance(out[k], dict) and isinstance(v, dict) else v
    return out


def sample_paths(samples: Any) -> dict[str, str]:
    """name -> path from a mapping, a list of paths (named by file stem) or one path."""
    samples = plain(samples)
    if not samples:
        raise ValueError("data_quality needs samples='{name: path.jsonl, ...}'")
    if isinstance(samples, str):
        samples = [samples]
    if isinstance(samples, (list, tuple)):
        named = {Path(p).stem: str(p) for p in samples}
        if len(named) != len(samples):
            raise ValueError(f"samples: file stems collide, name them: samples='{{name: path}}' ({samples})")
        return named
    out = {str(k): str(v) for k, v in dict(samples).items()}
    if "heldout" in out:
        raise ValueError("samples: the name 'heldout' is reserved for the real-data ceiling row")
    return out


def tokenizer_fn(kind: str, lowercase: bool):
    if kind == "regex":
        return lambda t: Q.tokenize(t, lowercase)
    if kind == "whitespace":
        return lambda t: (t.lower() if lowercase else t).split()
    raise ValueError(f"data_quality.tokenizer={kind!r}: expected regex | whitespace")


def subsample(n: int, size: int | None, rng_seed: int) -> np.ndarray:
    if size is None or n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(rng_seed).choice(n, size, replace=False))


def seed_for(seed: int, name: str) -> int:
    return seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def set_metrics(toks: list, emb: np.ndarray, toks_all: list, emb_all: np.ndarray, target: np.ndarray,
                train_toks: list, train_emb: np.ndarray, opt: dict, bandwidth: float) -> tuple[dict, dict]:
    """All metrics of one set. toks/emb: the (size-matched) evaluation subsample; toks_all/emb_all:
    every sample, for memorisation. Returns (row, per-sample memorisation arrays)."""
    row: dict[str, Any] = {"n": len(toks), "n_total": len(toks_all),
                           "mean_tokens": float(np.mean([len(t) for t in toks])) if toks else float("nan"),
                           "empty_share": float(np.mean([len(t) == 0 for t in toks_all])) if toks_all else 0.0}
    for n in opt["distinct_n"]:
        row[f"distinct_{n}"] = Q.distinct_n(toks, n)
    sb = opt["self_bleu"]
    row["self_bleu"] = Q.self_bleu(toks, max_n=sb["max_n"], subsample=sb["subsample"], seed=opt["seed"])
    row["vendi"] = Q.vendi_score(emb)
    row["frechet"] = Q.frechet_distance(emb, target)
    row["mmd2"] = Q.mmd2(emb, target, bandwidth=bandwidth)
    row.update(Q.prdc(target, emb, k=opt["knn_k"]))
    mem = opt["memorisation"]
    overlap, nearest = Q.ngram_overlap(toks_all, train_toks, n=mem["ngram_n"])
    cos = Q.nn_cosine(emb_all, train_emb)
    copy_ng, copy_cos = overlap >= mem["ngram_threshold"], cos >= mem["cosine_threshold"]
    row.update({"mem_ngram_mean": float(overlap.mean()), "mem_ngram_max": float(overlap.max()),
                "mem_cos_mean": float(cos.mean()), "mem_cos_max": float(cos.max()),
                "copy_share_ngram": float(copy_ng.mean()), "copy_share_cosine": float(copy_cos.mean()),
                "near_copy_share": float((copy_ng | copy_cos).mean())} if len(toks_all) else {})
    return row, {"ngram_overlap": overlap, "nearest_ref": nearest, "nn_cosine": cos,
                 "near_copy": copy_ng | copy_cos}


def compute_report(sets: dict[str, tuple[list[str], np.ndarray]], train: tuple[list[str], np.ndarray],
                   heldout: tuple[list[str], np.ndarray], opt: dict) -> dict:
    """Metrics for named sets of (texts, raw embeddings) against held-out and training references."""
    opt = options(opt)
    tok = tokenizer_fn(opt["tokenizer"], opt["lowercase"])
    real = np.concatenate([train[1], heldout[1]])
    mean = real.mean(0) if opt["center"] else np.zeros(real.shape[1])

    def prep(x):
        x = np.asarray(x, np.float64) - mean
        return Q.l2_normalize(x) if opt["normalize"] else x

    h_texts, h_emb = heldout[0], prep(heldout[1])
    n_h = len(h_texts)
    sets = {k: (v[0], prep(v[1])) for k, v in sets.items()}
    if opt["ceiling"] == "split" and n_h >= 4:
        perm = np.random.default_rng(opt["seed"]).permutation(n_h)
        ceil_idx, tgt_idx = np.sort(perm[: n_h // 2]), np.sort(perm[n_h // 2:])
        sets["heldout"] = ([h_texts[i] for i in ceil_idx], h_emb[ceil_idx])
    else:
        if opt["ceiling"] == "split":
            log.warning("only %d held-out references: no ceiling row, all of them are the target", n_h)
        tgt_idx = np.arange(n_h)
    target = h_emb[tgt_idx]
    sizes = {k: len(v[0]) for k, v in sets.items()}
    too_small = [k for k, n in sizes.items() if n < 2]
    if too_small:  # left out of size matching, or one empty file would empty every row
        log.warning("set(s) %s have fewer than 2 texts: their distribution metrics are n/a", too_small)
    usable = [n for n in sizes.values() if n >= 2]
    size = min(usable) if opt["match_size"] and usable else None
    if opt["max_samples"] is not None:
        size = min(size or opt["max_samples"], opt["max_samples"])
    bandwidth = opt["mmd_bandwidth"] or Q.median_bandwidth(target, seed=opt["seed"])
    train_toks, train_emb = [tok(t) for t in train[0]], prep(train[1])
    rows, per_sample, subsets, timing = {}, {}, {}, {}
    for name, (texts, emb) in sets.items():
        t0 = time.perf_counter()
        idx = subsample(len(texts), size, seed_for(opt["seed"], name))
        toks_all = [tok(t) for t in texts]
        rows[name], per_sample[name] = set_metrics(
            [toks_all[i] for i in idx], emb[idx], toks_all, emb, target, train_toks, train_emb, opt, bandwidth)
        subsets[name] = emb[idx]
        timing[name] = round(time.perf_counter() - t0, 3)
    return {"rows": rows, "per_sample": per_sample, "eval_embeddings": subsets, "target": target,
            "train_embeddings": train_emb, "timing_s": timing,
            "protocol": {"n_target": int(len(tgt_idx)), "n_train_references": len(train[0]),
                         "size_matched_to": size, "mmd_bandwidth": bandwidth,
                         "ceiling": "heldout" in rows and opt["ceiling"] == "split"}}


def embed_cached(embedder, texts: list[str], cache_dir: str | None, what: str = "texts") -> np.ndarray:
    if not cache_dir:
        return embedder.encode(texts, what)
    f = Path(cache_dir) / f"{texts_fingerprint(texts, embedder.id)}.npy"
    if f.exists():
        return np.load(f)
    x = embedder.encode(texts, what)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp.npy")
    np.save(tmp, x)
    tmp.replace(f)
    return x


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x
