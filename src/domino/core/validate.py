"""Config values checked before a stage loads anything, every error naming its key.

Hydra parses `data.batch_size=abc` into the string "abc" and lets it through; without this check it
surfaced deep inside a constructor as a bare TypeError, and a negative learning rate or `prompt.l=-1`
was silently accepted. Each entry point has a schema (dotted key -> rule); a key the composed config
does not have is skipped (groups differ between options), a key that has a wrong value is
reported with every other one in a single ConfigError:

    from domino.core.validate import EVALUATE, check_config
    check_config(cfg, EVALUATE, "evaluate")   # at the top of the stage, before any model or file is read

The stage table (domino.stages) names each stage's schema.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from domino.core.config import plain


class ConfigError(ValueError):
    """One or more config values of the wrong type or out of range, each named by its key."""


@dataclass(frozen=True)
class Num:
    kind: type = int                    # int (bool refused) or float (int accepted)
    min: float | None = None
    max: float | None = None
    min_open: bool = False              # min itself not allowed
    null: bool = False                  # None allowed
    what: str = ""                      # what the value means, for the message
    each: bool = False                  # a list of such numbers

    def problem(self, value: Any) -> str | None:
        if self.each:
            if not isinstance(value, (list, tuple)) or not value:
                return "expected a non-empty list, e.g. [1, 5]"
            for v in value:
                p = Num(self.kind, self.min, self.max, self.min_open).problem(v)
                if p:
                    return f"item {v!r}: {p}"
            return None
        if value is None:
            return None if self.null else f"must be set ({self._type()})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self._type()}, got {type(value).__name__} {value!r}"
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                return f"expected an integer, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            return f"must be {'>' if self.min_open else '>='} {self.min:g}" + (f" ({self.what})" if self.what else "")
        if self.max is not None and value > self.max:
            return f"must be <= {self.max:g}" + (f" ({self.what})" if self.what else "")
        return None

    def _type(self) -> str:
        t = "an integer" if self.kind is int else "a number"
        return t + (" or null" if self.null else "")


def Int(min: float | None = None, **kw) -> Num:  # noqa: N802 - reads like a type in the schemas
    return Num(int, min, **kw)


def Float(min: float | None = None, **kw) -> Num:  # noqa: N802
    return Num(float, min, **kw)


LR = Float(0, what="a learning rate; 0 freezes")
TRAINER = {"trainer.max_steps": Int(-1, what="-1 = no step limit"), "trainer.max_epochs": Int(-1, null=True),
           "trainer.log_every_n_steps": Int(1), "trainer.gradient_clip_val": Float(0, null=True),
           "trainer.accumulate_grad_batches": Int(1), "checkpoint_every_n_steps": Int(0, what="0 = only at the end"),
           "seed": Int()}
DOMAIN = {"domain.n_references": Int(1, null=True), "domain.n_heldout": Int(0, null=True),
          "domain.split_seed": Int(), "domain.limit": Int(1, null=True)}
ENGINE = {"engine.batch_size": Int(1, null=True), "engine.num_threads": Int(1, null=True),
          "engine.tensor_parallel_size": Int(1)}
SAMPLING = {"sampling.temperature": Float(0, what="0 = greedy"), "sampling.top_p": Float(0, max=1, min_open=True),
            "sampling.top_k": Int(0, what="0 = off"), "sampling.repetition_penalty": Float(0, min_open=True),
            "sampling.max_new_tokens": Int(1), "sampling.min_new_tokens": Int(0)}
TRAIN = {**TRAINER, **DOMAIN,
         "data.batch_size": Int(1), "data.max_len": Int(2, what="EOS and at least one token"),
         "data.val_size": Int(0, null=True), "data.num_workers": Int(0),
         "prompt.k": Int(1, what="domain tokens"), "prompt.l": Int(0, what="sample tokens; 0 = none"),
         "prompt.sample_rank": Int(1, null=True), "prompt.domain_head_hidden": Int(1),
         "optim.lr_domain": LR, "optim.lr_sample": LR, "optim.weight_decay": Float(0),
         "optim.warmup_steps": Int(0), "objective.lambda": Float(0), "objective.w_dom": Float(0),
         "objective.chunk_size": Int(1, null=True), "objective.negatives": Int(1, null=True)}
SYNTHESIZE = {"n": Int(1, what="samples wanted"), "seed": Int(), **DOMAIN, **SAMPLING, **ENGINE,
              "engine.batch_size": Int(1)}
GENERATION = {"batch_size": Int(1), "chunk": Int(1, null=True), "seed": Int(), **SAMPLING}
CURATE = {f"curation.{where}.{k}": rule
          for where in ("judge.generation", "responses.generation", "code_checks.tests_generation")
          for k, rule in GENERATION.items()}
FINETUNE = {**TRAINER, "sft.max_len": Int(2), "sft.batch_size": Int(1), "sft.val_size": Int(0),
            "sft.num_workers": Int(0), "optim.lr": LR, "optim.weight_decay": Float(0),
            "optim.warmup_steps": Int(0), "lora.r": Int(1), "lora.alpha": Float(0, min_open=True),
            "lora.dropout": Float(0, max=1, what="a probability"),
            "early_stopping.patience": Int(0, null=True), "early_stopping.min_delta": Float(0)}
EVALUATE = {"seed": Int(), "n_samples": Int(1), "k": Int(1, each=True),
            "sampling.temperature": Float(0, what="0 = greedy"),
            "sampling.top_p": Float(0, max=1, min_open=True), "sampling.max_new_tokens": Int(1),
            "sampling.batch_size": Int(1, null=True), "engine.batch_size": Int(1, null=True),
            "sandbox.workers": Int(1),
            "sandbox.timeout_per_test": Float(0, min_open=True), "sandbox.timeout_total": Float(0, min_open=True)}
DATA_QUALITY = {"data_quality.seed": Int(), "data_quality.max_samples": Int(1, null=True),
                "data_quality.knn_k": Int(1), "data_quality.distinct_n": Int(1, each=True),
                "data_quality.self_bleu.max_n": Int(1), "data_quality.self_bleu.subsample": Int(1),
                "data_quality.embed.max_length": Int(1), "data_quality.embed.batch_size": Int(1)}


def _get(cfg: Any, key: str) -> tuple[bool, Any]:
    if isinstance(cfg, DictConfig):
        missing = object()
        v = OmegaConf.select(cfg, key, default=missing)
        if v is missing:
            return False, None
        return True, plain(v)
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def config_problems(cfg: Any, schema: Mapping[str, Num]) -> list[str]:
    """`key=value: what is wrong` for every bad value of `schema` (empty: all good)."""
    out = []
    for key, rule in schema.items():
        present, value = _get(cfg, key)
        if present:
            problem = rule.problem(value)
            if problem:
                out.append(f"{key}={value!r}: {problem}")
    return out


def check_config(cfg: Any, schema: Mapping[str, Num], stage: str) -> None:
    """Raise ConfigError listing every bad value of `cfg` (a DictConfig or plain dict) under `schema`."""
    problems = config_problems(cfg, schema)
    if problems:
        raise ConfigError(f"{stage}: invalid config value(s):\n  " + "\n  ".join(problems))
