"""Large-scale sampling with vLLM (GPU only; imported only when engine=vllm).

The domain tokens go in as prompt embeddings: `LLM(..., enable_prompt_embeds=True)` and requests
`{"prompt_embeds": D}` with D a (k, hidden) tensor, which vLLM documents for offline inference
(vllm.inputs.EmbedsPrompt; written against vLLM >= 0.10.2, where prompt embeddings work in the V1
engine). Text prompts (baselines, benchmark prompts) go in as token ids. Every request carries its
own seed (`SamplingParams.seed`), so a sample depends on its index, not on the chunk it was sent in.
A LoRA adapter directory (evaluation of a fine-tuned model) is applied per request with
`LoRARequest`; vLLM then needs `enable_lora` and a `max_lora_rank` at least the adapter's rank.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from domino.core.generation.params import Generation, SamplingParams, StopFn, check_rows, stop_after

log = logging.getLogger(__name__)


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, tokenizer_path: str, params: SamplingParams, batch_size: int = 1024,
                 tensor_parallel_size: int = 1, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, enforce_eager: bool = False, seed: int = 0,
                 trust_remote_code: bool = False, enable_prefix_caching: bool | None = None,
                 extra: dict[str, Any] | None = None, prompt_embeds: bool = True, adapter: str | None = None,
                 max_lora_rank: int | None = None):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("engine=vllm needs vLLM on a CUDA machine: pip install 'vllm>=0.10.2' "
                              "(or pip install -e '.[gpu]')") from e
        if not torch.cuda.is_available():
            raise RuntimeError("engine=vllm needs a CUDA GPU; use engine=hf on this machine")
        self.params, self.batch_size = params, batch_size
        kwargs: dict[str, Any] = dict(model=model_path, tokenizer=tokenizer_path, enable_prompt_embeds=prompt_embeds,
                                      tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                      gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                      enforce_eager=enforce_eager, trust_remote_code=trust_remote_code)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = enable_prefix_caching
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest
            kwargs["enable_lora"] = True
            if max_lora_rank:
                kwargs["max_lora_rank"] = int(max_lora_rank)
            self.lora = LoRARequest("adapter", 1, str(adapter))
        kwargs.update(extra or {})
        log.info("vLLM %s: loading %s (tensor_parallel_size=%d)", vllm.__version__, model_path,
                 tensor_parallel_size)
        self.llm = vllm.LLM(**kwargs)
        self._SamplingParams = vllm.SamplingParams
        try:  # prompt embeddings in the model's dtype (vLLM >= 0.10 exposes it here)
            self.model_dtype = self.llm.llm_engine.model_config.dtype
        except AttributeError:
            self.model_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _sp(self, seed: int):
        p = self.params
        return self._SamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k else -1,
            repetition_penalty=p.repetition_penalty, max_tokens=p.max_new_tokens, min_tokens=p.min_new_tokens,
            stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
            seed=int(seed) % (2 ** 63), skip_special_tokens=True, include_stop_str_in_output=False)

    def _run(self, prompts: list[dict], seeds: list[int]) -> list[Generation]:
        outs = self.llm.generate(prompts, [self._sp(s) for s in seeds], use_tqdm=False, lora_request=self.lora)
        gens = []
        for o in outs:  # LLM.generate returns outputs in request order
            c = o.outputs[0]
            toks = list(c.token_ids)  # as vLLM reports them (may include the EOS/stop tokens)
            reason = c.stop_reason
            if reason is None and c.finish_reason == "stop":
                reason = "eos"
            gens.append(Generation(toks, c.text, "length" if c.finish_reason == "length" else "stop", reason))
        return gens

    # the same interface as HFEngine; "prefill" is vLLM's business (its prefix cache)
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds.detach().to("cpu", self.model_dtype)

    def generate_shared(self, prefix: torch.Tensor | list[int], seeds: list[int]) -> list[Generation]:
        req = {"prompt_token_ids": list(prefix)} if isinstance(prefix, list) else {"prompt_embeds": prefix}
        return self._run([req] * len(seeds), seeds)

    def generate_prompts(self, prompts: list[list[int]], seeds: list[int],
                         stop_fns: list[StopFn | None] | None = None) -> list[Generation]:
        """`stop_fns` as HFEngine's, applied after decoding (`params.stop_after`): vLLM decodes
        each row to its end, so they cut the text but save no time."""
        check_rows(prompts, seeds, stop_fns)
        gens = self._run([{"prompt_token_ids": list(p)} for p in prompts], seeds)
        return gens if stop_fns is None else [stop_after(g, f) for g, f in zip(gens, stop_fns)]
