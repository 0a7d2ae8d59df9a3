"""Chat generation for the LLM stages (judge, responses, test writing).

A generator is any callable `conversations -> texts` (one conversation = a list of
{"role", "content"} messages); tests inject deterministic fakes. The real one renders each
conversation with the model's chat template and decodes in left-padded batches on
domino.generation.hf.HFEngine (KV cache, finished rows dropped, per-row seeds) with
domino.generation.params.SamplingParams, the engine and sampling config every stage uses.
Models are loaded once per backbone config and shared by stages.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)
Conversation = list[dict[str, str]]


class ChatGenerator(Protocol):
    fingerprint: str          # identifies model + decoding settings: part of a stage fingerprint
    batch_size: int

    def __call__(self, conversations: list[Conversation]) -> list[str]: ...


class HFChatGenerator:
    def __init__(self, backbone, sampling: dict[str, Any] | None = None, batch_size: int = 8,
                 device: str = "auto", seed: int = 0, stop_tokens: list[str] | None = None,
                 num_threads: int | None = None):
        import torch
        if num_threads:  # on a shared CPU, oversubscribed torch threads can be 10-30x slower than one
            torch.set_num_threads(int(num_threads))

        from domino.generation.hf import HFEngine
        from domino.generation.params import SamplingParams
        self.tok, self.seed = backbone.tokenizer, seed
        if getattr(self.tok, "chat_template", None) is None:
            raise ValueError(f"backbone {backbone.id} has no chat template: the judge and responses "
                             "stages need an instruction-tuned (chat) model")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        backbone.model.to(device)
        stop_ids = [i for t in (stop_tokens or []) if (i := self.tok.convert_tokens_to_ids(t)) is not None
                    and i != self.tok.unk_token_id]
        params = SamplingParams.from_config({"temperature": 0.0, "max_new_tokens": 512, **(sampling or {})},
                                            stop_token_ids=tuple(stop_ids))
        self.engine = HFEngine(backbone.model, self.tok, params, batch_size=batch_size)
        self.batch_size = batch_size
        self.fingerprint = hashlib.sha256(json.dumps(
            {"backbone": backbone.id, "hash": backbone.model_hash, "params": params.to_dict(), "seed": seed},
            sort_keys=True).encode()).hexdigest()[:16]

    def encode(self, conv: Conversation) -> list[int]:
        text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def __call__(self, conversations: list[Conversation]) -> list[str]:
        out: list[str] = []
        for s in range(0, len(conversations), self.batch_size):
            chunk = conversations[s:s + self.batch_size]
            prompts = [self.encode(c) for c in chunk]
            seeds = [int(hashlib.sha256(f"{self.seed}:{json.dumps(c)}".encode()).hexdigest()[:12], 16)
                     for c in chunk]  # a row's draw depends on its content, not its batch
            out += [g.text for g in self.engine.generate_prompts(prompts, seeds)]
        return out

    def choose(self, conversations: list[Conversation], options: list[str], prefix: str = "") -> list[str]:
        """For each conversation, the option the model finds most likely as the start of its reply
        (`prefix` + option, summed token log-probabilities): a verdict that is always one of
        `options`, for models too small to follow an answer format."""
        out = []
        for conv in conversations:
            scores = self.option_scores(conv, options, prefix)
            out.append(options[max(range(len(options)), key=lambda i: scores[i])])
        return out

    def option_scores(self, conv: Conversation, options: list[str], prefix: str = "") -> list[float]:
        import torch
        sep = " " if prefix and not prefix.endswith(" ") else ""
        opt_ids = [list(self.tok(sep + o, add_special_tokens=False)["input_ids"]) for o in options]
        base = self.encode(conv) + (list(self.tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else [])
        seqs = [base + ids for ids in opt_ids]
        T = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), T), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, x in enumerate(seqs):  # right padding: the shared prompt keeps its positions
            ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
        keep = T - len(base) + 1  # only the positions that predict option tokens reach the LM head
        dev = self.engine.device
        with torch.no_grad():
            logits = self.engine.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=keep).logits
        logp = logits.float().log_softmax(-1)  # position j predicts option token j
        return [sum(float(logp[i, j, t]) for j, t in enumerate(opt_ids[i])) for i in range(len(seqs))]


_MODELS: dict[str, Any] = {}


def build_generator(model_cfg: dict[str, Any] | None, default_backbone: dict[str, Any] | None,
                    gen_cfg: dict[str, Any]) -> HFChatGenerator:
    """A generator on `model_cfg` (load_backbone kwargs) or, when null, the run's backbone."""
    from domino.backbone import load_backbone
    bcfg = dict(model_cfg or default_backbone or {"name": "smollm2", "path": "embedded"})
    key = json.dumps(bcfg, sort_keys=True, default=str)
    if key not in _MODELS:
        log.info("curation: loading %s", bcfg.get("path"))
        _MODELS[key] = load_backbone(**bcfg)
    return HFChatGenerator(_MODELS[key], sampling=gen_cfg.get("sampling"),
                           batch_size=int(gen_cfg.get("batch_size", 8)), device=gen_cfg.get("device") or "auto",
                           seed=int(gen_cfg.get("seed", 0)), stop_tokens=gen_cfg.get("stop_tokens"),
                           num_threads=gen_cfg.get("num_threads"))


def release_models() -> None:
    _MODELS.clear()


def fingerprint_of(gen: Callable) -> str:
    return str(getattr(gen, "fingerprint", None) or getattr(gen, "__qualname__", type(gen).__name__))


class StageProgress:
    """Records done / total with ETA for one LLM stage."""

    def __init__(self, stage: str, total: int, completed: int = 0, enabled: bool = True):
        self._p = Progress(TextColumn(f"[bold]curation:{stage}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)
        self._t = self._p.add_task(stage, total=total, completed=completed)

    def advance(self, n: int) -> None:
        self._p.advance(self._t, n)

    def __enter__(self):
        self._p.start()
        return self

    def __exit__(self, *exc):
        self._p.stop()
