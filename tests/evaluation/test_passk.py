"""pass@k against brute force over every k-subset of the n samples."""
import itertools

import pytest

from domino.evaluation.passk import aggregate, check_ks, pass_at_k


def brute_force(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_known_values_and_stability():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # C(1000, 500) overflows floats; the product form does not
    v = pass_at_k(1000, 1, 500)
    assert v == pytest.approx(0.5) and 0 <= pass_at_k(1000, 3, 100) <= 1


def test_k_larger_than_n_is_refused():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="n_samples=3"):
        check_ks([1, 5], 3)
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        aggregate({"a": (1, 1), "b": (2, 0)}, [2])
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_aggregate_is_mean_over_tasks():
    out = aggregate({"a": (4, 1), "b": (4, 4), "c": (4, 0)}, [1, 2])
    assert out["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert out["pass@2"] == pytest.approx((brute_force(4, 1, 2) + 1 + 0) / 3)
