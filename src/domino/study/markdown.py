"""report.md of the study, rendered from the report dict (study.json) alone."""
from __future__ import annotations

from typing import Any

TFIDF_FIT = {"references": "training references only",
             "references+heldout": "training references and the held-out split"}
VERDICT = {"a": "**{a} better**", "b": "**{b} better**", "none": "no detectable difference"}
# the mechanism's diagnostics (src/domino/training/diagnostics.py), in report order; val/nll_dom is every epoch's
DIAG_KEYS = ["nll_dom_train", "nll_dom_heldout", "nll_pos", "nll_neg", "contrast_gap", "d_drift", "s_drift",
             "s_move_max_std"]
TASK_KINDS = {"pilot": "pilot", "sweep": "learning-rate sweep", "train": "training", "sample": "sampling",
              "curate": "curation", "finetune": "SFT", "evaluate": "Pass@1 evaluation", "loop": "Part B report"}


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.{digits}g}"
    return str(v)


def _cell(d: dict | None) -> str:
    if not d:
        return "n/a"
    lo, hi = d["ci"]
    spread = f" ±{_f(d['range'] / 2)}" if d.get("n_seeds", 1) > 1 else ""
    return f"{_f(d['mean'])} [{_f(lo)}, {_f(hi)}]{spread}"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _points(by_epoch: dict) -> str:
    """`e1: mean [min–max], e3: ...` of a band over seeds per epoch."""
    return ", ".join(f"e{e}: {_f(v['mean'])} [{_f(v['min'])}–{_f(v['max'])}]" for e, v in by_epoch.items())


def render(report: dict, figures: list[str]) -> str:
    st = report["settings"]
    heads = report["headline"]
    out = ["# Evidence study: does DOMINO's data beat prompt tuning's?", ""]
    configs = ", ".join(f"`{c}` ({' '.join(v)})" for c, v in st["configs"].items())
    out += ["## Setup", "",
            f"- Trained configurations: {configs}; "
            f"seeds {st['seeds']}; {st['epochs']} epochs; domain prompt exported after epochs "
            f"{sorted(set(st['export_epochs']) | {st['epochs']})}.",
            f"- Shared overrides: `{' '.join(st['common'])}`; training: `{' '.join(st['train'])}`.",
            f"- Sampling (every method, baselines too): `{' '.join(st['synthesize'])}`; {st['samples']['final']} "
            f"samples per (config, seed) at the last epoch, {st['samples']['curve']} per earlier point; "
            f"baselines {st['baselines']} with {st['samples']['final']} samples (sampling seed {st['baseline_seed']}).",
            f"- Embeddings: the generator's own (`{' '.join(st['backbone_embed'])}`, mean-pooled last layer) and "
            f"TF-IDF over code tokens reduced to {st['tfidf']['dims']} dims by SVD (fitted on the "
            f"{TFIDF_FIT[st['tfidf'].get('fit', 'references')]}).",
            "- Alignment and coverage are measured against half of the held-out split (the target); the other half "
            "is the `heldout (ceiling)` row; memorisation against the training references. Texts are cut to the "
            "tokens the model trained on (`data.max_len`)."]
    sw = report.get("sweep") or {}
    if sw:
        ps = sw.get("picked_sample") or {}
        out += ["", f"Learning-rate sweep (seed {sw.get('seed')}, lowest final `{sw.get('pick_by')}`; a point is "
                f"`lr_domain`, or `lr_domain|lr_sample` where `lr_sample` is not {sw.get('lr_sample_ratio')} × "
                "`lr_domain`; a config with one point needs no run):", "",
                "| config | points | picked (lr_domain, lr_sample) |", "|---|---|---|"]
        for c, vals in sw["values"].items():
            pts = ", ".join(f"{k}: {_f(v, 5)}" for k, v in vals.items())
            out.append(f"| {c} | {pts} | {sw['picked'][c]}, {ps.get(c, '-')} |")
        if sw.get("borrow"):
            out.append("")
            uses = ", ".join(f"`{a}` uses `{b}`'s" for a, b in sw["borrow"].items())
            out.append(f"Configs using another's pick: {uses}")
    out += ["", "## Decision rule (fixed before the run)", "", "```", report["decision_rule"], "```", ""]

    out += ["## Final epoch: headline numbers", "",
            "Mean over seeds [95% interval from half-sampling] ±half the seed range. Baselines and the ceiling "
            "have one set each (no seed spread).", "",
            "| metric | " + " | ".join(report["summary"]) + " |", "|---|" + "---|" * len(report["summary"])]
    for h in heads:
        cells = [_cell(report["summary"][c].get(h["id"])) for c in report["summary"]]
        out.append(f"| {h['label']} {h['better']} | " + " | ".join(cells) + " |")
    flags = report.get("flags") or {}
    if flags:
        labels = {h["id"]: h["label"] for h in heads}
        out += ["", "Metrics that cannot discriminate here (their comparisons below are not evidence either way): "
                + "; ".join(f"{labels.get(m, m)}: {why}" for m, why in flags.items()) + "."]

    cm = report.get("ceiling_size_matched")
    if cm:
        out += ["", f"At the ceiling's size: every final set scored on a seeded subsample of {cm['n']} texts, "
                "the size of the `heldout (ceiling)` row (mean over seeds; size-dependent metrics such as "
                "coverage and Vendi are comparable with the ceiling only here):", "",
                "| metric | " + " | ".join(cm["summary"]) + " |", "|---|" + "---|" * len(cm["summary"])]
        for h in heads:
            out.append(f"| {h['label']} {h['better']} | "
                       + " | ".join(_f(cm["summary"][c].get(h["id"])) for c in cm["summary"]) + " |")

    out += ["", "## Comparisons", ""]
    for pair, comp in report["comparisons"].items():
        a, b = pair.split(" vs ")
        out += [f"### {pair}", "", "| metric | A − B | 95% interval | noise floor (seed range) | verdict |",
                "|---|---|---|---|---|"]
        for h in heads:
            c = comp.get(h["id"])
            if c:
                out.append(f"| {h['label']} {h['better']} | {_f(c['diff'])} | [{_f(c['ci'][0])}, {_f(c['ci'][1])}] | "
                           f"{_f(c['noise_floor'])} | {VERDICT[c['verdict']].format(a=a, b=b)} |")
        out.append("")

    out += ["## The paper's claims at this scale", ""]
    names = {"alignment_at_least_as_good": "alignment at least as good as soft prompt",
             "less_memorisation": "less memorisation", "more_coverage_or_diversity": "more coverage / diversity"}
    for c, cl in report["claims"].items():
        for k, v in cl.items():
            detail = ", ".join(f"{m}: {x}" for m, x in v["verdicts"].items())
            out.append(f"- `{c}` — {names[k]}: **{'holds' if v['holds'] else 'does not hold'}** "
                       f"(rule: {v['rule']}; verdicts: {detail})")
    out.append("")

    out += ["## Over training", ""]
    for config, metrics in report["curves"].items():
        for mid in ("mem_ngram_mean", "mem_cos_mean@backbone", "mmd2@backbone", "coverage@backbone"):
            if mid in metrics:
                out.append(f"- `{config}` {mid}: {_points(metrics[mid])}")
    if report["diagnostics"]:
        out += ["", "Diagnostics at the picked learning rate (mean over seeds [min–max]):", ""]
    for config, keys in report["diagnostics"].items():
        for k in DIAG_KEYS + ["val/nll_dom"]:
            if k in keys:
                out.append(f"- `{config}` {k}: {_points(keys[k])}")
    out.append("")

    out += ["## Every metric of every final set", ""]
    rows = report["sets"]["final"]
    keys = ["n", "mean_tokens", "distinct_2", "self_bleu", "vendi@backbone", "vendi@tfidf", "frechet@backbone",
            "frechet@tfidf", "mmd2@backbone", "mmd2@tfidf", "precision@backbone", "recall@backbone",
            "coverage@backbone", "coverage@tfidf", "mem_ngram_mean", "mem_cos_mean@backbone", "mem_cos_mean@tfidf",
            "near_copy_share@backbone"]
    out += ["| set | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join(_f(r.get(k)) for k in keys) + " |")

    t = report["timing_s"]
    tasks = t.get("tasks", {})
    parts: dict[str, float] = {}
    for k, v in tasks.items():  # one row per kind of task (pilot, sweep, train, sample, curate, ...)
        if k.split()[0] != "report":  # an earlier report's own time: this one's is in the rows below
            kind = TASK_KINDS.get(k.split()[0], k.split()[0])
            parts[kind] = parts.get(kind, 0.0) + v
    parts |= {"report: embedding": t["report"]["embed"],
              "report: metrics + half-sampling": t["report"]["metrics_and_bootstrap"]}
    out += ["", "## Wall time on this machine", "", "| part | wall time |", "|---|---|"]
    out += [f"| {k} | {_hms(v)} |" for k, v in parts.items()]
    out += [f"| **total** | **{_hms(sum(parts.values()))}** |", "",
            "Per task: `timings.json`. Every number above is in `study.json`."]
    out += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(out) + "\n"
