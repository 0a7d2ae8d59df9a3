"""The exported domain prompt: written by training, read by synthesis (and anything else).

- `save_domain_prompt` writes `<dir>/domain_prompt.safetensors` (D, heads folded, fp32) and
  `<dir>/domain_prompt.json` (how to rebuild: backbone, objective, references, digest of D);
- `load_domain_prompt` reads that export, or a Lightning `<run>/checkpoints/*.ckpt` (only the
  `prompts.*` tensors, folded by `training.prompts.domain_from_state_dict`, the same code the
  module exports with), or a run directory (its export first).

Both give a `DomainPrompt`: the (k, h) fp32 tensor plus the metadata synthesis checks the backbone
against and copies into every sample's provenance. A load checks the tensor is finite and, for an
export, that its digest is the one recorded at save time; every error names the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domino.core.records import read_json_object, write_text_atomic

DOMAIN_KEY = "domain_tokens"
EXPORT = "domain_prompt.safetensors"
META = "domain_prompt.json"
PEFT_DIR = "peft_prompt"  # the same D as a peft PromptTuning adapter


def tensor_digest(tokens: torch.Tensor) -> str:
    """Content hash of D: identifies the prompt whatever file or directory it is read from."""
    return hashlib.sha256(tokens.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class DomainPrompt:
    tokens: torch.Tensor          # (k, h) fp32
    meta: dict[str, Any]          # backbone (load_backbone kwargs), backbone_hash, hidden_size, method, ...
    path: str

    @property
    def digest(self) -> str:
        return tensor_digest(self.tokens)


def save_domain_prompt(out_dir: str | Path, tokens: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write the export (tensor first, metadata last: a metadata file means a complete export)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    D = tokens.detach().float().cpu().contiguous()
    _check_tensor(D, out_dir / EXPORT)
    meta = {**meta, "hidden_size": int(D.shape[1]), "k": int(D.shape[0]), "digest": tensor_digest(D)}
    path = out_dir / EXPORT
    tmp = path.with_name(path.name + ".tmp")
    header = {"format": "pt", "digest": meta["digest"], "backbone_id": str(meta.get("backbone_id")),
              "backbone_hash": str(meta.get("backbone_hash"))}
    save_file({DOMAIN_KEY: D}, str(tmp), metadata=header)
    tmp.replace(path)
    write_text_atomic(out_dir / META, json.dumps(meta, indent=2, default=str))
    save_peft_prompt(out_dir / PEFT_DIR, D, meta)
    return path


def save_peft_prompt(out_dir: str | Path, tokens: torch.Tensor, meta: dict[str, Any]) -> Path:
    """D as a peft PromptTuning adapter (adapter_config.json + adapter_model.safetensors), so
    `PeftModel.from_pretrained(base, <run>/peft_prompt)` prepends it to every input. The base model
    is named by hub id (backbone.hub_id); the safetensors header carries the provenance."""
    from peft import PromptTuningConfig
    from safetensors.torch import save_file

    from domino.core.backbone import hub_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    D = tokens.detach().float().cpu().contiguous()
    base = hub_id(meta.get("backbone")) if meta.get("backbone") else None
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(D.shape[0]), token_dim=int(D.shape[1]),
                       num_transformer_submodules=1, base_model_name_or_path=base).save_pretrained(str(out_dir))
    header = {"format": "pt", "digest": tensor_digest(D), "base_model": str(base),
              "source": "domino domain prompt (D, heads folded)"}
    for key in ("backbone_id", "backbone_hash", "method", "reference_fingerprint", "n_references", "domain",
                "git_commit", "config_hash", "steps", "seed"):
        if meta.get(key) is not None:
            header[key] = str(meta[key])
    if meta.get("objective"):
        header["objective"] = json.dumps(meta["objective"], sort_keys=True, default=str)
    tmp = out_dir / "adapter_model.safetensors.tmp"
    save_file({"prompt_embeddings": D}, str(tmp), metadata=header)
    tmp.replace(out_dir / "adapter_model.safetensors")
    return out_dir


def load_domain_prompt(path: str | Path) -> DomainPrompt:
    path = Path(path).expanduser()
    if path.is_dir():  # a run directory: prefer the export
        for cand in (path / EXPORT, path / "checkpoints" / "last.ckpt"):
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} has no metadata file {meta_path.name} beside it: it says which "
                                "backbone the tokens belong to, synthesis cannot check without it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the domain prompt ({e}); the file is damaged or truncated: "
                         "export it again from the run's checkpoints/last.ckpt") from None
    if DOMAIN_KEY not in tensors:
        raise KeyError(f"{path}: no tensor {DOMAIN_KEY!r} (found {sorted(tensors)})")
    meta = read_json_object(meta_path)
    D = _check_tensor(tensors[DOMAIN_KEY].float(), path)
    want = meta.get("digest")
    if want is not None and want != tensor_digest(D):
        raise ValueError(f"{path}: the tensor's digest {tensor_digest(D)} is not the {want} recorded in "
                         f"{meta_path.name}: the file was changed or damaged after export")
    return DomainPrompt(D, meta, str(path))


def _from_lightning(path: Path) -> DomainPrompt:
    from domino.core.prompts import domain_from_state_dict
    try:
        # weights_only: a checkpoint holds tensors and plain hyperparameters; nothing to unpickle
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); the file is "
                         "damaged or truncated") from None
    if not isinstance(ckpt, dict) or "domino" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a domino training checkpoint (no 'domino' metadata)")
    from domino.core.trainer import check_checkpoint
    check_checkpoint(ckpt, path)  # the tensors' digest stored at save time, and finiteness
    hp, sd = ckpt.get("hyper_parameters", {}), ckpt["state_dict"]
    try:
        P = domain_from_state_dict(sd)
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from None
    objective, prompt = hp.get("objective") or {}, hp.get("prompt") or {}
    l_trained = int(prompt.get("l", 0)) if "prompts.samples" in sd or "prompts.sample_coef" in sd else 0
    meta = {**ckpt["domino"], "backbone": hp.get("backbone"), "k": int(P.shape[0]), "l": l_trained,
            "method": objective.get("name"), "objective": objective, "seed": hp.get("seed"),
            "n_references": hp.get("n_references"), "steps": ckpt.get("global_step")}
    return DomainPrompt(_check_tensor(P, path), meta, str(path))


def _check_tensor(D: torch.Tensor, path: Path) -> torch.Tensor:
    if D.dim() != 2 or D.shape[0] < 1:
        raise ValueError(f"{path}: domain tokens must be (k, hidden), got {tuple(D.shape)}")
    if not bool(torch.isfinite(D).all()):
        bad = int((~torch.isfinite(D)).sum())
        raise ValueError(f"{path}: {bad} of {D.numel()} domain-token values are NaN or infinite: the "
                         "training diverged or the file is damaged; refusing to sample from it")
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
