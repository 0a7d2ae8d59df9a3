"""The HF sampling engine on the tiny random backbone: the shared prefix cache must not change
what is sampled (oracles: transformers' generate and a loop without any cache), seeds reproduce,
stop strings, length flags and left-padded prompts behave."""
from __future__ import annotations

import copy

import pytest
import torch

from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams, sample_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def D(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    # sample_vocab init, as training does
    idx = torch.randint(0, tiny_backbone.embed.weight.shape[0], (6,), generator=g)
    return tiny_backbone.embed.weight[idx].detach().clone()


def engine(bb, batch_size=4, **kw):
    return HFEngine(bb.model, bb.tokenizer, SamplingParams(**kw), batch_size=batch_size)


def uncached_greedy(bb, embeds, n, penalty=1.0):
    """Oracle: recompute the whole sequence every step, no cache at all."""
    toks = []
    for _ in range(n):
        x = torch.cat([embeds, bb.embed(torch.tensor(toks, dtype=torch.long))]) if toks else embeds
        logits = bb.model(inputs_embeds=x[None], use_cache=False).logits[0, -1]
        if penalty != 1 and toks:
            prev = torch.tensor(sorted(set(toks)))
            sel = logits[prev]
            logits[prev] = torch.where(sel > 0, sel / penalty, sel * penalty)
        toks.append(int(logits.argmax()))
    return toks


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_greedy_with_shared_prefix_cache_equals_uncached(tiny_backbone, D):
    bb = tiny_backbone
    # the random model's logits are nearly flat: a strong repetition penalty keeps greedy decoding
    # from repeating one token, so the comparison covers a real sequence
    e = engine(bb, temperature=0.0, max_new_tokens=24, repetition_penalty=3.0)
    gens = e.generate_shared(e.prefill(D), [1, 2, 3])
    oracle = uncached_greedy(bb, D, 24, penalty=3.0)
    hf = bb.model.generate(inputs_embeds=D[None], do_sample=False, max_new_tokens=24, use_cache=False,
                           repetition_penalty=3.0, eos_token_id=None, pad_token_id=0)[0].tolist()
    assert len(set(oracle)) > 5  # a real sequence, not one token repeated
    assert hf == oracle
    for g in gens:  # every row of the batch continues the one cached prefix
        assert g.token_ids == oracle and g.finish_reason == "length"


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_pick_is_the_first_maximal_token(tiny_backbone, dtype):
    """Greedy takes max(-1).indices (faster than argmax on a CPU): the first of tied maxima, as
    argmax and `generate` do; a NaN row picks its NaN, as argmax does."""
    e = engine(tiny_backbone, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (16, 5000), generator=g).to(dtype)  # every row has many tied maxima
    logits[4, 7] = float("nan")
    logits[5] = float("-inf")
    got = e._pick(logits, None, [1] * 16, None)
    assert torch.equal(got, logits.argmax(-1))
    assert got[4] == 7 and got[5] == 0 and got[0] == int((logits[0] == 2).nonzero()[0])


def test_cached_logits_equal_uncached_logits(tiny_backbone, D):
    """Token equality on a near-flat random model is a weak check (e.g. of positions); compare the
    logits every row sees at every step with a full recomputation."""
    bb = tiny_backbone
    seen_logits = []

    class Recording(HFEngine):
        def _pick(self, logits, seen, lengths, gens):
            seen_logits.append(logits.clone())
            return super()._pick(logits, seen, lengths, gens)

    e = Recording(bb.model, bb.tokenizer, SamplingParams(temperature=1.0, max_new_tokens=8), batch_size=3)
    gens = e.generate_shared(e.prefill(D), [1, 2, 3])
    for r, g in enumerate(gens):
        for step in range(8):
            x = torch.cat([D, bb.embed(torch.tensor(g.token_ids[:step], dtype=torch.long))])
            want = bb.model(inputs_embeds=x[None], use_cache=False).logits[0, -1]
            torch.testing.assert_close(seen_logits[step][r], want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sampling_is_batch_independent_and_cache_exact(tiny_backbone, D):
    """Batched rows on the shared cache == each seed alone == each seed with no cache at all."""
    bb = tiny_backbone
    kw = dict(temperature=0.9, top_p=0.95, top_k=200, repetition_penalty=1.1, max_new_tokens=16)
    e = engine(bb, **kw)
    prefix = e.prefill(D)
    seeds = [sample_seed(0, i) for i in range(4)]
    batched = [g.token_ids for g in e.generate_shared(prefix, seeds)]
    alone = [e.generate_shared(prefix, [s])[0].token_ids for s in seeds]
    assert batched == alone
    assert len({tuple(t) for t in batched}) == 4  # different seeds, different samples

    # no cache: re-embed the prefix and the tokens so far at every step, same processors and draws
    class NoCache(HFEngine):
        def _decode(self, cache, logits, pos, mask, seeds):
            p = self.params
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            out = []
            for r in range(len(seeds)):
                toks, seen = [], torch.zeros((1, logits.shape[-1]), dtype=torch.bool)
                for step in range(p.max_new_tokens):
                    x = torch.cat([D, bb.embed(torch.tensor(toks, dtype=torch.long))]) if toks else D
                    lg = bb.model(inputs_embeds=x[None], use_cache=False).logits[:, -1].float()
                    t = int(self._pick(lg, seen, [step], [gens[r]])[0])
                    seen[0, t] = True
                    toks.append(t)
                out.append(toks)
            return out

    nc = NoCache(bb.model, bb.tokenizer, SamplingParams(**kw), batch_size=4)
    assert nc.generate_shared(nc.prefill(D), seeds) == batched


@torch.no_grad()
def test_rows_finishing_early_leave_the_batch_without_changing_the_rest(tiny_backbone, D):
    bb = tiny_backbone
    # every 6th token id ends a sample, so rows finish at different steps and get dropped
    e = engine(bb, batch_size=6, temperature=1.0, max_new_tokens=20,
               stop_token_ids=tuple(range(0, bb.model.config.vocab_size, 6)))
    prefix = e.prefill(D)
    seeds = [sample_seed(3, i) for i in range(6)]
    batched = e.generate_shared(prefix, seeds)
    lengths = [len(g.token_ids) for g in batched]
    assert len(set(lengths)) > 2, lengths
    e.n_forward = 0
    e.generate_shared(prefix, seeds)
    # one forward per token drawn after the first (drawn from the prefix logits); a stop token is
    # drawn too: the batch ends with its longest row
    assert e.n_forward == max(len(g.token_ids) + (g.finish_reason == "stop") for g in batched) - 1
    for s, g in zip(seeds, batched):
        alone = e.generate_shared(prefix, [s])[0]
        assert (alone.token_ids, alone.finish_reason, alone.stop_reason) == \
            (g.token_ids, g.finish_reason, g.stop_reason)


@torch.no_grad()
def test_prefix_is_computed_once_and_never_mutated(tiny_backbone, D):
    e = engine(tiny_backbone, max_new_tokens=8)
    prefix = e.prefill(D)
    before = [(k.clone(), v.clone()) for k, v in prefix.kv]
    assert e.n_forward == 1 and prefix.kv[0][0].shape[0] == 1 and prefix.kv[0][0].shape[2] == D.shape[0]
    first = [g.token_ids for g in e.generate_shared(prefix, [5, 6, 7])]
    # 8 tokens: the first comes from the prefix's logits, then one forward per further token
    assert e.n_forward == 1 + 7
    again = [g.token_ids for g in e.generate_shared(prefix, [5, 6, 7])]
    assert first == again
    for (k0, v0), (k1, v1) in zip(before, prefix.kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


@torch.no_grad()
def test_same_seed_same_samples_other_seed_other_samples(tiny_backbone, D):
    e = engine(tiny_backbone, max_new_tokens=12)
    p = e.prefill(D)
    a = [g.token_ids for g in e.generate_shared(p, [sample_seed(0, i) for i in range(3)])]
    b = [g.token_ids for g in e.generate_shared(p, [sample_seed(0, i) for i in range(3)])]
    c = [g.token_ids for g in e.generate_shared(p, [sample_seed(1, i) for i in range(3)])]
    assert a == b and a != c


@torch.no_grad()
def test_max_length_is_flagged_and_eos_stops(tiny_backbone, D):
    bb = tiny_backbone
    e = engine(bb, temperature=0.0, max_new_tokens=5)
    g = e.generate_shared(e.prefill(D), [0])[0]
    assert g.finish_reason == "length" and len(g.token_ids) == 5
    # make the greedy continuation's 3rd token an end token: generation stops there, flagged "stop"
    greedy = uncached_greedy(bb, D, 3, penalty=3.0)
    third = greedy[2]
    assert third not in greedy[:2]
    e2 = HFEngine(bb.model, bb.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=5,
                                                         repetition_penalty=3.0, stop_token_ids=(third,)),
                  batch_size=2)
    g2 = e2.generate_shared(e2.prefill(D), [0, 1])
    assert all(x.finish_reason == "stop" and x.stop_reason == third and len(x.token_ids) == 2 for x in g2)
    # min_new_tokens forbids ending before it
    e3 = HFEngine(bb.model, bb.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=5, min_new_tokens=4,
                                                         repetition_penalty=3.0, stop_token_ids=(third,)),
                  batch_size=2)
    g3 = e3.generate_shared(e3.prefill(D), [0])[0]
    assert third not in g3.token_ids[:4]


@torch.no_grad()
def test_stop_string_cuts_text(tiny_backbone, D):
    bb = tiny_backbone
    e0 = engine(bb, temperature=0.0, max_new_tokens=10, repetition_penalty=3.0)
    full = e0.generate_shared(e0.prefill(D), [0])[0]
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and stop in text
    e = engine(bb, temperature=0.0, max_new_tokens=10, repetition_penalty=3.0, stop=(stop,))
    g = e.generate_shared(e.prefill(D), [0])[0]
    assert g.finish_reason == "stop" and g.stop_reason == stop
    assert g.text == text[:text.find(stop)] and stop not in g.text
    assert len(g.token_ids) < len(full.token_ids)


@torch.no_grad()
def test_left_padded_prompts_equal_each_prompt_alone(tiny_backbone):
    bb = tiny_backbone
    tok = bb.tokenizer
    texts = ["def add(a, b):", "Write a function that reverses a list of integers and returns it", "x"]
    prompts = [tok(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == 3
    e = engine(bb, temperature=0.0, max_new_tokens=10, repetition_penalty=3.0)
    batched = [g.token_ids for g in e.generate_prompts(prompts, [0, 1, 2])]
    assert len({tuple(b) for b in batched}) == 3
    for p, got in zip(prompts, batched):
        assert got == uncached_greedy(bb, bb.embed(torch.tensor(p)), 10, penalty=3.0)
    ek = engine(bb, temperature=1.0, max_new_tokens=10)
    seeds = [11, 12, 13]
    assert [g.token_ids for g in ek.generate_prompts(prompts, seeds)] == \
        [ek.generate_prompts([p], [s])[0].token_ids for p, s in zip(prompts, seeds)]


def test_bad_sampling_settings_are_named():
    for kw, key in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                    ({"max_new_tokens": 0}, "max_new_tokens"), ({"min_new_tokens": 9, "max_new_tokens": 4},
                                                                "min_new_tokens"), ({"stop": ("",)}, "stop")]:
        with pytest.raises(ValueError, match=key):
            SamplingParams(**kw)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (50, 1.0), (50, 0.8), (0, 1.0)])
def test_top_k_top_p_keep_exactly_transformers_candidates(tiny_backbone, top_k, top_p):
    """Samples stay inside the set transformers' TopK/TopP warpers keep, and reach all of it."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3000, generator=g) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    kept = set(torch.nonzero(torch.isfinite(ref[0])).flatten().tolist())
    probs = ref[0].softmax(-1)
    e = engine(tiny_backbone, temperature=1.0, top_k=top_k, top_p=top_p)
    draws = e._sample(logits.expand(4000, -1), [torch.Generator().manual_seed(i) for i in range(4000)]).tolist()
    assert set(draws) <= kept
    likely = {t for t in kept if probs[t] > 0.01}
    assert likely and likely <= set(draws)
    top = int(probs.argmax())
    assert abs(draws.count(top) / 4000 - float(probs[top])) < 0.03


def _full_sort_top_p(logits: torch.Tensor, temperature: float, top_p: float, seeds: list[int]) -> torch.Tensor:
    """Oracle: top-p over the whole vocabulary sorted (ties in token order), inverse-CDF draw."""
    s = logits.float() / temperature
    vals, idx = s.sort(dim=-1, descending=True, stable=True)
    probs = (vals - s.logsumexp(-1, keepdim=True)).exp()
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(x)) for x in seeds])
    pick = torch.searchsorted(cdf, ((1 - u) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.gather(-1, pick[:, None]).squeeze(-1)


@pytest.mark.parametrize("start_tau", [0.4, 1e-2, 1e-4, 1e-7, 0.0, "mixed"])
def test_top_p_sample_does_not_depend_on_where_the_nucleus_search_starts(tiny_backbone, start_tau):
    """The engine looks for top-p candidates among tokens above a probability from the row's
    previous step; the nucleus, its order and so the drawn token are those of a sort of the whole
    vocabulary, from any start (flat and peaked rows mixed, and bf16 logits, which tie often)."""
    V = len(tiny_backbone.tokenizer)
    g = torch.Generator().manual_seed(0)
    flat_to_peaked = torch.tensor([0.1, 0.5, 2.0, 8.0]).repeat(8)[:, None]
    logits = torch.randn(32, V, generator=g) * flat_to_peaked
    logits[16:] = logits[16:].bfloat16().float()  # ties, as a bf16 head gives them
    seeds = [sample_seed(0, i) for i in range(32)]
    e = HFEngine(tiny_backbone.model, tiny_backbone.tokenizer, SamplingParams(temperature=0.8, top_p=0.9))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    starts = [0.4, 1e-3, 1e-7, 0.0] * 8 if start_tau == "mixed" else [start_tau] * 32
    e._nucleus_tau = {id(gen): t for gen, t in zip(gens, starts)}
    got = e._sample(logits.clone(), gens)
    assert torch.equal(got, _full_sort_top_p(logits, 0.8, 0.9, seeds))
    assert set(e._nucleus_tau) == {id(gen) for gen in gens}  # one start per live row, for the next step
    assert all(0 < t <= 0.5 for t in e._nucleus_tau.values())
    # a row sampled alone draws what it drew in the batch
    alone = e._sample(logits[5:6].clone(), [torch.Generator().manual_seed(seeds[5])])
    assert int(alone) == int(got[5])


def test_last_logits_equal_the_models_own_and_take_a_contiguous_head(tiny_backbone):
    """The decoder + head path (which avoids a CPU bmm that copies the head once per row) gives the
    model's own logits_to_keep logits, for a plain model and a peft-wrapped one."""
    from peft import LoraConfig, get_peft_model

    from domino.core.generation.hf import last_logits
    ids = torch.randint(5, 500, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for model in (tiny_backbone.model,
                  get_peft_model(copy.deepcopy(tiny_backbone.model), LoraConfig(r=2, target_modules=["q_proj"]))):
        with torch.no_grad():
            ours, _ = last_logits(model, 2, input_ids=ids, attention_mask=mask)
            theirs = model(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits.float()
        torch.testing.assert_close(ours, theirs)
        assert ours.shape == (3, 2, theirs.shape[-1])


@pytest.mark.parametrize("kw", [dict(temperature=0.0, repetition_penalty=1.5, min_new_tokens=3),
                                dict(temperature=1.0, top_p=0.9)])
def test_continuous_batching_equals_each_prompt_alone(tiny_backbone, kw):
    """generate_many admits prompts shortest first and refills rows as others stop: every prompt
    gets exactly what it gets decoded alone (greedy with a repetition penalty and a minimum length,
    or sampled with its own seed), each result is reported once as it finishes, and rows really
    joined running batches (more prefills than the 3 fixed batches would need). What it saves is
    measured in bench/decode_refill.py, not asserted: it depends on the lengths."""
    bb = tiny_backbone
    tok = bb.tokenizer
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prompts = [tok(" ".join(words[: 1 + (3 * i) % 11]))["input_ids"] for i in range(9)]
    seeds = [sample_seed(5, i) for i in range(9)]
    stops = tuple(range(0, bb.model.config.vocab_size, 5))  # rows stop at different steps
    e = engine(bb, batch_size=3, max_new_tokens=12, stop_token_ids=stops, **kw)
    seen = []
    e.n_forward = e.n_prefill = 0
    many = e.generate_many(prompts, seeds, on_result=lambda i, g: seen.append((i, g)))
    assert e.n_prefill > 3
    assert sorted(i for i, _ in seen) == list(range(9)) and all(many[i] is g for i, g in seen)
    alone = [e.generate_prompts([p], [s])[0] for p, s in zip(prompts, seeds)]
    for got, want in zip(many, alone):
        assert (got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.finish_reason, want.stop_reason)
    assert len({len(g.token_ids) for g in many}) > 1  # the rows really finished at different steps


@pytest.mark.parametrize("kw", [dict(temperature=1.0, repetition_penalty=1.5, min_new_tokens=3),
                                dict(temperature=1.0, top_k=40, top_p=0.9), dict(temperature=0.8, top_k=7)])
def test_shared_prefix_continuous_batching_equals_each_seed_alone(tiny_backbone, D, kw):
    """generate_shared_many refills freed rows with the next seeds, which join the running batch at
    the cached prefix (left-padded to the batch's width, so every step carries a padding mask): each
    sample is what generate_shared gives its seed alone, results come back in seed order, and
    each is reported once as it finishes, in finish order (not seed order). The masked attention
    rounds differently (logits within ~1.5e-7 here); top-p alone over this random model's flat rows
    (~40k near-tied candidates, sorted by probability) turns that into another token now and then,
    so the top-p case is checked after a top-k."""
    bb = tiny_backbone
    seeds = [sample_seed(3, i) for i in range(10)]
    stops = tuple(range(0, bb.model.config.vocab_size, 6))
    e = engine(bb, batch_size=4, max_new_tokens=14, stop_token_ids=stops, **kw)
    prefix = e.prefill(D)
    seen = []
    e.n_forward = 0
    many = e.generate_shared_many(prefix, seeds, on_result=lambda i, g: seen.append((i, g)))
    refilled = e.n_forward
    assert sorted(i for i, _ in seen) == list(range(10)) and all(many[i] is g for i, g in seen)
    lengths = [len(g.token_ids) for g in many]
    assert len(set(lengths)) > 1  # rows really finished at different steps
    assert [i for i, _ in seen] != list(range(10))
    alone = [e.generate_shared(prefix, [s])[0] for s in seeds]
    for got, want in zip(many, alone):
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)
    e.n_forward = 0
    fixed = [g for b in range(0, 10, 4) for g in e.generate_shared(prefix, seeds[b:b + 4])]
    assert [g.token_ids for g in fixed] == [g.token_ids for g in many]
    assert refilled < e.n_forward  # fewer model calls than three fixed batches
    assert e.generate_shared_many(prefix, []) == []


def test_continuous_batching_of_nothing_and_of_fewer_prompts_than_rows(tiny_backbone):
    e = engine(tiny_backbone, batch_size=8, temperature=0.0, max_new_tokens=4)
    assert e.generate_many([], []) == []
    p = tiny_backbone.tokenizer("def f(x):")["input_ids"]
    assert [g.token_ids for g in e.generate_many([p, p[:2]], [0, 1])] == \
        [g.token_ids for g in e.generate_prompts([p, p[:2]], [0, 1])]
    with pytest.raises(ValueError, match="one seed per prompt"):
        e.generate_many([p], [])


def test_kept_buffers_give_the_same_bits_as_fresh_tensors(tiny_backbone):
    """Sampling from kept buffers (used for a larger batch first, then a smaller one) draws the
    same tokens as a fresh engine (the log-normaliser's bits: tests/core/test_scratch.py)."""
    e = engine(tiny_backbone, temperature=0.7, top_p=0.9)
    g = torch.Generator().manual_seed(1)
    e._sample(torch.randn(6, 5000, generator=g), [torch.Generator().manual_seed(s) for s in range(6)])
    assert e._scratch._buffers["scaled"].shape == (6, 5000)
    logits = torch.randn(4, 5000, generator=g) * 3
    seeds = [sample_seed(1, i) for i in range(4)]
    fresh = engine(tiny_backbone, temperature=0.7, top_p=0.9)
    assert torch.equal(e._sample(logits, [torch.Generator().manual_seed(s) for s in seeds]),
                       fresh._sample(logits, [torch.Generator().manual_seed(s) for s in seeds]))


def test_joined_batches_stay_as_wide_as_their_longest_live_row(tiny_backbone):
    """Refilling many times: the cache and mask a join builds never grow wider than the longest
    prompt plus max_new_tokens (the columns no live row uses are cut), and the answers stay those of
    each prompt alone."""
    bb = tiny_backbone
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    prompts = [bb.tokenizer(" ".join(words[i % 16: i % 16 + 1 + i % 4]))["input_ids"] for i in range(30)]
    seeds = list(range(30))
    widths = []

    class Widths(HFEngine):
        def _join(self, *args):
            cache, mask = super()._join(*args)
            widths.append(mask.shape[1])
            assert all(layer.keys.shape[2] == mask.shape[1] for layer in cache.layers)
            return cache, mask

    stops = tuple(range(0, bb.model.config.vocab_size, 4))
    e = Widths(bb.model, bb.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=stops),
               batch_size=4)
    many = e.generate_many(prompts, seeds)
    assert len(widths) > 5 and max(widths) <= max(len(p) for p in prompts) + 12, widths
    assert [g.token_ids for g in many] == [e.generate_prompts([p], [s])[0].token_ids for p, s in zip(prompts, seeds)]


def test_a_cache_that_cannot_take_rows_decodes_in_fixed_batches(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    prompts = [bb.tokenizer(t)["input_ids"] for t in ("a b", "c", "d e f", "g", "h i")]
    e = engine(bb, batch_size=2, temperature=0.0, max_new_tokens=5)
    want = [g.token_ids for g in e.generate_many(prompts, list(range(5)))]
    monkeypatch.setattr(HFEngine, "can_join", staticmethod(lambda cache: False))
    seen = []
    e.n_prefill = 0
    got = e.generate_many(prompts, list(range(5)), on_result=lambda i, g: seen.append(i))
    assert [g.token_ids for g in got] == want and sorted(seen) == list(range(5)) and e.n_prefill == 3


def test_buffered_layer_holds_what_a_dynamic_layer_holds():
    """Appending past the spare columns (rebuilt with `spare` more), dropping rows, a reorder that
    replaces the views behind its back, repeating rows and a reset: the buffered layer's
    keys/values equal DynamicLayer's at every step; while room lasts an append writes into the same
    buffer (no copy of the whole cache), and it never holds more than the keys plus `spare`."""
    from transformers.cache_utils import DynamicLayer

    from domino.core.generation.hf import buffered_layer_class
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    ref = DynamicLayer()
    ref.update(k0, v0)
    buf = buffered_layer_class()(k0, v0, spare=2)
    storage = buf._k.data_ptr()
    for step in range(8):
        if step == 3:
            for layer in (ref, buf):
                layer.batch_select_indices(torch.tensor([0, 2]))
            storage = buf._k.data_ptr()
        if step == 6:  # an inherited method that swaps the views for new tensors
            for layer in (ref, buf):
                layer.reorder_cache(torch.tensor([1, 0]))
        n = ref.keys.shape[0]
        kn, vn = torch.randn(n, 2, 1, 4, generator=g), torch.randn(n, 2, 1, 4, generator=g)
        want, got = ref.update(kn, vn), buf.update(kn, vn)
        assert all(torch.equal(a, b) for a, b in zip(want, got)) and buf.get_seq_length() == ref.get_seq_length()
        if step in (0, 1, 3, 4):  # room left: written in place
            assert buf._k.data_ptr() == storage
        assert buf._k.shape[2] <= buf.keys.shape[2] + 2
    for layer in (ref, buf):
        layer.batch_repeat_interleave(2)
    assert torch.equal(ref.keys, buf.keys) and torch.equal(ref.values, buf.values)
    for layer in (ref, buf):
        layer.reset()
    assert all(torch.equal(a, b) for a, b in zip(ref.update(k0, v0), buf.update(k0, v0)))


def test_decoding_with_buffered_caches_gives_the_same_tokens(tiny_backbone, D, monkeypatch):
    """Shared prefix (sampled), left-padded prompts (greedy) and continuous batching: the same
    tokens with the buffered cache as with transformers' concatenating DynamicCache."""
    from domino.core.generation import hf
    bb = tiny_backbone
    prompts = [bb.tokenizer(t)["input_ids"] for t in ("a b c", "d", "e f", "g h i j", "k")]
    stops = tuple(range(0, bb.model.config.vocab_size, 7))

    def run():
        s = engine(bb, batch_size=3, temperature=1.0, top_p=0.9, max_new_tokens=10)
        g = engine(bb, batch_size=3, temperature=0.0, max_new_tokens=10, stop_token_ids=stops)
        return ([x.token_ids for x in s.generate_shared(s.prefill(D), [1, 2, 3])],
                [x.token_ids for x in g.generate_prompts(prompts[:3], [0, 1, 2])],
                [x.token_ids for x in g.generate_many(prompts, list(range(5)))])

    with_buffers = run()
    monkeypatch.setattr(hf, "buffered", lambda cache, spare: cache)
    assert run() == with_buffers


def test_grouped_kv_heads_decode_as_packed_queries_with_the_same_tokens(tiny_backbone, monkeypatch):
    """A model with fewer key/value heads than query heads (as Qwen2.5 and SmolLM2), on the CPU
    under SDPA: every one-token step runs the query heads packed per key/value head (no
    `enable_gqa`), shared-prefix and left-padded batches alike, and decodes the tokens the unpacked
    path decodes (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=tiny_backbone.model.config.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tok = tiny_backbone.tokenizer
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        calls.append((q.shape[1], q.shape[2], bool(kw.get("enable_gqa"))))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    prompts = [tok(" ".join(words[: 1 + (3 * i) % 9]))["input_ids"] for i in range(7)]
    stops = tuple(range(0, cfg.vocab_size, 9))  # rows stop at different steps: dropped rows, joins
    from domino.core.generation import hf
    kinds = []
    real_buffered = hf.buffered

    def spy_buffered(cache, spare):
        cache = real_buffered(cache, spare)
        kinds.extend(type(layer).__name__ for layer in cache.layers)
        return cache

    monkeypatch.setattr(hf, "buffered", spy_buffered)

    def run(pack):
        e = HFEngine(model, tok, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=stops),
                     batch_size=3)
        assert e._pack_gqa
        e._pack_gqa, e.kv_spare = pack, 2  # 2 spare columns: the buffers are rebuilt as rows decode
        calls.clear()
        e.n_forward = e.n_prefill = 0
        prefix = e.prefill(model.get_input_embeddings().weight[:4].detach())
        out = ([g.token_ids for g in e.generate_shared(prefix, [0, 1, 2])],
               [g.token_ids for g in e.generate_prompts(prompts[:3], [0, 1, 2])],
               [g.token_ids for g in e.generate_many(prompts, list(range(7)))])
        steps = e.n_forward - e.n_prefill - 1  # one-token decoding forwards (not the prefix's, not prompts')
        return out, [c for c in calls if c[0] == 2 or c[1] == 1], steps * cfg.num_hidden_layers

    packed, steps, n = run(True)
    # every decoding step's attention in every layer: 2 kv heads x 2 packed queries, no enable_gqa
    assert n > 10 and steps.count((2, 2, False)) == n
    unpacked, steps, _ = run(False)
    assert any(c == (4, 1, True) for c in steps)  # unpadded batches went through enable_gqa
    assert packed == unpacked
    assert len({len(t) for t in packed[2]}) > 1  # rows really stopped at different steps
    assert kinds and set(kinds) == {"BufferedLayer"}


def test_timing_splits_prefills_from_decoding_steps(tiny_backbone, monkeypatch):
    """prefill_s holds the prompts' and prefixes' forwards, joins included; decode_s the decoding
    loop without them (a slowed prefill shows in the one and not in the other)."""
    import time

    from domino.core.generation import hf
    bb, tok = tiny_backbone, tiny_backbone.tokenizer
    real, calls = hf.last_logits, []

    def slow(*a, **kw):
        calls.append(1)
        time.sleep(0.2)
        return real(*a, **kw)

    monkeypatch.setattr(hf, "last_logits", slow)
    prompts = [tok(" ".join(["alpha beta gamma"] * (1 + i % 3)))["input_ids"] for i in range(7)]
    e = engine(bb, batch_size=2, temperature=0.0, max_new_tokens=3)
    e.generate_many(prompts, list(range(7)))
    assert len(calls) == e.n_prefill > 1
    assert e.prefill_s >= 0.2 * len(calls) and 0 < e.decode_s < 0.2
    before = e.prefill_s
    e.generate_shared(e.prefill(torch.zeros(2, bb.model.config.hidden_size)), [0])
    assert e.prefill_s - before >= 0.2 and e.decode_s < 0.4


@torch.no_grad()
def test_stop_fns_end_rows_at_a_line_break_and_match_the_same_cut_after_decoding(tiny_backbone):
    """A row's `stop_fn` is asked only when its newest token holds a line break, and the number it
    returns ends that row there: the tokens are the undisturbed row's up to that token, the text is
    cut to the number, other rows (and a stop_fn that never answers) change nothing. Cutting the
    whole decoded rows afterwards (`params.stop_after`, what vLLM gets) gives the same texts."""
    from domino.core.generation.params import stop_after
    bb = tiny_backbone
    tok = bb.tokenizer
    prompts = [tok(f"row {i}:")["input_ids"] for i in range(40)]
    seeds = [sample_seed(11, i) for i in range(40)]
    e = engine(bb, batch_size=8, temperature=1.0, max_new_tokens=40)
    full = e.generate_many(prompts, seeds)
    broken = [i for i, g in enumerate(full) if "\n" in g.text]
    assert len(broken) >= 3  # a random model writes ~0.3% line-break tokens: some rows have one

    asked = []

    def first_line(text):
        asked.append(text)
        return text.index("\n")

    cut = e.generate_many(prompts, seeds, stop_fns=[first_line if i % 2 == 0 else None for i in range(40)])
    assert asked and all("\n" in t for t in asked)
    for i, (g, f) in enumerate(zip(cut, full)):
        if i % 2 or i not in broken:
            assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == \
                (f.token_ids, f.text, f.finish_reason, f.stop_reason)
            continue
        k = next(n for n in range(1, len(f.token_ids) + 1) if "\n" in tok.decode(f.token_ids[:n]))
        assert g.token_ids == f.token_ids[:k] and (g.finish_reason, g.stop_reason) == ("stop", "stop_fn")
        assert g.text == f.text[:f.text.index("\n")]
        assert stop_after(f, first_line).text == g.text
    assert e.generate_many(prompts, seeds, stop_fns=[lambda text: None] * 40) == full
    assert [g.text for g in e.generate_prompts(prompts[:8], seeds[:8], stop_fns=[first_line] * 8)] == \
        [stop_after(f, first_line).text for f in full[:8]]
    with pytest.raises(ValueError, match="one stop_fn"):
        e.generate_many(prompts, seeds, stop_fns=[None])


@torch.no_grad()
@pytest.mark.parametrize("kw", [dict(temperature=0.0, repetition_penalty=1.5), dict(temperature=1.0, top_k=40)])
def test_a_shared_prompt_prefix_runs_once_and_decodes_what_the_plain_prefill_does(tiny_backbone, kw):
    """Prompts that begin alike (a chat template's system turn, an instruction): the shared tokens
    run once as one row and every row continues that cache after padding of its own (a mask with
    zeros between the prefix and the row's tokens). The tokens are those of the plain left-padded
    prefill (fp32: the logits agree to rounding), in fixed batches and with continuous batching,
    where rows with such masks join and leave running batches."""
    from domino.core.generation.hf import FORWARD_COST, MIN_SHARED
    bb = tiny_backbone
    tok = bb.tokenizer
    system = tok("You are a careful assistant. Read the problem below, think about the edge cases, and answer "
                 "with one python code block that defines the function it asks for, nothing else.")["input_ids"]
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prompts = [system + tok(" ".join(words[: 1 + (5 * i) % 11]))["input_ids"] for i in range(9)]
    assert len(system) >= MIN_SHARED and 2 * len(system) > len(system) + FORWARD_COST  # 3 rows share it
    seeds = [sample_seed(9, i) for i in range(9)]
    stops = tuple(range(0, bb.model.config.vocab_size, 5))
    widths = []
    hook = bb.model.get_decoder().register_forward_pre_hook(  # prefills run the decoder alone (last_logits)
        lambda m, a, k: widths.append(k["input_ids"].shape) if k.get("input_ids") is not None else None,
        with_kwargs=True)
    try:
        shared = engine(bb, batch_size=3, max_new_tokens=12, stop_token_ids=stops, **kw)
        plain = engine(bb, batch_size=3, max_new_tokens=12, stop_token_ids=stops, **kw)
        plain.shared_prefix = False
        widths.clear()
        got = shared.generate_prompts(prompts[:3], seeds[:3])
        # the prefix as one row, then the three rows' own tokens only
        assert widths[0] == (1, len(system)) and widths[1] == (3, max(len(p) for p in prompts[:3]) - len(system))
        assert got == plain.generate_prompts(prompts[:3], seeds[:3])
        many = shared.generate_many(prompts, seeds)
        assert many == plain.generate_many(prompts, seeds)
        assert shared.n_prefill > 3 and len({len(g.token_ids) for g in many}) > 1  # rows joined and left
    finally:
        hook.remove()
    # the logits after the shared prefill are the plain prefill's, row by row
    c1, l1, pos1, m1 = shared._prefill_prompts(prompts[:4])
    c2, l2, pos2, m2 = plain._prefill_prompts(prompts[:4])
    assert torch.equal(pos1, pos2) and torch.allclose(l1, l2, atol=1e-5, rtol=1e-5)
    assert m1.shape[1] == m2.shape[1] and not torch.equal(m1, m2)  # padding moved between prefix and rest


def test_common_prefix_and_live_width():
    from domino.core.generation.hf import _common_prefix, _live_width
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert _common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every row keeps a token of its own
    assert _common_prefix([[7], [7, 8]]) == 0 and _common_prefix([[1, 2], [3, 2]]) == 0
    assert _live_width(torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])) == 3
    assert _live_width(torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1]])) == 4
    assert _live_width(torch.tensor([[0, 0, 0, 1]])) == 1


def test_no_shared_prompt_prefix_over_sliding_window_layers(tiny_backbone):
    """A sliding window counts cache columns: the padding between a shared prefix and a row's own
    tokens would take some of it, so such a model prefills every prompt whole."""
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=tiny_backbone.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    windowed = HFEngine(MistralForCausalLM(cfg), tiny_backbone.tokenizer, SamplingParams())
    assert not windowed.shared_prefix and engine(tiny_backbone).shared_prefix
