"""Soft-token initialisation and heads; backbone loading, freezing and the one-time conversion."""

import pytest
import torch

from domino.core.backbone import count_params, freeze, load_backbone
from domino.core.prompts import SoftPrompts

from ..conftest import TINY


def test_init_modes(tiny_backbone):
    W = tiny_backbone.embed.weight
    sv = SoftPrompts(W, n_references=3, k=5, l=2, init="sample_vocab", seed=0)
    rows = {tuple(r.tolist()) for r in W.detach()}
    assert all(tuple(r.tolist()) in rows for r in sv.domain.detach())
    rnd = SoftPrompts(W, n_references=3, k=500, l=2, init="random", seed=0)
    assert rnd.domain.std().item() == pytest.approx(W.std().item(), rel=0.1)
    ids = tiny_backbone.tokenizer("def solve", add_special_tokens=False)["input_ids"]
    tx = SoftPrompts(W, n_references=3, k=5, l=2, init="text", text_ids=ids, seed=0)
    torch.testing.assert_close(tx.domain[: len(ids)], W[ids])
    assert sv.sample_tokens(torch.tensor([2, 0])).shape == (2, 2, 64)
    with pytest.raises(ValueError, match="prompt.init"):
        SoftPrompts(W, n_references=1, init="bogus")
    with pytest.raises(ValueError, match="init_text"):
        SoftPrompts(W, n_references=1, init="text")


def test_heads_start_at_init_and_fold_at_export(tiny_backbone):
    W = tiny_backbone.embed.weight
    plain = SoftPrompts(W, n_references=4, k=3, l=2, seed=7)
    headed = SoftPrompts(W, n_references=4, k=3, l=2, seed=7, domain_head=True, domain_head_hidden=16,
                         sample_rank=2)
    torch.testing.assert_close(headed.domain_tokens(), plain.domain_tokens())  # zero-init last layer
    with torch.no_grad():
        headed.domain_head.net[2].bias.fill_(0.5)
    exp = headed.export_domain()
    torch.testing.assert_close(exp, headed.domain + 0.5)
    assert exp.dtype == torch.float32 and not exp.requires_grad
    assert headed.sample_tokens(torch.tensor([1, 3])).shape == (2, 2, 64)
    # low rank: n*l*r + r*h parameters instead of n*l*h
    assert sum(p.numel() for p in headed.sample_parameters()) == 4 * 2 * 2 + 2 * 64


def test_freeze_counts(tiny_backbone):
    m = tiny_backbone.model
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    trainable, frozen = count_params(m)
    assert trainable == 0 and frozen == sum(p.numel() for p in m.parameters())
    lin = torch.nn.Linear(3, 2)
    assert freeze(lin) == (0, 8)


def test_local_directory_backbone_matches(tiny_backbone, tmp_path):
    """The hub-id code path, exercised with a local directory (no network here)."""
    tiny_backbone.model.save_pretrained(tmp_path / "m")
    tiny_backbone.tokenizer.save_pretrained(tmp_path / "m")
    bb = load_backbone(path=str(tmp_path / "m"), dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(bb.model(ids).logits, tiny_backbone.model(ids).logits)
    assert bb.model_hash == tiny_backbone.model_hash and bb.id == str(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        load_backbone(path=str(tmp_path / "missing"))


def test_tiny_is_deterministic():
    a, b = load_backbone(**TINY), load_backbone(**TINY)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_embedded_smollm2_loads_and_speaks():
    bb = load_backbone(path="embedded", dtype="float32")
    assert bb.hidden_size == 576 and "SmolLM2" in bb.id
    tok = bb.tokenizer
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    out = bb.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "a + b" in tok.decode(out[0, ids.shape[1]:])
