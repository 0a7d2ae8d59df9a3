"""Read the domain tokens a training run produced, from either artifact it leaves:

- `<run>/domain_prompt.safetensors` + `domain_prompt.json` (the export: D with heads folded);
- `<run>/checkpoints/*.ckpt` (Lightning: only `prompts.*` tensors, hyperparameters, backbone hash),
  folded here the same way `SoftPrompts.domain_tokens()` does, without loading the backbone twice.

Both give a `DomainPrompt`: the (k, h) fp32 tensor plus the metadata synthesis checks the backbone
against and copies into every sample's provenance.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DOMAIN_KEY = "domain_tokens"


@dataclass
class DomainPrompt:
    tokens: torch.Tensor          # (k, h) fp32
    meta: dict[str, Any]          # backbone (load_backbone kwargs), backbone_hash, hidden_size, method, ...
    path: str

    @property
    def digest(self) -> str:
        """Content hash of D: identifies the prompt whatever file or directory it is read from."""
        return hashlib.sha256(self.tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def load_domain_prompt(path: str | Path) -> DomainPrompt:
    path = Path(path).expanduser()
    if path.is_dir():  # a run directory: prefer the export
        for cand in (path / "domain_prompt.safetensors", path / "checkpoints" / "last.ckpt"):
            if cand.exists():
                path = cand
                break
        else:
            raise FileNotFoundError(f"ckpt={path}: the directory holds neither domain_prompt.safetensors "
                                    "nor checkpoints/last.ckpt")
    if not path.exists():
        raise FileNotFoundError(f"ckpt={path}: no such file")
    if path.suffix == ".safetensors":
        return _from_export(path)
    if path.suffix == ".ckpt":
        return _from_lightning(path)
    raise ValueError(f"ckpt={path}: expected a domain_prompt.safetensors or a Lightning .ckpt")


def _from_export(path: Path) -> DomainPrompt:
    from safetensors.torch import load_file
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} has no metadata file {meta_path.name} beside it: it says which "
                                "backbone the tokens belong to, synthesis cannot check without it")
    tensors = load_file(str(path))
    if DOMAIN_KEY not in tensors:
        raise KeyError(f"{path}: no tensor {DOMAIN_KEY!r} (found {sorted(tensors)})")
    meta = json.loads(meta_path.read_text())
    return DomainPrompt(_check_shape(tensors[DOMAIN_KEY].float(), path), meta, str(path))


def _from_lightning(path: Path) -> DomainPrompt:
    # weights_only: a checkpoint holds tensors and plain hyperparameters; nothing to unpickle
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if "domino" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a domino training checkpoint (no 'domino' metadata)")
    hp, sd = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    if "prompts.domain" not in sd:
        raise KeyError(f"{path}: no prompts.domain tensor (found {sorted(sd)})")
    P = sd["prompts.domain"].float()
    if hp.get("domain_head"):
        from domino.training.prompts import DomainHead
        head = DomainHead(P.shape[1], hp.get("domain_head_hidden", 256))
        prefix = "prompts.domain_head."
        head.load_state_dict({k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)})
        with torch.no_grad():
            P = head(P)
    meta = {**ckpt["domino"], "backbone": hp.get("backbone"), "k": int(P.shape[0]),
            "l": hp.get("l", 0) if hp.get("method") == "domino" else 0, "method": hp.get("method"),
            "seed": hp.get("seed"), "n_references": hp.get("n_references"),
            "steps": ckpt.get("global_step")}
    return DomainPrompt(_check_shape(P.detach().contiguous(), path), meta, str(path))


def _check_shape(D: torch.Tensor, path: Path) -> torch.Tensor:
    if D.dim() != 2 or D.shape[0] < 1:
        raise ValueError(f"{path}: domain tokens must be (k, hidden), got {tuple(D.shape)}")
    return D


def check_backbone(prompt: DomainPrompt, backbone_hash: str, hidden_size: int, backbone_id: str,
                   vocab_size: int | None = None, tokenizer_len: int | None = None) -> None:
    """Refuse to sample from domain tokens with a model they were not trained on."""
    meta = prompt.meta
    k, h = prompt.tokens.shape
    if meta.get("hidden_size") not in (None, h):
        raise ValueError(f"{prompt.path}: metadata says hidden_size={meta['hidden_size']} but the tensor "
                         f"is ({k}, {h}): the files do not belong together")
    if h != hidden_size:
        raise ValueError(f"backbone mismatch: {prompt.path} holds domain tokens of hidden size {h} "
                         f"(trained on {meta.get('backbone_id')}), the backbone {backbone_id} has "
                         f"hidden size {hidden_size}")
    want = meta.get("backbone_hash")
    if want is None:
        raise ValueError(f"{prompt.path}: metadata has no backbone_hash, cannot check the backbone")
    if want != backbone_hash:
        raise ValueError(f"backbone mismatch: {prompt.path} was trained on {meta.get('backbone_id')} "
                         f"(config hash {want}), the loaded backbone is {backbone_id} (config hash "
                         f"{backbone_hash}). Drop the backbone= override to use the checkpoint's own.")
    if vocab_size is not None and tokenizer_len is not None and tokenizer_len > vocab_size:
        raise ValueError(f"tokenizer mismatch: the tokenizer has {tokenizer_len} tokens, the model's "
                         f"vocabulary only {vocab_size}")
