"""Chat generation for the LLM stages (judge, responses, test writing).

A generator is any callable `conversations -> texts` (one conversation = a list of
{"role", "content"} messages); tests inject deterministic fakes. The real ones render each
conversation with the model's chat template into token ids and decode them with one of the
synthesis engines, with domino.core.generation.params.SamplingParams and a per-row seed taken from the
row's content (a row's draw does not depend on its batch):
- `hf` (default): left-padded batches on domino.core.generation.hf.HFEngine (KV cache, finished rows
  dropped); also scores labels for the judge's logprob mode;
- `vllm`: domino.core.generation.vllm.VLLMEngine (GPU only; vLLM is imported only when chosen).
The model of a stage (`model`, `tests_model`: load_backbone kwargs or a path) defaults to the
synthesis backbone (`teacher_config`). Models are loaded once per config and shared by stages.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any, Callable, Protocol

from domino.core.embedded import DEFAULT_BACKBONE

log = logging.getLogger(__name__)
Conversation = list[dict[str, str]]
ENGINES = ("hf", "vllm")
# a generation block's batch size and seed where it names none (conf/curation/default.yaml has the same)
HF_BATCH, VLLM_BATCH, SEED = 8, 256, 0


def messages(user: str, system: str | None = None, assistant: str | None = None) -> Conversation:
    """The one chat-message builder: [system,] user[, assistant] as {"role", "content"} messages."""
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": user})
    if assistant is not None:
        out.append({"role": "assistant", "content": assistant})
    return out


class ChatGenerator(Protocol):
    fingerprint: str          # identifies model + decoding settings: part of a stage fingerprint
    batch_size: int

    def __call__(self, conversations: list[Conversation]) -> list[str]: ...


def teacher_config(model_cfg: dict[str, Any] | str | None, default_backbone: dict[str, Any] | None) -> dict:
    """The load_backbone kwargs of a stage's model. `model_cfg` null, or without a `path`: the
    synthesis backbone (its other non-null keys, e.g. dtype, override the backbone's); a string or
    a `path` (hub id or local directory): that model, with the backbone's cache_dir unless given."""
    default = dict(default_backbone or DEFAULT_BACKBONE)
    if isinstance(model_cfg, str):
        model_cfg = {"path": model_cfg}
    m = {k: v for k, v in dict(model_cfg or {}).items() if v is not None}
    if not m.get("path"):
        m.pop("path", None)
        return {**default, **m}
    if default.get("cache_dir") is not None:
        m.setdefault("cache_dir", default["cache_dir"])
    return m


def stage_engine(gen_cfg: dict[str, Any], shared: dict[str, Any] | None = None,
                 where: str = "generation") -> dict[str, Any]:
    """A model stage's engine, in the one schema (domino.core.generation.factory): `curation.engine`
    (`shared`, one block for the judge, the responses and the test writer), beneath the stage's own
    older keys (`device`, `num_threads`, and a `vllm:` block when the engine is vllm), beneath the
    stage's `engine` (null: the shared one; a name; or a block)."""
    from domino.core.generation.factory import RUNTIME_KEYS, engine_config
    own = gen_cfg.get("engine")
    own = {"name": own} if isinstance(own, str) else {k: v for k, v in dict(own or {}).items() if v is not None}
    ecfg = {k: v for k, v in dict(shared or {}).items() if v is not None}
    name = own.get("name") or ecfg.get("name") or "hf"
    older = {k: gen_cfg[k] for k in RUNTIME_KEYS if gen_cfg.get(k) is not None}
    if name == "vllm":
        older.update({k: v for k, v in dict(gen_cfg.get("vllm") or {}).items() if v is not None})
    return engine_config({**ecfg, **older, **own, "name": name}, where=f"{where}.engine")


def check_engine(gen_cfg: dict[str, Any], where: str, logprob: bool = False,
                 shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine `gen_cfg` selects (see stage_engine), after checking it can run here; `where`
    names the config block in errors (e.g. curation.judge.generation)."""
    ecfg = stage_engine(gen_cfg, shared, where)
    engine = ecfg["name"]
    if engine == "vllm":
        if logprob:
            stage = where.rsplit(".", 1)[0]
            raise ValueError(f"{stage}.mode=logprob scores the labels with the HF engine: set {where}.engine=hf, "
                             f"or {stage}.mode=generate to judge on vLLM")
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{where}.engine=vllm needs vLLM on a CUDA machine: pip install 'vllm>=0.10.2' "
                              f"(or pip install -e '.[gpu]'); or set {where}.engine=hf") from e
    return ecfg


class _ChatGenerator:
    """Chat template -> token ids -> engine.generate_prompts (or generate_many, `refill`), with
    per-row seeds."""
    tok: Any
    engine: Any
    seed: int
    batch_size: int
    refill = False  # HF: one generate_many over the whole call (continuous batching)

    def encode(self, conv: Conversation) -> list[int]:
        text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def row_seed(self, conv: Conversation) -> int:
        return int(hashlib.sha256(f"{self.seed}:{json.dumps(conv)}".encode()).hexdigest()[:12], 16)

    def __call__(self, conversations: list[Conversation]) -> list[str]:
        prompts = [self.encode(c) for c in conversations]
        seeds = [self.row_seed(c) for c in conversations]  # a row's draw depends on its content, not its batch
        if self.refill:
            return [g.text for g in self.engine.generate_many(prompts, seeds)]
        bs = self.batch_size
        return [g.text for s in range(0, len(prompts), bs)
                for g in self.engine.generate_prompts(prompts[s:s + bs], seeds[s:s + bs])]


def _params(tok, sampling: dict[str, Any] | None, stop_tokens: list[str] | None):
    from domino.core.generation.params import SamplingParams
    stop_ids = [i for t in (stop_tokens or []) if (i := tok.convert_tokens_to_ids(t)) is not None
                and i != tok.unk_token_id]
    return SamplingParams.from_config({"temperature": 0.0, "max_new_tokens": 512, **(sampling or {})},
                                      stop_token_ids=tuple(stop_ids))


def _need_chat_template(tok, model_id: str) -> None:
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"backbone {model_id} has no chat template: the judge and responses "
                         "stages need an instruction-tuned (chat) model")


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class HFChatGenerator(_ChatGenerator):
    engine_name = "hf"

    def __init__(self, backbone, sampling: dict[str, Any] | None = None, batch_size: int = 8,
                 seed: int = 0, stop_tokens: list[str] | None = None, refill: bool = False,
                 packed_weights: bool | str = "auto", shared_prefix: bool = True):
        """`backbone` as factory.load_model returns it: on the device of the one device and thread rule.
        `refill`: a call decodes its conversations `batch_size` rows at a time with continuous
        batching (HFEngine.generate_many) instead of in fixed batches. `packed_weights`,
        `shared_prefix`: HFEngine's."""
        from domino.core.generation.factory import open_hf
        self.tok, self.seed = backbone.tokenizer, seed
        _need_chat_template(self.tok, backbone.id)
        params = _params(self.tok, sampling, stop_tokens)
        self.engine = open_hf(backbone.model, self.tok, params,
                              {"batch_size": batch_size, "packed_weights": packed_weights,
                               "shared_prefix": shared_prefix})
        self.batch_size, self.refill = batch_size, bool(refill)
        self.model_id = backbone.id
        self.fingerprint = _fingerprint(backbone=backbone.id, hash=backbone.model_hash, params=params.to_dict(),
                                        seed=seed, dtype=backbone.dtype)

    def choose(self, conversations: list[Conversation], options: list[str], prefix: str = "") -> list[str]:
        """For each conversation, the option the model finds most likely as the start of its reply
        (`prefix` + option, summed token log-probabilities): a verdict that is always one of
        `options`, for models too small to follow an answer format."""
        out = []
        with self.engine.packed_weights():  # packed once for all the conversations
            for conv in conversations:
                scores = self.option_scores(conv, options, prefix)
                out.append(options[max(range(len(options)), key=lambda i: scores[i])])
        return out

    def option_scores(self, conv: Conversation, options: list[str], prefix: str = "") -> list[float]:
        """Summed log-probabilities of each option's tokens after the prompt (+ `prefix`). The prompt
        runs once; the options then continue its cache together (each option's tokens but its last,
        right-padded: causal attention never lets a real token see the padding after it). Scoring
        each option as its own full sequence ran the prompt once per option."""
        import torch
        from transformers import DynamicCache

        from domino.core.backbone import cache_kwargs, output_cache
        from domino.core.generation.hf import last_logits
        sep = " " if prefix and not prefix.endswith(" ") else ""
        opt_ids = [list(self.tok(sep + o, add_special_tokens=False)["input_ids"]) for o in options]
        base = self.encode(conv) + (list(self.tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else [])
        model, dev = self.engine.model, self.engine.device
        with torch.no_grad():
            first, out = last_logits(model, 1, input_ids=torch.tensor([base], device=dev),
                                     use_cache=True, **cache_kwargs(model, DynamicCache(config=model.config)))
            logp0 = first[0, -1].log_softmax(-1)
            scores = [float(logp0[ids[0]]) if ids else 0.0 for ids in opt_ids]
            T = max(len(ids) for ids in opt_ids) - 1
            if T > 0:  # position j of the continuation predicts option token j + 1
                cache = output_cache(out)
                cache.batch_repeat_interleave(len(opt_ids))
                cont = torch.full((len(opt_ids), T), self.tok.pad_token_id or 0, dtype=torch.long)
                for i, ids in enumerate(opt_ids):
                    cont[i, :max(0, len(ids) - 1)] = torch.tensor(ids[:-1], dtype=torch.long)
                pos = torch.arange(len(base), len(base) + T)[None].expand(len(opt_ids), -1)
                logits, _ = last_logits(model, T, input_ids=cont.to(dev), position_ids=pos.to(dev),
                                        use_cache=True, **cache_kwargs(model, cache))
                logp = logits.log_softmax(-1)
                for i, ids in enumerate(opt_ids):
                    scores[i] += sum(float(logp[i, j - 1, t]) for j, t in enumerate(ids) if j > 0)
        return scores


class VLLMChatGenerator(_ChatGenerator):
    """The same chat generation on vLLM: token-id prompts, per-row seeds (SamplingParams.seed)."""
    engine_name = "vllm"

    def __init__(self, bcfg: dict[str, Any], sampling: dict[str, Any] | None = None, batch_size: int = 256,
                 seed: int = 0, stop_tokens: list[str] | None = None, ecfg: dict[str, Any] | None = None):
        from domino.core.backbone import model_dir
        from domino.core.generation.factory import vllm_identity, vllm_kwargs
        self.tok, ident = vllm_identity(bcfg, dict(ecfg or {}))
        self.seed, self.batch_size = seed, batch_size
        _need_chat_template(self.tok, ident["backbone_id"])
        params = _params(self.tok, sampling, stop_tokens)
        # one vLLM instance per model; each stage decodes with its own sampling parameters
        self.engine = copy.copy(_vllm_engine(model_dir(bcfg), bool(bcfg.get("trust_remote_code")),
                                             vllm_kwargs(dict(ecfg or {})), params, seed))
        self.engine.params = params
        self.model_id = ident["backbone_id"]
        self.fingerprint = _fingerprint(backbone=self.model_id, hash=ident["backbone_hash"],
                                        params=params.to_dict(), seed=seed, engine="vllm")


_MODELS: dict[str, Any] = {}
_VLLM: dict[str, Any] = {}


def _vllm_engine(model_dir: str, trust_remote_code: bool, vkw: dict[str, Any], params, seed: int):
    """One vLLM engine at a time: a different model (or engine settings, `vkw`: factory.vllm_kwargs)
    releases the previous one first, so a judge and a responses model of different size need not
    both fit on the GPU."""
    key = json.dumps([model_dir, trust_remote_code, vkw], sort_keys=True, default=str)
    if key not in _VLLM:
        _release_vllm()
        from domino.core.generation.factory import open_vllm
        _VLLM[key] = open_vllm({"path": model_dir, "trust_remote_code": trust_remote_code}, vkw, params, seed,
                               prompt_embeds=False)
    return _VLLM[key]


def _release_vllm() -> None:
    if not _VLLM:
        return
    import gc

    import torch
    _VLLM.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_generator(model_cfg: dict[str, Any] | str | None, default_backbone: dict[str, Any] | None,
                    gen_cfg: dict[str, Any], where: str = "generation", logprob: bool = False,
                    shared_engine: dict[str, Any] | None = None) -> _ChatGenerator:
    """A generator on `model_cfg` (see teacher_config; null = the run's backbone) with the engine
    stage_engine(gen_cfg, shared_engine) selects (hf | vllm); `where` names the generation block in
    errors."""
    ecfg = check_engine(gen_cfg, where, logprob, shared_engine)
    bcfg = teacher_config(model_cfg, default_backbone)
    kw = dict(sampling=gen_cfg.get("sampling"), seed=int(gen_cfg.get("seed", SEED)),
              stop_tokens=gen_cfg.get("stop_tokens"))
    if ecfg["name"] == "vllm":
        log.info("curation: %s on vLLM: %s", where, bcfg.get("path"))
        return VLLMChatGenerator(bcfg, batch_size=int(gen_cfg.get("batch_size", VLLM_BATCH)), ecfg=ecfg, **kw)
    from domino.core.generation.factory import load_model, runtime
    device = runtime(ecfg)
    key = json.dumps({**bcfg, "device": device, "engine_dtype": ecfg.get("dtype")}, sort_keys=True, default=str)
    if key not in _MODELS:
        log.info("curation: loading %s", bcfg.get("path"))
        _MODELS[key] = load_model(bcfg, ecfg)  # on `device`; engine.dtype (null = model.dtype): the one dtype rule
    return HFChatGenerator(_MODELS[key], batch_size=int(gen_cfg.get("batch_size", HF_BATCH)),
                           refill=bool(ecfg.get("refill")), packed_weights=ecfg.get("packed_weights", "auto"),
                           shared_prefix=ecfg.get("shared_prefix", True), **kw)


def release_models() -> None:
    _MODELS.clear()
    _release_vllm()


def fingerprint_of(gen: Callable) -> str:
    return str(getattr(gen, "fingerprint", None) or getattr(gen, "__qualname__", type(gen).__name__))
