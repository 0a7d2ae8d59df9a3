"""Sample completions for benchmark prompts: HF transformers (batched, KV cache, left padding) or
vLLM (`engine=vllm`, imported only then; GPU only).

Completions are appended to a JSONL file and flushed one record at a time, so a crashed run can
be resumed (`resume=<old completions.jsonl or run dir>`) without regenerating finished samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    n_samples: int = 1
    temperature: float = 0.0       # 0 = greedy (then n_samples > 1 repeats the same answer)
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0


def load_adapter(model, adapter: str | None):
    """Attach a peft LoRA directory and merge it (merged weights generate at base-model speed)."""
    if not adapter:
        return model, None
    from peft import PeftModel
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter={adapter}: no adapter_config.json there (a peft LoRA dir?)")
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model.eval()
    return model, adapter_fingerprint(path)


def adapter_fingerprint(path: Path) -> str:
    """What the adapter computes: its config and weights. finetune.py's provenance file beside
    them (domino_finetune.json: paths, git commit) is left out, so the same weights exported by
    another run have the same fingerprint (and completion keys)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin") and f.name != "domino_finetune.json":
            h.update(f.name.encode())
            h.update(_canonical_config(f.read_bytes()) if f.name == "adapter_config.json" else f.read_bytes())
    return h.hexdigest()[:16]


def _canonical_config(raw: bytes) -> bytes:
    # peft saves target_modules (a set) in hash-seed order: the same adapter must hash the same
    conf = json.loads(raw)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(conf.get(key), list):
            conf[key] = sorted(conf[key])
    return json.dumps(conf, sort_keys=True).encode()


class HFEngine:
    def __init__(self, model, tokenizer, sampling: SamplingConfig, chat: bool):
        self.model, self.tok, self.s, self.chat = model, tokenizer, sampling, chat
        self.tok.padding_side = "left"  # batched decoding: every row's last prompt token at -1
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> tuple[list[str], int]:
        """Return decoded continuations and the number of generated (non-pad) tokens."""
        enc = self.tok(prompts, return_tensors="pt", padding=True,
                       add_special_tokens=not self.chat).to(self.device)  # chat templates add BOS
        sample = self.s.temperature > 0
        kwargs = dict(max_new_tokens=self.s.max_new_tokens, do_sample=sample, use_cache=True,
                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        if sample:
            kwargs.update(temperature=self.s.temperature, top_p=self.s.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        n_tokens = int((new != self.tok.pad_token_id).sum())
        return self.tok.batch_decode(new, skip_special_tokens=True), n_tokens


class VLLMEngine:
    """GPU only. Untested on CPU CI: see tests marked `gpu`."""

    def __init__(self, model_path: str, sampling: SamplingConfig, chat: bool, adapter: str | None = None,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85):
        from vllm import LLM  # imported only when engine=vllm
        self.s, self.chat, self.adapter = sampling, chat, adapter
        self.llm = LLM(model=model_path, dtype=dtype, enable_lora=bool(adapter), seed=sampling.seed,
                       gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: list[str], seed: int) -> tuple[list[str], int]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        params = SamplingParams(n=1, temperature=self.s.temperature, top_p=self.s.top_p if self.s.temperature
                                else 1.0, max_tokens=self.s.max_new_tokens, seed=seed)
        lora = LoRARequest("adapter", 1, self.adapter) if self.adapter else None
        outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        return texts, sum(len(o.outputs[0].token_ids) for o in outs)


def read_completions(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "completions.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no completions file at {path}")
    recs = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                # only a torn *last* line (crash mid-write) is tolerated; it is regenerated
                rest = fh.read()
                if rest.strip():
                    raise ValueError(f"{path}:{lineno}: invalid JSON in completions") from None
                log.warning("%s:%d: dropping a torn last line (crash during write)", path, lineno)
    return recs


def batch_seed(seed: int, keys: Iterable[str]) -> int:
    """Seed of a batch from its content, so a resumed run draws the same samples it would have."""
    return int.from_bytes(hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()[:4], "little")
