"""Packed bf16 linear weights (domino.core.generation.packed): the HF engine decodes the same tokens
with and without them on the tiny model (at some row counts of larger shapes a few outputs round
differently: bench/packed_bits.py), really runs the packed op when it packs, never runs on stale copies after
the weights change, and packs only where it can and should."""
from __future__ import annotations

import copy

import pytest
import torch

from domino.core.generation import packed
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams

needs_onednn_bf16 = pytest.mark.skipif(not packed.supported(), reason="no oneDNN bf16 on this CPU/torch")


@pytest.fixture(scope="module")
def bf16_model(tiny_backbone):
    return copy.deepcopy(tiny_backbone.model).to(torch.bfloat16).eval()


@pytest.fixture()
def spy(monkeypatch):
    """Counts the calls of packed forwards (the oneDNN op on a packed weight)."""
    calls = []
    real = packed._packed_forward

    def counting(weight, bias, rows_hint, max_rows):
        fwd = real(weight, bias, rows_hint, max_rows)

        def forward(x):
            calls.append(tuple(x.shape))
            return fwd(x)
        return forward

    monkeypatch.setattr(packed, "_packed_forward", counting)
    return calls


@pytest.fixture()
def reorders(monkeypatch):
    """The rows hint of every weight packed (packed._reorder: one per copy made)."""
    hints = []
    real = packed._reorder
    monkeypatch.setattr(packed, "_reorder", lambda w, hint: hints.append(hint) or real(w, hint))
    return hints


def decode_all(model, tok, mode, **kw):
    """Greedy and sampled tokens of a shared prefix, of left-padded prompts and with continuous
    batching, on an engine with `packed_weights=mode`."""
    params = dict(max_new_tokens=8, repetition_penalty=1.5, **kw)
    words = "alpha beta gamma delta epsilon zeta eta".split()
    prompts = [tok(" ".join(words[: 1 + (2 * i) % 7]))["input_ids"] for i in range(5)]
    out, n = [], []
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9)):
        e = HFEngine(model, tok, SamplingParams(**sampling, **params), batch_size=3, packed_weights=mode)
        prefix = e.prefill(model.get_input_embeddings().weight[:4].detach())
        out += [[g.token_ids for g in e.generate_shared(prefix, [0, 1, 2])],
                [g.token_ids for g in e.generate_prompts(prompts[:3], [0, 1, 2])],
                [g.token_ids for g in e.generate_many(prompts, list(range(5)))]]
        n.append(e.n_packed)
    return out, n


@needs_onednn_bf16
def test_packed_weights_decode_the_same_tokens_through_the_packed_op(bf16_model, tiny_backbone, spy):
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in bf16_model.modules())
    with_packing, n = decode_all(bf16_model, tiny_backbone.tokenizer, True)
    assert n == [n_linear, n_linear] and n_linear > 0
    # every linear layer ran packed, for prefills (many rows) and one-token steps alike
    rows = {s[-2] for s in spy if len(s) == 3}
    assert len(spy) > 20 * n_linear and 1 in rows and max(rows) > 1
    spy.clear()
    without, n = decode_all(bf16_model, tiny_backbone.tokenizer, False)
    assert n == [0, 0] and spy == []
    assert with_packing == without
    # the model is back as it was: no forward left on any module, no marker
    assert not any("forward" in m.__dict__ for m in bf16_model.modules())
    assert not hasattr(bf16_model, "_domino_packed")


@needs_onednn_bf16
def test_a_weight_changed_between_calls_is_used_as_changed(bf16_model, tiny_backbone, reorders):
    """The copies are made per call: a change through .data (as a LoRA merge makes it, invisible to
    the version counter) is in the next call's output."""
    model = copy.deepcopy(bf16_model)
    # batch_size 8: the 5-row prefix's prefill runs the packed op (at most batch_size rows)
    e = HFEngine(model, tiny_backbone.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=1), batch_size=8,
                 packed_weights=True)
    x = model.get_input_embeddings().weight[:5].detach()
    before = e.prefill(x).logits
    assert len(reorders) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    head = model.get_output_embeddings()
    head.weight.data.mul_(-1)
    after = e.prefill(x).logits
    assert not torch.equal(before, after)
    e.pack = False
    assert torch.equal(after, e.prefill(x).logits)


@needs_onednn_bf16
def test_blocks_nest_restore_on_error_and_fall_back_outside_no_grad(bf16_model):
    lin = next(m for m in bf16_model.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="boom"):
        with packed.packed_linears(bf16_model) as n:
            assert n > 0 and "forward" in lin.__dict__
            with packed.packed_linears(bf16_model) as inner:
                assert inner == 0  # the outer block's copies serve
            # with autograd on, the plain F.linear runs (the packed op has no backward)
            y = lin(x.requires_grad_())
            assert y.requires_grad and y.grad_fn is not None
            raise RuntimeError("boom")
    assert "forward" not in lin.__dict__ and not hasattr(bf16_model, "_domino_packed")


def test_what_is_packed_and_when(bf16_model, tiny_backbone, monkeypatch):
    fp32 = tiny_backbone.model
    assert packed.packable(fp32) == [] and not packed.should_pack(fp32, "auto")
    with pytest.raises(ValueError, match="engine.packed_weights=true"):
        packed.should_pack(fp32, True)
    with pytest.raises(ValueError, match="engine.packed_weights='sometimes'"):
        packed.should_pack(bf16_model, "sometimes")
    assert packed.check_mode("false") is False and packed.check_mode("True") is True
    assert not packed.should_pack(bf16_model, False)
    if not packed.supported():
        return
    assert packed.should_pack(bf16_model, "auto") and packed.should_pack(bf16_model, "true")
    # trainable weights are left alone (they change under an optimiser)
    model = copy.deepcopy(bf16_model)
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    lin.weight.requires_grad_(True)
    assert lin not in packed.packable(model) and len(packed.packable(model)) > 0
    # auto does not pack when the copies would take more than half the available memory
    need = sum(m.weight.numel() * 2 for m in packed.packable(bf16_model))
    monkeypatch.setattr(packed, "available_memory", lambda: 2 * need - 2)
    assert not packed.should_pack(bf16_model, "auto") and packed.should_pack(bf16_model, True)
    monkeypatch.setattr(packed, "available_memory", lambda: 2 * need)
    assert packed.should_pack(bf16_model, "auto")


@needs_onednn_bf16
def test_packed_layers_give_the_same_bits_with_and_without_bias():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False)).bfloat16()
    model.requires_grad_(False)
    for x in (torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(16, 7).t()):  # 2-D, 3-D, strided
        x = x.bfloat16()
        plain = model(x)
        with torch.no_grad(), packed.packed_linears(model, rows_hint=4) as n:
            assert n == 2
            assert torch.equal(model(x), plain)


@needs_onednn_bf16
def test_calls_of_more_rows_than_a_decoding_step_run_plain_linear(monkeypatch):
    """A prefill (more rows than `max_rows`, by default the rows_hint: a decoding step's) runs plain
    F.linear inside a packed block; a decoding step's rows run the packed op."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).bfloat16().requires_grad_(False)
    plain_calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: plain_calls.append(a[0].shape) or real(*a))
    with torch.no_grad(), packed.packed_linears(lin, rows_hint=6):
        few, many = torch.randn(2, 3, 16).bfloat16(), torch.randn(7, 16).bfloat16()
        assert torch.equal(lin(few), real(few, lin.weight, lin.bias)) and plain_calls == []
        assert torch.equal(lin(many), real(many, lin.weight, lin.bias)) and plain_calls == [(7, 16)]
    with torch.no_grad(), packed.packed_linears(lin, rows_hint=6, max_rows=7):
        lin(many)
        assert plain_calls == [(7, 16)]


@needs_onednn_bf16
def test_a_layer_packs_its_copy_at_its_first_decoding_sized_call(bf16_model, tiny_backbone, reorders):
    """No copy exists before a layer's first call of at most max_rows rows: a prefix's prefill (a call
    that never decodes) packs only the head (its last row), a decoding call packs each layer once,
    however many steps."""
    lin = torch.nn.Linear(16, 8).bfloat16().requires_grad_(False)
    with torch.no_grad(), packed.packed_linears(lin, rows_hint=4) as n:
        assert n == 1
        lin(torch.randn(9, 16).bfloat16())  # more rows than max_rows: plain, no copy
        assert reorders == []
        for _ in range(3):
            lin(torch.randn(2, 16).bfloat16())
        assert reorders == [4]
    with torch.no_grad(), packed.packed_linears(lin, rows_hint=4):
        lin(torch.randn(2, 16).bfloat16())  # a new block: a new copy
    assert reorders == [4, 4]
    # the engine: a prefix longer than batch_size rows packs only the head (its one last-position row);
    # decoding from it packs every other layer
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in bf16_model.modules())
    e = HFEngine(bf16_model, tiny_backbone.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=3),
                 batch_size=2, packed_weights=True)
    reorders.clear()
    prefix = e.prefill(bf16_model.get_input_embeddings().weight[:6].detach())
    assert reorders == [2]
    e.generate_shared(prefix, [0, 1])
    assert reorders == [2] * (1 + n_linear)  # a call's copies are its own: the head is packed again
