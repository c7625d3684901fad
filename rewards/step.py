"""The rewards of one GRPO step: the built-in accuracy / parallel reward (schedule.RewardFn) per response and the
config's reward functions (funcs.py) per group, all in the reward pool under its time limits, summed with their
weights. Every function's scores come back by name (rewards/<name>/mean, /std); failures are counted
(reward/errors, reward/timeouts) and each is named once, never scored silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .funcs import RewardFunc, call_reward_func, group_kwargs, import_reward_func, weighted_total
from .length import OverlongPenalty
from .pool import BatchScores, Job, RewardPool
from .schedule import RewardFn


@dataclass(frozen=True)
class RewardSet:
    """What a step is scored with: `builtin` ((response, gold, step) -> (float, dict), e.g. a RewardFn; None when
    reward.mode is none), named `builtin_name` in the metrics, plus `funcs` (reward.funcs with their weights), plus
    `overlong` (DAPO's soft overlong penalty on the response length, named "overlong"; None = off)."""
    builtin: object | None
    builtin_name: str = "reward"
    funcs: tuple[RewardFunc, ...] = ()
    overlong: OverlongPenalty | None = None

    @classmethod
    def from_section(cls, section, builtin=None) -> "RewardSet":
        """The rewards of a config's reward section (read by field name, as RewardFn.from_section): the built-in
        reward named after reward.mode, or none for mode none; `builtin` replaces it (train_grpo's reward_fn, e.g.
        a test's toy reward; named "reward_fn"); reward.funcs weighted by reward.weights (1 each when unset);
        reward.overlong_buffer's len and penalty."""
        if builtin is not None:
            name = "reward_fn"
        elif section.mode != "none":
            builtin, name = RewardFn.from_section(section), section.mode
        else:
            name = ""
        weights = section.weights if section.weights is not None else [1.0] * len(section.funcs)
        buffer = section.overlong_buffer  # its `len` and `penalty`, or None
        overlong = None if buffer is None else OverlongPenalty(buffer.len, buffer.penalty)
        return cls(builtin, name, tuple(RewardFunc(s, float(w)) for s, w in zip(section.funcs, weights)), overlong)

    @property
    def names(self) -> list[str]:
        """Metric names, built-in first (rewards/<name>/mean), the overlong penalty last."""
        return (([self.builtin_name] if self.builtin is not None else []) + [f.name for f in self.funcs]
                + (["overlong"] if self.overlong is not None else []))


@dataclass(frozen=True)
class RewardInputs:
    """What the rewards of a step see, one entry per response: N = P*G rows, group-contiguous (rows i*G..i*G+G-1
    answer prompt i). `prompts`: prompt text, or the list of messages of a conversational row; `columns`: the
    data's other columns (name -> (N,) values), passed to reward functions as keyword arguments."""
    completions: list[str]
    answers: list[str]
    group_size: int
    prompts: list | None = None
    completion_ids: list | None = None
    columns: dict = field(default_factory=dict)
    max_steps: int = 0
    completion_lengths: list | None = None  # (N,) response lengths in tokens (forced tags included)
    max_completion_length: int | None = None  # the response limit in tokens (rollout.max_new_tokens)


def score_step(pool: RewardPool, rewards: RewardSet, inputs: RewardInputs, step: int) -> BatchScores:
    """The step's scores: `rewards` (N,) = built-in + sum of weight * function score (a None score left out);
    `components` the built-in's per response ({} without one); `per_func` every reward's (N,) scores by name.

    A function is called once per group, within reward.timeout x G seconds (the per-response limit for each of
    its completions): groups spread over the workers, and a hung call costs one group's scores, not the step's.
    A failed call leaves its group's scores None (no opinion), counted in errors / timeouts."""
    n, G = len(inputs.completions), inputs.group_size
    assert n % G == 0, f"{n} responses do not form groups of {G}"
    if rewards.builtin is not None:
        scores = pool.score(rewards.builtin, inputs.completions, inputs.answers, step)
        failed = [c for c in scores.components if isinstance(c, dict) and c.get("error")]
        name = rewards.builtin_name
        failures = [*_first_failures(pool, name, [c["error"] for c in failed if not c.get("timeout")]),
                    *_first_failures(pool, name, [c["error"] for c in failed if c.get("timeout")], timeout=True)]
        scores = replace(scores, per_func={rewards.builtin_name: scores.rewards}, failures=failures)
        parts = [(1.0, scores.rewards)]
    else:
        scores, parts = BatchScores(rewards=[0.0] * n, components=[{} for _ in range(n)], seconds=0.0, timeouts=0), []
    prompts = inputs.prompts if inputs.prompts is not None else [""] * n
    ids = inputs.completion_ids if inputs.completion_ids is not None else [[] for _ in range(n)]
    groups = [range(g, g + G) for g in range(0, n, G)]
    calls = [group_kwargs(prompts, inputs.completions, ids, inputs.answers, inputs.columns, rows, step,
                          inputs.max_steps) for rows in groups] if rewards.funcs else []
    jobs = [Job(call_reward_func, (f.spec, kwargs), pool.timeout * G, f.spec, (import_reward_func, (f.spec,)))
            for f in rewards.funcs for kwargs in calls]
    outcomes = pool.run(jobs) if jobs else []
    per_func, failures = dict(scores.per_func), list(scores.failures)
    timeouts, errors = scores.timeouts, scores.errors
    for k, f in enumerate(rewards.funcs):
        values: list = [None] * n
        for rows, outcome in zip(groups, outcomes[k * len(groups):(k + 1) * len(groups)]):
            if outcome.error:
                timeouts, errors = timeouts + G * outcome.timeout, errors + G * (not outcome.timeout)
                failures += _first_failures(pool, f.name, [outcome.error], outcome.timeout)
            else:
                values[rows.start:rows.stop] = outcome.value
        per_func[f.name] = values
        parts.append((f.weight, values))
    if rewards.overlong is not None:  # arithmetic on lengths: here, not in the pool
        per_func["overlong"] = overlong_scores(rewards.overlong, inputs)
        parts.append((1.0, per_func["overlong"]))
    return replace(scores, rewards=weighted_total(n, parts), per_func=per_func, failures=failures,
                   timeouts=timeouts, errors=errors)


def overlong_scores(penalty: OverlongPenalty, inputs: RewardInputs) -> list[float]:
    """The overlong penalty of each response (N,), from inputs.completion_lengths and max_completion_length."""
    if inputs.completion_lengths is None or inputs.max_completion_length is None:
        raise ValueError("the overlong penalty needs RewardInputs.completion_lengths and max_completion_length")
    return [penalty(length, inputs.max_completion_length) for length in inputs.completion_lengths]


def _first_failures(pool: RewardPool, name: str, reasons: list[str], timeout: bool = False) -> list:
    """[(name, first reason)] when the pool has not named this function's failures of this kind (time-outs and
    errors are named apart) before; [] otherwise."""
    if not reasons or (name, timeout) in pool.named:
        return []
    pool.named.add((name, timeout))
    return [(name, reasons[0])]
