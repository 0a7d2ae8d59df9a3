"""Where a decoding step's time goes, by kind of KV cache: the torch profiler over `--steps` greedy
one-token steps at batch `--batch` after a `--prompt`-token random prompt (no padding) on the
embedded Qwen2.5-Coder-0.5B-Instruct (bf16 on a CPU with bf16 kernels), each step given an all-ones
2-D attention mask as the engine's prompt batches are.

    .venv/bin/python bench/profile_decode_step.py dynamic buffered static engine [--batch 64 --prompt 160 --steps 8]
        [--adapter <finetune run>/adapter]

dynamic: transformers' DynamicCache (concatenates the whole cache every step); buffered: the same
cache with `domino.core.generation.hf.buffered` layers (spare columns, one column written a step);
static: transformers' StaticCache; engine: `HFEngine.generate_shared` itself (its picks, stop
checks, step masks and `--packed` weights) decoding `--steps` tokens a row from a prefix prefilled
before the profiler starts, the weights packed before it too (`--adapter DIR`: with a LoRA adapter
attached as evaluate.py attaches it). Prints each kind's median step (the engine's: its decoding
loop's time over the steps) and the costliest ops.
"""
import argparse
import time

import torch
from torch.profiler import profile

from domino.core.backbone import cache_kwargs, load_backbone
from domino.core.generation.hf import HFEngine, buffered
from domino.core.generation.params import SamplingParams


def profile_engine(model, tok, ids, steps: int, packed: str, rows: int):
    """The engine's own decoding loop over a prefilled prefix (the first row of `ids`)."""
    B = ids.shape[0]
    p = SamplingParams(temperature=0.0, max_new_tokens=steps, min_new_tokens=steps)
    eng = HFEngine(model, tok, p, batch_size=B, packed_weights=packed)
    with eng.packed_weights():
        prefix = eng.prefill(eng.embed_ids(ids[0].tolist()))
        eng.generate_shared(prefix, list(range(B)))  # warm-up
        d0 = eng.decode_s
        with profile() as prof:
            eng.generate_shared(prefix, list(range(B)))
    step = (eng.decode_s - d0) / steps
    print(f"engine (packed: {eng.pack}, {eng.n_packed} layers): {step:.3f} s a step ({B} rows, "
          f"{B / step:.0f} tok/s)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kinds", nargs="+", choices=["dynamic", "buffered", "static", "engine"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--packed", choices=["auto", "false"], default="auto", help="engine: engine.packed_weights")
    ap.add_argument("--rows", type=int, default=10, help="ops shown")
    ap.add_argument("--adapter", default=None, help="engine: a LoRA adapter directory (finetune.py's adapter/)")
    a = ap.parse_args()
    from transformers import DynamicCache, StaticCache
    bb = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct")
    model = bb.model
    B, P, N = a.batch, a.prompt, a.steps
    ids = torch.randint(0, 1000, (B, P), generator=torch.Generator().manual_seed(0))
    dec, head = model.get_decoder(), model.get_output_embeddings()
    for kind in a.kinds:
        if kind == "engine":
            m = model
            if a.adapter:  # as evaluate.py attaches a fine-tuned adapter (unmerged on a bf16 backbone)
                from domino.evaluation.generation import load_adapter
                m = load_adapter(model, a.adapter)[0]
            profile_engine(m, bb.tokenizer, ids, N, a.packed, a.rows)
            continue
        cache = (StaticCache(config=model.config, max_cache_len=P + N + 8) if kind == "static"
                 else DynamicCache(config=model.config))
        mask = torch.ones(B, P, dtype=torch.long)
        times = []
        with torch.inference_mode():
            out = dec(input_ids=ids, use_cache=True, attention_mask=mask, **cache_kwargs(dec, cache))
            if kind == "buffered":
                cache = buffered(cache, 64)
            nxt = head(out.last_hidden_state[:, -1]).argmax(-1)
            with profile() as prof:
                for s in range(N):
                    t = time.perf_counter()
                    mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                    kw = dict(input_ids=nxt[:, None], use_cache=True, **cache_kwargs(dec, cache),
                              position_ids=torch.full((B, 1), P + s), attention_mask=mask)
                    if kind == "static":
                        kw["cache_position"] = torch.tensor([P + s])
                    nxt = head(dec(**kw).last_hidden_state[:, -1]).argmax(-1)
                    times.append(time.perf_counter() - t)
        print(f"{kind}: median step {sorted(times)[N // 2]:.3f} s ({B} rows)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
