"""Part B's report: Pass@1 per arm with the noise floor beside every difference, computed only from
study.dir/loop/ (so it recomputes from committed files: `python study.py experiment=<study>
stage=report study.dir=<results dir>`).

Decision rule (fixed before the run; docs/study.md):
- An arm's Pass@1 is the mean over its replicates of the mean over test problems (greedy, one
  completion per problem). Its replicate spread is max - min over replicates.
- A difference A - B is the mean over problems of (A's replicate-averaged verdict - B's). Its 95%
  interval is a paired bootstrap over problems (`bootstrap.n` resamples of the problem set).
- A difference counts only where the interval excludes 0 AND |A - B| exceeds the larger of the two
  arms' replicate spreads (the base model, greedy and untrained, has spread 0). An arm with one
  replicate has no spread: its differences are reported, never counted.
- Sanity check: the same rule applied to replicate 0 against replicate 1 of one arm must not fire;
  where the interval alone would fire, replicate noise exceeds what the problem sample shows.
  (Two single replicates have no spread, so of the rule only the interval can fire: the check fires
  where the interval alone excludes 0, as computed since the code's first version, before any result.
  This sentence was added on 2026-12-03 after a review found the wording above ambiguous.)
- Detectable effect: 2.8 standard errors of the paired difference (80% power, two-sided 5%), from the
  observed per-problem discordance; a null reads "no effect above that".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from domino.core.records import read_jsonl, write_text_atomic

OUTCOMES = ("passed", "failed", "error", "timeout")


def is_scored(run_dir: Path) -> bool:
    """An evaluation run that has finished: its summary and its per-problem results exist."""
    return (run_dir / "summary.json").exists() and (run_dir / "results.jsonl").exists()


def _verdicts(run_dir: Path, test: list[str]) -> np.ndarray | None:
    """A run's per-problem pass rate in `test` order; None if it is not scored yet. A problem missing,
    scored twice or not in the test set, or a malformed count, is an error (a paired comparison over
    silently different problem sets would be biased)."""
    path = run_dir / "results.jsonl"
    if not is_scored(run_dir):
        return None
    by_task: dict[str, float] = {}
    for i, r in enumerate(read_jsonl(path), 1):
        t, c, n = r.get("task_id"), r.get("c"), r.get("n")
        if t in by_task:
            raise ValueError(f"{path}:{i}: {t} is scored twice")
        if not isinstance(n, int) or not isinstance(c, int) or n < 1 or not 0 <= c <= n:
            raise ValueError(f"{path}:{i}: {t}: expected 0 <= c <= n and n >= 1, got c={c!r} n={n!r}")
        by_task[t] = c / n
    missing = [t for t in test if t not in by_task]
    if missing:
        raise ValueError(f"{path}: no verdict for {len(missing)} test problems (e.g. {missing[0]})")
    extra = sorted(set(by_task) - set(test))
    if extra:
        raise ValueError(f"{path}: {len(extra)} problems outside the test set (e.g. {extra[0]})")
    return np.array([by_task[t] for t in test], np.float64)


def paired(a: np.ndarray, b: np.ndarray, n: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    """Mean of a - b over problems, its bootstrap interval over problems, and the detectable effect."""
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    reps = d[idx].mean(1)
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "ci": [float(lo), float(hi)], "ci_excludes_zero": bool(lo > 0 or hi < 0),
            "se": float(se), "detectable": float(2.8 * se), "n_problems": int(len(d)),
            "a_only": int(((a > b)).sum()), "b_only": int(((b > a)).sum())}


def _pairings(a: dict, b: dict, n: int, seed: int, level: float) -> list[dict]:
    """Beside the rule, not part of it: the difference for every pairing of one replicate of A with
    one of B (the base model is its one run), each with its own interval over problems. With two
    replicates an arm-mean difference can rest on one lucky pairing; this shows whether it does."""
    ra, rb = a.get("_reps") or {"-": a["_vec"]}, b.get("_reps") or {"-": b["_vec"]}
    out = []
    for i, va in ra.items():
        for j, vb in rb.items():
            p = paired(va, vb, n, seed, level)
            out.append({"a_rep": str(i), "b_rep": str(j), "diff": p["diff"], "ci": p["ci"],
                        "ci_excludes_zero": p["ci_excludes_zero"]})
    return out


def decide(p: dict, floor: float | None) -> str:
    if floor is None:
        return "not counted (one replicate: no spread)"
    if p["ci_excludes_zero"] and abs(p["diff"]) > floor:
        return "A better" if p["diff"] > 0 else "B better"
    return "no detectable difference"


def extension_arms(s: Any) -> list[str]:
    """Arms added after the design was fixed (`study.sft.extension.arms`): reported under the same rule,
    marked as such, and never part of the questions fixed before the run."""
    ext = (s.sft.get("extension") or {}).get("arms") or []
    unknown = [a for a in ext if a not in s.sft.arms]
    if unknown:
        raise ValueError(f"study.sft.extension.arms: {unknown} are not arms of study.sft.arms ({list(s.sft.arms)})")
    return [str(a) for a in ext]


def compute(study_dir: Path, s: Any) -> dict[str, Any]:
    loop = study_dir / "loop"
    sp = json.loads((loop / "split.json").read_text())
    test = sp["test"]
    boot = dict(s.get("bootstrap") or {})
    n_boot, seed, level = int(boot.get("n", 2000)), int(boot.get("seed", 0)), float(boot.get("level", 0.95))
    arms: dict[str, dict] = {}
    ext = extension_arms(s)
    base = _verdicts(loop / "eval" / "base", test)
    if base is not None:
        arms["base"] = {"replicates": {"-": float(base.mean())}, "pass@1": float(base.mean()), "spread": 0.0,
                        "_vec": base}
    for arm in s.sft.arms:
        reps = {}
        for r in range(int(s.sft.replicates)):
            v = _verdicts(loop / "eval" / f"{arm}_r{r}", test)
            if v is not None:
                reps[r] = v
        if not reps:
            continue
        means = {str(r): float(v.mean()) for r, v in reps.items()}
        vec = np.mean(list(reps.values()), axis=0)
        arms[arm] = {"replicates": means, "pass@1": float(vec.mean()),
                     "missing_replicates": [r for r in range(int(s.sft.replicates)) if r not in reps],
                     "spread": float(max(means.values()) - min(means.values())) if len(reps) > 1 else None,
                     "_vec": vec, "_reps": reps}
    # every adapter's study_sft.json (records trained on, seconds), by run name: read once
    sft_meta = {p.parent.name: json.loads(p.read_text()) for p in sorted((loop / "adapters").glob("*/study_sft.json"))}
    for name, a in arms.items():
        sft = {r: sft_meta[f"{name}_r{r}"] for r in a["replicates"] if f"{name}_r{r}" in sft_meta}
        a["sft"] = {r: {k: m.get(k) for k in ("n_records", "n_available", "seconds")} for r, m in sft.items()}
        if name != "base" and "base" in arms:
            pr = paired(a["_vec"], arms["base"]["_vec"], n_boot, seed, level)
            a["vs_base"] = {**pr, "floor": a["spread"], "verdict": decide(pr, a["spread"])}
        if len(a.get("_reps", {})) >= 2:
            r0, r1 = sorted(a["_reps"])[:2]
            pr = paired(a["_reps"][r0], a["_reps"][r1], n_boot, seed, level)
            a["self_check"] = {**pr, "fires": bool(pr["ci_excludes_zero"])}
    comparisons = []
    for pair in s.sft.get("compare") or []:
        x, y = str(pair[0]), str(pair[1])
        if x in arms and y in arms:
            pr = paired(arms[x]["_vec"], arms[y]["_vec"], n_boot, seed, level)
            fa, fb = arms[x]["spread"], arms[y]["spread"]
            floor = None if fa is None or fb is None else max(fa, fb)
            comparisons.append({"a": x, "b": y, **pr, "floor": floor, "verdict": decide(pr, floor),
                                "pairings": _pairings(arms[x], arms[y], n_boot, seed, level),
                                "extension": x in ext or y in ext})
    funnels = {}
    for f in sorted((loop / "curation").glob("*.json")) if (loop / "curation").exists() else []:
        d = json.loads(f.read_text())
        funnels[f.stem] = {k: d.get(k) for k in ("set", "n_samples", "n_sft", "n_problems", "answers", "passed")}
        funnels[f.stem]["n_trained"] = sft_meta.get(f.stem, {}).get("n_records")  # at most n_records
    outcomes = {}  # where the answers fail: wrong (failed), crashed (error), hung (timeout), cut off
    for f in sorted((loop / "eval").glob("*/summary.json")) if (loop / "eval").exists() else []:
        m = json.loads(f.read_text())
        if isinstance(m.get("outcomes"), dict):
            comp = f.parent / "completions.jsonl"  # every completion (a resumed run's summary counts its last part)
            outcomes[f.parent.name] = {**{k: int(m["outcomes"].get(k, 0)) for k in OUTCOMES},
                                       "other": sum(int(v) for k, v in m["outcomes"].items() if k not in OUTCOMES),
                                       "truncated": m.get("truncated_completions"),
                                       "tokens": sum(int(r.get("n_tokens") or 0) for r in read_jsonl(comp))
                                       if comp.exists() else None}
    pilot = json.loads((study_dir / "pilot.json").read_text()) if (study_dir / "pilot.json").exists() else None
    clean = {n: {k: v for k, v in a.items() if not k.startswith("_")} for n, a in arms.items()}
    missing = {}
    for arm in ["base", *s.sft.arms]:
        if arm not in arms:
            files = sorted((loop / "eval").glob(f"{arm}_r*/summary.json")) if (loop / "eval").exists() else []
            skipped = [json.loads(f.read_text()).get("skipped") for f in files]
            missing[arm] = skipped[0] if any(skipped) else "not evaluated yet"
    extension = None
    if ext:
        e = dict(s.sft.extension)
        extension = {"arms": ext, "added": str(e.get("added") or ""), "why": str(e.get("why") or "")}
    return {"rule": __doc__.split("Decision rule", 1)[1].strip(), "test_problems": len(test),
            "extension": extension,
            "val_problems_excluded": len(sp.get("val", [])), "arms": clean, "missing_arms": missing,
            "comparisons": comparisons,
            "curation": funnels, "n_records": int(s.sft.n_records), "outcomes": outcomes,
            "pilot": None if pilot is None else {k: pilot[k] for k in ("chosen", "why", "rule")} | {
                "regimes": {r: {k: v for k, v in d.items() if k != "points"} for r, d in pilot["regimes"].items()}}}


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def _pairing_range(ps: list[dict]) -> str:
    if not ps:
        return "-"
    d = [p["diff"] for p in ps]
    span = _pct(d[0], True) if len(d) == 1 else f"{_pct(min(d), True)} to {_pct(max(d), True)}"
    return f"{span} ({sum(p['ci_excludes_zero'] for p in ps)} of {len(ps)} exclude 0)"


def _fires(c: dict) -> str:
    if c["fires"]:
        return " (interval alone fires)"
    return " (interval touches 0)" if 0.0 in (c["ci"][0], c["ci"][1]) else ""


def render(rep: dict) -> str:
    short = {n: f["n_trained"] for n, f in rep["curation"].items()
             if f.get("n_trained") is not None and f["n_trained"] < rep["n_records"]}
    records = f"every SFT run trains on {rep['n_records']} records" + ("" if not short else (
        " except where curation kept fewer: " + ", ".join(f"{n} on {k}" for n, k in short.items())
        + " (a smaller SFT set: not size-matched)"))
    out = ["# Part B: does SFT on each arm's data raise Pass@1?", "",
           f"Greedy Pass@1 on {rep['test_problems']} held-out HumanEval problems ({rep['val_problems_excluded']} "
           f"held-out problems that picked learning rates are excluded); {records}.", ""]
    if rep.get("pilot"):
        p = rep["pilot"]
        out += ["## Pilot", "", "| regime | s_drift | max S move (init std) | l(x_i|D,S_i) | l(x_i|D) | gain (init) | "
                "own text more likely | works |", "|---|---|---|---|---|---|---|---|"]
        for r, d in p["regimes"].items():
            if d.get("nll_pos") is None:
                out.append(f"| {r} | - | - | - | - | - | - | {d['works']} |")
                continue
            g0 = d.get("pos_gain_at_init") or 0.0
            out.append(f"| {r} | {d['s_drift']:.4g} | {d['s_move_max_std']:.3g} | {d['nll_pos']:.4f} | "
                       f"{d['nll_dom_train']:.4f} | {d['pos_gain_over_dom']:+.4f} ({g0:+.4f}) | "
                       f"{d['own_text_more_likely']} | {d['works']} |")
        out += ["", f"Chosen: {p['why']}.", ""]
    ext = (rep.get("extension") or {}).get("arms") or []
    mark = {n: (n + " †" if n in ext else n) for n in [*rep["arms"], *rep.get("missing_arms", {})]}
    out += ["## Pass@1", "", "| arm | Pass@1 | replicates | spread | vs base [95% CI] | detectable | verdict |",
            "|---|---|---|---|---|---|---|"]
    for name, a in rep["arms"].items():
        vb = a.get("vs_base")
        reps = ", ".join([_pct(v) for v in a["replicates"].values()]
                         + [f"r{r} not scored" for r in a.get("missing_replicates") or []])
        out.append(f"| {mark[name]} | {_pct(a['pass@1'])} | {reps} | {_pct(a['spread'])} | "
                   + (f"{_pct(vb['diff'], True)} [{_pct(vb['ci'][0], True)}, {_pct(vb['ci'][1], True)}] | "
                      f"{_pct(vb['detectable'])} | {vb['verdict']} |" if vb else "- | - | - |"))
    for name, why in rep.get("missing_arms", {}).items():
        out.append(f"| {mark[name]} | - | - | - | - | - | {why} |")
    out += ["", "vs base: the arm minus the base model, paired over problems (\"A better\": the arm); the floor "
            "is the arm's replicate spread."]
    if ext:
        e = rep["extension"]
        out += ["", f"† An extension, not part of the design fixed before the run: added {e['added']}. {e['why']} "
                "The same rule applies; its comparisons are marked † below."]
    if rep["comparisons"]:
        out += ["", "## Between arms", "", "| A | B | A - B [95% CI] | floor | detectable | verdict "
                "| by replicate pairing |", "|---|---|---|---|---|---|---|"]
        for c in rep["comparisons"]:
            a, b = mark.get(c["a"], c["a"]), mark.get(c["b"], c["b"])
            out.append(f"| {a} | {b} | {_pct(c['diff'], True)} [{_pct(c['ci'][0], True)}, "
                       f"{_pct(c['ci'][1], True)}] | {_pct(c['floor'])} | {_pct(c['detectable'])} | {c['verdict']} "
                       f"| {_pairing_range(c.get('pairings') or [])} |")
        out += ["", "floor: the larger replicate spread of A and B; a difference counts only where its interval "
                "excludes 0 and it exceeds the floor (\"A better\": the first arm). By replicate pairing (beside "
                "the rule, not part of it): the range of A - B over every pairing of one replicate of A with one of "
                "B, and in how many of them the pairing's own interval excludes 0."]
    checks = {n: a["self_check"] for n, a in rep["arms"].items() if a.get("self_check")}
    if checks:
        out += ["", "Sanity check, replicate 0 vs replicate 1 of the same arm (must not count): "
                + "; ".join(f"{n} {_pct(c['diff'], True)} [{_pct(c['ci'][0], True)}, {_pct(c['ci'][1], True)}]"
                            f"{_fires(c)}" for n, c in checks.items()) + "."]
    if rep["curation"]:
        out += ["", "## SFT data", "", "| run | source | in | kept by curation | trained on |", "|---|---|---|---|---|"]
        for n, f in rep["curation"].items():
            src = f.get("set")
            inn = f.get("n_samples") if f.get("n_samples") is not None else f"{f.get('answers')} answers"
            trained = "-" if f.get("n_trained") is None else f["n_trained"]
            out.append(f"| {n} | {src} | {inn} | {f.get('n_sft')} | {trained} |")
    if rep.get("outcomes"):
        out += ["", "## How the answers fail", "",
                "Per run, over the test problems: passed; failed (a test's assertion: a wrong answer); error (an "
                "exception: syntax, a missing name); timeout; other (the sandbox itself failed); answers cut off "
                "at the token cap; and the tokens of all its completions.", "",
                "| run | " + " | ".join(OUTCOMES) + " | other | cut off | tokens |",
                "|---|" + "---|" * (len(OUTCOMES) + 3)]
        for n, o in rep["outcomes"].items():
            out.append(f"| {n} | " + " | ".join(str(o[k]) for k in (*OUTCOMES, "other"))
                       + f" | {'-' if o['truncated'] is None else o['truncated']} | "
                       f"{'-' if o['tokens'] is None else o['tokens']} |")
    out += ["", "## Decision rule", "", "```", rep["rule"], "```", ""]
    return "\n".join(out)


def write_loop_report(study_dir: str | Path, s: Any) -> dict:
    study_dir = Path(study_dir)
    if not (study_dir / "loop" / "split.json").exists():
        return {}
    rep = compute(study_dir, s)
    write_text_atomic(study_dir / "loop_report.json", json.dumps(rep, indent=1, default=float))
    write_text_atomic(study_dir / "loop_report.md", render(rep))
    from domino.study.plots import loop_pass1
    loop_pass1(study_dir / "loop_pass1.png", rep)
    return rep
