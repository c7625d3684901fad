"""rewards/length.py: DAPO's soft overlong penalty at and around its edges, and as a named part of a step's reward
(rewards/overlong/mean) beside the built-in reward and reward functions."""
import pytest

from curriculum.config import OverlongBuffer, RewardConfig
from rewards import OverlongPenalty, RewardInputs, RewardPool, RewardSet, score_step


@pytest.mark.parametrize("length,expected", [
    (0, 0.0), (79, 0.0),
    (80, 0.0),  # exactly L_max - L_cache: no penalty yet
    (81, -0.5 / 20),  # one token into the buffer: penalty / L_cache
    (90, -0.25),  # half way: half the penalty
    (99, -0.5 * 19 / 20),
    (100, -0.5),  # exactly L_max: the whole penalty
    (101, -0.5), (5000, -0.5),  # beyond: never more than the penalty
])
def test_edges(length, expected):
    assert OverlongPenalty(buffer=20, penalty=0.5)(length, max_length=100) == pytest.approx(expected, abs=1e-12)


def test_buffer_as_long_as_the_limit_and_zero_penalty():
    whole = OverlongPenalty(buffer=10, penalty=1.0)
    assert [whole(n, 10) for n in (0, 1, 5, 10)] == pytest.approx([0.0, -0.1, -0.5, -1.0])
    assert OverlongPenalty(buffer=10, penalty=0.0)(10, 10) == 0.0


@pytest.mark.parametrize("buffer,penalty,match", [(0, 1.0, "buffer=0"), (2.5, 1.0, "integer"),
                                                  (4, -1.0, "penalty=-1.0"), (4, float("nan"), "finite")])
def test_bad_values(buffer, penalty, match):
    with pytest.raises(ValueError, match=match):
        OverlongPenalty(buffer, penalty)


def test_a_named_part_of_the_step_reward():
    """Built-in accuracy + the overlong penalty of each response's token length, logged as rewards/overlong."""
    section = RewardConfig(mode="accuracy", overlong_buffer=OverlongBuffer(len=4, penalty=1.0))
    rewards = RewardSet.from_section(section)
    assert rewards.names == ["accuracy", "overlong"] and rewards.overlong == OverlongPenalty(4, 1.0)
    inputs = RewardInputs(["Final Answer: 1", "Final Answer: 2"], ["1", "1"], group_size=2,
                          completion_lengths=[6, 10], max_completion_length=10)
    with RewardPool(workers=0) as pool:
        scores = score_step(pool, rewards, inputs, step=0)
    assert scores.per_func["overlong"] == pytest.approx([0.0, -1.0])  # 6 = 10 - 4: free; 10: the limit
    assert scores.rewards == pytest.approx([1.0, -2.0])  # right + 0, wrong - 1
    with RewardPool(workers=0) as pool, pytest.raises(ValueError, match="needs RewardInputs.completion_lengths"):
        score_step(pool, rewards, RewardInputs(["a", "b"], ["1", "1"], group_size=2), step=0)
    assert RewardSet.from_section(RewardConfig()).overlong is None
