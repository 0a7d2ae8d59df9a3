"""Sandbox throughput: executions per second on the 164 HumanEval canonical solutions.

    .venv/bin/python bench/evaluate.py [--workers 1 2] [--repeats 1]

Every execution is real (no cache): a fresh `python -I` in new namespaces per program.
Writes bench/results/evaluate.json and prints the markdown table pasted into bench/README.md.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

from domino.core.benchmarks import load_benchmark
from domino.core.sandbox import Sandbox, SandboxConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    probs = load_benchmark("humaneval")
    jobs = [(p["prompt"] + p["canonical_solution"], p["tests"], "functional") for p in probs]
    rows = []
    for w in args.workers:
        best = None
        for _ in range(args.repeats):
            sb = Sandbox(SandboxConfig(workers=w))  # fresh: its in-memory cache must not serve repeats
            t = time.perf_counter()
            res = sb.run_many(jobs)
            dt = time.perf_counter() - t
            assert sum(r.passed for r in res) == len(jobs), "canonical solutions must all pass"
            best = dt if best is None else min(best, dt)
        rows.append({"workers": w, "programs": len(jobs), "seconds": round(best, 2),
                     "exec_per_s": round(len(jobs) / best, 1), "isolation": sb.isolation})
    out = {"machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
           "load_avg_1m_after": round(os.getloadavg()[0], 2),
           "python": platform.python_version(), "rows": rows}
    path = Path(__file__).parent / "results" / "evaluate.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("| workers | programs | seconds | exec/s | isolation |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['programs']} | {r['seconds']} | {r['exec_per_s']} | {r['isolation']} |")


if __name__ == "__main__":
    main()
