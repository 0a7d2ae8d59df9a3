"""LoRA dropout drawn by gaps (finetune/dropout.py): the same distribution as nn.Dropout, the same
output and gradient for the positions it draws, and wired into LoRAModule by lora.dropout_draws."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from domino.finetune.dropout import GapDropout, drop_positions, use_gap_dropout
from domino.finetune.module import LoRAModule

from ..conftest import TINY


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_positions_are_iid_bernoulli(p):
    """Many draws over n elements: every position's drop frequency, the number dropped, and
    neighbours dropped together (independence) match Bernoulli(p), within 5 standard errors."""
    torch.manual_seed(0)
    n, draws = 64, 4000
    hits = torch.zeros(n)
    pairs = 0
    counts = []
    for _ in range(draws):
        pos = drop_positions(n, p)
        assert pos.dtype == torch.int64
        assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or (0 <= pos[0] and pos[-1] < n))
        m = torch.zeros(n)
        m[pos] = 1
        hits += m
        pairs += int((m[1:] * m[:-1]).sum())
        counts.append(pos.numel())
    se = math.sqrt(p * (1 - p) / draws)
    freq = hits / draws
    # the first and the last position too (an off-by-one in the gaps shows there first)
    assert (freq - p).abs().max() < 5 * se, (freq[0], freq[-1], freq.min(), freq.max())
    mean = sum(counts) / draws
    assert abs(mean - n * p) < 5 * math.sqrt(n * p * (1 - p) / draws)
    pair_rate = pairs / (draws * (n - 1))
    assert abs(pair_rate - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (draws * (n - 1))) + 1e-3


def test_drop_positions_cover_a_long_tensor_and_refuse_bad_p():
    torch.manual_seed(1)
    n = 1_000_003
    pos = drop_positions(n, 0.05)
    assert abs(pos.numel() - 0.05 * n) < 5 * math.sqrt(n * 0.05 * 0.95)
    # both halves get their share: the gaps are drawn until they pass the end
    first = int((pos < n // 2).sum())
    assert abs(first - pos.numel() / 2) < 5 * math.sqrt(pos.numel() / 4)
    assert drop_positions(0, 0.1).numel() == 0
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="dropout probability"):
            drop_positions(10, bad)


def test_gap_dropout_output_and_gradient():
    """Kept elements are x / (1 - p), dropped ones 0, the gradient the same mask and scale; the
    draws come from torch's default generator (a seeded step draws them again)."""
    p = 0.1
    d = GapDropout(p).train()
    x = torch.randn(37, 53, requires_grad=True)
    torch.manual_seed(7)
    y = d(x)
    torch.manual_seed(7)
    pos = drop_positions(x.numel(), p)
    keep = torch.ones(x.numel())
    keep[pos] = 0
    keep = keep.view_as(x)
    assert torch.equal(y, x.detach() * (1 / (1 - p)) * keep)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g * keep / (1 - p))
    torch.manual_seed(7)
    assert torch.equal(d(x), y)
    # a strided view is masked like any other tensor
    xt = torch.randn(40, 30).t()
    assert ((d(xt) == 0).float().mean() - p).abs() < 0.05
    # eval mode and p = 0: the input itself
    assert d.eval()(x) is x
    assert GapDropout(0.0).train()(x) is x


def test_gap_dropout_falls_back_to_f_dropout_for_large_p_and_off_the_cpu(monkeypatch):
    calls = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(100, 100)
    GapDropout(0.6).train()(x)
    GapDropout(0.05).train()(x)
    assert calls == [0.6]
    # any other device (a GPU draws Bernoulli numbers fast): F.dropout; "meta" stands in for it here
    out = GapDropout(0.05).train()(torch.empty(8, 8, device="meta"))
    assert calls == [0.6, 0.05] and out.device.type == "meta"


def test_lora_module_draws_dropout_by_gaps_unless_told():
    """lora.dropout_draws: gaps (default) swaps every adapter's nn.Dropout for GapDropout of the
    same p; bernoulli keeps peft's; dropout 0 keeps peft's Identity; anything else names the key."""
    def dropouts(m):
        return [d for name, md in m.model.named_modules() if name.endswith("lora_dropout") for d in md.values()]

    gaps = dropouts(LoRAModule(TINY, r=2, alpha=4, dropout=0.1))
    assert gaps and all(type(d) is GapDropout and d.p == 0.1 for d in gaps)
    bern = dropouts(LoRAModule(TINY, r=2, alpha=4, dropout=0.1, dropout_draws="bernoulli"))
    assert bern and all(type(d) is nn.Dropout for d in bern)
    off = dropouts(LoRAModule(TINY, r=2, alpha=4, dropout=0.0))
    assert off and all(type(d) is nn.Identity for d in off)
    with pytest.raises(ValueError, match="lora.dropout_draws"):
        LoRAModule(TINY, r=2, alpha=4, dropout=0.1, dropout_draws="fast")
    # the swap keeps each module's training mode, and the module's train() reaches the new ones
    m = LoRAModule(TINY, r=2, alpha=4, dropout=0.1)
    m.train()
    assert all(d.training for d in dropouts(m))
    m.eval()
    assert not any(d.training for d in dropouts(m))
    assert use_gap_dropout(m.model) == 0  # nothing left to swap
