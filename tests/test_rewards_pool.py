"""rewards/pool.py: batch scores equal in-process scores, in order; a hung item times out alone."""
import os
import time
from dataclasses import dataclass

import pytest

from rewards import RewardPool, score_batch
from rewards.worker import WorkerTimeout

from .test_rewards_schedule import make_reward

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
        return make_reward(mode="alternating")(response, gold, step)

    def score_failure(self, reason: str, timeout: bool = False) -> tuple[float, dict]:
        return make_reward(wrong=self.wrong).score_failure(reason, timeout)


@dataclass(frozen=True)
class Raises:
    """Test-only reward that always raises."""

    def __call__(self, response, gold, step):
        raise RuntimeError("boom")


def test_in_process_scores():
    scores = score_batch(make_reward(mode="alternating"), RESPONSES, GOLDS, step=9, workers=0)
    assert scores.rewards == EXPECTED and scores.timeouts == 0
    assert [c["correct"] for c in scores.components] == [r > 0 for r in EXPECTED]


def test_pool_equals_in_process_and_keeps_order():
    reward_fn = make_reward(mode="alternating")
    responses, golds = RESPONSES * 3, GOLDS * 3
    here = score_batch(reward_fn, responses, golds, step=9, workers=0)
    there = score_batch(reward_fn, responses, golds, step=9, workers=2)
    assert there.rewards == here.rewards == EXPECTED * 3
    assert there.components == here.components and there.timeouts == 0 and there.seconds > 0


def test_hung_item_times_out_alone_and_the_pool_recovers():
    # Only the hung item must hit the 1 s limit; the others are string matches (microseconds), and the
    # wall-clock bound is loose: it only shows the hang was cut instead of waited out (600 s).
    responses = ["Final Answer: 18", "hang", "Final Answer: 17", "Final Answer: 18"]
    golds = ["18"] * 4
    with RewardPool(workers=2, timeout=1.0) as pool:
        start = time.perf_counter()
        scores = pool.score(HangOn(wrong=-3.0), responses, golds, step=0)
        assert time.perf_counter() - start < 120
        assert scores.rewards == [1.0, -3.0, -1.0, 1.0] and (scores.timeouts, scores.errors) == (1, 0)
        assert scores.components[1]["timeout"] is True and scores.components[1]["correct"] is False
        assert "1 s" in scores.components[1]["error"]
        pool.timeout = 120.0  # symbolic checks follow: a generous limit for items meant to pass
        again = pool.score(make_reward(mode="alternating"), RESPONSES, GOLDS, step=9)  # the killed worker was replaced
        assert again.rewards == EXPECTED and again.timeouts == 0
        pool.timeout = 1.0
        twice = pool.score(HangOn(), ["hang", "hang", "Final Answer: 18"], golds[:3], step=0)
        assert twice.rewards == [-1.0, -1.0, 1.0] and twice.timeouts == 2


@dataclass(frozen=True)
class CheckerProbe:
    """Test-only reward run in a pool worker: "probe" reports how many started, ready checkers the worker
    holds; "stall" runs a checker call that times out (the checker is killed and replaced); "orphan" writes
    the checker's pid to `path`, then hangs in it until the pool kills the worker."""
    path: str = ""

    def __call__(self, response: str, gold: str, step: int) -> tuple[float, dict]:
        from rewards.math import _CHECKERS
        if response == "stall":
            try:
                _CHECKERS.call(time.sleep, (600,), timeout=0.5)
            except WorkerTimeout:
                pass
        if response == "orphan":
            with open(self.path, "w") as f:
                f.write(str(_CHECKERS.call(os.getpid, (), timeout=60)))
            _CHECKERS.call(time.sleep, (600,), timeout=600)
        return 0.0, {"ready_checkers": _CHECKERS.idle_ready()}


def test_a_worker_starts_its_checker_outside_every_time_limit():
    """A fresh worker (first or replacement) starts its equivalence checker before it reports ready, and a
    checker killed by a timeout is replaced before the worker answers, so the next item never waits for a
    checker to import sympy inside its own time limit (under load that cascaded into ~13 timeouts)."""
    with RewardPool(workers=1, timeout=120.0) as pool:
        scores = pool.score(CheckerProbe(), ["probe", "stall", "probe"], ["1"] * 3, step=0)
    probes = [scores.components[i]["ready_checkers"] for i in (0, 2)]  # the stall's own count is taken mid-call
    assert probes == [1, 1] and scores.timeouts == 0


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_killed_worker_takes_its_checker_with_it(tmp_path):
    """The pool kills a worker's whole process group: no checker lives on as an orphan (it used to, and
    printed BrokenPipe tracebacks when its parent was gone)."""
    marker = tmp_path / "checker.pid"
    with RewardPool(workers=1, timeout=120.0) as pool:
        pool.score(CheckerProbe(), ["probe"], ["1"], step=0)  # started and ready: the clock below is the item's
        pool.timeout = 10.0
        scores = pool.score(CheckerProbe(str(marker)), ["orphan"], ["1"], step=0)
        assert scores.timeouts == 1
        pid = int(marker.read_text())
        deadline = time.monotonic() + 60
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(pid)


def test_a_raising_reward_scores_minus_one_and_counts_as_an_error():
    for workers in (0, 1):
        scores = score_batch(Raises(), ["a", "b"], ["1", "2"], step=0, workers=workers)
        assert scores.rewards == [-1.0, -1.0] and "boom" in scores.components[0]["error"]
        assert (scores.timeouts, scores.errors) == (0, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="same length"):
        score_batch(make_reward(mode="alternating"), ["a"], [], step=0, workers=0)
    with pytest.raises(ValueError, match="workers=-1"):
        RewardPool(workers=-1)
    with pytest.raises(ValueError, match="timeout=0"):
        RewardPool(workers=0, timeout=0)
    assert score_batch(make_reward(mode="alternating"), [], [], step=0, workers=2).rewards == []
