"""evaluate.py with two sets of overrides, alternated (A B B A ...), each run a fresh subprocess
into its own directory: generation time, tokens, pass@1, and whether the two sides scored the same
programs and verdicts problem by problem.

    .venv/bin/python bench/evaluate_ab.py --common experiment=demo_evaluate \
        benchmark.path=<demo>/train/heldout.jsonl --a prompt.stop_after_solution=false \
        --b prompt.stop_after_solution=true --order abba --out bench/results/<file>.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(overrides: list[str], out_dir: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"hydra.run.dir={out_dir}",
           f"cache_path={out_dir / 'exec_cache.jsonl'}", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out_dir / "summary.json").read_text())
    comps = {(c["task_id"], c["sample_idx"]): c
             for c in map(json.loads, (out_dir / "completions.jsonl").read_text().splitlines())}
    verdicts = {(r["task_id"], s["sample_idx"]): s["status"]
                for r in map(json.loads, (out_dir / "results.jsonl").read_text().splitlines()) for s in r["samples"]}
    g = summary["generation"]
    return {"wall_s": round(wall, 1), "generation_s": g["seconds"], "prefill_s": g.get("prefill_s"),
            "decode_s": g.get("decode_s"), "new_tokens": g["new_tokens"], "pass@1": summary["pass@1"],
            "outcomes": summary["outcomes"], "truncated": summary.get("truncated_completions"),
            "programs": {f"{t}#{i}": c["program"] for (t, i), c in comps.items()},
            "verdicts": {f"{t}#{i}": v for (t, i), v in verdicts.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--common", nargs="*", default=[], help="overrides of both sides")
    ap.add_argument("--a", nargs="*", default=[], help="side A's own overrides")
    ap.add_argument("--b", nargs="*", default=[], help="side B's own overrides")
    ap.add_argument("--order", default="abba", help="the sides' turns, e.g. abba")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="evaluate_ab_") as tmp:
        for n, side in enumerate(args.order):
            r = run(args.common + (args.a if side == "a" else args.b), Path(tmp) / f"{n}_{side}")
            r["side"] = side
            runs.append(r)
            print(f"run {n} ({side}): generation {r['generation_s']} s (prefills {r['prefill_s']}, decoding "
                  f"{r['decode_s']}), {r['new_tokens']} tokens, pass@1 {r['pass@1']:.4f}, wall {r['wall_s']} s",
                  flush=True)
    first = {s: next(r for r in runs if r["side"] == s) for s in "ab"}
    same_programs = sum(first["a"]["programs"][k] == first["b"]["programs"].get(k) for k in first["a"]["programs"])
    same_verdicts = sum(first["a"]["verdicts"][k] == first["b"]["verdicts"].get(k) for k in first["a"]["verdicts"])
    repeat = {s: all(r["programs"] == first[s]["programs"] for r in runs if r["side"] == s) for s in "ab"}
    mean = {s: {k: round(sum(r[k] for r in runs if r["side"] == s) / args.order.count(s), 2)
                for k in ("generation_s", "prefill_s", "decode_s", "new_tokens", "wall_s")} for s in "ab"}
    result = {"common": args.common, "a": args.a, "b": args.b, "order": args.order,
              "runs": [{k: v for k, v in r.items() if k not in ("programs", "verdicts")} for r in runs],
              "mean": mean, "a_over_b_generation": round(mean["a"]["generation_s"] / mean["b"]["generation_s"], 3),
              "same_programs": f"{same_programs}/{len(first['a']['programs'])}",
              "same_verdicts": f"{same_verdicts}/{len(first['a']['verdicts'])}",
              "each_side_repeats_its_programs": repeat}
    print(json.dumps({k: result[k] for k in ("mean", "a_over_b_generation", "same_programs", "same_verdicts",
                                             "each_side_repeats_its_programs")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
