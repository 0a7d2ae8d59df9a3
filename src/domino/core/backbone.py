"""Load a frozen causal LM and its tokenizer: hub id, local directory, a model embedded through
pip (domino.core.embedded: SmolLM2-135M, Qwen2.5-Coder-0.5B/1.5B, de-quantised once into the cache),
or a tiny randomly initialised model for tests. Also the one rule that decides a stage's dtype and
device (`choose_dtype`, `choose_device`), used by training, synthesis, curation, fine-tuning and
evaluation alike.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from domino.core import embedded
from domino.core.embedded import DEFAULT_BACKBONE, default_cache_dir  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
EMBEDDED_ID = embedded.EMBEDDED[embedded.DEFAULT].hub_id


# --------------------------------------------------------------------------------------------
# the KV cache's keyword: transformers 5.x renamed a forward's `past_key_values` to `cache` (the old
# name warns, and goes in 5.40); setup.cfg allows 4.56 onwards, which know only the old one

@lru_cache(maxsize=None)
def _takes_cache(cls) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_kwargs(model: nn.Module, cache) -> dict:
    """{name: cache} for `model(...)`: `cache` where its forward takes that name, else
    `past_key_values` (a PEFT wrapper is asked about the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"cache" if _takes_cache(type(base)) else "past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned, under the name its output class declares."""
    return out.cache if "cache" in getattr(type(out), "__dataclass_fields__", {}) else out.past_key_values


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: Any
    id: str                 # what produced the weights: hub id, local dir, embedded/tiny description
    hidden_size: int
    model_hash: str         # model_config_hash of its config: checkpoints and samplers compare it
    dtype: str = "float32"  # what choose_dtype picked for the frozen weights

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()


def hub_id(backbone_cfg: dict[str, Any] | None) -> str | None:
    """The name other tools (peft, the hub, vLLM elsewhere) know the backbone by: the hub id of the
    embedded model, a hub id or local directory as given, None for the random tiny test model."""
    path = str((backbone_cfg or {}).get("path") or "embedded")
    if path == "tiny":
        return None
    m = embedded.lookup(path)
    return m.hub_id if m else path


def model_dir(backbone_cfg: dict[str, Any]) -> str:
    """A local directory (or hub id) holding the backbone's weights, for engines that load by path
    (vLLM): the de-quantised cache of an embedded model, else the path as given."""
    path = str(backbone_cfg.get("path") or "embedded")
    if path == "tiny":
        raise ValueError("engine=vllm cannot load the random tiny test backbone; use engine=hf")
    m = embedded.lookup(path)
    return str(embedded.model_dir(m, backbone_cfg.get("cache_dir"))) if m else path


# ---------------------------------------------------------------------------------- dtype and device
@lru_cache(maxsize=1)
def cpu_bf16_kernels() -> str | None:
    """The CPU feature that makes bf16 matrix products fast here (AMX or AVX512-BF16), or None.
    Without one, bf16 on the CPU is emulated and slower than fp32."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        return None
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            return name
    return None


def choose_device(device: str | None = None) -> str:
    """`auto` (or null): cuda when there is one, else cpu."""
    device = str(device or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def choose_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> tuple[torch.dtype, str]:
    """The one dtype rule for a frozen backbone: (dtype, why). `auto` (or null) is bfloat16 on CUDA
    and on a CPU with bf16 kernels, else float32. Trainable tensors (soft tokens, LoRA weights, the
    optimiser state) stay fp32 whatever this says: they are cast where they are fed in."""
    if isinstance(dtype, torch.dtype):
        return dtype, "as given"
    if dtype is not None and str(dtype) != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"backbone.dtype={dtype!r} is not one of {sorted(DTYPES) + ['auto']}")
        return DTYPES[dtype], "as configured"
    if choose_device(device).startswith("cuda"):
        return torch.bfloat16, "auto: CUDA"
    feature = cpu_bf16_kernels()
    if feature:
        return torch.bfloat16, f"auto: the CPU has {feature}"
    return torch.float32, "auto: the CPU has no bf16 kernels (AMX, AVX512-BF16)"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> torch.dtype:
    return choose_dtype(dtype, device)[0]


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


def embedded_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2's tokenizer alone (the random tiny test model uses it)."""
    return embedded.tokenizer_dir(embedded.EMBEDDED[embedded.DEFAULT], cache_dir)


def embedded_model_dir(cache_dir: str | Path | None = None, path: str = "embedded") -> Path:
    """The de-quantised directory of an embedded model (`path`: `embedded` or `embedded:<name>`)."""
    return embedded.model_dir(embedded.lookup(path), cache_dir)


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


def load_backbone(name: str = "smollm2", path: str | None = None, dtype: str | None = "auto",
                  gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                  cache_dir: str | None = None, tiny: dict | None = None,
                  trust_remote_code: bool = False, device: str | None = None, **_: Any) -> Backbone:
    """Load a frozen backbone in the dtype `choose_dtype(dtype, device)` picks (logged).

    `path` is a hub id, a local directory, `embedded` / `embedded:<name>` (a GGUF shipped via pip,
    see domino.core.embedded) or `tiny` (a random model from `tiny`: hidden_size, num_layers, ... with
    SmolLM2's tokenizer). `device` only informs the dtype rule; the caller moves the model. Keys
    other than these (e.g. a display name) are ignored on purpose so a backbone config group can
    carry documentation fields.
    """
    from transformers import AutoModelForCausalLM
    torch_dtype, why = choose_dtype(dtype, device)
    path = path or "embedded"
    if path == "tiny":
        tok = load_tokenizer(embedded_tokenizer_dir(cache_dir))
        model = build_tiny(tok, **(tiny or {})).to(torch_dtype)
        ident = "tiny:" + json.dumps(dict(tiny or {}), sort_keys=True)
    else:
        m = embedded.lookup(path)
        if m is not None:
            local = embedded.model_dir(m, cache_dir)
            ident = f"{m.hub_id} ({m.quant} GGUF from pip, de-quantised)"
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
    log.info("backbone %s: %s (%s)", ident, str(torch_dtype).replace("torch.", ""), why)
    if gradient_checkpointing:
        # inputs_embeds come from trainable soft tokens, so the checkpointed blocks see inputs that
        # require grad; non-reentrant checkpointing handles frozen weights correctly.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    freeze(model)
    return Backbone(model=model, tokenizer=tok, id=ident, hidden_size=model.config.hidden_size,
                    model_hash=model_config_hash(model.config), dtype=str(torch_dtype).replace("torch.", ""))
