"""Token batches and a resumable, seeded loader: what the training and finetune stages share.

The batch order is a function of (seed, pass over the data) alone, never of the global RNG, and the
loader is resumable: Lightning stores its position in the checkpoint, so a run resumed mid-epoch
from `last.ckpt` sees exactly the batches the uninterrupted run would have seen."""
from __future__ import annotations

import logging
from collections import Counter

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def tokenize_texts(tokenizer, texts: list[str], max_len: int, what: str = "texts") -> list[list[int]]:
    """Token ids of each text followed by EOS, truncated to max_len tokens with one warning."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out, n_cut = [], 0
    for ids in enc:
        ids = list(ids) + ([eos] if eos is not None else [])
        if len(ids) > max_len:
            ids, n_cut = ids[:max_len], n_cut + 1
        out.append(ids)
    if n_cut:
        log.warning("%d of %d %s are longer than max_len=%d tokens and were truncated", n_cut, len(texts),
                    what, max_len)
    return out


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class IndexedTexts(Dataset):
    def __init__(self, token_ids: list[list[int]]):
        self.token_ids = token_ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "input_ids": self.token_ids[i]}


class Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = pad_batch([it["input_ids"] for it in items], self.pad_id)
        return {"index": torch.tensor([it["index"] for it in items]), "input_ids": ids,
                "attention_mask": mask}


class EpochOrder(DistributedSampler):
    """The indices of one pass: a permutation drawn from (seed, pass) by its own generator, sharded
    over ranks, starting `start` indices in (a resumed pass). A DistributedSampler, so that Lightning
    keeps it under DDP instead of wrapping it in one that reshuffles."""

    def __init__(self, dataset, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        # the pass number comes from ResumableLoader, which counts passes itself: Lightning's epoch
        # counter is one too high after a resume from an end-of-epoch checkpoint
        pass

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        while len(order) < self.total_size:  # pad so every rank gets as many (DistributedSampler's rule)
            order += order[: self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas][self.start:])


class ResumableLoader(DataLoader):
    """A training DataLoader that knows where it is: `state_dict()` = (pass, batches handed out in
    that pass). Lightning saves it with every checkpoint and calls `load_state_dict()` on resume;
    the next pass then starts after the batches already trained on (a fresh loader would replay
    them). The sampler must be an EpochOrder."""

    def __init__(self, dataset, sampler: EpochOrder, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.passes, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"pass": self.passes, "batches": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.position = int(state["pass"]), int(state["batches"])

    def __iter__(self):
        if self.position >= len(self):  # the previous pass was finished: start the next one
            self.passes, self.position = self.passes + 1, 0
        self.sampler.epoch, self.sampler.start = self.passes, self.position * self.batch_size
        return self._counted(super().__iter__())

    def _counted(self, it):
        for batch in it:
            self.position += 1
            yield batch


# tokens' worth of a forward + backward's fixed cost on a CPU (reading the frozen weights whatever
# the rows): measured 27 on Qwen2.5-Coder-0.5B in bf16 and 52 on SmolLM2-135M in fp32 on a 2-core
# AMD EPYC (bench/forward_cost.py, bench/README.md); rounded up, so a close call keeps fewer forwards
CPU_FORWARD_COST = 64


def check_forward_cost(cost, key: str):
    """`cost` ("auto", None or a number of tokens >= 0), or a ValueError naming the config `key`."""
    number = isinstance(cost, (int, float)) and not isinstance(cost, bool)
    if not (cost in ("auto", None) or (number and cost >= 0)):
        raise ValueError(f"{key}={cost!r}: 'auto', null or a number of tokens >= 0")
    return cost


def resolve_forward_cost(cost, device) -> float | None:
    """A forward cost for `length_groups` on `device`: "auto" is CPU_FORWARD_COST on a CPU and None
    (one forward, no grouping) elsewhere, where fewer and larger forwards are what counts (kernel
    launches; not measured here)."""
    if cost == "auto":
        return CPU_FORWARD_COST if torch.device(device).type == "cpu" else None
    return cost


def length_groups(lengths: list[int], cost: float) -> list[list[int]]:
    """The rows (indices into `lengths`) in groups, longest rows first, that minimise the sum over
    groups of (rows x the group's longest row + cost): the tokens the forwards compute, padding
    included, plus a fixed cost per forward in tokens. Some optimal partition keeps rows of equal
    length together and groups neighbouring lengths, so a dynamic programme over the distinct
    lengths, longest first, finds one; at equal cost the fewer forwards win."""
    per_length = Counter(lengths)
    distinct = sorted(per_length, reverse=True)
    counts = [per_length[v] for v in distinct]
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):  # best[j]: the rows of the j longest lengths grouped
        rows = 0
        for i in range(j - 1, -1, -1):  # the last group: lengths distinct[i:j], its longest distinct[i]
            rows += counts[i]
            c = best[i] + rows * distinct[i] + cost
            if c <= best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], len(distinct)
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    where = {v: g for g, (i, j) in enumerate(reversed(bounds)) for v in distinct[i:j]}
    groups: list[list[int]] = [[] for _ in bounds]
    for r in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        groups[where[lengths[r]]].append(r)
    return groups


def resumable_loader(dataset, batch_size: int, seed: int, trainer=None, shuffle: bool = True,
                     **kwargs) -> ResumableLoader:
    """A ResumableLoader over `dataset` for this process's rank. Its worker seeds come from `seed`
    too, so creating it never draws from the global RNG."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
    sampler = EpochOrder(dataset, seed, shuffle, num_replicas=world, rank=rank)
    return ResumableLoader(dataset, sampler, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(seed), **kwargs)
