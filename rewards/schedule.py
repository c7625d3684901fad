"""Reward functions of the curriculum and their schedule over training steps.

Implements DESIGN.md "rewards/": accuracy-only (S1), the alternating accuracy / accuracy+parallel
reward (S2, the reference) and a constant parallel bonus (ablation); a reward never raises.
"""
import math
from dataclasses import dataclass, fields

from .math import extract_answer, judge_equivalence
from .parallel import parallel_stats

MODES = ("accuracy", "alternating", "parallel_bonus")
KINDS = ("accuracy", "accuracy+parallel", "accuracy+bonus")


def reward_kind(step: int, mode: str, window: int = 10, accuracy_steps: int = 8,
                scaffold_until: int | None = None) -> str:
    """Which reward step `step` uses: "accuracy", "accuracy+parallel" or "accuracy+bonus".

    "alternating": in each window of `window` steps the first `accuracy_steps` use accuracy
    only, the rest accuracy+parallel. "parallel_bonus": the bonus on every step. With
    `scaffold_until=K`, every step after K (step > K) is accuracy only.
    """
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; valid modes: {', '.join(MODES)}")
    if mode == "accuracy" or (scaffold_until is not None and step > scaffold_until):
        return "accuracy"
    if mode == "parallel_bonus":
        return "accuracy+bonus"
    return "accuracy" if step % window < accuracy_steps else "accuracy+parallel"


def _check_number(name: str, value, minimum=None, integer=False) -> None:
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"RewardFn.{name}={value!r} is invalid; it must be {kind}{bound}")


@dataclass(frozen=True)
class RewardFn:
    """A picklable reward: `reward_fn(response, gold, step) -> (reward, components)`.

    Values: `correct` / `wrong` for accuracy; `correct_parallel` for a correct, well-formed
    response with >= 1 valid block on accuracy+parallel steps (a correct response without a
    valid well-formed block gets `correct`, a wrong one `wrong`); `bonus` added on every step of
    "parallel_bonus" for a well-formed response with >= 1 valid block, right or wrong;
    `format_penalty` (e.g. -0.5; 0 = off) added on every step while the scaffold lasts, in any
    mode, when the response is not well formed. `timeout`: seconds per equivalence check.
    No defaults here: the config's reward section holds them (`from_section`).
    """
    mode: str
    window: int
    accuracy_steps: int
    scaffold_until: int | None
    correct: float
    wrong: float
    correct_parallel: float
    bonus: float
    format_penalty: float
    timeout: float

    @classmethod
    def from_section(cls, section, **changes) -> "RewardFn":
        """The reward of a config's reward section (curriculum.config.RewardConfig, read by field name so
        rewards/ imports no config): each field from the section's field of the same name, but `timeout`
        is half the section's per-response limit (the pool kills a response at the whole of it).
        `changes` override fields, e.g. mode="accuracy" for evaluation."""
        values = {f.name: getattr(section, f.name) for f in fields(cls) if f.name != "timeout"}
        return cls(**{**values, "timeout": section.timeout / 2, **changes})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"RewardFn.mode={self.mode!r} is not a known mode; "
                             f"valid modes: {', '.join(MODES)}")
        _check_number("window", self.window, minimum=1, integer=True)
        _check_number("accuracy_steps", self.accuracy_steps, minimum=0, integer=True)
        if self.accuracy_steps > self.window:
            raise ValueError(f"RewardFn.accuracy_steps={self.accuracy_steps} is invalid; it must be "
                             f"between 0 and window={self.window}")
        if self.scaffold_until is not None:
            _check_number("scaffold_until", self.scaffold_until, minimum=0, integer=True)
        for name in ("correct", "wrong", "correct_parallel", "bonus", "format_penalty"):
            _check_number(name, getattr(self, name))
        _check_number("timeout", self.timeout)
        if self.timeout <= 0:
            raise ValueError(f"RewardFn.timeout={self.timeout!r} is invalid; it must be > 0 seconds")

    def kind(self, step: int) -> str:
        """The reward used at `step` (see `reward_kind`)."""
        return reward_kind(step, self.mode, self.window, self.accuracy_steps, self.scaffold_until)

    def __call__(self, response: str, gold: str, step: int) -> tuple[float, dict]:
        """(reward, components); never raises: a failure anywhere scores as wrong."""
        try:
            return self._score(response, gold, step)
        except Exception as error:
            return self.score_failure(f"{type(error).__name__}: {error}"[:500])

    def _score(self, response: str, gold: str, step: int) -> tuple[float, dict]:
        kind = self.kind(step)
        answer = extract_answer(response)
        verdict = judge_equivalence(answer, gold, self.timeout) if answer is not None else "unequal"
        correct = verdict == "equal"
        stats = parallel_stats(response)
        parallel = stats.well_formed and stats.num_blocks >= 1
        reward = self.correct if correct else self.wrong
        if kind == "accuracy+parallel" and correct and parallel:
            reward = self.correct_parallel
        elif kind == "accuracy+bonus" and parallel:
            reward += self.bonus
        scaffold_on = self.scaffold_until is None or step <= self.scaffold_until
        penalty = self.format_penalty if scaffold_on and not stats.well_formed else 0.0
        components = dict(
            reward_kind=kind, accuracy=float(correct), correct=correct, answer=answer,
            verdict=verdict, parallel=float(parallel), well_formed=stats.well_formed,
            num_blocks=stats.num_blocks, format=float(stats.well_formed), format_penalty=penalty,
            timeout=verdict == "timeout", error="the equivalence check failed" if verdict == "error" else "")
        return float(reward + penalty), components

    def score_failure(self, reason: str, timeout: bool = False) -> tuple[float, dict]:
        """What a response scores when scoring it failed or timed out: wrong, with the reason."""
        components = dict(
            reward_kind="failed", accuracy=0.0, correct=False, answer=None, verdict="error",
            parallel=0.0, well_formed=False, num_blocks=0, format=0.0, format_penalty=0.0,
            timeout=timeout, error=reason)
        return float(self.wrong), components
