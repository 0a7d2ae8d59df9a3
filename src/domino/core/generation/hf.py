"""Batched sampling on a transformers model with a KV cache throughout.

A shared prefix (the domain tokens D, or a text prompt every sample starts from) is run through
the model ONCE; its per-layer keys/values and last logits are kept, and every batch starts from a
fresh cache filled with those tensors expanded along the batch axis (the stored prefix tensors
are never mutated). While a batch decodes, each layer's keys/values live in a buffer with spare
columns (`BufferedLayer`): a step writes one column instead of re-copying the whole cache as
`DynamicCache`'s concatenation does (that copy was 18% of a decoding step at batch 64 on the 0.5B,
on a 2-core CPU). Per-sample prompts (few-shot, benchmark problems, chat conversations) are
left-padded and prefilled per batch; the first tokens they all share (a chat template's system
turn, an instruction) run once, as one row (`shared_prefix`). Finished rows are dropped from the
batch (and from the cache) as soon as they finish; `generate_many` (prompts) and
`generate_shared_many` (a shared prefix) also refill the freed rows with the next samples
(continuous batching), so a batch does not decode for its longest row alone.

Each row draws its random numbers from its own generator seeded by its sample seed, so a sample
does not depend on which other samples share its batch (up to float rounding).
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from domino.core.backbone import cache_kwargs, output_cache
from domino.core.generation import packed
from domino.core.generation.params import Generation, SamplingParams, StopFn, check_rows
from domino.core.scratch import Scratch


@dataclass
class SharedPrefix:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, P, head_dim)
    logits: torch.Tensor                         # (V,) fp32, next-token logits after the prefix
    length: int


def last_logits(model: nn.Module, keep: int = 1, **inputs):
    """(fp32 logits of the last `keep` positions (B, keep, V), the model output) of one forward.

    transformers' `logits_to_keep` slices the hidden states to a non-contiguous (B, keep, h) view,
    and a CPU linear on that view goes through bmm with the (V, h) head expanded to (B, h, V) and
    copied: 8.7 GB and 33 s of a 54 s prefill at batch 32 on the 0.5B. Here the decoder runs alone
    and the head sees one contiguous (B*keep, h) matrix. Models whose head does more than a linear
    map (logit soft-capping or scaling) go through their own forward."""
    dec, head = model.get_decoder(), model.get_output_embeddings()
    special = getattr(model.config, "final_logit_softcapping", None) or hasattr(model, "logit_scale")
    if dec is None or head is None or special or dec is model:
        out = model(**inputs, logits_to_keep=keep)
        return out.logits[:, -keep:].float(), out
    out = dec(**inputs)
    h = out.last_hidden_state[:, -keep:]
    B = h.shape[0]
    logits = head(h.reshape(B * keep, h.shape[-1]).contiguous()).float().view(B, keep, -1)
    return logits, out


@functools.cache
def buffered_layer_class():
    """`BufferedLayer`, defined on first use (transformers is imported only when decoding)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys/values are views of (B, H, capacity, D) buffers: `update`
        writes the new columns into the spare capacity instead of concatenating a fresh copy of
        the whole cache every step; when the spare columns are used up the buffer is rebuilt with
        `spare` more (so it never holds more than what is needed plus `spare`). The views hold the
        very values `DynamicLayer` would, so attention reads the same numbers. Anything that
        replaces the views behind its back (an inherited reorder, offload, reset) is noticed by
        `update`, which then rebuilds the buffer from the tensors it finds."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int):
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self.spare = max(1, int(spare))
            self._fill(keys, values, keys.shape[-2] + self.spare)

        def _fill(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            T = keys.shape[-2]
            capacity = max(capacity, T)
            self._k = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
            self._v = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
            self._k[:, :, :T].copy_(keys)
            self._v[:, :, :T].copy_(values)
            self.keys, self.values = self._k[:, :, :T], self._v[:, :, :T]

        def _owns_views(self) -> bool:
            return (self._k is not None and self.keys is not None and self.keys.data_ptr() == self._k.data_ptr()
                    and self.values.data_ptr() == self._v.data_ptr() and self.keys.device == self._k.device)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized or self.keys is None:  # after reset(): start from these states
                self.device, self.is_initialized = key_states.device, True
                self._fill(key_states, value_states, key_states.shape[-2] + self.spare)
                return self.keys, self.values
            T, t = self.keys.shape[-2], key_states.shape[-2]
            if not self._owns_views() or T + t > self._k.shape[-2]:
                self._fill(self.keys, self.values, T + t + self.spare)
            self._k[:, :, T:T + t].copy_(key_states)
            self._v[:, :, T:T + t].copy_(value_states)
            self.keys, self.values = self._k[:, :, :T + t], self._v[:, :, :T + t]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._fill(self.keys[indices], self.values[indices], self._k.shape[-2])

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._fill(self.keys.repeat_interleave(repeats, dim=0),
                       self.values.repeat_interleave(repeats, dim=0), self._k.shape[-2])

        def reset(self) -> None:
            super().reset()
            self._k = self._v = None

    return BufferedLayer


def _transformers_packs_gqa() -> bool:
    """Whether transformers' SDPA attention packs a one-token query's heads per key/value head when
    given a mask (older versions repeat the keys/values instead: correct, but no faster)."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        return False
    return hasattr(sdpa_attention, "pack_gqa")


def buffered(cache, spare: int):
    """`cache` with each plain `DynamicLayer` replaced by a `BufferedLayer` holding its keys/values
    plus `spare` free columns (other layer kinds, e.g. sliding windows, are left as they are)."""
    from transformers.cache_utils import DynamicLayer
    BufferedLayer = buffered_layer_class()
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = BufferedLayer(layer.keys, layer.values, spare)
    return cache


# fewest tokens a batch's prompts must share for `_prefill_prompts` to run them once, and what the
# prefix's own forward costs beyond its tokens, in tokens (bench/forward_cost.py measured 27 on the
# 0.5B in bf16 and 52 on SmolLM2 in fp32): sharing must save more than the prefix row and that
MIN_SHARED, FORWARD_COST = 8, 32


def _common_prefix(prompts: list[list[int]]) -> int:
    """How many first tokens every prompt shares, at most the shortest prompt's length less one
    (every row keeps a token of its own, whose logits start its decoding)."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(max(n, 0)):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


def _live_width(mask: torch.Tensor) -> int:
    """Columns from the earliest first unmasked column of any row to the end."""
    first = (mask != 0).int().argmax(-1)  # a row's first 1 (0 for a row of zeros: it keeps the whole width)
    return int(mask.shape[-1] - first.min())


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (tokenizer.eos_token_id, gen_eos):
        if e is None:
            continue
        ids.update([e] if isinstance(e, int) else list(e))
    return sorted(ids)


def engine_call(fn):
    """An entry point of HFEngine: no autograd, and the model's bf16 linear weights packed for
    oneDNN for the length of the call where the engine packs (`packed_weights`, packed.py)."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        with torch.no_grad(), self.packed_weights():
            return fn(self, *args, **kwargs)
    return call


class HFEngine:
    name = "hf"

    def __init__(self, model: nn.Module, tokenizer, params: SamplingParams, batch_size: int = 32,
                 packed_weights: bool | str = "auto", shared_prefix: bool = True):
        """`packed_weights` (engine.packed_weights): auto | true | false, whether each call runs the
        model's bf16 linear layers on weights reordered once for oneDNN in its decoding steps (at
        most `batch_size` rows; prefills run plain F.linear): packed.py, faster on a CPU, the same
        bits except at some row counts, where a few outputs round differently; auto = where
        supported and the copies fit in memory. `shared_prefix` (engine.shared_prefix): whether the
        first tokens a batch's prompts share are prefilled once (`_prefill_prompts`; a model whose
        cache has other than plain key/value layers never does)."""
        from transformers import DynamicCache  # fails early on an old transformers
        if batch_size < 1:
            raise ValueError(f"engine.batch_size={batch_size} must be >= 1")
        self.model, self.tok, self.params, self.batch_size = model.eval(), tokenizer, params, batch_size
        self.pack = packed.should_pack(model, packed_weights)
        # plain key/value layers only (the cache's layer kinds follow the config): a sliding window
        # counts columns, and the padding between the prefix and a row's tokens would take some of it
        self.shared_prefix = bool(shared_prefix) and all(
            type(layer).__name__ == "DynamicLayer" for layer in DynamicCache(config=model.config).layers)
        self.n_packed = 0  # layers the last call ran on packed weights, for tests and benchmarks
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.stop_ids = sorted(set(eos_token_ids(model, tokenizer)) | set(params.stop_token_ids))
        self._eos = set(eos_token_ids(model, tokenizer))
        # a stop string of c characters spans at most c tokens (+ slack for partial UTF-8 tokens)
        self._stop_window = max((len(s) for s in params.stop), default=0) + 4
        self.n_forward = 0  # model calls, for tests and benchmarks
        self.n_prefill = 0  # of which prompt prefills (the rest decode one token per row)
        # seconds spent, summed over calls: prefills (prompts and prefixes, joins included) and the
        # decoding loops without them (steps, picks, stop checks, dropping finished rows)
        self.prefill_s = self.decode_s = 0.0
        self._nucleus_tau: dict[int, float] = {}  # per row (by its generator's id): where _top_p_pick starts
        self._scratch = Scratch()  # full-vocabulary fp32 tensors kept across steps
        self._newline: dict[int, bool] = {}  # token id -> whether its text holds a line break
        self.kv_spare = 256  # most free key/value columns a decoding batch's buffers hold (BufferedLayer)
        cfg = model.config
        heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
        # see _step_mask
        self._pack_gqa = (self.device.type == "cpu" and getattr(cfg, "_attn_implementation", None) == "sdpa"
                          and heads is not None and kv is not None and kv < heads and _transformers_packs_gqa())

    @contextlib.contextmanager
    def packed_weights(self):
        """A `with` block in which the model's bf16 linear layers run on packed weights where this
        engine packs (nested blocks pack once)."""
        with packed.packed_linears(self.model, self.batch_size, self.pack) as n:
            self.n_packed = n or self.n_packed
            yield n

    # ------------------------------------------------------------------ prefixes
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.get_input_embeddings()(torch.tensor(ids, device=self.device))

    @engine_call
    def prefill(self, embeds: torch.Tensor) -> SharedPrefix:
        """Run a (P, h) prefix once and keep its cache: the only time the prefix is computed."""
        if embeds.dim() != 2 or embeds.shape[0] < 1:
            raise ValueError(f"prefix embeddings must be (P>=1, hidden), got {tuple(embeds.shape)}")
        logits, cache = self._prefill_forward(inputs_embeds=embeds[None].to(self.device, self.dtype))
        kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        return SharedPrefix(kv=kv, logits=logits[0, -1], length=embeds.shape[0])

    def _expand(self, kv: list[tuple[torch.Tensor, torch.Tensor]], B: int):
        from transformers import DynamicCache

        # update() concatenates onto an empty tensor, so each batch owns a copy; the stored prefix
        # tensors are only read
        data = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    # ------------------------------------------------------------------ entry points
    @engine_call
    def generate_shared(self, prefix: SharedPrefix, seeds: list[int]) -> list[Generation]:
        """One sample per seed, all continuing the same cached prefix."""
        B = len(seeds)
        cache = self._expand(prefix.kv, B)
        logits = prefix.logits[None].expand(B, -1).clone()
        pos = torch.full((B,), prefix.length, dtype=torch.long, device=self.device)
        return self._decode(cache, logits, pos, None, seeds)

    @engine_call
    def generate_prompts(self, prompts: list[list[int]], seeds: list[int],
                         stop_fns: list[StopFn | None] | None = None) -> list[Generation]:
        """One sample per (token-id prompt, seed); prompts are left-padded into one batch.
        `stop_fns` (one per prompt, or None): see `generate_many`."""
        check_rows(prompts, seeds, stop_fns)
        cache, logits, pos, mask = self._prefill_prompts(prompts)
        return self._decode(cache, logits, pos, mask, seeds, stop_fns=stop_fns)

    @engine_call
    def generate_many(self, prompts: list[list[int]], seeds: list[int],
                      on_result: Callable[[int, Generation], None] | None = None,
                      stop_fns: list[StopFn | None] | None = None) -> list[Generation]:
        """One sample per (token-id prompt, seed), at most `batch_size` rows decoding at once, with
        continuous batching: prompts are admitted shortest first, and once a quarter of the
        `batch_size` slots are free, the next prompts are prefilled and join the running batch
        (`_join`), so a batch no longer decodes for its longest row alone. `on_result(i,
        generation)` is called as prompt i finishes (results in prompt order too). A model whose
        cache cannot take new rows (`can_join`) decodes in fixed batches instead.
        `stop_fns[i]`, where given, ends prompt i's row early: it is called with the row's text
        whenever the row's newest token holds a line break, and a number it returns ends the row
        there, its text cut to that many characters (finish "stop", stop reason "stop_fn"); stop
        tokens and stop strings are checked before it, max_new_tokens after it."""
        check_rows(prompts, seeds, stop_fns)
        return self._refill(sorted(range(len(prompts)), key=lambda i: len(prompts[i])),
                            lambda take: (*self._prefill_prompts([prompts[i] for i in take]), [seeds[i] for i in take]),
                            on_result, stop_fns)

    @engine_call
    def generate_shared_many(self, prefix: SharedPrefix, seeds: list[int],
                             on_result: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        """`generate_shared` for any number of seeds with continuous batching: at most `batch_size`
        rows decode at once and, once a quarter of the slots are free, the next seeds (in order)
        join the running batch at the prefix (its cached keys/values, left-padded to the batch's
        width). `on_result(i, generation)` is called as sample i finishes; results in seed order."""
        def rows(take: list[int]):
            n = len(take)
            logits = prefix.logits.float()[None].repeat(n, 1)  # rows own their logits
            pos = torch.full((n,), prefix.length, dtype=torch.long, device=self.device)
            mask = torch.ones((n, prefix.length), dtype=torch.long, device=self.device)
            return self._expand(prefix.kv, n), logits, pos, mask, [seeds[i] for i in take]
        return self._refill(list(range(len(seeds))), rows, on_result)

    def _refill(self, order: list[int], rows: Callable, on_result, stop_fns=None) -> list[Generation]:
        """Decode the samples `order` names, admitted in that order, refilling freed rows
        (`_decode`); `rows(ids)` builds (cache, logits, pos, mask, seeds) of the samples `ids`."""
        pending = deque(order)

        def admit(n_free: int):
            take = [pending.popleft() for _ in range(min(n_free, len(pending)))]
            return (*rows(take), take) if take else None

        first = admit(self.batch_size)
        if first is None:
            return []
        cache, logits, pos, mask, first_seeds, ids = first
        if not self.can_join(cache):  # this model's cache cannot take new rows: fixed batches
            done = self._decode(cache, logits, pos, mask, first_seeds, ids=ids, on_result=on_result,
                                stop_fns=stop_fns)
            while (nxt := admit(self.batch_size)) is not None:
                done.update(self._decode(*nxt[:4], nxt[4], ids=nxt[5], on_result=on_result, stop_fns=stop_fns))
        else:
            done = self._decode(cache, logits, pos, mask, first_seeds, ids=ids, admit=admit,
                                min_free=max(1, self.batch_size // 4), on_result=on_result, stop_fns=stop_fns)
        return [done[i] for i in range(len(order))]

    def _prefill_prompts(self, prompts: list[list[int]]):
        """(cache, last logits, next positions, attention mask) of token-id prompts, left-padded.
        With `shared_prefix`, the first tokens every prompt of the batch shares (a chat template's
        system turn, an instruction; at least MIN_SHARED of them, and more in all than the prefix's
        own forward costs) run once, as one row, and each row is that prefix's cache, then padding,
        then its own left-padded rest: the padding sits between the two (masked out; positions
        count real tokens only)."""
        B = len(prompts)
        shared = _common_prefix(prompts) if self.shared_prefix and B > 1 else 0
        if shared < MIN_SHARED or (B - 1) * shared <= shared + FORWARD_COST:
            shared = 0
        head = None
        if shared:
            _, one = self._prefill_forward(input_ids=torch.tensor([prompts[0][:shared]], device=self.device))
            head = self._expand([(layer.keys, layer.values) for layer in one.layers], B)
        rest = [p[shared:] for p in prompts]
        T = max(len(p) for p in rest)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((B, T), pad, dtype=torch.long, device=self.device)
        mask = torch.ones((B, shared + T), dtype=torch.long, device=self.device)
        for i, p in enumerate(rest):
            ids[i, T - len(p):] = torch.tensor(p, device=self.device)
            mask[i, shared:shared + T - len(p)] = 0
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits, cache = self._prefill_forward(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                              cache=head)
        self.n_prefill += 1
        return cache, logits[:, -1], mask.sum(-1), mask

    def _prefill_forward(self, cache=None, **inputs):
        """(`last_logits`, the KV cache) of a prefill (a prefix or prompts) into `cache` (default a
        fresh DynamicCache), counted in n_forward and timed in prefill_s."""
        from transformers import DynamicCache
        t = time.perf_counter()
        cache = DynamicCache(config=self.model.config) if cache is None else cache
        logits, out = last_logits(self.model, use_cache=True, **cache_kwargs(self.model, cache), **inputs)
        self.n_forward += 1
        self.prefill_s += time.perf_counter() - t
        return logits, output_cache(out)

    def _join(self, cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor):
        """The running batch's cache and mask with the new rows' appended below. Each side first
        loses the leading columns no row of it uses any more (those before every row's first
        unmasked column; a row's mask may have zeros after that, between a shared prefix and its
        own tokens), then both are left-padded (zeros, masked out) to the longer: the width stays
        the longest live row's, not everything the batch has decoded since it started."""
        from transformers import DynamicCache
        need = (_live_width(mask), _live_width(new_mask))
        L = max(need)

        def fit(t: torch.Tensor, dim: int, keep: int) -> torch.Tensor:
            keep = min(keep, t.shape[dim])  # a sliding-window layer holds fewer positions
            t = t.narrow(dim, t.shape[dim] - keep, keep)
            if keep == L:
                return t
            shape = list(t.shape)
            shape[dim] = L - keep
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        data = [(torch.cat([fit(a.keys, 2, need[0]), fit(b.keys, 2, need[1])]),
                 torch.cat([fit(a.values, 2, need[0]), fit(b.values, 2, need[1])]))
                for a, b in zip(cache.layers, new_cache.layers)]
        joined = torch.cat([fit(mask, 1, need[0]), fit(new_mask, 1, need[1])])
        return DynamicCache(ddp_cache_data=data, config=self.model.config), joined

    @staticmethod
    def can_join(cache) -> bool:
        """Whether rows can join this cache: plain (or sliding-window) key/value layers only; other
        layer kinds (indexed, quantised, linear attention) keep state `_join` does not carry."""
        return all(type(layer).__name__ in ("DynamicLayer", "BufferedLayer", "DynamicSlidingWindowLayer")
                   for layer in cache.layers)

    # ------------------------------------------------------------------ decoding
    def _decode(self, cache, logits: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                seeds: list[int], ids: list[int] | None = None, admit: Callable | None = None, min_free: int = 1,
                on_result: Callable[[int, Generation], None] | None = None,
                stop_fns: list[StopFn | None] | None = None) -> list[Generation] | dict:
        """Decode the rows of `cache` (result index `ids[j]` for row j, default j) until each stops.
        With `admit(n_free)` (continuous batching), whenever at least `min_free` of `batch_size` rows
        are free, the rows it returns ((cache, logits, pos, mask, seeds, ids), or None when no prompt
        is left) join the batch; results are then a dict by id. `stop_fns[id]`: see generate_many."""
        t0, pre0 = time.perf_counter(), self.prefill_s
        p = self.params
        V = logits.shape[-1]
        spare = min(p.max_new_tokens, self.kv_spare)  # free columns per buffer, added again when used up
        cache = buffered(cache, spare)
        # per-row generators live on the CPU whatever the model's device: a CUDA generator per row
        # costs one kernel launch per row and step (at batch 256 that made sampling slower than
        # transformers' generate on an H100), and CPU draws make a seed's sample device-independent
        gens = None if p.greedy else [torch.Generator().manual_seed(int(s)) for s in seeds]
        rows = list(ids) if ids is not None else list(range(logits.shape[0]))  # row j -> result id rows[j]
        tokens: dict[int, list[int]] = {r: [] for r in rows}
        results: dict[int, Generation] = {}
        seen = (torch.zeros((len(rows), V), dtype=torch.bool, device=self.device)
                if p.repetition_penalty != 1 else None)
        stop_set = set(self.stop_ids)
        while rows:
            nxt = self._pick(logits, seen, [len(tokens[r]) for r in rows], gens)
            if seen is not None:
                seen[torch.arange(len(rows), device=self.device), nxt] = True
            done = []
            for j, t in enumerate(nxt.tolist()):
                r = rows[j]
                if t in stop_set:
                    reason = "eos" if t in self._eos else t
                    results[r] = self._finish(tokens[r], "stop", reason)
                    done.append(j)
                    continue
                tokens[r].append(t)
                hit = self._stop_hit(tokens[r]) if p.stop else None
                if hit is not None:
                    results[r] = Generation(list(tokens[r]), hit[0], "stop", hit[1])
                    done.append(j)
                    continue
                if stop_fns is not None and stop_fns[r] is not None and self._has_newline(t):
                    text = self.tok.decode(tokens[r], skip_special_tokens=True)
                    end = stop_fns[r](text)
                    if end is not None:
                        results[r] = Generation(list(tokens[r]), text[:end], "stop", "stop_fn")
                        done.append(j)
                        continue
                if len(tokens[r]) >= p.max_new_tokens:
                    results[r] = self._finish(tokens[r], "length", None)
                    done.append(j)
            if on_result is not None:
                for j in done:
                    on_result(rows[j], results[rows[j]])
            gone = set(done)
            keep = [j for j in range(len(rows)) if j not in gone]
            free = self.batch_size - len(keep)
            joining = admit(free) if admit is not None and free > 0 and (free >= min_free or not keep) else None
            if keep and done:
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                nxt, pos = nxt[sel], pos[sel]
                mask = mask[sel] if mask is not None else None
                seen = seen[sel] if seen is not None else None
                gens = [gens[j] for j in keep] if gens is not None else None
                rows = [rows[j] for j in keep]
            elif not keep:
                rows = []
            if rows:
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                out = self.model(input_ids=nxt[:, None], attention_mask=self._step_mask(mask, cache, len(rows)),
                                 position_ids=pos[:, None], use_cache=True, **cache_kwargs(self.model, cache))
                self.n_forward += 1
                pos = pos + 1
                head = out.logits[:, -1]
                logits = self._buffer("logits", *head.shape).copy_(head)  # fp32, in a kept buffer
            if joining is not None:
                j_cache, j_logits, j_pos, j_mask, j_seeds, j_ids = joining
                if rows:
                    cache, mask = self._join(cache, mask, j_cache, j_mask)
                    cache = buffered(cache, spare)
                    logits, pos = torch.cat([logits, j_logits.float()]), torch.cat([pos, j_pos])
                else:
                    cache, mask, logits, pos = buffered(j_cache, spare), j_mask, j_logits.float(), j_pos
                if seen is not None:
                    seen = torch.cat([seen, seen.new_zeros((len(j_ids), V))]) if rows else \
                        torch.zeros((len(j_ids), V), dtype=torch.bool, device=self.device)
                if not p.greedy:
                    gens = (gens if rows else []) + [torch.Generator().manual_seed(int(s)) for s in j_seeds]
                rows = rows + list(j_ids)
                tokens.update({r: [] for r in j_ids})
        self.decode_s += time.perf_counter() - t0 - (self.prefill_s - pre0)
        if ids is None and admit is None:
            return [results[r] for r in range(len(results))]
        return results

    def _step_mask(self, mask: torch.Tensor | None, cache, n: int):
        """The attention mask of a one-token decoding step. With grouped key/value heads under SDPA
        on a CPU it is the (n, 1, 1, keys) boolean mask (all true for an unpadded batch, else what
        transformers builds from `mask`): given a mask, transformers runs each key/value head's
        query heads as one packed query block; without one it asks SDPA for `enable_gqa`, whose CPU
        kernel took ~7x longer a call at batch 64 on the 0.5B (bench/README.md). Not for caches with
        sliding-window (or other) layers, whose masks differ per layer."""
        if not self._pack_gqa or not all(type(layer).__name__ in ("DynamicLayer", "BufferedLayer")
                                         for layer in cache.layers):
            return mask
        if mask is None:
            keys = cache.get_seq_length() + 1
            return torch.ones((n, 1, 1, keys), dtype=torch.bool, device=self.device)
        return mask[:, None, None, :].bool()

    def _has_newline(self, t: int) -> bool:
        """Whether token `t` decodes to text with a line break (asked once per token id)."""
        has = self._newline.get(t)
        if has is None:
            has = self._newline[t] = "\n" in self.tok.decode([t], skip_special_tokens=True)
        return has

    def _finish(self, toks: list[int], finish: str, reason) -> Generation:
        return Generation(list(toks), self.tok.decode(toks, skip_special_tokens=True), finish, reason)

    def _stop_hit(self, toks: list[int]) -> tuple[str, str] | None:
        """(text cut before the first stop string, that string) once a stop string has appeared."""
        tail = self.tok.decode(toks[-self._stop_window:], skip_special_tokens=True)
        if not any(s in tail for s in self.params.stop):
            return None
        text = self.tok.decode(toks, skip_special_tokens=True)
        found = [(text.find(s), s) for s in self.params.stop if s in text]
        if not found:
            return None
        at, s = min(found)
        return text[:at], s

    def _pick(self, logits: torch.Tensor, seen: torch.Tensor | None, lengths: list[int],
              gens: list[torch.Generator] | None) -> torch.Tensor:
        """Next token per row (`lengths`: the tokens each row has so far); the processors run in
        transformers' order (repetition penalty, min length, temperature, top-k, top-p). `logits`
        may be a kept buffer that the next step overwrites: copy it to keep it."""
        p = self.params
        if seen is not None:
            pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, pen, logits)
        short = [j for j, n in enumerate(lengths) if n < p.min_new_tokens]
        if short and self.stop_ids:  # a copy in a kept buffer (a fresh one costs its page faults)
            logits = self._buffer("min_length", *logits.shape).copy_(logits)
            logits[torch.tensor(short, device=logits.device)[:, None],
                   torch.tensor(self.stop_ids, device=logits.device)] = float("-inf")
        if gens is None:
            # max(-1).indices, not argmax: the same index (the first maximal one, NaN included; both
            # documented) at 3-4x the speed over a 152k vocabulary on a CPU (bench/README.md)
            return logits.max(-1).indices
        return self._sample(logits, gens)

    def _buffer(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) fp32 scratch tensor kept across steps: a fresh full-vocabulary tensor per
        step and pass cost its allocation and first touch every time."""
        return self._scratch.get(name, rows, cols, device=self.device)

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Temperature, then top-k / top-p (transformers' rules), then inverse-CDF sampling with one
        uniform draw per row from that row's generator. Top-p alone works on a candidate set that
        provably holds the nucleus (_top_p_pick): a full-vocabulary sort per step cost more than the
        forward pass on CPU, and so did a `topk` of the thousands of candidates a flat distribution's
        nucleus needs."""
        p = self.params
        logits = torch.div(logits, p.temperature, out=self._buffer("scaled", *logits.shape))
        u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(self.device)
        if p.top_p < 1 and not p.top_k:
            return self._top_p_pick(logits, self._scratch.logsumexp(logits), u, gens)
        if p.top_k:
            vals, idx = logits.topk(min(logits.shape[-1], p.top_k), dim=-1)  # descending
            return self._draw(self._nucleus(vals.softmax(-1)), idx, u)  # top-k renormalises; top-p within
        return self._draw(logits.softmax(-1), None, u)

    def _nucleus(self, probs: torch.Tensor) -> torch.Tensor:
        """`probs` (rows in descending order) with the tokens outside each row's top-p nucleus zeroed:
        a token stays while the mass strictly above it is < top_p (the first always stays)."""
        top_p = self.params.top_p
        return probs if top_p >= 1 else probs * ((probs.cumsum(-1) - probs) < top_p)

    def _draw(self, probs: torch.Tensor, idx: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """Row j's token: the first position whose cumulative mass reaches (1 - u[j]) of the row's
        mass (`probs`: the kept tokens' probabilities, e.g. _nucleus's; `idx` their token ids or None)."""
        cdf = probs.cumsum(-1)
        # (1 - u) is in (0, 1]: the first index whose cdf reaches it has non-zero probability
        pick = torch.searchsorted(cdf, ((1 - u) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        pick = pick.clamp_(max=cdf.shape[-1] - 1)
        return pick if idx is None else idx.gather(-1, pick[:, None]).squeeze(-1)

    def _top_p_pick(self, scaled: torch.Tensor, lse: torch.Tensor, u: torch.Tensor,
                    gens: list[torch.Generator]) -> torch.Tensor:
        """Top-p draws from the candidates of probability exp(scaled - lse) at least tau, for a tau per
        row at which they carry at least top_p of the row's mass: a top set holding the whole
        nucleus. Each row's set is sorted with ties in token order, so the nucleus, its order and
        the drawn token do not depend on tau nor on the other rows. A row's tau starts from half the
        smallest probability its nucleus kept the step before (distributions change slowly; a row
        is known by its generator, which lives as long as the row; 1e-4 for a new row) and drops 4x
        while its set falls short, for that row alone. Finding the sets is two passes over the
        vocabulary (a comparison, then the positions of the hits); rows are sorted in groups of
        similar set size, so one flat row's 30,000-token nucleus does not pad 63 peaked rows' sets
        to its size (bench/README.md: a `topk` of K = 4,096 cost 100 ms a step at batch 64 on a
        2-core CPU, a padded sort of all rows' sets 50-200 ms)."""
        B, V = scaled.shape
        top_p, dev = self.params.top_p, scaled.device
        lse = lse.view(-1)
        tau = torch.tensor([self._nucleus_tau.get(id(g), 1e-4) for g in gens], dtype=torch.float64)
        pick = torch.empty(B, dtype=torch.long, device=dev)
        smallest = torch.full((B,), float("inf"), device=dev)
        todo = torch.arange(B)  # rows without a draw yet: all, then those whose set fell short
        while len(todo):
            rows_d = todo.to(dev)
            sub = scaled if len(todo) == B else torch.index_select(  # kept buffer: a fresh one page-faults
                scaled, 0, rows_d, out=self._buffer("retry", len(todo), V))
            t, lse_t = tau[todo], lse[rows_d]
            # tau below the smallest positive float: every token is a candidate
            cut = torch.where(t > 1e-38, t.log(), float("-inf")).to(dev, lse.dtype) + lse_t
            hit = torch.ge(sub, cut[:, None], out=self._scratch.get("hit", len(todo), V, dtype=torch.bool, device=dev))
            at = hit.view(-1).nonzero().squeeze(1)  # flat positions: by row, then by token id
            bounds = torch.searchsorted(at, torch.arange(len(todo) + 1, device=dev) * V)
            counts = bounds.diff()
            v = sub.view(-1)[at]
            r = torch.repeat_interleave(torch.arange(len(todo), device=dev), counts)
            mass = torch.zeros(len(todo), device=dev).index_add_(0, r, (v - lse_t[r]).exp())
            ok = ((mass >= top_p) | (cut == float("-inf"))).cpu()
            groups: dict[int, list[int]] = {}  # rows by the power of two at or above their set's size
            for j, c in zip(ok.nonzero().squeeze(1).tolist(), counts[ok.to(dev)].tolist()):
                groups.setdefault(max(c - 1, 0).bit_length(), []).append(j)
            for js in groups.values():  # sort each group's sets, padded to the group's largest
                js_t = torch.tensor(js, device=dev)
                n = counts[js_t]
                local = torch.repeat_interleave(torch.arange(len(js), device=dev), n)
                slot = torch.arange(local.shape[0], device=dev) - (n.cumsum(0) - n)[local]  # place in its row
                at_g = at[bounds[js_t][local] + slot]
                K = max(1, int(n.max()))
                vals = sub.new_full((len(js), K), float("-inf")).index_put_((local, slot), sub.view(-1)[at_g])
                ids = torch.zeros((len(js), K), dtype=torch.long, device=dev).index_put_((local, slot), at_g % V)
                vals, order = vals.sort(dim=-1, descending=True, stable=True)
                rows_t = rows_d[js_t]
                probs = (vals - lse[rows_t, None]).exp()
                kept = self._nucleus(probs)
                smallest[rows_t] = torch.where(kept > 0, kept, float("inf")).amin(-1)
                pick[rows_t] = self._draw(kept, ids.gather(-1, order), u[rows_t])
            todo = todo[~ok]
            tau[todo] /= 4
        # a row's next tau: half the smallest probability its nucleus kept
        smallest = smallest.cpu().double()
        nxt = torch.where(smallest.isfinite(), (smallest / 2).clamp(1e-38, 0.5), tau)
        self._nucleus_tau = {id(g): t for g, t in zip(gens, nxt.tolist())}
        return pick
