"""What `prompt.stop_after_solution` saves, and whether it changes a scored program, on completions
that were decoded to their end (the closing fence or max_new_tokens) and saved by evaluate.py.

For every saved completion of a completion-style problem with an evalplus-style prompt (the output
is the code itself), `generation.code.solution_end` finds where decoding would have stopped; the
program built from the output up to there (`evaluation.prompting.to_program`) must be the program
built from the whole output, and the tokens up to there (the backbone's tokenizer) are what
decoding would have produced. Nothing is executed and no model runs.

    .venv/bin/python bench/stop_after_solution.py results/study_qwen/loop/eval/*/completions.jsonl \
        --out bench/results/stop_after_solution_study_qwen.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from domino.core.backbone import load_tokenizer
from domino.core.benchmarks import load_benchmark
from domino.core.embedded import lookup, tokenizer_dir
from domino.core.generation.code import solution_end
from domino.evaluation.prompting import to_program


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("completions", nargs="+", help="completions.jsonl files of evalplus-style HumanEval runs")
    ap.add_argument("--tokenizer", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--show", type=int, default=3, help="print this many programs that changed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    m = lookup(args.tokenizer)
    tok = load_tokenizer(tokenizer_dir(m) if m else args.tokenizer)
    problems = {p["task_id"]: p for p in load_benchmark("humaneval")}
    runs, changed, finish = [], [], Counter()
    check_s, n_checks = 0.0, 0
    for path in args.completions:
        n = n_fired = tok_full = tok_cut = 0
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            p = problems[rec["task_id"]]
            out = rec["output"]
            n += 1
            tok_full += rec["n_tokens"]
            # the engine asks at every line break of the growing text: time those calls
            t0, end, nl = time.perf_counter(), None, out.find("\n")
            while end is None and nl >= 0:
                end, nl, n_checks = solution_end(out[:nl + 1], p["entry_point"]), out.find("\n", nl + 1), n_checks + 1
            check_s += time.perf_counter() - t0
            assert end == solution_end(out, p["entry_point"])
            if end is None:
                tok_cut += rec["n_tokens"]
                finish[(rec["finish_reason"], "not fired")] += 1
                continue
            n_fired += 1
            finish[(rec["finish_reason"], "fired")] += 1
            # decoding stops at the token that completes the line after `end`
            line_end = out.find("\n", end) + 1
            tok_cut += min(rec["n_tokens"], len(tok(out[:line_end], add_special_tokens=False)["input_ids"]))
            if to_program(p, out[:end], chat=True, style="evalplus") != \
                    to_program(p, out, chat=True, style="evalplus"):
                changed.append({"file": path, "task_id": rec["task_id"], "end": end})
        runs.append({"file": path, "completions": n, "fired": n_fired, "tokens": tok_full,
                     "tokens_with_stop": tok_cut, "ratio": round(tok_cut / max(tok_full, 1), 4)})
        print(f"{path}: {n} completions, stop fired in {n_fired}, tokens {tok_full} -> {tok_cut} "
              f"({tok_cut / max(tok_full, 1):.3f})")
    tot = {k: sum(r[k] for r in runs) for k in ("completions", "fired", "tokens", "tokens_with_stop")}
    print(f"all: {tot['completions']} completions, stop fired in {tot['fired']}, tokens {tot['tokens']} -> "
          f"{tot['tokens_with_stop']} ({tot['tokens_with_stop'] / max(tot['tokens'], 1):.3f}); "
          f"programs changed: {len(changed)}")
    print("finish reason of the saved completion, and whether the stop fired:",
          {f"{a}/{b}": v for (a, b), v in sorted(finish.items())})
    print(f"{n_checks} checks at line breaks took {check_s:.2f} s "
          f"({1e3 * check_s / max(tot['completions'], 1):.2f} ms a completion)")
    for c in changed[:args.show]:
        print("changed:", c)
    result = {"runs": runs, "total": tot, "programs_changed": changed,
              "finish": {f"{a}/{b}": v for (a, b), v in sorted(finish.items())},
              "line_checks": n_checks, "check_seconds": round(check_s, 3),
              "check_ms_per_completion": round(1e3 * check_s / max(tot["completions"], 1), 3)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
