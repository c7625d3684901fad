"""rewards/schedule.py: the alternating table of steps, scaffold, bonus, format penalty, config errors."""
import pickle

import pytest

from curriculum.config import RewardConfig
from rewards import RewardFn, reward_kind

P, P_, A, A_, S, S_ = "<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>"
PARALLEL_RIGHT = f"{P}{A} 9+9=18 {A_}{A} 2*9=18 {A_}{P_}\n{S} 18 {S_}\nFinal Answer: 18"
PARALLEL_WRONG = PARALLEL_RIGHT.replace("Final Answer: 18", "Final Answer: 17")
PLAIN_RIGHT = "9 + 9 = 18.\nFinal Answer: 18"
PLAIN_WRONG = "9 + 9 = 19.\nFinal Answer: 19"
MALFORMED_RIGHT = f"{P}{A} 9+9=18 {A_}{P_}\nFinal Answer: 18"  # one path, no summary
GOLD = "18"



def make_reward(**changes) -> RewardFn:
    """RewardFn with the defaults of the config's reward section (the one place they live), `changes` on top.
    (Here, not in conftest: reward workers import the test module of a reward they run, and this one is light.)"""
    return RewardFn.from_section(RewardConfig(), **changes)


# step -> (correct + well-formed block, correct without blocks, wrong) under the reference S2.
ALTERNATING = {step: (1.2, 1.0, -1.0) if step % 10 in (8, 9) else (1.0, 1.0, -1.0) for step in range(20)}


def test_alternating_table_steps_0_to_19():
    reward_fn = make_reward(mode="alternating")
    for step in range(20):
        got = tuple(reward_fn(text, GOLD, step)[0] for text in (PARALLEL_RIGHT, PLAIN_RIGHT, PLAIN_WRONG))
        assert got == ALTERNATING[step], step
    # Spelled out once, so the table above cannot drift from the reference by construction.
    assert [ALTERNATING[s][0] for s in range(10)] == [1.0] * 8 + [1.2] * 2


def test_alternating_edge_cases_on_a_parallel_step():
    reward_fn = make_reward(mode="alternating")
    assert reward_fn(MALFORMED_RIGHT, GOLD, 9)[0] == 1.0   # correct with malformed blocks
    assert reward_fn(PARALLEL_WRONG, GOLD, 9)[0] == -1.0   # wrong with a perfect block
    assert reward_fn("no answer at all", GOLD, 9)[0] == -1.0


def test_reward_kind_table():
    assert [reward_kind(s, "alternating", window=5, accuracy_steps=3) for s in range(6)] == \
        ["accuracy"] * 3 + ["accuracy+parallel"] * 2 + ["accuracy"]
    assert {reward_kind(s, "accuracy") for s in range(30)} == {"accuracy"}
    assert {reward_kind(s, "parallel_bonus") for s in range(30)} == {"accuracy+bonus"}
    assert reward_kind(9, "alternating", accuracy_steps=10) == "accuracy"
    assert reward_kind(0, "alternating", accuracy_steps=0) == "accuracy+parallel"


def test_accuracy_mode_ignores_blocks():
    reward_fn = make_reward(mode="accuracy")
    assert {reward_fn(PARALLEL_RIGHT, GOLD, s)[0] for s in range(20)} == {1.0}
    assert {reward_fn(PARALLEL_WRONG, GOLD, s)[0] for s in range(20)} == {-1.0}


def test_scaffold_turns_the_parallel_part_off_after_k():
    reward_fn = make_reward(mode="alternating", scaffold_until=18, format_penalty=-0.5)
    assert reward_fn(PARALLEL_RIGHT, GOLD, 18)[0] == 1.2      # step K itself still shaped
    assert reward_fn(MALFORMED_RIGHT, GOLD, 17)[0] == 0.5     # 1.0 - 0.5 while the scaffold lasts
    assert reward_fn(PARALLEL_RIGHT, GOLD, 19)[0] == 1.0      # after K: accuracy only
    assert reward_fn(MALFORMED_RIGHT, GOLD, 19)[0] == 1.0     # ... and no format penalty
    assert reward_fn(PARALLEL_RIGHT, GOLD, 29)[1]["reward_kind"] == "accuracy"
    bonus = make_reward(mode="parallel_bonus", scaffold_until=3)
    assert [bonus(PARALLEL_RIGHT, GOLD, s)[0] for s in (2, 3, 4)] == [1.2, 1.2, 1.0]


def test_parallel_bonus_every_step_right_or_wrong():
    reward_fn = make_reward(mode="parallel_bonus", bonus=0.3)
    for step in (0, 5, 8, 9, 123):
        assert reward_fn(PARALLEL_RIGHT, GOLD, step)[0] == pytest.approx(1.3)
        assert reward_fn(PARALLEL_WRONG, GOLD, step)[0] == pytest.approx(-0.7)
        assert reward_fn(PLAIN_RIGHT, GOLD, step)[0] == 1.0
        assert reward_fn(MALFORMED_RIGHT, GOLD, step)[0] == 1.0


def test_format_penalty_on_malformed_only():
    reward_fn = make_reward(mode="alternating", format_penalty=-0.25)
    assert reward_fn(MALFORMED_RIGHT, GOLD, 0)[0] == 0.75
    assert reward_fn(MALFORMED_RIGHT, GOLD, 9)[0] == 0.75
    assert reward_fn(f"{P}{A} x", GOLD, 0)[0] == -1.25          # wrong and cut off inside a block
    assert reward_fn(PLAIN_RIGHT, GOLD, 0)[0] == 1.0            # no tags is well formed
    assert make_reward(mode="accuracy", format_penalty=-0.25)(MALFORMED_RIGHT, GOLD, 0)[0] == 0.75


def test_configurable_values():
    reward_fn = make_reward(mode="alternating", correct=2.0, wrong=0.0, correct_parallel=3.0, window=4,
                            accuracy_steps=1)
    assert [reward_fn(PARALLEL_RIGHT, GOLD, s)[0] for s in range(5)] == [2.0, 3.0, 3.0, 3.0, 2.0]
    assert reward_fn(PLAIN_WRONG, GOLD, 1)[0] == 0.0


def test_components():
    reward, parts = make_reward(mode="alternating")(PARALLEL_RIGHT, GOLD, 8)
    assert reward == 1.2
    assert parts == dict(reward_kind="accuracy+parallel", accuracy=1.0, correct=True, answer="18",
                         verdict="equal", parallel=1.0, well_formed=True, num_blocks=1, format=1.0,
                         format_penalty=0.0, timeout=False, error="")
    _, parts = make_reward(mode="alternating")(MALFORMED_RIGHT, GOLD, 0)
    assert (parts["parallel"], parts["well_formed"], parts["format"], parts["num_blocks"]) == (0.0, False, 0.0, 0)


def test_never_raises_and_failures_score_wrong():
    reward_fn = make_reward(mode="alternating", wrong=-2.0)
    for response, gold, step in [(None, GOLD, 0), (PLAIN_RIGHT, None, 0), (PLAIN_RIGHT, GOLD, "x"),
                                 (b"bytes", GOLD, 0), (PLAIN_RIGHT, GOLD, None)]:
        reward, parts = reward_fn(response, gold, step)
        assert reward == -2.0 and parts["correct"] is False


def test_picklable():
    reward_fn = make_reward(mode="parallel_bonus", bonus=0.5)
    assert pickle.loads(pickle.dumps(reward_fn)) == reward_fn


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="alternate"), "mode"), (dict(window=0), "window"), (dict(window=2.5), "window"),
    (dict(accuracy_steps=-1), "accuracy_steps"), (dict(accuracy_steps=11), "accuracy_steps"),
    (dict(scaffold_until=-3), "scaffold_until"), (dict(correct="1"), "correct"),
    (dict(wrong=float("nan")), "wrong"), (dict(correct_parallel=None), "correct_parallel"),
    (dict(bonus=float("inf")), "bonus"), (dict(format_penalty=True), "format_penalty"),
    (dict(timeout=0), "timeout"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RewardFn.{field}="):
        make_reward(**kwargs)


def test_unknown_mode_lists_the_modes():
    with pytest.raises(ValueError, match="accuracy, alternating, parallel_bonus"):
        make_reward(mode="s2")
    with pytest.raises(ValueError, match="valid modes"):
        reward_kind(0, "s2")


def test_the_config_section_builds_the_reward():
    """RewardFn keeps no defaults of its own (they disagreed with the config's: mode alternating vs accuracy,
    timeout 5 vs 10 / 2); the reward section of the config builds it, field by field."""
    section = RewardConfig(mode="alternating", window=4, accuracy_steps=3, scaffold_until=7, correct=2.0, wrong=-3.0,
                           correct_parallel=2.5, bonus=0.1, format_penalty=-0.2, workers=5, timeout=8.0)
    fn = RewardFn.from_section(section)
    assert (fn.mode, fn.window, fn.accuracy_steps, fn.scaffold_until, fn.correct, fn.wrong, fn.correct_parallel,
            fn.bonus, fn.format_penalty, fn.timeout) == ("alternating", 4, 3, 7, 2.0, -3.0, 2.5, 0.1, -0.2, 4.0)
    default = RewardFn.from_section(RewardConfig())
    assert (default.mode, default.timeout) == ("accuracy", 5.0)
    assert RewardFn.from_section(section, mode="accuracy").mode == "accuracy"
    with pytest.raises(TypeError):
        RewardFn()
