"""rewards/pool.py: batch scores equal in-process scores, in order; a hung item times out alone."""
import time
from dataclasses import dataclass

import pytest

from rewards import RewardFn, RewardPool, score_batch

P, P_, A, A_, S, S_ = "<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>"
RESPONSES = [
    "Final Answer: 18", "Final Answer: 17", f"{P}{A}9+9{A_}{A}18{A_}{P_}{S}18{S_}Final Answer: 18",
    "\\boxed{\\frac{1}{2}}", "Final Answer: 0.5", "nothing", "Final Answer: $1,080.", "Final Answer: x^2+2x+1",
]
GOLDS = ["18", "18", "18", "0.5", "\\frac{1}{2}", "3", "1080", "(x+1)^2"]
EXPECTED = [1.0, -1.0, 1.2, 1.0, 1.0, -1.0, 1.0, 1.0]  # at step 9, a parallel step


@dataclass(frozen=True)
class HangOn:
    """Test-only reward: sleeps far past any time limit when the response is "hang"."""
    wrong: float = -1.0

    def __call__(self, response: str, gold: str, step: int) -> tuple[float, dict]:
        if response == "hang":
            time.sleep(600)
        return RewardFn()(response, gold, step)

    def score_failure(self, reason: str, timeout: bool = False) -> tuple[float, dict]:
        return RewardFn(wrong=self.wrong).score_failure(reason, timeout)


@dataclass(frozen=True)
class Raises:
    """Test-only reward that always raises."""

    def __call__(self, response, gold, step):
        raise RuntimeError("boom")


def test_in_process_scores():
    scores = score_batch(RewardFn(), RESPONSES, GOLDS, step=9, workers=0)
    assert scores.rewards == EXPECTED and scores.timeouts == 0
    assert [c["correct"] for c in scores.components] == [r > 0 for r in EXPECTED]


def test_pool_equals_in_process_and_keeps_order():
    reward_fn = RewardFn()
    responses, golds = RESPONSES * 3, GOLDS * 3
    here = score_batch(reward_fn, responses, golds, step=9, workers=0)
    there = score_batch(reward_fn, responses, golds, step=9, workers=2)
    assert there.rewards == here.rewards == EXPECTED * 3
    assert there.components == here.components and there.timeouts == 0 and there.seconds > 0


def test_hung_item_times_out_alone_and_the_pool_recovers():
    responses = ["Final Answer: 18", "hang", "Final Answer: 17", "Final Answer: 18"]
    golds = ["18"] * 4
    with RewardPool(workers=2, timeout=1.0) as pool:
        start = time.perf_counter()
        scores = pool.score(HangOn(wrong=-3.0), responses, golds, step=0)
        assert time.perf_counter() - start < 1.0 + 5.0
        assert scores.rewards == [1.0, -3.0, -1.0, 1.0] and scores.timeouts == 1
        assert scores.components[1]["timeout"] is True and scores.components[1]["correct"] is False
        assert "1 s" in scores.components[1]["error"]
        again = pool.score(RewardFn(), RESPONSES, GOLDS, step=9)   # the killed worker was replaced
        assert again.rewards == EXPECTED and again.timeouts == 0
        twice = pool.score(HangOn(), ["hang", "hang", "Final Answer: 18"], golds[:3], step=0)
        assert twice.rewards == [-1.0, -1.0, 1.0] and twice.timeouts == 2


def test_a_raising_reward_scores_minus_one():
    for workers in (0, 1):
        scores = score_batch(Raises(), ["a", "b"], ["1", "2"], step=0, workers=workers)
        assert scores.rewards == [-1.0, -1.0] and "boom" in scores.components[0]["error"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="same length"):
        score_batch(RewardFn(), ["a"], [], step=0, workers=0)
    with pytest.raises(ValueError, match="workers=-1"):
        RewardPool(workers=-1)
    with pytest.raises(ValueError, match="timeout=0"):
        RewardPool(workers=0, timeout=0)
    assert score_batch(RewardFn(), [], [], step=0, workers=2).rewards == []
