"""core/batching.length_groups: the row groups that minimise padded tokens plus a fixed cost per
forward, which fine-tuning's padded batches (`sft.forward_cost`) and training's continuations
(`objective.forward_cost`) both run in."""
from __future__ import annotations

import random

import pytest

from domino.core.batching import length_groups


def partitions(items):
    if not items:
        yield []
        return
    for rest in partitions(items[1:]):
        for k in range(len(rest)):
            yield rest[:k] + [[items[0]] + rest[k]] + rest[k + 1:]
        yield [[items[0]]] + rest


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_minimise_padded_tokens_plus_a_cost_per_forward(seed):
    """`length_groups` is optimal against every partition of the rows (brute force), covers each row
    once, and spans the two ends: no fixed cost splits every distinct length, a large one keeps the
    batch whole."""
    def cost_of(groups, c):
        return sum(len(g) * max(lengths[i] for i in g) + c for g in groups)

    rng = random.Random(seed)
    lengths = [rng.choice([5, 40, 41, 90, 200, 380, 600]) for _ in range(rng.randint(1, 7))]
    for c in (0, 30, 64, 500, 10**6):
        got = length_groups(lengths, c)
        assert sorted(i for g in got for i in g) == list(range(len(lengths)))
        assert cost_of(got, c) == min(cost_of(p, c) for p in partitions(list(range(len(lengths)))))
    assert len(length_groups(lengths, 0)) == len(set(lengths))  # equal rows share a forward at equal cost
    assert len(length_groups(lengths, 10**6)) == 1
    assert length_groups([606, 546, 471, 366], 64) == [[0, 1], [2], [3]]  # the demo-like batch of bench/
    assert length_groups([160, 140, 110, 80], 64) == [[0, 1], [2, 3]]
