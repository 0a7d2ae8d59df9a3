r"""The prefix-cached computation of l(x|D) and the matrix l_ij: the same numbers as
`objective.straightforward_nll` (its test oracle), at a fraction of the cost.

Where the straightforward path runs B^2 + 2B full sequences [prefix, text], this one runs each
prefix once, keeps its key/value cache with its autograd graph, and runs every text as a
continuation of a prefix cache: B continuations of D for l(x|D) and the B^2 pairs (i, j) = text x_j
after [D, S_i] for the matrix, `chunk_size` continuations per forward; the positive l_ii is read off
the matrix (no third pass). Two layouts (`objective.layout`, `resolve_layout`):
- joint: the B prefixes [D, S_i] in one forward (batch B); D comes first and attention is causal,
  so the first k positions of every row are D's own cache and hidden states, and l(x|D)'s
  continuations read row 0's cache with its S positions masked out (positions restarting at k).
  Every continuation then runs in one more forward: two forwards a step. On a GPU a small
  backbone's step is bound by the CPU's kernel launches (~50 ops per layer per forward), so fewer,
  larger forwards are what makes it faster;
- split: D once (batch 1), [S_1..S_B] as a continuation of D's cache, the continuations of D, then
  those of [D, S_i]. (B-1)k fewer prefix tokens and no attention to masked S columns, for two more
  passes over the weights: on a CPU whose products are bound by arithmetic (fp32; bf16 without
  AMX) with many domain tokens (k = 64) that is what counts; with few, or in bf16 on AMX, the
  extra weight reads cost more (bench/README.md). `auto` chooses.
Both apply the LM head only where a text token is predicted (the last prefix position predicts
x_1), through a fused linear + cross-entropy that never keeps a (tokens x vocab) tensor alive: the
gradient with respect to the hidden state is formed chunk by chunk during the forward.

Gradients reach D and S_i through the cached keys/values: a fresh `DynamicCache` is built for
every continuation forward from the prefix tensors (HF's cache mutates itself on `update`).

Memory: without gradient checkpointing every chunk's activations stay alive until backward, so
`chunk_size` bounds only the transient tensors of one forward (masks, concatenated K/V, logits).
With activation checkpointing on (`backbone.gradient_checkpointing=true`) each continuation chunk is
checkpointed as a whole here (HF's per-layer checkpointing is inactive on a frozen backbone in eval
mode, and would drop the cache in train mode): then only one chunk's activations are alive at a time
and `chunk_size` caps the peak, for one extra forward of the continuations.

Sampled negatives (`negatives=K`): row i computes l_ii plus K columns drawn uniformly without
replacement from j != i, so the matrix costs B(K+1) continuations instead of B^2. Unsampled entries
are +inf (total = +inf, count = the true token count), so exp(-l_ij) = 0 and `objective.combine`
reduces over the sampled entries only. This is a different estimator, not the full objective
with noise: log of a sum over a random subset is biased low relative to the log of the full sum
(Jensen), and rescaling by (B-1)/K, a constant, changes the loss value but not its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from domino.core import backbone
from domino.core.batching import check_forward_cost, length_groups, resolve_forward_cost
from domino.core.scratch import Scratch
from domino.training.objective import NLL, embed_texts

# fp32 logits materialised at once by the fused head (elements): 2**26 * 4 B = 256 MiB for the
# head's matrix products (kept buffer: the head's output, in the model's dtype); the softmax then
# works through it in row blocks of about HEAD_BLOCK_BYTES of fp32 (two kept buffers of that size)
LOGIT_BUDGET = 2 ** 26
HEAD_BLOCK_BYTES = 2 ** 23


# --------------------------------------------------------------------------------------------
# LM head + cross-entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """nll_t = logsumexp(W h_t + b) - (W h_t + b)[y_t] in fp32, token chunk by token chunk.

    The frozen head needs no weight gradient, so d nll_t / d h_t = (softmax_t - onehot(y_t)) W is
    formed right away and only that (M x h) tensor is saved, never the logits. Each chunk's logits
    come from one matrix product (as many rows as LOGIT_BUDGET allows: large products run at the
    GEMM rate); the fp32 log-softmax then runs over blocks of a few rows, small enough that its
    passes (fp32 copy, max, exp, sum, softmax - onehot) stay in the cache instead of streaming a
    (chunk x vocab) tensor through memory once per pass (1.21x a step on the 0.5B in bf16, where
    the vocabulary is 151,936; bench/README.md), and the softmax overwrites the chunk's logits in
    place, ready for the product that forms the gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk):
        need_grad = ctx.needs_input_grad[0]
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        # every chunk's (chunk x vocab) tensors live in kept buffers: fresh ones cost their
        # allocation and page faults each time (on a CPU as much as the softmax itself)
        scratch, V, dev = Scratch(), weight.shape[0], hidden.device
        block = max(1, HEAD_BLOCK_BYTES // (4 * V))
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], target[s:s + chunk]
            n = h.shape[0]
            out = scratch.get("head", n, V, dtype=torch.result_type(h, weight), device=dev)
            if bias is None:
                torch.mm(h, weight.t(), out=out)
            else:
                torch.addmm(bias, h, weight.t(), out=out)
            for b in range(0, n, block):
                o, tb = out[b:b + block], t[b:b + block]
                r = o.shape[0]
                x = o if o.dtype == torch.float32 else scratch.get("logits", r, V, device=dev).copy_(o)
                m = x.amax(-1, keepdim=True)
                m = m.masked_fill(m.abs() == float("inf"), 0)
                e = torch.sub(x, m, out=scratch.get("exp", r, V, device=dev)).exp_()
                total = e.sum(-1, keepdim=True)
                nll[s + b:s + b + r] = total.log().add_(m).squeeze(1) - x.gather(1, tb[:, None]).squeeze(1)
                if need_grad:  # softmax - onehot, written over this block's logits
                    e.div_(total)
                    e[torch.arange(r, device=dev), tb] -= 1.0
                    o.copy_(e)
            if need_grad:
                torch.mm(out, weight, out=grad[s:s + chunk])
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g[:, None].to(grad.dtype), None, None, None, None


def token_nll(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fp32 NLL of `target` (M,) under head(hidden) (M, h)."""
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if (type(head) is not torch.nn.Linear or weight.requires_grad
            or (bias is not None and bias.requires_grad)):
        # an unfrozen head needs its own gradient, and a wrapped one (a LoRA adapter on the head)
        # computes more than its weight: plain autograd
        logits = head(hidden).float()
        return F.cross_entropy(logits, target, reduction="none")
    chunk = max(1, LOGIT_BUDGET // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, chunk)


# --------------------------------------------------------------------------------------------
# prefix caches


def _checkpointing(model) -> bool:
    # transformers 5 renamed the flag; ask the new name first (the old one warns)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh DynamicCache holding the given per-layer (keys, values), without copying them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    cache = DynamicCache(config=model.config)
    if len(cache.layers) != len(kv):
        raise RuntimeError(f"cache has {len(cache.layers)} layers, prefix has {len(kv)}")
    for layer, (k, v) in zip(cache.layers, kv):
        if type(layer) is not DynamicLayer:
            # sliding-window / linear-attention layers would need their own prefix handling
            raise NotImplementedError(f"objective.impl=efficient supports full-attention layers only, "
                                      f"got {type(layer).__name__}")
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def _run(model, embeds, attention_mask, kv, past_len, pos_start=None):
    """Decoder forward of `embeds` (N, T, h) after a prefix cache `kv` of length `past_len`:
    (last hidden states (N, T, h) after the final norm, the per-layer (keys, values) of prefix+input).
    `pos_start` (N,): each row's first position id (default past_len; less when the row's prefix
    is shorter than the cache and its tail is masked out)."""
    N, T = embeds.shape[:2]
    cache = _cache(model, kv) if kv is not None else None
    pos = torch.arange(T, device=embeds.device).unsqueeze(0).expand(N, -1)
    pos = pos + (past_len if pos_start is None else pos_start.unsqueeze(1))
    dec = _decoder(model)
    out = dec(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos, use_cache=True,
              **backbone.cache_kwargs(dec, cache))
    new_kv = [(layer.keys, layer.values) for layer in backbone.output_cache(out).layers]
    return out.last_hidden_state, new_kv


def _continuations(model, kv, hidden, rows, cols, plen, emb, input_ids, attention_mask, width=None):
    """Summed NLL (N,) of texts `cols` after prefixes `rows` (prefix caches `kv` and prefix hidden
    states `hidden` (R, P, h), batch-indexed by row) of lengths `plen` (N,) <= P: a shorter prefix
    is the first plen positions of its row (the rest is masked out); its last hidden state predicts x_1.
    `width`: the texts' first columns only (the rest is right padding for every one of `cols`)."""
    N = rows.shape[0]
    P = kv[0][0].shape[-2]
    if kv[0][0].shape[0] == 1:  # one shared prefix: a view, no copy
        pkv = [(k.expand(N, -1, -1, -1), v.expand(N, -1, -1, -1)) for k, v in kv]
    else:
        pkv = [(k[rows], v[rows]) for k, v in kv]
    am = attention_mask[cols, :width]
    pmask = (torch.arange(P, device=plen.device).unsqueeze(0) < plen.unsqueeze(1)).to(am.dtype)
    mask = torch.cat([pmask, am], dim=1)
    hid, _ = _run(model, emb[cols, :width], mask, pkv, P, pos_start=plen)
    # position t-1 predicts text token t; the prefix's last position predicts token 0
    h_last = hidden[rows, plen - 1]
    pred = torch.cat([h_last.unsqueeze(1).to(hid.dtype), hid[:, :-1]], dim=1)
    valid = am.bool()
    nll = token_nll(model.get_output_embeddings(), pred[valid], input_ids[cols, :width][valid])
    which = torch.arange(N, device=rows.device).unsqueeze(1).expand_as(valid)[valid]
    return torch.zeros(N, dtype=torch.float32, device=nll.device).index_add(0, which, nll)


def _chunked(model, kv, hidden, rows, cols, plen, emb, input_ids, attention_mask, chunk_size, ckpt, cost=None):
    """`_continuations` of every (rows, cols) pair, `chunk_size` pairs a forward at most. With a
    forward cost (tokens, `batching.length_groups`) the pairs go in groups of texts of neighbouring
    lengths, each forward cut to its longest text: right padding computes nothing that a real token
    reads, so the NLLs are the same, over fewer tokens."""
    n = rows.shape[0]
    step = n if not chunk_size else max(1, int(chunk_size))
    if cost is None:
        groups, widths = [torch.arange(n, device=rows.device)], [None]
    else:
        lengths = attention_mask.sum(1)[cols].tolist()
        idx = length_groups(lengths, cost)
        groups = [torch.tensor(g, device=rows.device) for g in idx]
        widths = [max(1, max(lengths[i] for i in g)) for g in idx]
    parts = []
    for g, width in zip(groups, widths):
        for s in range(0, len(g), step):
            sel = g[s:s + step]
            args = (model, kv, hidden, rows[sel], cols[sel], plen[sel], emb, input_ids, attention_mask, width)
            if ckpt:
                parts.append(checkpoint(_continuations, *args, use_reentrant=False))
            else:
                parts.append(_continuations(*args))
    out = torch.cat(parts)
    return out if cost is None else out[torch.cat(groups).argsort()]


def sample_pairs(B: int, negatives: int | None, device=None, generator: torch.Generator | None = None):
    """(rows, cols) of the matrix entries to compute: all B^2, or the diagonal plus `negatives`
    columns j != i per row drawn uniformly without replacement."""
    if negatives is None or negatives >= B - 1:
        r = torch.arange(B).repeat_interleave(B)
        c = torch.arange(B).repeat(B)
        return r.to(device), c.to(device)
    if negatives < 1:
        raise ValueError(f"objective.negatives={negatives}: need at least 1 (or null for all B-1)")
    # random keys, the diagonal pushed last: the K smallest keys are a uniform K-subset of j != i
    keys = torch.rand(B, B, generator=generator)
    keys.fill_diagonal_(2.0)
    neg = keys.argsort(dim=1)[:, :negatives]
    r = torch.arange(B).repeat_interleave(negatives + 1)
    c = torch.cat([torch.arange(B)[:, None], neg], dim=1).reshape(-1)
    return r.to(device), c.to(device)


# --------------------------------------------------------------------------------------------
# entry point (same contract as objective.straightforward_nll)


LAYOUTS = ("auto", "joint", "split")


# split pays two more forwards, i.e. two more reads of every weight in the forward and two in the
# backward (at few rows a product is bound by that read), to save (B-1)k prefix tokens of FLOPs.
# Where the products are bound by arithmetic (fp32; bf16 without AMX) that paid at (B-1)k = 192
# (fp32 1.08x on an AMX CPU, bf16 1.09x on an AMD EPYC without AMX), and at 64 in bf16 there
# (1.05x), not at 48 or fewer (bench/README.md; 64 is a guess between 48 and 192 for fp32); in bf16
# on AMX, whose products run 5-7x faster over half the bytes, it did not pay at any shape measured
SPLIT_MIN_TOKENS = 64


def check_layout(layout: str) -> str:
    """`layout`, or a ValueError naming `objective.layout` when it is not one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"objective.layout={layout!r} is not one of {LAYOUTS}")
    return layout


def resolve_layout(layout: str, device, B: int = 0, k: int = 0, itemsize: int = 4) -> str:
    """`objective.layout` for B texts, k domain tokens and a backbone of `itemsize`-byte weights:
    joint or split (the module docstring) as given; auto is split on a CPU when (B-1) * k >=
    SPLIT_MIN_TOKENS and the products are bound by arithmetic (fp32 or wider, or a narrower dtype
    on a CPU without AMX: `backbone.cpu_bf16_kernels`), joint otherwise and on every other device."""
    if check_layout(layout) == "auto":
        if torch.device(device).type != "cpu" or (B - 1) * k < SPLIT_MIN_TOKENS:
            return "joint"
        return "split" if itemsize >= 4 or backbone.cpu_bf16_kernels() != "AMX-BF16" else "joint"
    return layout


def cached_nll(model, domain: torch.Tensor, samples: torch.Tensor | None, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, chunk_size: int | None = None, negatives: int | None = None,
               generator: torch.Generator | None = None, layout: str = "auto",
               forward_cost: float | str | None = "auto") -> tuple[NLL, NLL | None]:
    """(l(x|D) for each text, the matrix l_ij or None when there are no sample tokens).

    domain: (k, h); samples: (B, l, h) or None; input_ids/attention_mask: (B, T), right-padded.
    chunk_size: most continuations per forward (None: all at once). negatives: K sampled
    negatives per row (None: all B-1); unsampled entries come back as +inf. layout: how the
    prefixes and continuations are grouped into forwards (`resolve_layout`). forward_cost: the
    continuations go in length groups (`_chunked`; "auto": on a CPU, `batching.resolve_forward_cost`),
    None: every continuation padded to the longest text."""
    if _checkpointing(model) and model.training:
        raise RuntimeError("objective.impl=efficient: HF gradient checkpointing in train mode drops the "
                           "prefix cache; keep the frozen backbone in eval() mode")
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("objective.impl=efficient expects right-padded texts")
    ckpt = _checkpointing(model) and torch.is_grad_enabled()
    B = input_ids.shape[0]
    dev = input_ids.device
    emb = embed_texts(model, input_ids)
    dt = emb.dtype
    layout = resolve_layout(layout, dev, B, domain.shape[0], emb.element_size())
    count = attention_mask.sum(1).float()
    cost = resolve_forward_cost(check_forward_cost(forward_cost, "objective.forward_cost"), dev)

    def continue_(kv, hidden, rows, cols, plen):
        return _chunked(model, kv, hidden, rows, cols, plen, emb, input_ids, attention_mask, chunk_size, ckpt,
                        cost)

    k = domain.shape[0]
    ar = torch.arange(B, device=dev)
    zeros, ks = torch.zeros_like(ar), torch.full_like(ar, k)
    if samples is None or layout == "split":
        hD, kvD = _run(model, domain.to(dt).unsqueeze(0), None, None, 0)
        dom = NLL(total=continue_(kvD, hD, zeros, ar, ks), count=count)
        if samples is None:
            return dom, None

    l = samples.shape[1]
    mrows, mcols = sample_pairs(B, negatives, dev, generator)
    mlen = torch.full_like(mrows, k + l)
    if layout == "split":
        # [S_i] after D's cache (shared by every row: a view); the prefixes' hidden states are
        # D's then S_i's (only the last one is read: it predicts x_1)
        kvDB = [(kk.expand(B, -1, -1, -1), vv.expand(B, -1, -1, -1)) for kk, vv in kvD]
        hS, kvP = _run(model, samples.to(dt), attention_mask.new_ones(B, k + l), kvDB, k)
        hP = torch.cat([hD.expand(B, -1, -1), hS], dim=1)
        tot = continue_(kvP, hP, mrows, mcols, mlen)
    else:
        # the B prefixes [D, S_i] in one forward; row 0's first k positions double as D's own prefix
        prefix = torch.cat([domain.to(dt).unsqueeze(0).expand(B, -1, -1), samples.to(dt)], dim=1)
        hP, kvP = _run(model, prefix, None, None, 0)
        both = continue_(kvP, hP, torch.cat([zeros, mrows]), torch.cat([ar, mcols]), torch.cat([ks, mlen]))
        dom, tot = NLL(total=both[:B], count=count), both[B:]
    total = torch.full((B, B), float("inf"), dtype=tot.dtype, device=dev).index_put((mrows, mcols), tot)
    return dom, NLL(total=total, count=count.unsqueeze(0).expand(B, B).clone())
