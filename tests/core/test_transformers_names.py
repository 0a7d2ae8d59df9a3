"""transformers names domino calls by: 5.x renamed a forward's `past_key_values` to `cache` (the
old name raises a FutureWarning and goes in 5.40) and `gradient_checkpointing_enable` to
`activation_checkpointing_enable` (goes in v6), while the versions setup.cfg still allows (4.56
onwards) know only the old names. Every forward domino runs with a cache (the engine's prefill and
decoding steps, the chat generator's option scores, the objective's prefix caches) and a backbone
loaded with checkpointing must raise no such warning, and the cache helpers must pick the old name
for a model that only knows it."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from domino.core.backbone import cache_kwargs, load_backbone, output_cache
from domino.core.generation.chat import HFChatGenerator
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams
from domino.training.objective import combine
from domino.training.objective_cached import cached_nll

pytestmark = pytest.mark.usefixtures("one_thread")


class _OldModel(torch.nn.Module):  # a forward from before the rename
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class _NewModel(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


class _Wrapper(torch.nn.Module):  # what a PEFT model looks like from outside: **kwargs only
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base

    def forward(self, **kwargs):
        return self.base(**kwargs)


@dataclass
class _OldOutput:
    past_key_values: object = None


@dataclass
class _NewOutput:
    cache: object = None


def test_the_cache_keyword_follows_the_models_forward():
    c = object()
    assert cache_kwargs(_OldModel(), c) == {"past_key_values": c}
    assert cache_kwargs(_NewModel(), c) == {"cache": c}
    assert cache_kwargs(_Wrapper(_OldModel()), c) == {"past_key_values": c}
    assert cache_kwargs(_Wrapper(_NewModel()), c) == {"cache": c}
    assert output_cache(_OldOutput(past_key_values=c)) is c and output_cache(_NewOutput(cache=c)) is c


def test_no_deprecated_name_reaches_transformers(tiny_backbone):
    bb = tiny_backbone
    g = torch.Generator().manual_seed(0)
    D = torch.randn(3, bb.hidden_size, generator=g) * 0.05
    S = torch.randn(2, 3, bb.hidden_size, generator=g) * 0.05
    ids = torch.randint(0, bb.model.config.vocab_size, (2, 5), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        e = HFEngine(bb.model, bb.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=3), batch_size=2)
        assert len(e.generate_shared(e.prefill(D), [0, 1])) == 2
        assert len(e.generate_prompts([[1, 2, 3], [4, 5]], [0, 1])) == 2
        gen = HFChatGenerator(bb, sampling={"temperature": 0.0, "max_new_tokens": 2}, batch_size=2)
        assert len(gen.option_scores([{"role": "user", "content": "hi"}], ["yes", "no way"])) == 2
        for layout in ("joint", "split"):
            Dg, Sg = D.clone().requires_grad_(), S.clone().requires_grad_()
            dom, mat = cached_nll(bb.model, Dg, Sg, ids, torch.ones_like(ids), layout=layout)
            combine(dom, mat, form="paper")["loss"].backward()
            assert Dg.grad is not None and Sg.grad is not None
        gc = load_backbone(path="tiny", tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                              "intermediate_size": 64, "seed": 0}, gradient_checkpointing=True)
        dom, _ = cached_nll(gc.model, D[:, :32].clone().requires_grad_(), None, ids, torch.ones_like(ids))
        assert dom.total.requires_grad
