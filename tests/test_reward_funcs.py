"""rewards/funcs.py and rewards/step.py: reward functions named "module:function" (TRL's signature) run in the
reward workers beside the built-in reward, weighted, with None left out; a function the workers could not import
is refused with the reason; a failing, hung or malformed function is counted and named once, never scored -1."""
import pytest

import run
from curriculum.config import RewardConfig
from rewards import RewardFuncError, RewardInputs, RewardPool, RewardSet, check_reward_func, score_step

from .test_rewards_schedule import make_reward

F = "tests.reward_fns:"
COMPLETIONS = ["Final Answer: 18", "Final Answer: 17", "", "Final Answer: 3"]  # 2 groups of G=2
ANSWERS = ["18", "18", "3", "3"]
BUILTIN = [1.0, -1.0, -1.0, 1.0]  # accuracy: right, wrong, no answer, right
LENGTH = [-0.6, -0.6, 0.0, -0.5]  # -0.1 per character past 10 (16, 16, 0, 15 characters)
GOLD = [1.0, 0.0, None, 1.0]  # None: no opinion on the empty completion
# built-in + 2 * length_penalty + 0.5 * has_gold, the None left out of its row's sum
TOTAL = [1.0 - 1.2 + 0.5, -1.0 - 1.2 + 0.0, -1.0 + 0.0, 1.0 - 1.0 + 0.5]


def rewards(*funcs, weights=None, mode="accuracy"):
    return RewardSet.from_section(RewardConfig(mode=mode, funcs=[F + f for f in funcs], weights=weights))


def inputs(completions=COMPLETIONS, **over):
    return RewardInputs(list(completions), list(ANSWERS), group_size=2, **over)


@pytest.mark.parametrize("workers", [0, 2])
def test_functions_by_name_are_weighted_into_the_builtin_reward(workers):
    with RewardPool(workers=workers, timeout=60.0) as pool:
        scores = score_step(pool, rewards("length_penalty", "has_gold", weights=[2.0, 0.5]), inputs(), step=3)
    assert scores.rewards == pytest.approx(TOTAL)
    assert list(scores.per_func) == ["accuracy", "length_penalty", "has_gold"]
    assert scores.per_func["accuracy"] == BUILTIN and scores.per_func["has_gold"] == GOLD
    assert scores.per_func["length_penalty"] == pytest.approx(LENGTH)
    assert (scores.errors, scores.timeouts, scores.failures) == (0, 0, [])
    assert [c["correct"] for c in scores.components] == [True, False, False, True]


def test_mode_none_replaces_the_builtin_and_functions_get_trls_arguments():
    section = RewardConfig(mode="none", funcs=[F + "echo_step", F + "async_half"])
    with RewardPool(workers=0) as pool:
        scores = score_step(pool, RewardSet.from_section(section), inputs(), step=7)
    assert scores.rewards == [7.5] * 4 and list(scores.per_func) == ["echo_step", "async_half"]
    assert scores.components == [{}] * 4  # no built-in: no accuracy components


@pytest.mark.parametrize("func, reason", [("raises", "RuntimeError: boom"),
                                          ("wrong_length", "returned 1 scores for 2 completions"),
                                          ("not_a_number", "score 0 is 'high' (str)")])
def test_a_failing_function_is_counted_and_named_once_never_scored(func, reason):
    with RewardPool(workers=1, timeout=60.0) as pool:
        first = score_step(pool, rewards(func), inputs(), step=0)
        second = score_step(pool, rewards(func), inputs(), step=1)
    assert first.rewards == BUILTIN and first.per_func[func] == [None] * 4  # left out, not -1
    assert (first.errors, first.timeouts) == (4, 0) and second.errors == 4
    assert len(first.failures) == 1 and first.failures[0][0] == func and reason in first.failures[0][1]
    assert second.failures == []  # named once per run


def test_a_hung_function_costs_its_group_only():
    # The limit of a call is the pool's per-response timeout x G = 2 s; the other group is scored.
    with RewardPool(workers=2, timeout=1.0) as pool:
        scores = score_step(pool, rewards("hangs_on_hang", mode="none"), inputs(["hang", "x", "a", "b"]), step=0)
    assert scores.per_func["hangs_on_hang"] == [None, None, 1.0, 1.0] and scores.rewards == [0.0, 0.0, 1.0, 1.0]
    assert (scores.timeouts, scores.errors) == (2, 0) and "ran past 2 s" in scores.failures[0][1]


@pytest.mark.parametrize("spec, reason", [
    ("__main__:my_reward", "is defined in __main__ (the script being run)"),
    ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
    (F + "nope", "has no attribute 'nope'"),
    (F + "NOT_CALLABLE", "is not a function (its type is int)"),
    (F + "no_kwargs", "takes no **kwargs"),
    ("tests.reward_fns.length_penalty", "is not of the form 'module:function'"),
])
def test_a_function_the_workers_cannot_import_is_refused_with_the_reason(spec, reason):
    with pytest.raises(RewardFuncError, match=reason.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        check_reward_func(spec)
    check_reward_func(F + "length_penalty")


def test_run_refuses_a_function_from_main_before_any_work(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "kind: grpo\nmodel: {tokenizer: words, build: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
        " num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16}}\n"
        "data: {synthetic: {difficulty: easy, n: 8, seed: 1}, prompt_style: demo}\n"
        "reward: {funcs: ['__main__:my_reward'], workers: 0}\n")
    assert run.main(["--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: reward.funcs[0]: '__main__:my_reward' is defined in __main__ (the script being "
                   "run); the reward workers are separate processes that cannot import it: move it into a module "
                   "and name that"]


def test_a_failing_builtin_reward_is_named_once_too():
    from .test_rewards_pool import Raises
    with RewardPool(workers=0) as pool:
        first = score_step(pool, RewardSet(Raises(), "reward_fn"), inputs(), step=0)
        second = score_step(pool, RewardSet(Raises(), "reward_fn"), inputs(), step=1)
    assert first.rewards == [-1.0] * 4 and (first.errors, second.errors) == (4, 4)  # the built-in's failure: wrong
    assert first.failures == [("reward_fn", "RuntimeError: boom")] and second.failures == []
