"""Save a randomly initialised Qwen2.5-shaped model (bf16) + the embedded tokenizer as a local HF
directory, so that `backbone.path=<dir>` runs every entry point on it without any download.

    python bench/gpu/make_random_model.py 0.5b /tmp/q05
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from train_step_gpu import build_model  # noqa: E402

from domino.core.backbone import embedded_tokenizer_dir, load_tokenizer  # noqa: E402

if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    model = build_model(name, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, "sdpa")
    tok = load_tokenizer(embedded_tokenizer_dir())
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params) to {out}")
