"""The one place a decoding engine is built, for every stage that decodes (synthesis, curation's
judge / responses / test writer, evaluation).

One engine config schema (conf/engine/hf.yaml, conf/engine/vllm.yaml), one thread and device rule
(`runtime`), one dtype rule (backbone.choose_dtype, through load_backbone), one set of vLLM
keyword arguments (`vllm_kwargs`). `engine_config` turns a bare name (`engine: vllm`) or the group
into that schema; curation's model stages read it from `curation.engine` (one block for the judge,
the responses and the test writer), each stage able to override it.
"""
from __future__ import annotations

from typing import Any

ENGINES = ("hf", "vllm")
# the keys of the one schema (conf/engine/*.yaml); batch_size is the caller's (resume granularity)
HF_KEYS = ("device", "dtype", "num_threads", "packed_weights", "shared_prefix")
VLLM_KEYS = ("tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len", "enforce_eager",
             "enable_prefix_caching", "extra")
# settings of where and how fast a model runs, which change at most the float rounding of what it
# outputs: left out of fingerprints (packed_weights: oneDNN on weights reordered once; at some row
# counts it blocks a sum differently and a few bf16 outputs round differently, packed.py;
# shared_prefix: a batch's common prompt prefix computed as one row, which rounds as a row alone does)
RUNTIME_KEYS = ("device", "num_threads", "packed_weights", "shared_prefix")
# how rows are scheduled into batches (continuous batching), which changes at most the rounding of
# what is output: left out of the fingerprints of synthesis and curation (evaluation records it)
SCHEDULE_KEYS = ("refill",)


def engine_config(engine: Any, batch_size: int | None = None, where: str = "engine") -> dict[str, Any]:
    """The engine as a dict of the one schema. `engine`: a name (`engine: vllm` in an older
    experiment file: that engine with its defaults) or a dict with `name` (null = hf);
    `batch_size`, when given (`sampling.batch_size`, the older place of it), wins."""
    ecfg = {"name": engine} if isinstance(engine, str) or engine is None else dict(engine)
    ecfg["name"] = ecfg.get("name") or "hf"
    if ecfg["name"] not in ENGINES:
        raise ValueError(f"{where}={ecfg['name']!r}: expected one of {ENGINES}")
    if batch_size is not None:
        ecfg["batch_size"] = int(batch_size)
    return ecfg


def runtime(ecfg: dict[str, Any]) -> str:
    """The one thread and device rule: `num_threads` (null = torch's default) sets torch's CPU
    threads, `device` (auto | cpu | cuda[:i]) is resolved; returns the device."""
    import torch

    from domino.core.backbone import choose_device
    if ecfg.get("num_threads"):  # on a shared CPU, oversubscribed threads can be 10-30x slower than one
        torch.set_num_threads(int(ecfg["num_threads"]))
    return choose_device(ecfg.get("device"))


def load_model(bcfg: dict[str, Any], ecfg: dict[str, Any]):
    """The backbone (domino.core.backbone.Backbone) on the engine's device; `engine.dtype` (null = the
    backbone's) goes through the one dtype rule in load_backbone."""
    from domino.core.backbone import load_backbone
    device = runtime(ecfg)
    bb = load_backbone(**{**bcfg, "dtype": ecfg.get("dtype") or bcfg.get("dtype"), "device": device})
    bb.model.to(device)
    return bb


def hf_identity(bb) -> dict[str, Any]:
    """What samples and verdicts record of the model they came from."""
    return {"backbone_id": bb.id, "backbone_hash": bb.model_hash, "hidden_size": bb.hidden_size,
            "vocab_size": bb.model.config.vocab_size, "dtype": bb.dtype}


def vllm_identity(bcfg: dict[str, Any], ecfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, identity) of the model vLLM will load, without loading its weights here."""
    from transformers import AutoConfig

    from domino.core.backbone import load_tokenizer, model_config_hash, model_dir
    local = model_dir(bcfg)
    conf = AutoConfig.from_pretrained(local, trust_remote_code=bool(bcfg.get("trust_remote_code")))
    text = conf.get_text_config()
    return load_tokenizer(local), {"backbone_id": str(bcfg.get("path")), "backbone_hash": model_config_hash(conf),
                                   "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
                                   "dtype": str(ecfg.get("dtype") or "auto")}


def open_hf(model, tokenizer, params, ecfg: dict[str, Any]):
    """An HFEngine on a loaded model with the schema's settings (batch_size, packed_weights,
    shared_prefix)."""
    from domino.core.generation.hf import HFEngine
    shared = ecfg.get("shared_prefix", True)
    if not isinstance(shared, bool):
        raise ValueError(f"engine.shared_prefix={shared!r}: expected true or false")
    return HFEngine(model, tokenizer, params, batch_size=int(ecfg.get("batch_size", 32)),
                    packed_weights=ecfg.get("packed_weights", "auto"), shared_prefix=shared)


def vllm_kwargs(ecfg: dict[str, Any]) -> dict[str, Any]:
    """VLLMEngine's engine settings from the one schema (defaults: conf/engine/vllm.yaml)."""
    return dict(tensor_parallel_size=int(ecfg.get("tensor_parallel_size") or 1),
                dtype=str(ecfg.get("dtype") or "auto"),
                gpu_memory_utilization=float(ecfg.get("gpu_memory_utilization") or 0.9),
                max_model_len=ecfg.get("max_model_len"), enforce_eager=bool(ecfg.get("enforce_eager")),
                enable_prefix_caching=ecfg.get("enable_prefix_caching"), extra=ecfg.get("extra"))


def open_vllm(bcfg: dict[str, Any], ecfg: dict[str, Any], params, seed: int, *, prompt_embeds: bool,
              batch_size: int | None = None, adapter: str | None = None, max_lora_rank: int | None = None):
    """A VLLMEngine on the backbone's local directory (embedded models: their converted cache)."""
    from domino.core.backbone import model_dir
    from domino.core.generation.vllm import VLLMEngine
    path = model_dir(bcfg)
    return VLLMEngine(path, path, params, batch_size=int(batch_size or ecfg.get("batch_size") or 1024),
                      seed=int(seed), trust_remote_code=bool(bcfg.get("trust_remote_code")),
                      prompt_embeds=prompt_embeds, adapter=adapter, max_lora_rank=max_lora_rank, **vllm_kwargs(ecfg))
