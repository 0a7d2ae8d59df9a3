"""Print (and write to <demo dir>/demo_report.md) the table of a `make demo` run: each stage's
output, counts, pass@1 before/after fine-tuning and wall time per stage."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def count_lines(path: Path) -> int | None:
    return sum(1 for line in path.open() if line.strip()) if path.exists() else None


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def timings(out: Path) -> dict[str, int]:
    t: dict[str, int] = {}
    if (out / "timings.tsv").exists():
        for line in (out / "timings.tsv").read_text().splitlines():
            name, secs = line.split("\t")
            t[name] = t.get(name, 0) + int(secs)  # a resumed stage's runs add up
    return t


def fmt_time(s: int | None) -> str:
    return "-" if s is None else f"{s // 60}m{s % 60:02d}s"


def report(out: Path) -> str:
    t = timings(out)
    meta = load(out / "train" / "domain_prompt.json")
    funnel = load(out / "synthesize" / "curation_report.json")
    ft = load(out / "finetune" / "adapter" / "domino_finetune.json")
    base, tuned = load(out / "eval_base" / "summary.json"), load(out / "eval_finetuned" / "summary.json")
    n_refs, n_held = count_lines(out / "train" / "references.jsonl"), count_lines(out / "train" / "heldout.jsonl")
    n_samples, n_sft = count_lines(out / "synthesize" / "samples.jsonl"), count_lines(out / "synthesize" / "sft.jsonl")
    val = meta.get("metrics", {}).get("val/nll_dom")
    ft_val = ft.get("metrics", {}).get("val/loss") if isinstance(ft.get("metrics"), dict) else None
    rows = [
        ("train", "train/domain_prompt.safetensors",
         f"{n_refs} references, {n_held} held out; k={meta.get('k')}, {meta.get('steps')} steps"
         + (f", val/nll_dom {val:.3f}" if val is not None else ""), t.get("train")),
        ("synthesize + curate", "synthesize/samples.jsonl, sft.jsonl",
         f"{n_samples} samples -> {n_sft} SFT pairs"
         + (f" ({funnel_summary(funnel)})" if funnel else ""), t.get("synthesize+curate")),
        ("finetune", "finetune/adapter/", (f"LoRA on {n_sft} pairs" + (f", val/loss {ft_val:.3f}" if ft_val else "")),
         t.get("finetune")),
        ("evaluate (base)", "eval_base/summary.json", pass_str(base), t.get("evaluate-base")),
        ("evaluate (fine-tuned)", "eval_finetuned/summary.json", pass_str(tuned), t.get("evaluate-finetuned")),
        ("train (soft prompt)", "train_soft_prompt/domain_prompt.safetensors", "the same config, objective=soft_prompt",
         t.get("train-soft-prompt")),
        ("compare", "compare/data_quality.md", "DOMINO vs soft prompt, same sampling (table below)", t.get("compare")),
    ]
    total = sum(t.values()) if t else None
    lines = ["| stage | output | result | wall time |", "|---|---|---|---|"]
    lines += [f"| {a} | `{b}` | {c} | {fmt_time(d)} |" for a, b, c, d in rows]
    lines.append(f"| **total** | `{out}` | pass@1 {pct(base)} -> {pct(tuned)} | {fmt_time(total)} |")
    return "\n".join(lines) + "\n" + comparison(load(out / "compare" / "data_quality.json"))


# (key, label) of the comparison table: alignment with the held-out problems, then memorisation of the
# training references, then diversity
COMPARE = [("mmd2", "MMD² ↓"), ("coverage", "coverage ↑"), ("frechet", "Fréchet ↓"),
           ("mem_ngram_mean", "8-gram overlap ↓"), ("mem_cos_mean", "NN cosine to train ↓"),
           ("near_copy_share", "near copies ↓"), ("vendi", "Vendi ↑"), ("distinct_2", "distinct-2 ↑")]


def comparison(dq: dict) -> str:
    rows = dq.get("rows") or {}
    if not rows:
        return ""
    lines = ["", "DOMINO vs plain soft prompt (same config, same sampling; `heldout` = real held-out problems):", "",
             "| set | n | " + " | ".join(lab for _, lab in COMPARE) + " |", "|---|---|" + "---|" * len(COMPARE)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.get('n')} | " + " | ".join(num(r.get(k)) for k, _ in COMPARE) + " |")
    lines += ["", "One seed and one sample set each: differences smaller than the seed spread measured by the "
              "evidence study (results/study_humaneval/report.md) are noise."]
    return "\n".join(lines) + "\n"


def num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def funnel_summary(funnel: dict) -> str:
    """The stages that dropped something: `judge 60->11; code_checks 11->6`."""
    return "; ".join(f"{s['stage']} {s['n_in']}->{s['n_out']}" for s in funnel.get("funnel", [])
                     if s.get("enabled") and s.get("n_dropped"))


def pct(summary: dict) -> str:
    return f"{100 * summary['pass@1']:.1f}%" if "pass@1" in summary else "-"


def pass_str(summary: dict) -> str:
    if not summary:
        return "-"
    return f"pass@1 {pct(summary)} on {summary.get('tasks')} held-out problems; outcomes {summary.get('outcomes')}"


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "lightning_logs/demo")
    table = report(out_dir)
    (out_dir / "demo_report.md").write_text(table)
    print(table)
