"""Where packed bf16 linear weights (domino.core.generation.packed) round differently from a plain
`F.linear`: for each linear shape of a model config (random bf16 weights of those shapes, biases
where the model has them) and each row count 1..`--rows`, whether the two outputs are the same
bits, and if not how many elements differ and by how much (the largest absolute difference,
beside the outputs' root mean square).

    cd bench && PYTHONPATH=../src ../.venv/bin/python packed_bits.py [--rows 140] [--hint 64]

Both run oneDNN on the same numbers; for some row counts oneDNN picks another blocking of the sum
for one path than for the other, so a few outputs differ by one bf16 rounding. The model's config
comes from the embedded Qwen2.5-Coder-0.5B-Instruct (only its shapes are used).
"""
import argparse
import json
from pathlib import Path

import torch
from torch import nn

from domino.core.generation.packed import packed_linears, supported


def shapes(cfg) -> list[tuple[int, int, bool]]:
    """(out, in, bias) of every distinct linear layer of a Qwen2/Llama-style decoder and its head."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    bias = bool(getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2")
    return [(cfg.num_attention_heads * hd, h, bias), (cfg.num_key_value_heads * hd, h, bias),
            (h, cfg.num_attention_heads * hd, False), (cfg.intermediate_size, h, False),
            (h, cfg.intermediate_size, False), (cfg.vocab_size, h, False)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=140, help="row counts 1..rows (the head: every 16th)")
    ap.add_argument("--hint", type=int, default=64, help="rows_hint the weights are packed for")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packed_bits.json"))
    a = ap.parse_args()
    if not supported():
        raise SystemExit("no oneDNN bf16 on this CPU/torch: nothing is packed here")
    from transformers import AutoConfig

    from domino.core.backbone import embedded_model_dir
    cfg = AutoConfig.from_pretrained(embedded_model_dir(path="embedded:qwen2.5-coder-0.5b-instruct"))
    torch.manual_seed(0)
    rows = []
    for o, i, bias in shapes(cfg):
        m = nn.Linear(i, o, bias=bias).to(torch.bfloat16).requires_grad_(False)
        counts = range(1, a.rows + 1) if o < 100_000 else range(16, a.rows + 1, 16)
        differ = []
        for M in counts:
            x = torch.randn(M, i, dtype=torch.bfloat16)
            with torch.no_grad():
                plain = m(x)
                with packed_linears(m, a.hint):
                    pk = m(x)
            if not torch.equal(plain, pk):
                d = (plain.float() - pk.float()).abs()
                rms = float(plain.float().pow(2).mean().sqrt())
                differ.append({"rows": M, "elements": int((d > 0).sum()), "of": plain.numel(),
                               "max_abs_diff": float(d.max()), "output_rms": round(rms, 4)})
        row = {"out": o, "in": i, "bias": bias, "row_counts": len(counts), "differ": differ}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"hint": a.hint, "layers": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
