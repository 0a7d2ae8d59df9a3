"""The loss math against hand-computed values, and the NLL's treatment of padding and soft tokens."""
import math

import pytest
import torch

from domino.training.objective import (
    NLL,
    combine,
    contrastive_official,
    contrastive_paper,
    full_nll,
    straightforward_nll,
)


def nll_from_means(means, counts=None):
    means = torch.tensor(means, dtype=torch.float64)
    counts = torch.ones_like(means) if counts is None else torch.tensor(counts, dtype=torch.float64)
    return NLL(total=means * counts, count=counts)


L3 = [[1.0, 2.0, 3.0], [4.0, 0.5, 6.0], [7.0, 8.0, 0.25]]


def test_paper_form_by_hand():
    dom = nll_from_means([1.5, 2.5, 0.5])
    mat = nll_from_means(L3)
    con = sum(L3[i][i] + math.log(sum(math.exp(-L3[i][j]) for j in range(3) if j != i)) for i in range(3)) / 3
    out = combine(dom, mat, form="paper", w_dom=2.0, lam=0.5)
    assert out["loss_dom"].item() == pytest.approx(1.5)
    assert out["loss_con"].item() == pytest.approx(con, rel=1e-12)
    assert out["loss"].item() == pytest.approx(2.0 * 1.5 + 0.5 * con, rel=1e-12)
    off = [L3[i][j] for i in range(3) for j in range(3) if i != j]
    assert out["contrast_gap"].item() == pytest.approx(sum(off) / 6 - (1.0 + 0.5 + 0.25) / 3)


def test_official_form_by_hand_is_token_weighted():
    # per-sample token counts differ, so token weighting and sample averaging disagree
    dom_counts, dom_means = [2.0, 4.0, 6.0], [1.5, 2.5, 0.5]
    counts = [[2.0, 4.0, 6.0]] * 3
    dom = nll_from_means(dom_means, dom_counts)
    mat = nll_from_means(L3, counts)
    lbar_dom = sum(m * c for m, c in zip(dom_means, dom_counts)) / sum(dom_counts)
    lbar_pos = sum(L3[i][i] * counts[i][i] for i in range(3)) / sum(counts[i][i] for i in range(3))
    log_mean_neg = math.log(sum(math.exp(-L3[i][j]) for i in range(3) for j in range(3) if i != j) / 6)
    out = combine(dom, mat, form="official", w_dom=1.0, lam=1.0)
    assert out["loss_dom"].item() == pytest.approx(lbar_dom, rel=1e-12)
    assert out["loss_con"].item() == pytest.approx(lbar_pos + log_mean_neg, rel=1e-12)
    assert out["loss"].item() == pytest.approx(lbar_dom + lbar_pos + log_mean_neg, rel=1e-12)


def test_soft_prompt_is_domain_term_only():
    out = combine(nll_from_means([1.0, 3.0]), None, form="paper", w_dom=1.0, lam=1.0)
    assert set(out) == {"loss_dom", "loss"} and out["loss"].item() == pytest.approx(2.0)


def test_lambda_zero_reduces_to_prompt_tuning():
    dom, mat = nll_from_means([1.0, 3.0]), nll_from_means([[1.0, 2.0], [3.0, 0.5]])
    for form in ("paper", "official"):
        assert combine(dom, mat, form=form, lam=0.0)["loss"].item() == pytest.approx(2.0)


def test_logsumexp_is_stable_for_large_nll():
    big = torch.tensor([[1000.0, 2000.0], [3000.0, 1000.5]])
    assert contrastive_paper(big).item() == pytest.approx(((1000 - 2000) + (1000.5 - 3000)) / 2)
    assert math.isfinite(contrastive_official(big).item())
    assert contrastive_official(big).item() == pytest.approx(-2000 + math.log((1 + math.exp(-1000)) / 2))


def test_batch_of_one_is_refused_not_nan():
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_paper(torch.ones(1, 1))
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_official(torch.ones(1, 1))
    with pytest.raises(ValueError, match="objective.form"):
        combine(nll_from_means([1.0]), None, form="nope")


def _texts(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_padding_does_not_change_nll(tiny_backbone):
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    seqs = _texts(tok, ["def f(x):\n    return x + 1", "print('a much longer example text here', 42)", "x = 1"])
    torch.manual_seed(0)
    prefix = torch.randn(5, tiny_backbone.hidden_size) * 0.02

    def run(extra_pad, pad_id):
        T = max(map(len, seqs)) + extra_pad
        ids = torch.full((len(seqs), T), pad_id)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return full_nll(model, prefix, ids, mask)

    a, b = run(0, tok.pad_token_id), run(7, 123)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-5)
    assert a.count.tolist() == [len(s) for s in seqs] == b.count.tolist()
    # and each padded row equals that text scored alone (no leakage across rows either)
    for i, s in enumerate(seqs):
        solo = full_nll(model, prefix, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
        torch.testing.assert_close(solo.total[0], a.total[i], rtol=1e-5, atol=1e-5)


def test_first_text_token_is_predicted_from_last_prefix_position(tiny_backbone):
    """Changing the last soft token must change l (x_1 is scored from it); with no prefix
    dependence this would fail."""
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    ids = torch.tensor(_texts(tok, ["hello world"]))
    mask = torch.ones_like(ids)
    torch.manual_seed(1)
    p = torch.randn(3, tiny_backbone.hidden_size)
    q = p.clone()
    q[-1] += 1.0
    assert not torch.allclose(full_nll(model, p, ids, mask).total, full_nll(model, q, ids, mask).total)


def test_matrix_rows_are_sample_tokens_columns_are_texts(tiny_backbone):
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    seqs = _texts(tok, ["alpha beta gamma", "one two", "x y z w"])
    T = max(map(len, seqs))
    ids = torch.full((3, T), tok.pad_token_id)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    torch.manual_seed(2)
    D, S = torch.randn(2, 64), torch.randn(3, 2, 64)
    dom, mat = straightforward_nll(model, D, S, ids, mask)
    for i in range(3):
        for j in range(3):
            one = full_nll(model, torch.cat([D, S[i]]), ids[j: j + 1, : len(seqs[j])],
                           mask[j: j + 1, : len(seqs[j])])
            torch.testing.assert_close(mat.total[i, j], one.total[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dom.total, full_nll(model, D, ids, mask).total)
