"""The study's report, computed only from what `study.dir` holds (compact samples, the cut reference
split, diagnostics, sweep, timings), so the committed results recompute with one command:

    python study.py experiment=study_humaneval stage=report study.dir=results/study_humaneval

Writes study.json (every number), report.md, and plots: memorisation_vs_epoch.png,
alignment_vs_epoch.png, diagnostics.png, final_bars.png, tsne.png.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from domino.core.config import plain
from domino.core.records import read_jsonl
from domino.data_quality import metrics as Q
from domino.data_quality.compute import compute_report, embed_cached, jsonable, options
from domino.study import stats as S
from domino.study.markdown import DIAG_KEYS

log = logging.getLogger(__name__)
CURVE_METRICS = [("mem_ngram_mean", None), ("mem_cos_mean", "backbone"), ("mem_cos_mean", "tfidf"),
                 ("mmd2", "backbone"), ("mmd2", "tfidf"), ("coverage", "backbone"), ("coverage", "tfidf")]


class TfidfEmbedder:
    """TF-IDF over code tokens (the data-quality regex tokenizer), fitted on the references, reduced
    by a truncated SVD fitted on them too: an embedding that owes nothing to the generator."""

    def __init__(self, references: list[str], dims: int, seed: int = 0):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        self.vec = TfidfVectorizer(tokenizer=Q.tokenize, lowercase=False, token_pattern=None, sublinear_tf=True)
        x = self.vec.fit_transform(references)
        dims = max(2, min(dims, x.shape[0] - 1, x.shape[1] - 1))
        self.svd = TruncatedSVD(n_components=dims, random_state=seed).fit(x)
        self.id = f"tfidf|regex|sublinear|svd{dims}"

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.svd.transform(self.vec.transform(texts)).astype(np.float64)


def load_study(study_dir: Path) -> dict[str, Any]:
    data = study_dir / "data"
    if not (data / "references.jsonl").exists():
        raise FileNotFoundError(f"{data / 'references.jsonl'} not found: has the study trained anything yet?")
    sets: dict[str, list[dict]] = {}
    for f in sorted((study_dir / "samples").glob("*.jsonl")):
        sets[f.stem] = read_jsonl(f, required=["text", "config"])
    diags = [json.loads(f.read_text()) for f in sorted((study_dir / "diagnostics").glob("*.json"))]
    read = (lambda p: json.loads(p.read_text()) if p.exists() else {})
    return {"refs": [r["text"] for r in read_jsonl(data / "references.jsonl", required=["text"])],
            "held": [r["text"] for r in read_jsonl(data / "heldout.jsonl", required=["text"])],
            "sets": sets, "diagnostics": diags, "sweep": read(study_dir / "sweep.json"),
            "timings": read(study_dir / "timings.json")}


def _groups(sets: dict[str, list[dict]], n_curve: int):
    """final: every trained set at its last epoch and every baseline, all samples; curve: every
    trained (config, seed, epoch), the first n_curve samples (per-sample seeds make the first n of
    the final set exactly what a run of n would have drawn)."""
    final, curve, last_epoch = {}, {}, {}
    for name, recs in sets.items():
        c = recs[0]["config"]
        if recs[0].get("epoch") is not None:
            last_epoch[c] = max(last_epoch.get(c, 0), int(recs[0]["epoch"]))
    for name, recs in sets.items():
        r0 = recs[0]
        if r0.get("epoch") is None:
            final[name] = recs
            continue
        curve[name] = recs[:n_curve]
        if int(r0["epoch"]) == last_epoch[r0["config"]]:
            final[name] = recs
    return final, curve


def write_report(study_dir: str | Path, s: Any) -> dict:
    t_start = time.perf_counter()
    study_dir, s = Path(study_dir), plain(s)
    st = load_study(study_dir)
    opt = options({**(s.get("data_quality") or {}), "match_size": False, "plots": False})
    final, curve = _groups(st["sets"], int(s["samples"]["curve"]))
    if not final:
        raise RuntimeError(f"no sample sets under {study_dir / 'samples'} yet")
    level, n_boot, boot_seed = float(s["bootstrap"]["level"]), int(s["bootstrap"]["n"]), int(s["bootstrap"]["seed"])

    # ---- embeddings in both spaces
    t0 = time.perf_counter()
    texts = {"_train": st["refs"], "_heldout": st["held"]}
    texts.update({k: [r["text"] for r in v] for k, v in st["sets"].items()})
    spaces: dict[str, dict[str, np.ndarray]] = {}
    from domino.core.config import compose
    from domino.data_quality.embed import build_embedder
    from domino.study.run import config_method
    bcfg = compose("train", [*s["backbone_embed"], "paths.output_dir=.", "paths.root_dir=."]).backbone
    embedder = build_embedder(opt["embed"], OmegaConf.to_container(bcfg, resolve=True))
    cache = str(Path(s["work_dir"]) / "embed_cache")
    spaces["backbone"] = {k: embed_cached(embedder, v, cache, k) for k, v in texts.items()}
    del embedder
    # tfidf.fit: "references" (the default: a space fitted on training data only, none of the
    # alignment target's vocabulary) or "references+heldout" (what study_humaneval ran with)
    fit = str(s["tfidf"].get("fit", "references"))
    if fit not in ("references", "references+heldout"):
        raise ValueError(f"study.tfidf.fit={fit!r}: expected references or references+heldout")
    tf = TfidfEmbedder(st["refs"] + (st["held"] if fit == "references+heldout" else []), int(s["tfidf"]["dims"]),
                       seed=opt["seed"])
    spaces["tfidf"] = {k: tf.encode(v) for k, v in texts.items()}
    embed_s = time.perf_counter() - t0

    # ---- metrics of every set, both groups, both spaces; bootstrap of the final sets
    t0 = time.perf_counter()
    tok = (lambda t: Q.tokenize(t, opt["lowercase"]))
    rows: dict[str, dict[str, dict]] = {"final": defaultdict(dict), "curve": defaultdict(dict)}
    reps: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    tsne_res = None
    protocol = {}
    for space, emb in spaces.items():
        train, held = (st["refs"], emb["_train"]), (st["held"], emb["_heldout"])
        for group, members in (("final", final), ("curve", curve)):
            if not members:
                continue
            res = compute_report({k: ([r["text"] for r in v], emb[k][: len(v)]) for k, v in members.items()},
                                 train, held, opt)
            for name, row in res["rows"].items():
                rows[group][name].update({(f"{k}@{space}" if k not in _SPACE_FREE else k): v for k, v in row.items()})
            if group == "final":
                protocol[space] = res["protocol"]
                if space == "backbone":
                    tsne_res = res
                for name, ps in res["per_sample"].items():
                    set_texts = _ceiling_texts(st["held"], opt) if name == "heldout" else \
                        [r["text"] for r in members[name]]
                    toks = [tok(t) for t in set_texts]
                    keys = ["mmd2", "coverage", "mem_cos_mean", "vendi"] + (
                        ["mem_ngram_mean", "near_copy_share", "distinct_2"] if space == "backbone" else [])
                    r = S.bootstrap_set(res["eval_embeddings"][name], res["target"], res["protocol"]["mmd_bandwidth"],
                                        opt["knn_k"], ps, toks, n_boot, boot_seed + _stable(name + space), keys)
                    for k, v in r.items():
                        reps[name][S.metric_id(k, None if k in _SPACE_FREE else space)] = v
    # ---- the ceiling at equal size: the real held-out half is fewer texts than a sample set, and
    # size-dependent metrics (coverage, Vendi, MMD² bias) favour the larger set; every final set is
    # scored again on a seeded subsample of the ceiling's size, beside it
    matched: dict[str, dict] = defaultdict(dict)
    matched_n = None
    if "heldout" in rows["final"]:
        for space, emb in spaces.items():
            res = compute_report({k: ([r["text"] for r in v], emb[k][: len(v)]) for k, v in final.items()},
                                 (st["refs"], emb["_train"]), (st["held"], emb["_heldout"]),
                                 {**opt, "match_size": True})
            matched_n = res["protocol"]["size_matched_to"]
            for name, row in res["rows"].items():
                matched[name].update({(f"{k}@{space}" if k not in _SPACE_FREE else k): v for k, v in row.items()})
    metrics_s = time.perf_counter() - t0

    # ---- aggregate over seeds, compare, claims
    headline = [(S.metric_id(k, sp), lab, arrow, fam) for k, sp, lab, arrow, fam in S.HEADLINE]
    by_config: dict[str, dict[int, str]] = defaultdict(dict)
    for name, recs in final.items():
        seed = recs[0].get("train_seed")  # baselines have no training seed: their sampling seed
        seed = recs[0].get("sample_seed", 0) if seed is None else seed
        by_config[recs[0]["config"]][int(seed) if seed is not None else 0] = name
    # table order: trained configs as configured, then the baselines, then the real-data ceiling
    order = [*s["configs"], *s.get("baselines", [])]
    by_config = defaultdict(dict, sorted(by_config.items(), key=lambda kv: order.index(kv[0])
                                         if kv[0] in order else len(order)))
    if "heldout" in rows["final"]:
        by_config["heldout (ceiling)"] = {0: "heldout"}
    summary: dict[str, dict[str, dict]] = {}
    for config, seeds in by_config.items():
        summary[config] = {}
        for mid, _, _, _ in headline:
            per_seed = {sd: rows["final"][name].get(mid) for sd, name in seeds.items()}
            if any(v is None for v in per_seed.values()):
                continue
            summary[config][mid] = S.summarise(per_seed, {sd: reps[name][mid] for sd, name in seeds.items()}, level)
    comparisons = {}
    pairs = [tuple(p) for p in s.get("compare") or []]
    # claims_against: one config for every contrastive config, or a mapping {config: its reference}
    spec = s.get("claims_against")
    contrastive = [c for c in s["configs"] if config_method(s["configs"][c])[1]]
    against_of = {c: (spec.get(c) if isinstance(spec, dict) else spec) for c in contrastive}
    pairs += [(c, b) for c, b in against_of.items() if b and (c, b) not in pairs]
    for a, b in pairs:
        if a not in summary or b not in summary:
            continue
        comparisons[f"{a} vs {b}"] = {mid: S.compare(summary[a][mid], summary[b][mid], arrow, level)
                                      for mid, _, arrow, _ in headline if mid in summary[a] and mid in summary[b]}
    claims = {c: S.claims(comparisons[f"{c} vs {b}"], c, b)
              for c, b in against_of.items() if f"{c} vs {b}" in comparisons}

    # ---- curves and diagnostics over epochs
    curves = _curves(curve, rows["curve"])
    diag = _diagnostics(st["diagnostics"], st["sweep"])
    flags = _flags(summary, headline)
    ceiling_matched = {}
    if matched:
        for config, seeds in by_config.items():
            vals = {mid: [matched[name].get(mid) for name in seeds.values()] for mid, *_ in headline}
            ceiling_matched[config] = {mid: float(np.mean(v)) for mid, v in vals.items()
                                       if v and all(x is not None for x in v)}
    report = {"settings": _settings(s), "sweep": st["sweep"], "decision_rule": S.__doc__.strip(), "flags": flags,
              "headline": [{"id": mid, "label": lab, "better": arrow, "family": fam}
                           for mid, lab, arrow, fam in headline],
              "summary": {c: {m: {k: v for k, v in d.items() if k != "_reps"} for m, d in ms.items()}
                          for c, ms in summary.items()},
              "ceiling_size_matched": {"n": matched_n, "summary": ceiling_matched} if ceiling_matched else None,
              "comparisons": comparisons, "claims": claims, "curves": curves, "diagnostics": diag,
              "sets": {g: dict(r) for g, r in rows.items()}, "protocol": protocol,
              "timing_s": {"tasks": st["timings"], "report": {"embed": round(embed_s, 1),
                                                              "metrics_and_bootstrap": round(metrics_s, 1)}}}
    report = jsonable(report)
    (study_dir / "study.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    from domino.study import plots
    figs = plots.write_all(study_dir, report, tsne_res, opt)
    from domino.study.markdown import render
    (study_dir / "report.md").write_text(render(report, [f.name for f in figs]))
    log.info("study report: %s (%.0f s)", study_dir / "report.md", time.perf_counter() - t_start)
    return report


_SPACE_FREE = {"n", "n_total", "mean_tokens", "empty_share", "distinct_1", "distinct_2", "distinct_3", "self_bleu",
               "mem_ngram_mean", "mem_ngram_max", "copy_share_ngram"}


def _flags(summary: dict, headline: list) -> dict[str, str]:
    """Headline metrics that cannot discriminate here: equal for every set (e.g. a coverage of 1.0
    everywhere), or, for the n-gram overlap with the references, higher for real held-out problems
    than for any generated set (it then measures the domain's shared boilerplate, not copying)."""
    out = {}
    for mid, *_ in headline:
        vals = {c: d[mid]["mean"] for c, d in summary.items() if mid in d}
        sets = {c: v for c, v in vals.items() if c != "heldout (ceiling)"}
        if len(sets) >= 2 and max(sets.values()) - min(sets.values()) <= 1e-9:
            out[mid] = f"the same value ({next(iter(sets.values())):.4g}) for every set: cannot discriminate"
        elif mid == "mem_ngram_mean" and "heldout (ceiling)" in vals and sets and \
                vals["heldout (ceiling)"] >= max(sets.values()):
            out[mid] = ("real held-out problems overlap the references more than any generated set: this "
                        "measures shared boilerplate, not copying")
    return out


def _stable(name: str) -> int:
    import hashlib
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _ceiling_texts(held: list[str], opt: dict) -> list[str]:
    """The held-out half that compute_report scored as the `heldout` row (same seeded split)."""
    n_h = len(held)
    perm = np.random.default_rng(opt["seed"]).permutation(n_h)
    return [held[i] for i in np.sort(perm[: n_h // 2])]


def _curves(curve: dict[str, list[dict]], rows: dict[str, dict]) -> dict:
    """config -> metric -> epoch -> {mean, min, max, per_seed}."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for name, recs in curve.items():
        r0 = recs[0]
        for key, space in CURVE_METRICS:
            mid = S.metric_id(key, space)
            v = rows.get(name, {}).get(mid)
            if v is not None:
                acc[r0["config"]][mid][int(r0["epoch"])][str(r0["train_seed"])] = v
    out: dict = {}
    for config, ms in acc.items():
        out[config] = {}
        for mid, eps in ms.items():
            out[config][mid] = {str(e): _band(v) for e, v in sorted(eps.items())}
    return out


def _band(per_seed: dict[str, float]) -> dict:
    vals = np.array(list(per_seed.values()), np.float64)
    return {"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max()), "per_seed": per_seed}


def _diagnostics(diags: list[dict], sweep: dict) -> dict:
    """config -> key -> epoch -> band over seeds, for the runs at the picked learning rate."""
    picked, picked_s = sweep.get("picked", {}), sweep.get("picked_sample", {})
    borrow = sweep.get("borrow", {})
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for d in diags:
        owner = borrow.get(d["config"], d["config"])
        lr, lr_s = picked.get(owner), picked_s.get(owner)
        if lr is None or abs(float(d["lr_domain"]) - float(lr)) > 1e-12 or (
                lr_s is not None and abs(float(d["lr_sample"]) - float(lr_s)) > 1e-12):
            continue  # a sweep run at the rate that was not picked
        for p in d["points"]:
            for k in DIAG_KEYS:
                if p.get(k) is not None:
                    acc[d["config"]][k][int(p["epoch"])][str(d["seed"])] = p[k]
        for row in d["log"]:
            if "val/nll_dom" in row and row.get("epoch") is not None:
                acc[d["config"]]["val/nll_dom"][int(row["epoch"]) + 1][str(d["seed"])] = row["val/nll_dom"]
    return {c: {k: {str(e): _band(v) for e, v in sorted(eps.items())} for k, eps in ks.items()}
            for c, ks in acc.items()}


def _settings(s: dict) -> dict:
    keep = ("name", "common", "train", "configs", "lr_sweep", "seeds", "epochs", "export_epochs", "samples",
            "synthesize", "baselines", "baseline_seed", "baseline_seeds", "bootstrap", "data_quality", "backbone_embed",
            "tfidf", "pilot", "sft")
    return {k: s.get(k) for k in keep}
