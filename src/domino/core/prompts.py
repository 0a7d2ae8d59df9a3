"""Soft-token tables: domain tokens D (k x h, shared) and sample tokens S_i (l x h, one set per
reference), with their initialisations and optional reparameterisation heads.

Heads (both off by default):
- domain head: D = P + MLP(P). The last layer starts at zero, so at initialisation D = P and the
  chosen init is preserved; the MLP only reshapes the optimisation landscape (as in P-tuning).
- low-rank sample head: S_i = U_i V with U_i (l x r) per reference and V (r x h) shared, because a
  full table costs n*l*h parameters (~0.9 M per reference at h=3584, l=256).
Either head is folded into a plain tensor by `domain_tokens()` at export time.
"""
from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("random", "normal", "sample_vocab", "text")


def _vocab_rows(weight: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, weight.shape[0], (n,), generator=gen)
    return weight[idx].detach().float().clone()


def init_tokens(n: int, embedding_weight: torch.Tensor, mode: str, gen: torch.Generator,
                text_ids: list[int] | None = None) -> torch.Tensor:
    """n x h initial soft tokens.

    random: N(0, sigma) with sigma the embedding table's std (the scale the model expects);
    normal: N(0, 1), the released code's initialisation (far larger than most embedding tables'
    scale: h=576 gives rows of norm ~24, where SmolLM2's sampled vocabulary rows average ~3);
    sample_vocab: copies of random vocabulary embeddings; text: the embeddings of a text's tokens,
    tiled or cut to n."""
    if mode == "random":
        std = embedding_weight.detach().float().std().item()
        return torch.randn(n, embedding_weight.shape[1], generator=gen) * std
    if mode == "normal":
        return torch.randn(n, embedding_weight.shape[1], generator=gen)
    if mode == "sample_vocab":
        return _vocab_rows(embedding_weight, n, gen)
    if mode == "text":
        if not text_ids:
            raise ValueError("prompt.init=text needs a non-empty prompt.init_text")
        reps = math.ceil(n / len(text_ids))
        idx = torch.tensor((list(text_ids) * reps)[:n])
        return embedding_weight[idx].detach().float().clone()
    raise ValueError(f"prompt.init={mode!r} is not one of {INITS}")


class DomainHead(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p + self.net(p)


PREFIX = "prompts."  # the module's attribute name: checkpoint keys are prompts.domain, prompts.domain_head.*


def domain_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = PREFIX) -> torch.Tensor:
    """D (k, h) fp32 from a checkpoint's state dict, the domain head folded in: what
    `SoftPrompts.export_domain` gives, without building the backbone."""
    if prefix + "domain" not in sd:
        raise KeyError(f"no {prefix}domain tensor (found {sorted(sd)})")
    P = sd[prefix + "domain"].float()
    head_prefix = prefix + "domain_head."
    head_sd = {k[len(head_prefix):]: v.float() for k, v in sd.items() if k.startswith(head_prefix)}
    if head_sd:
        head = DomainHead(P.shape[1], head_sd["net.0.weight"].shape[0])
        head.load_state_dict(head_sd)
        with torch.no_grad():
            P = head(P)
    return P.detach().contiguous()


class SoftPrompts(nn.Module):
    """All trainable soft tokens of a run. Parameters are fp32; callers cast to the embedding dtype."""

    def __init__(self, embedding_weight: torch.Tensor, n_references: int, k: int = 8, l: int = 8,
                 init: str = "sample_vocab", text_ids: list[int] | None = None,
                 domain_head: bool = False, domain_head_hidden: int = 256,
                 sample_rank: int | None = None, seed: int = 0):
        super().__init__()
        if k < 1:
            raise ValueError(f"prompt.k={k}: need at least one domain token")
        h = embedding_weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        self.k, self.l, self.hidden = k, l, h
        self.domain = nn.Parameter(init_tokens(k, embedding_weight, init, gen, text_ids))
        self.domain_head = DomainHead(h, domain_head_hidden) if domain_head else None
        self.sample_rank = sample_rank
        if l > 0 and n_references > 0:
            sample_init = "sample_vocab" if init == "text" else init
            if sample_rank:
                # U_i V ~ a random mix of r vocabulary embeddings, at the embeddings' scale
                self.sample_basis = nn.Parameter(init_tokens(sample_rank, embedding_weight, sample_init, gen))
                self.sample_coef = nn.Parameter(torch.randn(n_references, l, sample_rank, generator=gen)
                                                / math.sqrt(sample_rank))
            else:
                self.samples = nn.Parameter(torch.stack(
                    [init_tokens(l, embedding_weight, sample_init, gen) for _ in range(n_references)]))

    @property
    def has_samples(self) -> bool:
        return hasattr(self, "samples") or hasattr(self, "sample_coef")

    def domain_tokens(self) -> torch.Tensor:
        return self.domain_head(self.domain) if self.domain_head is not None else self.domain

    def sample_tokens(self, index: torch.Tensor) -> torch.Tensor:
        """(B, l, h) sample tokens of the references at `index`."""
        if not self.has_samples:
            raise RuntimeError("this prompt has no sample tokens (objective.lambda=0 or prompt.l=0)")
        if self.sample_rank:
            return self.sample_coef[index] @ self.sample_basis
        return self.samples[index]

    def domain_parameters(self) -> list[nn.Parameter]:
        ps = [self.domain]
        if self.domain_head is not None:
            ps += list(self.domain_head.parameters())
        return ps

    def sample_parameters(self) -> list[nn.Parameter]:
        if not self.has_samples:
            return []
        return [self.sample_basis, self.sample_coef] if self.sample_rank else [self.samples]

    @torch.no_grad()
    def export_domain(self) -> torch.Tensor:
        """D as a plain fp32 (k, h) tensor, heads folded in."""
        return self.domain_tokens().detach().float().cpu().contiguous()
