"""grpo/advantage.py: hand-computed advantages, the no-signal groups, errors, and a plain-loop reference."""
import statistics

import pytest
import torch

from grpo.advantage import expand_to_rows, frac_zero_std, group_advantages, nonzero_std_groups

# two groups of 4: one with signal, one constant
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_group_scale_hand_values():
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.5773503; 0.5 / (0.5773503 + 1e-6) = 0.8660239
    expected = torch.tensor([0.8660239, -0.8660239, -0.8660239, 0.8660239, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4), expected, atol=1e-6, rtol=0)


def test_batch_scale_hand_values():
    # batch mean 1.25; squared deviations sum to 5.5; unbiased std sqrt(5.5 / 7) = 0.8864053
    # 0.5 / (0.8864053 + 1e-6) = 0.5640760
    expected = torch.tensor([0.5640760, -0.5640760, -0.5640760, 0.5640760, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="batch"), expected, atol=1e-6, rtol=0)


def test_none_scale_is_centered_only():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="none"), expected, atol=0, rtol=0)


def test_eps_enters_the_denominator():
    # 0.5 / (0.5773503 + 1.0) = 0.3169873
    out = group_advantages(REWARDS[:4], 4, eps=1.0)
    torch.testing.assert_close(out, torch.tensor([0.3169873, -0.3169873, -0.3169873, 0.3169873]), atol=1e-6, rtol=0)


def test_std_is_unbiased():
    # [3, 1]: centered +-1; unbiased std sqrt(2) = 1.4142136 (the biased one would be 1 and give +-1)
    out = group_advantages(torch.tensor([3.0, 1.0]), 2)
    torch.testing.assert_close(out, torch.tensor([0.7071065, -0.7071065]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_groups_are_exactly_zero(scale):
    # float32 mean([0.9] * 3) is 0.9 - 6e-8: without the explicit zero, "group" would give 0.0555 each
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.25])
    out = group_advantages(rewards, 3, scale=scale)
    assert torch.equal(out[:3], torch.zeros(3))
    assert (out[3:] != 0).all()
    everything_equal = group_advantages(torch.full((4,), 0.7), 2, scale=scale)  # batch std 0: no nan
    assert torch.equal(everything_equal, torch.zeros(4))


def test_integer_and_bool_rewards_are_accepted():
    out = group_advantages(torch.tensor([True, False, False, False]), 2)
    torch.testing.assert_close(out, torch.tensor([0.7071063, -0.7071063, 0.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_plain_python_loop(scale):
    gen = torch.Generator().manual_seed(0)
    G = 5
    rewards = torch.randint(0, 3, (6 * G,), generator=gen).double() * 0.5
    values = rewards.tolist()
    batch_std = statistics.stdev(values)
    expected = []
    for i in range(0, len(values), G):
        group = values[i:i + G]
        mean = sum(group) / G
        std = {"group": statistics.stdev(group), "batch": batch_std, "none": None}[scale]
        for r in group:
            if max(group) == min(group):
                expected.append(0.0)
            else:
                expected.append((r - mean) / (std + 1e-6) if std is not None else r - mean)
    out = group_advantages(rewards, G, scale=scale)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="cannot be split into groups of 3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        group_advantages(REWARDS, 4, scale="std")
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        group_advantages(REWARDS.view(2, 4), 4)


def test_zero_std_groups_and_rows():
    keep = nonzero_std_groups(REWARDS, 4)
    assert keep.tolist() == [True, False]
    assert frac_zero_std(REWARDS, 4) == 0.5
    assert frac_zero_std(torch.tensor([1.0, 0.0, 2.0, 2.0, 3.0, 4.0]), 2) == pytest.approx(1 / 3)
    assert expand_to_rows(keep, 4).tolist() == [True] * 4 + [False] * 4
    # the filter and the advantages agree on which groups carry signal
    assert torch.equal(expand_to_rows(keep, 4), group_advantages(REWARDS, 4) != 0)
    with pytest.raises(ValueError, match="cannot be split"):
        frac_zero_std(REWARDS, 3)
