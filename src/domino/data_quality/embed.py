"""Text embeddings for the data-quality metrics.

Default: the masked mean of one layer's hidden states of the (frozen) backbone, i.e. the model the
domain tokens were learnt on. Any other Hugging Face encoder or causal LM can be named instead
(`data_quality.embed.path`), e.g. a sentence encoder, when a model-independent view is wanted.

Cost: one forward pass per text, O(n·L) tokens (L = max_length after truncation). Texts are sorted
by length before batching so padding stays small, and put back in their order afterwards.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    path: str | None = None     # null = the evaluate config's backbone; else a hub id / local dir
    layer: int = -1             # hidden_states index: -1 = last layer, 0 = input embeddings
    max_length: int = 256       # tokens per text; longer texts are truncated (cost is O(n·L))
    batch_size: int = 16
    device: str = "auto"        # auto = cuda when available, else cpu
    dtype: str | None = None    # null = the backbone's dtype (pooled vectors are always float32)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EmbedConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"data_quality.embed: unknown key(s) {sorted(unknown)}")
        return cls(**d)


class Embedder:
    """Masked mean pooling of hidden_states[layer] of `model` (a HF causal LM or encoder)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, ident: str, layer: int = -1,
                 max_length: int = 256, batch_size: int = 16, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        # the transformer body without the LM head: the head's vocab projection is ~25% of the cost
        # of a small LM's forward pass and its logits are never used here
        self.body = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
        self.tokenizer = tokenizer
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.layer, self.max_length, self.batch_size, self.device = layer, max_length, batch_size, device
        self.id = f"{ident}|layer={layer}|mean|max_length={max_length}"

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer
        old_side, tok.padding_side = tok.padding_side, "right"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length, add_special_tokens=True)
        finally:
            tok.padding_side = old_side
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] == 0:  # a batch of empty texts only
            ids, mask = torch.zeros(len(texts), 1, dtype=torch.long), torch.zeros(len(texts), 1, dtype=torch.long)
        empty = mask.sum(1) == 0
        if empty.any():  # an empty text with a tokenizer that adds no BOS: embed one EOS token instead
            ids[empty, 0] = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
            mask[empty, 0] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.layer == -1:  # the final hidden states (after the final norm) need no per-layer copies
            h = self.body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        else:
            h = self.body(input_ids=ids, attention_mask=mask, output_hidden_states=True
                          ).hidden_states[self.layer].float()
        m = mask.unsqueeze(-1).to(h.dtype)
        return ((h * m).sum(1) / m.sum(1)).cpu().numpy()

    def encode(self, texts: Sequence[str], what: str = "texts", progress: bool = True) -> np.ndarray:
        from domino.core.progress import Bar
        texts = [t if t else "" for t in texts]
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")[::-1]  # longest first: an OOM shows up at once
        out: list[np.ndarray | None] = [None] * len(texts)
        with Bar(f"embedding {what}", len(texts), "texts", enabled=progress) as bar:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                vecs = self._encode_batch([texts[i] for i in idx])
                for i, v in zip(idx, vecs):
                    out[i] = v
                bar.advance(len(idx))
        return np.stack(out).astype(np.float32)


def build_embedder(embed_cfg: dict | None, backbone_cfg: dict | None) -> Embedder:
    """The backbone of the run (default) or the model at `embed.path`."""
    ec = EmbedConfig.from_dict(embed_cfg)
    if ec.path is None:
        from domino.core.backbone import load_backbone
        kw = dict(backbone_cfg or {})
        kw.pop("gradient_checkpointing", None)
        if ec.dtype:
            kw["dtype"] = ec.dtype
        bb = load_backbone(**kw, device=ec.device)
        # the config hash and the dtype the rule picked tell apart two weight sets behind one name
        # (the embedding cache key)
        model, tok, ident = bb.model, bb.tokenizer, f"{bb.id}|{bb.model_hash}|{bb.dtype}"
    else:
        from transformers import AutoModel, AutoTokenizer

        from domino.core.backbone import choose_dtype
        tok = AutoTokenizer.from_pretrained(ec.path)
        dtype, why = choose_dtype(ec.dtype or "auto", ec.device)
        log.info("embedder %s: %s (%s)", ec.path, str(dtype).replace("torch.", ""), why)
        model = AutoModel.from_pretrained(ec.path, dtype=dtype)
        ident = f"{ec.path}|{str(dtype).replace('torch.', '')}"
    for p in model.parameters():
        p.requires_grad_(False)
    return Embedder(model, tok, ident, layer=ec.layer, max_length=ec.max_length,
                    batch_size=ec.batch_size, device=ec.device)


def texts_fingerprint(texts: Sequence[str], embedder_id: str) -> str:
    """Key of an embedding cache entry: the texts, their order and the embedder."""
    h = hashlib.sha256(embedder_id.encode())
    for t in texts:
        h.update(json.dumps(t).encode())
        h.update(b"\n")
    return h.hexdigest()[:20]
