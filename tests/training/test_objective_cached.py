"""The prefix-cached objective (`objective.impl=efficient`) against the straightforward oracle:
same loss and same gradients for D and every S_i, with right padding of different lengths."""
import math

import pytest
import torch
import torch.nn.functional as F

from domino.core.backbone import load_backbone
from domino.training import objective_cached as efficient
from domino.training.objective import combine, straightforward_nll
from domino.training.objective_cached import cached_nll, sample_pairs, token_nll

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "seed": 0}
B, T, K_, L_ = 4, 12, 4, 4
LENGTHS = [12, 8, 5, 1]    # right padding of different lengths, one text of a single token


@pytest.fixture(scope="module")
def models():
    """fp32 without / with gradient checkpointing, bf16 (own instances: enabling checkpointing
    mutates a model, so the session's shared tiny backbone is left alone)."""
    plain = load_backbone(path="tiny", tiny=TINY, dtype="float32")
    gc = load_backbone(path="tiny", tiny=TINY, dtype="float32", gradient_checkpointing=True)
    bf16 = load_backbone(path="tiny", tiny=TINY, dtype="bfloat16")
    return {"plain": plain.model, "gc": gc.model, "bf16": bf16.model, "pad": plain.tokenizer.pad_token_id}


def batch(pad_id, lengths=LENGTHS, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    am = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
    return ids.masked_fill(am == 0, pad_id), am


def prompts(h, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K_, h, generator=g) * 0.05, torch.randn(n, L_, h, generator=g) * 0.05


def step(fn, model, D0, S0, ids, am, form="paper", **kw):
    D = D0.clone().requires_grad_()
    S = S0.clone().requires_grad_() if S0 is not None else None
    dom, mat = fn(model, D, S, ids, am, **kw)
    out = combine(dom, mat, form=form)
    out["loss"].backward()
    return {"dom": dom, "mat": mat, "out": out, "gD": D.grad, "gS": S.grad if S is not None else None}


def close(a, b, rtol=1e-5, atol_frac=1e-6):
    """Elementwise rtol with an atol tied to the tensor's scale (gradients have no natural unit)."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_frac * b.abs().max().item() + 1e-12)


def assert_same(got, ref, rtol=1e-5):
    close(got["out"]["loss"], ref["out"]["loss"], rtol)
    close(got["dom"].total, ref["dom"].total, rtol)
    torch.testing.assert_close(got["dom"].count, ref["dom"].count)
    if ref["mat"] is not None:
        close(got["mat"].total, ref["mat"].total, rtol)
        torch.testing.assert_close(got["mat"].count, ref["mat"].count)
        close(got["gS"], ref["gS"], rtol, 1e-5)
    close(got["gD"], ref["gD"], rtol, 1e-5)


_ORACLE = {}


def oracle(models, form, with_samples=True):
    """The straightforward result, computed once per form (it is the slow part of these tests)."""
    key = (form, with_samples)
    if key not in _ORACLE:
        ids, am = batch(models["pad"])
        D0, S0 = prompts(64)
        _ORACLE[key] = step(straightforward_nll, models["plain"], D0, S0 if with_samples else None, ids, am, form)
    return _ORACLE[key]


@pytest.mark.parametrize("form", ["paper", "official"])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("which", ["plain", "gc"])
@pytest.mark.parametrize("layout", ["joint", "split"])
@pytest.mark.parametrize("forward_cost", [None, 0])
def test_matches_straightforward(models, form, chunk_size, which, layout, forward_cost):
    model = models[which]
    ids, am = batch(models["pad"])
    D0, S0 = prompts(model.config.hidden_size)
    ref = oracle(models, form)
    got = step(cached_nll, model, D0, S0, ids, am, form, chunk_size=chunk_size, layout=layout,
               forward_cost=forward_cost)
    assert_same(got, ref)
    assert ref["gS"].abs().amin(dim=(1, 2)).gt(0).all()  # every S_i gets a gradient


@pytest.mark.parametrize("layout", ["joint", "split"])
def test_soft_prompt_no_sample_tokens(models, layout):
    ids, am = batch(models["pad"])
    D0, _ = prompts(64)
    ref = oracle(models, "paper", with_samples=False)
    got = step(cached_nll, models["plain"], D0, None, ids, am, chunk_size=3, layout=layout)
    assert got["mat"] is None and set(got["out"]) == {"loss_dom", "loss"}
    assert_same(got, ref)


def count_runs(monkeypatch) -> list[tuple[int, int]]:
    """The (rows, tokens) of every decoder forward `cached_nll` runs from here on, in order."""
    seen = []
    run = efficient._run

    def counted(model, embeds, *args, **kw):
        seen.append(tuple(embeds.shape[:2]))
        return run(model, embeds, *args, **kw)
    monkeypatch.setattr(efficient, "_run", counted)
    return seen


def test_layout_is_chosen_per_device_and_size(models, monkeypatch):
    """auto: split on a CPU whose products are bound by arithmetic (fp32; bf16 without AMX) once
    (B-1) k saved tokens outweigh two more weight passes, joint otherwise, in bf16 on AMX and on a
    GPU (launch-bound)."""
    from domino.core import backbone
    r = efficient.resolve_layout
    for kernels in ("AMX-BF16", "AVX512-BF16", None):
        monkeypatch.setattr(backbone, "cpu_bf16_kernels", lambda: kernels)
        assert r("auto", torch.device("cpu"), B=4, k=64, itemsize=4) == "split"   # (B-1)k = 192 >= 64
        assert r("auto", "cpu", B=4, k=16, itemsize=4) == "joint"                 # 48 < 64
        assert r("auto", "cpu", B=5, k=16, itemsize=4) == "split"                 # 64
        # bf16: joint on AMX (its products are bound by reading the weights), else as fp32
        assert r("auto", "cpu", B=4, k=64, itemsize=2) == ("joint" if kernels == "AMX-BF16" else "split")
        assert r("auto", "cpu", B=4, k=16, itemsize=2) == "joint"
        assert r("auto", "cuda:0", B=4, k=64, itemsize=4) == "joint"
        assert r("auto", "cuda:0", B=4, k=64, itemsize=2) == "joint"
    assert r("joint", "cpu", B=4, k=64) == "joint" and r("split", "cuda", B=2, k=1) == "split"
    with pytest.raises(ValueError, match="objective.layout='fused'"):
        r("fused", "cpu")
    # the chosen layout is the one that runs: split runs D alone (a batch-1 forward of k tokens)
    seen = count_runs(monkeypatch)
    monkeypatch.setattr(efficient, "SPLIT_MIN_TOKENS", 1)
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    for layout in ("auto", "joint"):
        cached_nll(models["plain"], D0, S0, ids, am, layout=layout, forward_cost=None)
    assert seen == [(1, K_), (B, T), (B, L_), (B * B, T), (B, K_ + L_), (B + B * B, T)]
    seen.clear()
    monkeypatch.setattr(efficient, "SPLIT_MIN_TOKENS", (B - 1) * K_ + 1)
    cached_nll(models["plain"], D0, S0, ids, am, forward_cost=None)
    assert seen == [(B, K_ + L_), (B + B * B, T)]


def test_continuations_run_in_length_groups(models, monkeypatch):
    """With a forward cost the continuations go in groups of texts of neighbouring lengths, each cut
    to its longest text (`batching.length_groups`), `chunk_size` at most a forward within a group;
    "auto" groups on a CPU only; a bad value is named (the results: test_matches_straightforward)."""
    from domino.core.batching import CPU_FORWARD_COST, resolve_forward_cost
    seen = count_runs(monkeypatch)
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    n = B + B * B  # joint: l(x|D)'s B continuations and the B^2 pairs, each text B + 1 times
    cached_nll(models["plain"], D0, S0, ids, am, layout="joint", forward_cost=0)
    assert seen == [(B, K_ + L_)] + [(n // B, w) for w in LENGTHS]
    seen.clear()
    cached_nll(models["plain"], D0, S0, ids, am, layout="joint", forward_cost=0, chunk_size=3)
    assert seen == [(B, K_ + L_)] + [(c, w) for w in LENGTHS for c in (3, 2)]
    seen.clear()
    cached_nll(models["plain"], D0, S0, ids, am, layout="joint", forward_cost=30)  # 12 with 8, 5 with 1
    assert seen == [(B, K_ + L_), (2 * n // B, 12), (2 * n // B, 5)]
    seen.clear()
    cached_nll(models["plain"], D0, S0, ids, am, layout="joint", forward_cost=200)
    assert seen == [(B, K_ + L_), (n, T)]
    seen.clear()
    cached_nll(models["plain"], D0, S0, ids, am, layout="joint")  # auto, 64: 298 tokens' worth against 304
    assert seen == [(B, K_ + L_), (2 * n // B, 12), (2 * n // B, 5)]
    assert resolve_forward_cost("auto", "cpu") == CPU_FORWARD_COST and resolve_forward_cost("auto", "cuda:0") is None
    assert resolve_forward_cost(0, "cuda") == 0 and resolve_forward_cost(None, "cpu") is None
    with pytest.raises(ValueError, match="objective.forward_cost='cheap'"):
        cached_nll(models["plain"], D0, S0, ids, am, forward_cost="cheap")


def test_fused_head_chunks_over_tokens(models, monkeypatch):
    """A logit budget of a few rows forces the fused LM head + CE through many token chunks."""
    model = models["plain"]
    monkeypatch.setattr(efficient, "LOGIT_BUDGET", 5 * model.config.vocab_size)
    monkeypatch.setattr(efficient, "HEAD_BLOCK_BYTES", 2 * 4 * model.config.vocab_size)  # softmax 2 rows at a time
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    assert_same(step(cached_nll, model, D0, S0, ids, am, chunk_size=2), oracle(models, "paper"))


@pytest.mark.parametrize("block_rows", [1, 2, 3, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_token_nll_matches_cross_entropy(monkeypatch, block_rows, bias):
    """Chunks of 3 rows for the head's product, softmax blocks of 1, 2 (a partial last block), 3
    or all rows: the fused head is F.cross_entropy, value and gradient."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    h = torch.randn(7, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (7,), generator=g)
    w = torch.rand(7, generator=g)
    ref = F.cross_entropy(head(h).float(), y, reduction="none")
    (gref,) = torch.autograd.grad((ref * w).sum(), h)
    monkeypatch.setattr(efficient, "LOGIT_BUDGET", 3 * 50)
    monkeypatch.setattr(efficient, "HEAD_BLOCK_BYTES", block_rows * 4 * 50)
    got = token_nll(head, h, y)
    (ggot,) = torch.autograd.grad((got * w).sum(), h)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ggot, gref, rtol=1e-5, atol=1e-7)


def test_token_nll_of_a_bf16_head_is_fp32_cross_entropy_of_its_logits(monkeypatch):
    """A bf16 head: its bf16 logits, then an fp32 log-softmax (the value to fp32 rounding); the
    gradient is (softmax - onehot) rounded to bf16, times W."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(7, 16, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, 50, (7,), generator=g)
    monkeypatch.setattr(efficient, "LOGIT_BUDGET", 3 * 50)
    monkeypatch.setattr(efficient, "HEAD_BLOCK_BYTES", 2 * 4 * 50)
    got = token_nll(head, h, y)
    logits = (h @ head.weight.t()).float()
    torch.testing.assert_close(got, F.cross_entropy(logits, y, reduction="none"), rtol=1e-6, atol=1e-6)
    (ggot,) = torch.autograd.grad(got.sum(), h)
    want = ((logits.softmax(-1) - F.one_hot(y, 50)).to(torch.bfloat16) @ head.weight)
    torch.testing.assert_close(ggot, want, rtol=1e-2, atol=1e-3)  # a softmax element may round to the other bf16


def test_padding_ids_do_not_leak(models):
    """Pad positions may hold any token id; a real token changing must change the result."""
    model = models["plain"]
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    base = step(cached_nll, model, D0, S0, ids, am)
    junk = ids.clone()
    junk[am == 0] = torch.randint(0, 1000, (int((am == 0).sum()),), generator=torch.Generator().manual_seed(5))
    other = step(cached_nll, model, D0, S0, junk, am)
    torch.testing.assert_close(other["mat"].total, base["mat"].total, rtol=0, atol=0)
    torch.testing.assert_close(other["gS"], base["gS"], rtol=0, atol=0)
    real = ids.clone()
    real[2, 4] = (real[2, 4] + 1) % 1000          # the last real token of text 2 (length 5)
    changed = step(cached_nll, model, D0, S0, real, am)
    assert not torch.equal(changed["mat"].total[:, 2], base["mat"].total[:, 2])
    torch.testing.assert_close(changed["mat"].total[:, :2], base["mat"].total[:, :2], rtol=0, atol=0)


def test_first_token_is_predicted_by_the_prefix(models):
    """A one-token text is scored only by the last prefix position: l(x|D) = -log softmax(head(h_D))[x_1]."""
    model = models["plain"]
    ids, am = batch(models["pad"], lengths=[1, 1])
    D0, _ = prompts(64)
    dom, _ = cached_nll(model, D0, None, ids, am)
    with torch.no_grad():
        logits = model(inputs_embeds=D0.unsqueeze(0)).logits[0, -1].float()
    want = -torch.log_softmax(logits, -1)[ids[:, 0]]
    torch.testing.assert_close(dom.total, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dom.count, torch.ones(2))


def test_bf16_is_close(models):
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    ref = oracle(models, "paper")   # fp32
    got = step(cached_nll, models["bf16"], D0, S0, ids, am, chunk_size=3)
    assert got["gD"].dtype == torch.float32   # the fp32 parameters get fp32 gradients
    close(got["out"]["loss"], ref["out"]["loss"], rtol=2e-2, atol_frac=0)
    for k in ("gD", "gS"):
        cos = F.cosine_similarity(got[k].flatten(), ref[k].flatten(), dim=0)
        assert cos > 0.98, (k, cos)


def test_train_mode_checkpointing_is_refused(models):
    """HF drops the cache of a checkpointed layer in train mode: results would be silently wrong."""
    model = models["gc"]
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            cached_nll(model, D0, S0, ids, am)
    finally:
        model.eval()


def test_left_padding_is_refused(models):
    ids, am = batch(models["pad"])
    with pytest.raises(ValueError, match="right-padded"):
        cached_nll(models["plain"], *prompts(64), ids, am.flip(1))


def test_qwen2_family_matches():
    """Qwen2 (q/k/v biases, grouped KV heads) is the GPU target: same contract, a tiny random one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    ids, am = batch(0)
    D0, S0 = prompts(64)
    for form, layout in (("paper", "joint"), ("official", "joint"), ("paper", "split")):
        assert_same(step(cached_nll, model, D0, S0, ids, am, form, chunk_size=3, layout=layout),
                    step(straightforward_nll, model, D0, S0, ids, am, form))


def test_eager_attention_matches():
    """HF's eager attention reads the same 4D masks (prefix columns, padding) as SDPA: same contract
    (its own model: setting the implementation mutates it)."""
    bb = load_backbone(path="tiny", tiny=TINY, dtype="float32")
    bb.model.set_attn_implementation("eager")
    ids, am = batch(bb.tokenizer.pad_token_id)
    D0, S0 = prompts(64)
    ref = step(straightforward_nll, bb.model, D0, S0, ids, am)
    for layout in ("joint", "split"):
        assert_same(step(cached_nll, bb.model, D0, S0, ids, am, chunk_size=3, layout=layout), ref)


# ------------------------------------------------------------------------ sampled negatives


def test_sample_pairs_draws_k_distinct_negatives():
    g = torch.Generator().manual_seed(0)
    rows, cols = sample_pairs(5, 2, generator=g)
    assert rows.tolist() == [i for i in range(5) for _ in range(3)]
    for i in range(5):
        c = cols[rows == i].tolist()
        assert c[0] == i and len(set(c)) == 3 and i not in c[1:]
    with pytest.raises(ValueError):
        sample_pairs(5, 0)


def test_all_negatives_sampled_equals_full(models, monkeypatch):
    """K = B-1 through the sampling path (pairs in shuffled order, scattered back) = the full matrix."""
    model = models["plain"]
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    full = step(cached_nll, model, D0, S0, ids, am, "official")
    real = efficient.sample_pairs

    def sampled_path(B_, K, device=None, generator=None):
        g = torch.Generator().manual_seed(3)
        keys = torch.rand(B_, B_, generator=g).fill_diagonal_(2.0)
        c = torch.cat([torch.arange(B_)[:, None], keys.argsort(1)[:, :B_ - 1]], 1).reshape(-1)
        return torch.arange(B_).repeat_interleave(B_), c

    monkeypatch.setattr(efficient, "sample_pairs", sampled_path)
    got = step(cached_nll, model, D0, S0, ids, am, "official", negatives=B - 1, chunk_size=3)
    monkeypatch.setattr(efficient, "sample_pairs", real)
    assert_same(got, full)


@pytest.mark.parametrize("form", ["paper", "official"])
def test_fewer_negatives_masks_the_rest(models, form):
    model = models["plain"]
    ids, am = batch(models["pad"])
    D0, S0 = prompts(64)
    full = step(cached_nll, model, D0, S0, ids, am, form)
    got = step(cached_nll, model, D0, S0, ids, am, form, negatives=1,
               generator=torch.Generator().manual_seed(0))
    tot = got["mat"].total.detach()
    fin = torch.isfinite(tot)
    assert fin.sum(1).tolist() == [2] * B and fin.diagonal().all()
    assert torch.isposinf(tot[~fin]).all()
    close(tot[fin], full["mat"].total.detach()[fin])
    l = got["mat"].mean.detach()
    neg = [(i, j) for i in range(B) for j in range(B) if i != j and fin[i, j]]
    if form == "paper":
        con = sum(l[i, i] + (-l[i, j]) for i, j in neg) / B        # logsumexp over one negative
    else:
        pos = got["mat"].total.diagonal().sum() / got["mat"].count.diagonal().sum()
        con = pos + torch.logsumexp(torch.stack([-l[i, j] for i, j in neg]), 0) - math.log(len(neg))
    # a difference of ~10-sized terms: an absolute tolerance at their scale
    torch.testing.assert_close(got["out"]["loss_con"].detach(), torch.as_tensor(con, dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)
    gap = torch.stack([l[i, j] for i, j in neg]).mean() - l.diagonal().mean()
    close(got["out"]["contrast_gap"], gap)
    for k in ("gD", "gS"):
        assert torch.isfinite(got[k]).all() and got[k].abs().sum() > 0
