"""Reward functions named in the config ("module:function"), called as TRL's `reward_funcs` are, so a TRL user's
function works unchanged: `fn(prompts=, completions=, completion_ids=, answer=, step=, trainer_state=, **columns)
-> list[float | None]` over a batch (None: no opinion, left out of that sample's weighted sum, as TRL does with
NaN). They run in the reward pool's workers, which import them by name; `check_reward_func` refuses at config
time what the workers could not import. Plain Python: no torch, no config objects.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass

# Keyword arguments every function gets; a data column of one of these names would be shadowed (preflight refuses).
ARGUMENTS = ("prompts", "completions", "completion_ids", "answer", "step", "trainer_state")
_loaded: dict = {}  # spec -> function, per process (a worker imports each function once)


class RewardFuncError(ValueError):
    """A reward function that cannot be used; the message names the spec and the reason."""


@dataclass(frozen=True)
class StepState:
    """What a TRL reward function reads from `trainer_state` (transformers.TrainerState): the step."""
    global_step: int
    max_steps: int


@dataclass(frozen=True)
class RewardFunc:
    """One entry of reward.funcs: `spec` "module:function" (a dotted attribute path after the colon is allowed),
    `weight` its factor in the total. Its metric name (rewards/<name>/mean) is the last part of the spec."""
    spec: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2].rpartition(".")[2]


def split_spec(spec: str) -> tuple[str, str]:
    """("module", "attr") of "module:attr"; RewardFuncError when the spec has another shape."""
    module, colon, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not colon or not module or not attr or ":" in attr:
        raise RewardFuncError(f"{spec!r} is not of the form 'module:function' (e.g. 'my_rewards:length_penalty')")
    return module, attr


def load_reward_func(spec: str):
    """The callable that `spec` names, imported as the workers import it: from the import path, with the
    current directory added at its end (a rewards file beside the config works without installing it)."""
    if spec in _loaded:
        return _loaded[spec]
    module_name, attr = split_spec(spec)
    if module_name == "__main__":
        raise RewardFuncError(f"{spec!r} is defined in __main__ (the script being run); the reward workers are "
                              "separate processes that cannot import it: move it into a module and name that")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module raised while importing
        raise RewardFuncError(f"{spec!r}: cannot import module {module_name!r} ({type(error).__name__}: "
                              f"{error}); it must be importable from the current directory or PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            where = getattr(module, "__file__", None) or module_name
            raise RewardFuncError(f"{spec!r}: {module_name} ({where}) has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardFuncError(f"{spec!r} is not a function (its type is {type(fn).__name__})")
    _loaded[spec] = fn
    return fn


def import_reward_func(spec: str) -> None:
    """Import the function `spec` names (a worker's introduction to it, before its first timed call)."""
    load_reward_func(spec)


def check_reward_func(spec: str) -> None:
    """What preflight runs for each reward.funcs entry: it imports (RewardFuncError with the reason otherwise)
    and accepts the keyword arguments a reward function is called with."""
    fn = load_reward_func(spec)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check before the first call
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise RewardFuncError(f"{spec!r} takes no **kwargs; a reward function is called with keyword arguments "
                              f"({', '.join(ARGUMENTS)} and the data's other columns): add **kwargs to its signature")
    positional = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional:
        raise RewardFuncError(f"{spec!r}: its arguments {positional} are positional-only; every argument is "
                              "passed by keyword")


def call_reward_func(spec: str, kwargs: dict) -> list:
    """`fn(**kwargs)` for the function `spec` names (awaited if it is async), its scores checked: one per
    completion, each a real number or None (NaN counts as None). Runs in a reward worker."""
    fn = load_reward_func(spec)
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_awaited(out))
    return checked_scores(out, len(kwargs["completions"]))


async def _awaited(awaitable):
    return await awaitable


def checked_scores(out, n: int) -> list:
    """`out` as a list of n floats or None; ValueError saying what is wrong (a length, a type, a value)."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # numpy arrays, torch tensors
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"returned a {type(out).__name__}; a reward function returns a list of floats, one per "
                         "completion (None for no opinion)")
    if len(out) != n:
        raise ValueError(f"returned {len(out)} scores for {n} completions")
    scores = []
    for i, value in enumerate(out):
        if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
            scores.append(None)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            scores.append(float(value))
        else:
            raise ValueError(f"score {i} is {value!r} ({type(value).__name__}); each score must be a finite number "
                             "or None")
    return scores


def group_kwargs(prompts: list, completions: list[str], completion_ids: list, answers: list, columns: dict,
                 rows: range, step: int, max_steps: int) -> dict:
    """The keyword arguments of one call over `rows` (TRL's shapes: one entry per completion, columns repeated
    over a group's completions). A row whose prompt is a list of messages (conversational) gets its completion
    as [{"role": "assistant", "content": text}], as TRL gives it."""
    def conversational(i):
        return isinstance(prompts[i], list)
    kwargs = {name: [values[i] for i in rows] for name, values in columns.items()}
    kwargs.update(prompts=[prompts[i] for i in rows],
                  completions=[[{"role": "assistant", "content": completions[i]}] if conversational(i)
                               else completions[i] for i in rows],
                  completion_ids=[completion_ids[i] for i in rows], answer=[answers[i] for i in rows],
                  step=step, trainer_state=StepState(step, max_steps))
    return kwargs


def weighted_total(n: int, parts: list[tuple[float, list]]) -> list[float]:
    """Per sample, sum of weight * score over (weight, scores (n,)) pairs, a None score left out (TRL's nansum)."""
    return [sum(w * s[i] for w, s in parts if s[i] is not None) for i in range(n)]
