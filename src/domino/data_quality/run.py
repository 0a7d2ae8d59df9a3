"""Data-quality report: diversity, alignment, coverage and memorisation of several named sample
sets, with held-out references as the real-data ceiling.

    python evaluate.py task=data_quality references=<run>/references.jsonl \\
        samples='{domino: a.jsonl, soft_prompt: b.jsonl}' [heldout=<run>/heldout.jsonl]

Protocol (see docs/data_quality.md):
- the held-out references are split (seeded) into a *target* half, which every set is compared
  with (Fréchet, MMD², precision/recall/density/coverage), and a *ceiling* half, reported as the
  row `heldout`: real in-domain data scored exactly like a sample set;
- `match_size`: every set is subsampled (seeded) to the size of the smallest one for the
  size-dependent metrics, so rows are comparable; memorisation uses every sample;
- memorisation is measured against the TRAINING references, alignment against held-out ones;
- embeddings are centred on the mean of all references (training + held-out) before the cosine
  metrics (Vendi, NN cosine, t-SNE): mean-pooled LM states are strongly anisotropic (raw cosine
  ≈ 0.9 between unrelated texts). Euclidean metrics (Fréchet, MMD², k-NN balls) are unaffected by
  centring and use the vectors unnormalised by default, so a far-off set stays far.
Writes data_quality.json, data_quality.md, data_quality_samples.jsonl, tsne.png, metrics.png.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from domino.config import plain
from domino.data_quality import metrics as Q
from domino.data_quality.embed import build_embedder, texts_fingerprint
from domino.provenance import file_sha256
from domino.records import read_jsonl, write_jsonl, write_text_atomic

log = logging.getLogger(__name__)

# (key, label, better direction) in table / plot order
METRICS = [("distinct_1", "distinct-1", "↑"), ("distinct_2", "distinct-2", "↑"),
           ("distinct_3", "distinct-3", "↑"), ("self_bleu", "self-BLEU", "↓"),
           ("vendi", "Vendi", "↑"), ("frechet", "Fréchet", "↓"), ("mmd2", "MMD²", "↓"),
           ("precision", "precision", "↑"), ("recall", "recall", "↑"), ("density", "density", "↑"),
           ("coverage", "coverage", "↑"), ("mem_ngram_mean", "max n-gram overlap", "↓"),
           ("mem_cos_mean", "NN cosine to train", "↓"), ("near_copy_share", "near-copy share", "↓")]


def defaults() -> dict[str, Any]:
    """The options of conf/data_quality.yaml (the one place they are written down); its cache_dir
    interpolates the run's paths, so a call outside Hydra caches nothing unless it says so."""
    from omegaconf import OmegaConf

    from domino.config import conf_dir
    d = OmegaConf.to_container(OmegaConf.load(conf_dir() / "data_quality.yaml").data_quality, resolve=False)
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
        raise ValueError("task=data_quality needs samples='{name: path.jsonl, ...}'")
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


def _subsample(n: int, size: int | None, rng_seed: int) -> np.ndarray:
    if size is None or n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(rng_seed).choice(n, size, replace=False))


def _seed_for(seed: int, name: str) -> int:
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
        idx = _subsample(len(texts), size, _seed_for(opt["seed"], name))
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


def _embed_cached(embedder, texts: list[str], cache_dir: str | None, what: str = "texts") -> np.ndarray:
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


def _sha256(path: str) -> str:
    return file_sha256(path)[:16]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def run_data_quality(cfg: Any) -> dict:
    """Entry point for `evaluate.py task=data_quality`; returns what data_quality.json holds. One
    writer per output directory (the lock), every file written whole (temp + rename)."""
    from domino.locking import output_lock
    out_dir = Path(cfg.paths.output_dir)
    with output_lock(out_dir, "data_quality"):
        return _run_data_quality(cfg, out_dir)


def _run_data_quality(cfg: Any, out_dir: Path) -> dict:
    opt = options(cfg.get("data_quality"))
    refs_path = cfg.get("references")
    if not refs_path:
        raise ValueError("task=data_quality needs references=<run>/references.jsonl (the training references)")
    if not Path(refs_path).exists():
        raise FileNotFoundError(f"references={refs_path}: no such file (the training references, "
                                "<train run>/references.jsonl)")
    heldout_path = cfg.get("heldout") or str(Path(refs_path).with_name("heldout.jsonl"))
    named = sample_paths(cfg.get("samples"))
    field = opt["text_field"]
    if not Path(heldout_path).exists():
        raise FileNotFoundError(f"held-out references {heldout_path} not found: pass heldout=<path>")
    from domino import attempt
    attempt.accept(out_dir)  # inputs checked: the run owns out_dir from here

    def load(p):
        recs = read_jsonl(p, required=[field])
        return [str(r.get("id", i)) for i, r in enumerate(recs)], [str(r[field]) for r in recs]

    (train_ids, train_texts), (_, held_texts) = load(refs_path), load(heldout_path)
    ids = {}
    texts = {}
    for name, p in named.items():
        i_, t = load(p)
        idx = _subsample(len(t), opt["max_samples"], _seed_for(opt["seed"], name))
        texts[name], ids[name] = [t[i] for i in idx], [i_[i] for i in idx]
        log.info("%s: %d samples from %s (%d used)", name, len(t), p, len(idx))
    t0 = time.perf_counter()
    embedder = build_embedder(opt["embed"], plain(cfg.get("backbone")))
    emb = {k: _embed_cached(embedder, v, opt["cache_dir"], k)
           for k, v in [("_train", train_texts), ("_heldout", held_texts), *texts.items()]}
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = compute_report({k: (v, emb[k]) for k, v in texts.items()}, (train_texts, emb["_train"]),
                         (held_texts, emb["_heldout"]), opt)
    metric_s = time.perf_counter() - t0
    report = {"rows": res["rows"], "protocol": {
        **res["protocol"], "embedder": embedder.id, "center": opt["center"], "normalize": opt["normalize"],
        "tokenizer": opt["tokenizer"], "knn_k": opt["knn_k"], "mmd_kernel": "rbf exp(-d^2/(2 sigma^2))",
        "self_bleu": opt["self_bleu"], "memorisation": opt["memorisation"], "seed": opt["seed"]},
        "inputs": {"references": {"path": str(refs_path), "n": len(train_texts), "sha256": _sha256(refs_path)},
                   "heldout": {"path": str(heldout_path), "n": len(held_texts), "sha256": _sha256(heldout_path)},
                   "samples": {k: {"path": p, "sha256": _sha256(p)} for k, p in named.items()}},
        "timing_s": {"embed": round(embed_s, 2), "metrics": round(metric_s, 2), "per_set": res["timing_s"]}}
    report = _jsonable(report)
    write_text_atomic(out_dir / "data_quality.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_jsonl(out_dir / "data_quality_samples.jsonl", _per_sample_records(res["per_sample"], texts, ids, train_ids))
    plots = []
    if opt["plots"]:
        from domino.data_quality.plots import plot_metrics, plot_tsne
        plots = [plot_tsne(res, out_dir / "tsne.png", opt), plot_metrics(report["rows"], METRICS,
                                                                         out_dir / "metrics.png")]
    write_text_atomic(out_dir / "data_quality.md", render_markdown(report, [p.name for p in plots if p]))
    log.info("data quality report: %s", out_dir / "data_quality.md")
    return report


def _per_sample_records(per_sample: dict, texts: dict, ids: dict, train_ids: list) -> list[dict]:
    """One line per sample: its memorisation numbers and the training reference it overlaps most."""
    recs = []
    for name, ps in per_sample.items():
        if name == "heldout":
            continue
        for i, t in enumerate(texts[name]):
            j = int(ps["nearest_ref"][i])
            recs.append({"set": name, "id": ids[name][i], "ngram_overlap": round(float(ps["ngram_overlap"][i]), 4),
                         "overlap_ref_id": train_ids[j] if j >= 0 else None,
                         "nn_cosine": round(float(ps["nn_cosine"][i]), 4), "near_copy": bool(ps["near_copy"][i]),
                         "text": t[:200]})
    return recs


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def render_markdown(report: dict, plots: list[str]) -> str:
    rows, p = report["rows"], report["protocol"]
    keys = ["n"] + [k for k, _, _ in METRICS if any(k in r for r in rows.values())]
    labels = {k: f"{lab} {arrow}" for k, lab, arrow in METRICS}
    lines = ["# Data quality", "",
             f"Target: {p['n_target']} held-out references; memorisation against {p['n_train_references']} "
             f"training references. Row `heldout` = the other half of the held-out references (real-data "
             f"ceiling)." if p["ceiling"] else f"Target: all {p['n_target']} held-out references (no ceiling row).",
             f"Sets subsampled to n = {p['size_matched_to']} for all but memorisation (seeded).", "",
             "| set | " + " | ".join(labels.get(k, k) for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    mem = p["memorisation"]
    lines += ["", "## How these were measured",
              f"- Embedder: `{p['embedder']}`; centred on the references' mean: {p['center']}, "
              f"L2-normalised: {p['normalize']}.",
              f"- Tokens for distinct-n / self-BLEU / n-gram overlap: `{p['tokenizer']}` "
              "(regex = `\\w+` runs and single punctuation characters).",
              f"- Self-BLEU: BLEU-{p['self_bleu']['max_n']}, add-one smoothing for n>1, each text vs the rest "
              f"of a seeded subsample of {p['self_bleu']['subsample']}.",
              f"- MMD²: unbiased, {p['mmd_kernel']}, σ = {_fmt(p['mmd_bandwidth'])} (median pairwise "
              "distance of the target).",
              f"- Precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020), "
              f"k = {p['knn_k']}.",
              f"- Memorisation: max share of a sample's {mem['ngram_n']}-grams found in one training reference; "
              f"NN cosine to training references; near copy = overlap ≥ {mem['ngram_threshold']} or "
              f"cosine ≥ {mem['cosine_threshold']}.",
              f"- Time: embedding {report['timing_s']['embed']} s, metrics {report['timing_s']['metrics']} s."]
    lines += [""] + [f"![{f}]({f})" for f in plots]
    return "\n".join(lines) + "\n"
