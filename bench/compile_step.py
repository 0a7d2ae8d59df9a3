"""One greedy decoding step of the embedded Qwen2.5-Coder-0.5B-Instruct (bf16) on transformers'
StaticCache, eager against `torch.compile` with inductor's freezing and weight prepacking (the
CPU recipe for frozen inference), batch `--batch` after a `--prompt`-token random prompt: the
first call (compilation included) and the median of the rest.

    cd bench && PYTHONPATH=../src ../.venv/bin/python compile_step.py eager
    cd bench && PYTHONPATH=../src ../.venv/bin/python compile_step.py compile

Run each mode in its own process (freezing turns the parameters into constants of the graph).
The engine itself stays eager: see bench/README.md for what this measured.
"""
import argparse
import time

import torch

from domino.core.backbone import cache_kwargs, load_backbone


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["eager", "compile"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--steps", type=int, default=24)
    a = ap.parse_args()
    import torch._inductor.config as ic
    from transformers import StaticCache
    ic.freezing = True
    ic.cpp.weight_prepack = True
    model = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct").model.eval()
    B, P, N = a.batch, a.prompt, a.steps
    ids = torch.randint(0, 1000, (B, P), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=P + N + 8)

    def step(tok, pos, cache_position):
        out = model(input_ids=tok, position_ids=pos, cache_position=cache_position, use_cache=True,
                    **cache_kwargs(model, cache))
        return out.logits[:, -1].max(-1).indices

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, cache_position=torch.arange(P), **cache_kwargs(model, cache))
        nxt = out.logits[:, -1].max(-1).indices
        f = torch.compile(step, dynamic=False) if a.mode == "compile" else step
        times = []
        for s in range(N):
            t = time.perf_counter()
            nxt = f(nxt[:, None], torch.full((B, 1), P + s), torch.tensor([P + s]))
            times.append(time.perf_counter() - t)
    rest = sorted(times[1:])
    print(f"{a.mode}: first call {times[0]:.2f} s, median step {rest[len(rest) // 2]:.4f} s ({B} rows)")


if __name__ == "__main__":
    main()
