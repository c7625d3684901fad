"""studies/stats.py: the t interval and the paired difference against hand values (and scipy when present)."""
import math

import pytest

from studies.stats import paired_difference, t_cdf, t_interval, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445),
                                         (10, 2.228139), (30, 2.042272)])
def test_t_quantile_975_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)


def test_t_quantile_is_symmetric_and_inverts_the_cdf():
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5), abs=1e-12)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    for df in (1, 2, 5, 40):
        for p in (0.6, 0.9, 0.995):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 19, 100):
        for p in (0.8, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_t_interval_hand_values():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), half width t_{0.975,3} * s / 2 = 3.182446 * 1.290994 / 2
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    assert (iv.mean, iv.n) == (2.5, 4)
    assert iv.half_width == pytest.approx(2.054260, abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-5)
    assert t_interval([0.3, 0.3, 0.3]).half_width == 0.0
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width)
    with pytest.raises(ValueError):
        t_interval([])


def test_t_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    values = [0.41, 0.52, 0.38, 0.47, 0.5]
    low, high = stats.t.interval(0.9, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    iv = t_interval(values, level=0.9)
    assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-9)


def test_paired_difference_hand_values():
    # differences by seed: 2, 3, 2 -> mean 7/3, s = sqrt(1/3), half width t_{0.975,2} * s / sqrt(3) = 4.302653 / 3
    iv = paired_difference({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.0})
    assert iv.mean == pytest.approx(7 / 3) and iv.n == 3
    assert iv.half_width == pytest.approx(4.302653 / 3, abs=1e-6)


def test_paired_difference_pairs_by_seed_not_by_order():
    # a seed effect shared by both arms cancels: the unpaired intervals overlap, the paired one excludes 0
    first = {0: 0.1, 1: 0.5, 2: 0.9}
    arm = {2: 0.95, 0: 0.16, 1: 0.54, 7: 0.0}  # seed 7 has no partner: left out
    iv = paired_difference(arm, first)
    assert iv.n == 3 and iv.mean == pytest.approx(0.05)
    assert iv.low > 0
    assert t_interval([0.16, 0.54, 0.95]).low < t_interval(list(first.values())).high  # unpaired: overlap
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})
