"""rewards/metrics.py: pass@k and mean@k against hand-computed values and brute force."""
import itertools
import math

import pytest

from rewards import aggregate_by_problem, mean_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 0, 5, 0.0), (10, 10, 1, 1.0),
    (2, 1, 1, 0.5),                     # one of two samples right
    (4, 1, 2, 0.5),                     # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),                     # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (16, 4, 1, 0.25),                   # pass@1 is the plain accuracy
    (16, 4, 16, 1.0), (16, 12, 5, 1.0),  # fewer than k wrong samples: every subset passes
    (10, 3, 3, 1 - 35 / 120),           # 1 - C(7,3)/C(10,3)
    (8, 0, 0, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not need it.
    expected = 1 - math.comb(900, 500) / math.comb(1000, 500)
    assert pass_at_k(1000, 100, 500) == pytest.approx(expected, rel=1e-12)
    assert 0.0 <= pass_at_k(10_000, 1, 3) <= 1.0


@pytest.mark.parametrize("n, c, k, name", [
    (3, 1, 4, "k <= n"), (3, 4, 1, "c <= n"), (-1, 0, 0, "n=-1"), (3, -1, 1, "c=-1"),
    (3, 1, -2, "k=-2"), (3.0, 1, 1, "n=3.0"),
])
def test_pass_at_k_rejects_bad_counts(n, c, k, name):
    with pytest.raises(ValueError, match=name):
        pass_at_k(n, c, k)


def test_mean_at_k():
    assert mean_at_k([True, False, True, True]) == 0.75                 # one problem, flat
    assert mean_at_k([[True, False], [True, True, True, False]]) == (0.5 + 0.75) / 2
    assert mean_at_k([[False] * 16, [True] * 16]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        mean_at_k([])
    with pytest.raises(ValueError, match="at least one"):
        mean_at_k([[True], []])


def test_aggregate_by_problem():
    ids = ["a", "a", "b", "b", "a", "b"]
    correct = [True, False, False, False, True, True]
    result = aggregate_by_problem(ids, correct, k=2)
    # a: 2 of 3 right, pass@2 = 1; b: 1 of 3 right, pass@2 = 1 - C(2,2)/C(3,2) = 2/3.
    assert result["mean_at_k"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["pass_at_k"] == pytest.approx((1 + 2 / 3) / 2)
    assert (result["problems"], result["samples"], result["k"]) == (2, 6, 2)
    assert aggregate_by_problem(ids, correct)["k"] == 3
    with pytest.raises(ValueError, match="same length"):
        aggregate_by_problem(["a"], [])
