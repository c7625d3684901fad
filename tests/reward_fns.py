"""Reward functions named by tests as "tests.reward_fns:<name>" (reward.funcs): TRL's signature, importable by
the reward workers."""
import time


def length_penalty(completions, **kwargs):
    """-0.1 per character past 10 (TRL style: only completions, the rest in **kwargs)."""
    return [-0.1 * max(0, len(c) - 10) for c in completions]


def has_gold(completions, answer, **kwargs):
    """1 when the completion holds the gold answer, else 0; no opinion (None) on an empty completion."""
    return [None if not c else float(a in c) for c, a in zip(completions, answer)]


def echo_step(completions, step, trainer_state, **kwargs):
    assert trainer_state.global_step == step
    return [float(step)] * len(completions)


def chat_and_column(prompts, completions, level, **kwargs):
    """TRL's conversational shapes: prompts are message lists and completions [{"role": "assistant", ...}];
    scores the data column `level` of each row."""
    ok = all(isinstance(p, list) and c[0]["role"] == "assistant" for p, c in zip(prompts, completions))
    return [float(lv) if ok else -100.0 for lv in level]


async def async_half(completions, **kwargs):
    return [0.5 for _ in completions]


def raises(completions, **kwargs):
    raise RuntimeError("boom")


def wrong_length(completions, **kwargs):
    return [1.0]


def not_a_number(completions, **kwargs):
    return ["high"] * len(completions)


def hangs_on_hang(completions, **kwargs):
    if "hang" in completions:
        time.sleep(600)
    return [1.0] * len(completions)


def no_kwargs(completions):
    return [0.0] * len(completions)


NOT_CALLABLE = 3
