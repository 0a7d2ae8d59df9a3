"""curation_report.md and curation_report.json: the funnel (in, out, reasons per stage), a few
dropped examples per reason, the judge's grade distribution and every decontamination match."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domino.core.records import iter_jsonl, write_text_atomic


def _examples(dropped: Path, per_reason: int, chars: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if not dropped.exists():
        return out
    for _, r in iter_jsonl(dropped):
        d = r.get("dropped") or {}
        bucket = out.setdefault(d.get("reason", "?"), [])
        if len(bucket) < per_reason:
            text = r.get("text", "")
            bucket.append({"id": r.get("id"), "text": text[:chars] + ("…" if len(text) > chars else ""),
                           "detail": d.get("detail")})
    return out


def _matches(root: Path) -> list[dict]:
    p = root / "decontamination_matches.jsonl"
    return [r for _, r in iter_jsonl(p)] if p.exists() else []


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ⏎ ")


def write_report(out_dir: Path, root: Path, funnel: list[dict], metas: dict[str, dict],
                 result: dict[str, Any], cfg: dict) -> dict[str, str]:
    per_reason, chars = int(cfg.get("examples_per_reason", 3)), int(cfg.get("example_chars", 300))
    examples = {}
    for i, row in enumerate(funnel, start=1):
        if row.get("enabled") and row["stage"] in metas:
            from domino.curation.stages import StageFiles
            examples[row["stage"]] = _examples(StageFiles(root, i, row["stage"]).dropped, per_reason, chars)
    matches = _matches(root)
    judge = metas.get("judge", {})
    decon = metas.get("decontaminate", {})
    outputs = {k: result.get(k) for k in ("curated", "sft", "sft_dataset")}
    report = {"funnel": funnel, "n_curated": result.get("n_curated"), "n_sft": result.get("n_sft"),
              "sft_note": result.get("sft_note"), "outputs": outputs,
              "judge_grades": judge.get("grades"), "decontamination": {
                  "eval_sets": decon.get("eval_sets"), "n_matches": len(matches), "matches": matches},
              "dropped_examples": examples}
    jpath, mpath = out_dir / "curation_report.json", out_dir / "curation_report.md"
    write_text_atomic(jpath, json.dumps(report, indent=2, ensure_ascii=False, default=str))
    write_text_atomic(mpath, _markdown(report, int(cfg.get("max_matches_md", 50))))
    return {"report_md": str(mpath), "report_json": str(jpath)}


def _markdown(rep: dict, max_matches: int) -> str:
    L = ["# Curation report", "", "## Funnel", "",
         "| stage | in | out | dropped | reasons |", "|---|---:|---:|---:|---|"]
    for row in rep["funnel"]:
        if not row.get("enabled"):
            L.append(f"| {row['stage']} | – | – | – | {'skipped: ' + row['note'] if row.get('note') else 'disabled'} |")
            continue
        reasons = ", ".join(f"{k}: {v}" for k, v in row["reasons"].items()) or "–"
        L.append(f"| {row['stage']}{' (cached)' if row.get('skipped') else ''} | {row['n_in']} | {row['n_out']} | "
                 f"{row['n_dropped']} | {reasons} |")
    if rep["outputs"].get("sft"):
        L += ["", f"SFT records written: **{rep['n_sft']}** → `{rep['outputs']['sft']}`", ""]
    else:
        L += ["", f"Curated records: **{rep['n_curated']}** → `{rep['outputs']['curated']}`. "
              f"{rep.get('sft_note') or 'No SFT export.'}", ""]
    if rep.get("judge_grades"):
        total = sum(rep["judge_grades"].values()) or 1
        L += ["## Judge grades", "", "| grade | count | share |", "|---|---:|---:|"]
        L += [f"| {g} | {n} | {n / total:.1%} |" for g, n in rep["judge_grades"].items()]
        L.append("")
    d = rep["decontamination"]
    if d.get("eval_sets") is not None:
        L += ["## Decontamination", "", "Evaluation sets (texts indexed): " +
              (", ".join(f"{k} ({v})" for k, v in d["eval_sets"].items()) or "none"), "",
              f"{d['n_matches']} matches."]
        if d["matches"]:
            L += ["", "| sample | eval set | item | field | shared n-grams | shared span |",
                  "|---|---|---|---|---:|---|"]
            for m in d["matches"][:max_matches]:
                L.append(f"| {m['sample_id']} | {m['eval_set']} | {m['eval_id']} | {m['field']} | {m['n_shared']} | "
                         f"{_md_escape(m['span'])} |")
            if len(d["matches"]) > max_matches:
                L.append(f"\n… {len(d['matches']) - max_matches} more in curation_report.json")
        L.append("")
    L += ["## Dropped examples", ""]
    for stage, by_reason in rep["dropped_examples"].items():
        for reason, exs in by_reason.items():
            L.append(f"### {stage}: {reason}")
            for e in exs:
                detail = json.dumps(e["detail"], ensure_ascii=False, default=str)[:300] if e["detail"] else ""
                L.append(f"- `{e['id']}` {_md_escape(e['text'])}" + (f"  \n  _{_md_escape(detail)}_" if detail else ""))
            L.append("")
    return "\n".join(L) + "\n"
