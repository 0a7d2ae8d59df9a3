"""Curation's logprob judge (`judge.mode=logprob`, the demo's and the Qwen study's): seconds to grade
`--n` synthesized problems with `HFChatGenerator.choose` (the five labels after "Score:"), the judge
prompt of conf/curation/default.yaml, on the embedded 0.5B (bf16 on a CPU with bf16 kernels).

    PYTHONPATH=<checkout>/src .venv/bin/python bench/judge_logprob.py [--n 16] [--out ...]

Run it with PYTHONPATH pointing at two checkouts to compare them; it prints the verdicts' digest so
equal grades can be checked.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from domino.core.backbone import load_backbone
from domino.core.generation.chat import HFChatGenerator
from domino.curation import judge as J

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--samples", default=str(ROOT / "results/study_qwen/samples/released_domino_s0_e10.jsonl"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/curation/default.yaml"))["judge"]
    texts = [json.loads(x)["text"] for x in Path(args.samples).read_text().splitlines()[: args.n]]
    convs = [J.build_conversation(t, cfg["criteria"], cfg["template"], cfg.get("system")) for t in texts]
    bb = load_backbone(path=args.backbone)
    gen = HFChatGenerator(bb, sampling={"max_new_tokens": 4}, batch_size=8)
    gen.choose(convs[:1], list(J.LABELS), cfg["logprob_prefix"])  # warm-up
    t = time.perf_counter()
    grades = gen.choose(convs, list(J.LABELS), cfg["logprob_prefix"])
    dt = time.perf_counter() - t
    prompt_tokens = sum(len(gen.encode(c)) for c in convs)
    res = {"model": bb.id, "dtype": bb.dtype, "n": len(convs), "seconds": round(dt, 2),
           "records_per_s": round(len(convs) / dt, 3), "prompt_tokens": prompt_tokens,
           "grades": dict(sorted({g: grades.count(g) for g in grades}.items())),
           "grades_digest": hashlib.sha256(json.dumps(grades).encode()).hexdigest()[:12],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
