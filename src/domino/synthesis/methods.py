"""What each method feeds the engine. Every method samples through the same batched engine; they
differ only in the prefix:

- domain_prompt: trained domain tokens D alone (DOMINO's or a soft prompt's) (no text, no sample tokens, no BOS: the
  training objective scores x after D with nothing in between, so sampling starts the same way);
- zero_shot: a chat prompt describing the domain in words (`domain.description`): the deductive
  baseline;
- few_shot: a chat prompt with k references drawn per sample (seeded by the sample's seed) from the
  reference split, asking for one new example like them;
- magpie: the chat template up to the start of an (empty) user turn; the model writes the user
  turn and stops at the end-of-turn token.

Shared prefixes (D, zero_shot, magpie) are computed once per run; few-shot prompts differ per sample.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from domino.core.generation.chat import messages

DOMAIN_METHODS = ("domain_prompt",)
TEXT_METHODS = ("few_shot", "zero_shot", "magpie")
METHODS = DOMAIN_METHODS + TEXT_METHODS
_SENTINEL = "\u2063DOMINO_USER_TURN\u2063"


@dataclass
class Plan:
    method: str
    prefix_embeds: torch.Tensor | None = None     # (P, h): domain tokens
    prefix_ids: list[int] | None = None           # a shared text prompt
    per_sample: Callable[[int], tuple[list[int], dict[str, Any]]] | None = None  # seed -> (ids, provenance)
    stop_token_ids: tuple[int, ...] = ()
    describe: dict[str, Any] = field(default_factory=dict)  # into the run metadata and its fingerprint


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _encode_rendered(tok, text: str) -> list[int]:
    # a rendered chat template already holds its special tokens (BOS included where the model uses one)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tok, user_text: str, system: str | None = None, use_chat_template: bool = True) -> list[int]:
    """Token ids of a one-turn request, through the chat template when the tokenizer has one."""
    if use_chat_template and has_chat_template(tok):
        msgs = messages(user_text, system)
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return _encode_rendered(tok, rendered)
    text = (system + "\n\n" if system else "") + user_text + "\n\n"
    return list(tok(text, add_special_tokens=True)["input_ids"])


def magpie_prefix(tok, system: str | None = None) -> tuple[list[int], list[int], list[str]]:
    """(pre-query ids, end-of-turn token ids, end-of-turn strings) from the chat template: everything
    the template writes before a user message's content, and what it writes right after it."""
    if not has_chat_template(tok):
        raise ValueError("method=magpie needs a tokenizer with a chat template (an instruct model)")
    rendered = tok.apply_chat_template(messages(_SENTINEL, system), tokenize=False,
                                       add_generation_prompt=False)
    if _SENTINEL not in rendered:
        raise ValueError("method=magpie: could not locate the user turn in the chat template")
    pre, post = rendered.split(_SENTINEL, 1)
    stop_ids, stop_strings = [], []
    post_ids = _encode_rendered(tok, post) if post else []
    special = set(getattr(tok, "all_special_ids", []) or [])
    if post_ids and post_ids[0] in special:
        stop_ids.append(post_ids[0])
    elif post.strip():
        stop_strings.append(post.strip())
    return _encode_rendered(tok, pre), stop_ids, stop_strings


def build_plan(method: dict[str, Any], tokenizer, domain_prompt=None, domain: dict | None = None,
               references: list[dict] | None = None) -> Plan:
    """`method` is the `method` config group; `domain` the `domain` group (description, name)."""
    name = method.get("name")
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not one of {METHODS}")
    if name in DOMAIN_METHODS:
        if domain_prompt is None:
            raise ValueError(f"method={name} samples from trained domain tokens: pass ckpt=<run>/"
                             "domain_prompt.safetensors (or <run>/checkpoints/last.ckpt)")
        return Plan(name, prefix_embeds=domain_prompt.tokens,
                    describe={"domain_prompt_digest": domain_prompt.digest,
                              "k": int(domain_prompt.tokens.shape[0])})
    system = method.get("system")
    use_chat = bool(method.get("chat_template", True))
    if name == "zero_shot":
        desc = (domain or {}).get("description")
        if not desc:
            raise ValueError("method=zero_shot needs domain.description (a sentence saying what the "
                             "domain is)")
        text = method["template"].format(description=str(desc).strip())
        ids = prompt_ids(tokenizer, text, system, use_chat)
        return Plan(name, prefix_ids=ids,
                    describe={"prompt": text, "system": system, "chat_template": use_chat})
    if name == "magpie":
        ids, stop_ids, stop_strings = magpie_prefix(tokenizer, system)
        return Plan(name, prefix_ids=ids, stop_token_ids=tuple(stop_ids),
                    describe={"pre_query": tokenizer.decode(ids), "stop_strings": stop_strings,
                              "system": system})
    # few_shot
    if not references:
        raise ValueError("method=few_shot needs reference examples (the domain's reference split)")
    k = int(method.get("k", 3))
    if k < 1:
        raise ValueError(f"method.k={k} must be >= 1")
    k = min(k, len(references))
    template, example = method["template"], method["example_template"]
    sep = method.get("separator", "\n\n")

    def per_sample(seed: int) -> tuple[list[int], dict[str, Any]]:
        chosen = random.Random(seed).sample(range(len(references)), k)
        shots = [references[i] for i in chosen]
        examples = sep.join(example.format(i=j + 1, text=r["text"].strip())
                            for j, r in enumerate(shots))
        text = template.format(k=k, examples=examples)
        return prompt_ids(tokenizer, text, system, use_chat), {"references": [r["id"] for r in shots]}

    return Plan(name, per_sample=per_sample,
                describe={"k": k, "template": template, "example_template": example, "system": system,
                          "chat_template": use_chat, "n_references": len(references)})


def stop_strings(plan: Plan) -> list[str]:
    return list(plan.describe.get("stop_strings", []))
