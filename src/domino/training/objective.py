r"""The DOMINO objective (README "1. Learn the domain tokens"), as pure tensor functions plus the
straightforward way of computing the per-sample losses that feed them.

Notation: l(x | prefix) is the mean NLL of the non-padding tokens of x, x_1 predicted from the
last prefix position; soft positions never carry a loss. For a batch of B >= 2 references,
l_ij = l(x_j | D, S_i) (row i: the sample tokens of reference i, column j: the text of reference j).

- paper form:    L = w_dom * mean_i l(x_i|D) + lam * mean_i [ l_ii + logsumexp_{j!=i}(-l_ij) ]
- official form: L = w_dom * lbar(x|D) + lam * ( lbar(x|D,S) + log mean_{i!=j} exp(-l_ij) )
  where lbar is the token-weighted batch mean (sum of token NLLs over sum of tokens). With
  w_dom = lam = 1 this is the released code's loss; the weights let lam=0 reduce either form to
  plain prompt tuning.
- bounded form (a variant, docs/study.md): L = w_dom * mean_i l(x_i|D) + lam * ( mean_i l_ii
  + beta * mean_{i!=j} relu(sg(l(x_j|D)) - l_ij) ). The paper form's contrastive term is unchanged
  by adding a constant to a row of l_ij and unbounded below, so S_i can lower it by making every
  text, its own included, less likely; here l_ii is an absolute target and a negative is pushed up
  only while S_i makes x_j more likely than D alone does (what S_i shares with x_j belongs in D).
- soft_prompt:   L = w_dom * mean_i l(x_i|D).

`straightforward_nll` runs one full forward per row of the B x B matrix plus the D-only and
positive passes (B^2 + 2B sequences): it is slow on purpose and stays as the test oracle for any
faster computation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMS = ("paper", "official", "bounded")


@dataclass
class NLL:
    """Per-sample summed token NLL and token counts; `.mean` gives l per sample."""
    total: torch.Tensor   # (...,) float32
    count: torch.Tensor   # (...,) float32

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


# --------------------------------------------------------------------------------------------
# losses on precomputed NLLs


def offdiag_mask(B: int, device=None) -> torch.Tensor:
    return ~torch.eye(B, dtype=torch.bool, device=device)


def contrastive_paper(l_mat: torch.Tensor) -> torch.Tensor:
    """mean_i [ l_ii + logsumexp_{j != i} (-l_ij) ]."""
    B = l_mat.shape[0]
    if B < 2:
        raise ValueError("the contrastive term needs a batch of at least 2 references")
    neg = (-l_mat).masked_fill(~offdiag_mask(B, l_mat.device), float("-inf"))
    return (l_mat.diagonal() + torch.logsumexp(neg, dim=1)).mean()


def contrastive_official(l_mat: torch.Tensor) -> torch.Tensor:
    """log mean_{i != j} exp(-l_ij), via logsumexp."""
    B = l_mat.shape[0]
    if B < 2:
        raise ValueError("the contrastive term needs a batch of at least 2 references")
    neg = (-l_mat)[offdiag_mask(B, l_mat.device)]
    # entries left out by sampled negatives (cached_nll's `negatives`) are +inf: exp(-inf) = 0
    # drops them from the sum and the mean is over the computed ones (B(B-1) when all are)
    n = int(torch.isfinite(neg).sum())
    return torch.logsumexp(neg, dim=0) - math.log(n)


def contrastive_bounded(l_mat: torch.Tensor, l_dom: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """mean_i l_ii + beta * mean_{i != j} relu(sg(l(x_j|D)) - l_ij); `l_dom` (B,) is l(x_j|D)."""
    B = l_mat.shape[0]
    if B < 2:
        raise ValueError("the contrastive term needs a batch of at least 2 references")
    off = offdiag_mask(B, l_mat.device) & torch.isfinite(l_mat)  # +inf: a negative not sampled
    hinge = torch.relu(l_dom.detach()[None, :] - l_mat)[off]
    return l_mat.diagonal().mean() + beta * hinge.mean()


def contrast_gap(l_mat: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal l_ij minus mean l_ii: how much better a text is explained by its own
    sample tokens than by another reference's."""
    B = l_mat.shape[0]
    off = l_mat[offdiag_mask(B, l_mat.device)]
    return off[torch.isfinite(off)].mean() - l_mat.diagonal().mean()  # +inf: a negative not sampled


def combine(dom: NLL, mat: NLL | None, form: str = "paper", w_dom: float = 1.0,
            lam: float = 1.0, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Total loss and its parts from l(x|D) (B,) and, for DOMINO, the (B, B) matrix l_ij."""
    if form not in FORMS:
        raise ValueError(f"objective.form={form!r} is not one of {FORMS}")
    if form == "official":
        loss_dom = dom.total.sum() / dom.count.sum().clamp_min(1)
    else:
        loss_dom = dom.mean.mean()
    out = {"loss_dom": loss_dom}
    if mat is None:
        out["loss"] = w_dom * loss_dom
        return out
    l_mat = mat.mean
    if form == "paper":
        loss_con = contrastive_paper(l_mat)
    elif form == "bounded":
        loss_con = contrastive_bounded(l_mat, dom.mean, beta)
    else:
        loss_con = (mat.total.diagonal().sum() / mat.count.diagonal().sum().clamp_min(1)
                    + contrastive_official(l_mat))
    out.update(loss_con=loss_con, loss=w_dom * loss_dom + lam * loss_con,
               contrast_gap=contrast_gap(l_mat.detach()), nll_pos=l_mat.diagonal().detach().mean())
    return out


# --------------------------------------------------------------------------------------------
# the straightforward computation


def embed_texts(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(input_ids)


def full_nll(model, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> NLL:
    """NLL of right-padded texts after a soft prefix, one full forward over [prefix, text].

    prefix: (B, P, h) or (P, h) (broadcast); input_ids/attention_mask: (B, T)."""
    B, T = input_ids.shape
    emb = embed_texts(model, input_ids)
    if prefix.dim() == 2:
        prefix = prefix.unsqueeze(0).expand(B, -1, -1)
    P = prefix.shape[1]
    inputs = torch.cat([prefix.to(emb.dtype), emb], dim=1)
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    logits = model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits
    # position P-1+t predicts text token t; soft positions carry no loss
    logits = logits[:, P - 1: P + T - 1].float()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(B, T)
    return NLL(total=tok.sum(1), count=attention_mask.sum(1).float())


def straightforward_nll(model, domain: torch.Tensor, samples: torch.Tensor | None,
                        input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[NLL, NLL | None]:
    """(l(x|D) for each text, the matrix l_ij or None when there are no sample tokens).

    domain: (k, h); samples: (B, l, h) for the batch's references."""
    dom = full_nll(model, domain, input_ids, attention_mask)
    if samples is None:
        return dom, None
    B = input_ids.shape[0]
    rows = []
    for i in range(B):
        prefix = torch.cat([domain, samples[i]], dim=0)
        rows.append(full_nll(model, prefix, input_ids, attention_mask))
    mat = NLL(torch.stack([r.total for r in rows]), torch.stack([r.count for r in rows]))
    # the positive pairs once more, as a straightforward port computes them; the loss reads them
    # from here so the diagonal's gradient flows through this pass, exactly like the original code
    pos_prefix = torch.cat([domain.unsqueeze(0).expand(B, -1, -1), samples], dim=1)
    pos = full_nll(model, pos_prefix, input_ids, attention_mask)
    eye = torch.eye(B, dtype=torch.bool, device=input_ids.device)
    mat = NLL(torch.where(eye, torch.diag_embed(pos.total), mat.total), mat.count)
    return dom, mat


def has_sample_tokens(l: int, lam: float) -> bool:
    """Whether a run learns sample tokens S_i: only they carry the contrastive term, so a run with
    no sample tokens (prompt.l = 0) or no weight on that term (objective.lambda = 0) is prompt tuning."""
    return int(l) > 0 and float(lam) > 0
