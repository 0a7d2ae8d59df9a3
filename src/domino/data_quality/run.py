"""Data-quality report: diversity, alignment, coverage and memorisation of several named sample
sets, with held-out references as the real-data ceiling.

    python data_quality.py references=<run>/references.jsonl \\
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

import json
import logging
import time
from pathlib import Path
from typing import Any

from domino.core.config import plain
from domino.core.provenance import file_sha256
from domino.core.records import read_jsonl, write_jsonl, write_text_atomic
from domino.data_quality.compute import (
    METRICS,
    compute_report,
    embed_cached,
    jsonable,
    options,
    sample_paths,
    seed_for,
    subsample,
)
from domino.data_quality.embed import build_embedder

log = logging.getLogger(__name__)


def _sha256(path: str) -> str:
    return file_sha256(path)[:16]


def run_data_quality(cfg: Any) -> dict:
    """The data_quality stage (`data_quality.py`, `domino data_quality`, and the older spelling
    `evaluate.py task=data_quality`); returns what data_quality.json holds. One writer per output
    directory (the lock), every file written whole (temp + rename)."""
    from domino.core.locking import output_lock
    from domino.core.validate import DATA_QUALITY, check_config
    check_config(cfg, DATA_QUALITY, "data_quality")
    out_dir = Path(cfg.paths.output_dir)
    with output_lock(out_dir, "data_quality"):
        return _run_data_quality(cfg, out_dir)


def _run_data_quality(cfg: Any, out_dir: Path) -> dict:
    opt = options(cfg.get("data_quality"))
    refs_path = cfg.get("references")
    if not refs_path:
        raise ValueError("data_quality needs references=<run>/references.jsonl (the training references)")
    if not Path(refs_path).exists():
        raise FileNotFoundError(f"references={refs_path}: no such file (the training references, "
                                "<train run>/references.jsonl)")
    heldout_path = cfg.get("heldout") or str(Path(refs_path).with_name("heldout.jsonl"))
    named = sample_paths(cfg.get("samples"))
    field = opt["text_field"]
    if not Path(heldout_path).exists():
        raise FileNotFoundError(f"held-out references {heldout_path} not found: pass heldout=<path>")
    from domino.core import attempt
    attempt.accept(out_dir)  # inputs checked: the run owns out_dir from here

    def load(p):
        recs = read_jsonl(p, required=[field])
        return [str(r.get("id", i)) for i, r in enumerate(recs)], [str(r[field]) for r in recs]

    (train_ids, train_texts), (_, held_texts) = load(refs_path), load(heldout_path)
    ids = {}
    texts = {}
    for name, p in named.items():
        i_, t = load(p)
        idx = subsample(len(t), opt["max_samples"], seed_for(opt["seed"], name))
        texts[name], ids[name] = [t[i] for i in idx], [i_[i] for i in idx]
        log.info("%s: %d samples from %s (%d used)", name, len(t), p, len(idx))
    t0 = time.perf_counter()
    embedder = build_embedder(opt["embed"], plain(cfg.get("backbone")))
    emb = {k: embed_cached(embedder, v, opt["cache_dir"], k)
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
    report = jsonable(report)
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
