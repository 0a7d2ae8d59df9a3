"""Does a prefill run slower while the engine's packed weights exist? A prefill (more rows than the
engine's batch size) runs plain F.linear inside or outside `packed_linears`; this times the same
prefill forward (`last_logits` of `--batch` rows x `--prompt` random tokens, the embedded
Qwen2.5-Coder-0.5B-Instruct in bf16) with no packed copies, inside a `packed_linears(model, --hint)`
block, and beside plain copies of the weights (as much memory again, not packed), in rotated order
(rep r starts with arm r mod 3), `--reps` times; reports every time, the medians' ratios, and each
prefill's minor page faults and system CPU seconds. Until db31c23 a block made every copy when it
opened; since then a layer makes its copy at its first call of at most --hint rows, so inside the
block only the head's copy is made, at the prefill's end (its last-position rows).

    cd bench && PYTHONPATH=../src ../.venv/bin/python packed_prefill.py [--batch 64] [--prompt 160] [--reps 3]

Why: decode_batch.py's prefill read slower in its packed runs on both machines it ran on (AMX
2026-12-05: 9.49 / 6.90 s plain against 9.82 / 9.38 s packed; AMD 2026-12-07: 29.4 / 28.0 against
31.1 / 32.2 s), though the packed path is never taken by a prefill's rows.
"""
import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from domino.core.backbone import load_backbone
from domino.core.generation.hf import last_logits
from domino.core.generation.packed import packed_linears


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--hint", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packed_prefill.json"))
    a = ap.parse_args()
    model = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct").model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 1000, (a.batch, a.prompt), generator=g)

    def prefill() -> tuple[float, tuple[int, float]]:
        """(seconds, (minor page faults, system CPU seconds)) of one prefill."""
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        last_logits(model, input_ids=ids, use_cache=True)
        dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        return dt, (r1.ru_minflt - r0.ru_minflt, round(r1.ru_stime - r0.ru_stime, 2))

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def plain():
        return prefill()

    def inside_packed_block():
        with packed_linears(model, a.hint):
            return prefill()

    def beside_plain_copies():
        copies = [m.weight.clone() for m in layers]  # as much memory again, not packed
        out = prefill()
        del copies
        return out

    arms = [plain, inside_packed_block, beside_plain_copies]
    times = {f.__name__: [] for f in arms}
    faults = {f.__name__: [] for f in arms}  # per arm: minor page faults and system CPU seconds
    with torch.no_grad():
        prefill()  # warm-up
        for r in range(a.reps):  # rep r starts with arm r mod 3: no arm always runs first
            for f in arms[r % 3:] + arms[:r % 3]:
                dt, pf = f()
                times[f.__name__].append(round(dt, 3))
                faults[f.__name__].append(pf)
            print(json.dumps(times), json.dumps(faults), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"batch": a.batch, "prompt": a.prompt, "hint": a.hint, "threads": torch.get_num_threads(),
           "seconds": times, "median_s": med, "minor_faults_and_system_s": faults,
           "inside_over_plain": round(med["inside_packed_block"] / med["plain"], 3),
           "copies_over_plain": round(med["beside_plain_copies"] / med["plain"], 3)}
    print(json.dumps(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
