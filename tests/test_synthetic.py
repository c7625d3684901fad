"""curriculum/synthetic.py: the demo task's problems, solutions, vocabulary and lengths."""
import re
import statistics

import pytest

from curriculum.config import build_config, load_config, pipeline_stages
from curriculum.data import load_examples, write_jsonl
from curriculum.prompts import encode_prompt, format_prompt
from curriculum.stages import load_train_data
from curriculum.synthetic import (DEMO_INSTRUCTION, DEMO_PLAIN_INSTRUCTION, DEMO_WORDS, make_problems,
                                  parallel_solution, plain_solution, synthetic_sets)
from model import add_tag_tokens, build_structure
from model.tokenizer import build_word_tokenizer

EQUATION = re.compile(r"(\d+(?:[+-]\d+)+)=(\d+)")
PATHS = re.compile(r"^<Parallel>\n<Path> (.*) </Path>\n<Path> (.*) </Path>\n</Parallel>\n"
                   r"<Summary> path (one|two): (\S+) </Summary>\nFinal Answer: (\d+)$")


@pytest.fixture(scope="module")
def dtok():
    return build_word_tokenizer(DEMO_WORDS)


@pytest.fixture(scope="module")
def sets():
    return {d: make_problems(300, d, seed=0) for d in ("easy", "hard")}


def running_values(meta):
    """The count after each clause (a distractor repeats the count)."""
    values = [meta["start"]]
    for sign, k, *_ in meta["ops"]:
        values.append(values[-1] + {"+": k, "-": -k, "0": 0}[sign])
    return values


def operations(meta):
    return [op for op in meta["ops"] if op[0] != "0"]


def checked_equations(text):
    """Every "a+b-c=d" in text is true; returns the results in order."""
    results = []
    for lhs, rhs in EQUATION.findall(text):
        assert sum(map(int, re.findall(r"[+-]?\d+", lhs))) == int(rhs), f"wrong arithmetic {lhs}={rhs} in {text!r}"
        results.append(int(rhs))
    return results


def test_deterministic_per_seed(sets):
    assert make_problems(300, "easy", seed=0) == sets["easy"]
    assert make_problems(20, "hard", seed=0) == sets["hard"][:20]
    assert make_problems(50, "easy", seed=0, solution="parallel")[7].solution == parallel_solution(sets["easy"][7])
    with pytest.raises(ValueError, match="easy.*hard"):
        make_problems(3, "medium", seed=0)


def test_difficulty_sets_number_of_ops(sets):
    assert {len(operations(e.meta)) for e in sets["easy"]} == {1, 2}
    assert {len(operations(e.meta)) for e in sets["hard"]} == {3, 4}
    # easy questions carry 0-2 distractors, hard ones 0-1: 1-4 clauses in easy questions, 3-4 in hard ones
    assert {len(e.meta["ops"]) for e in sets["easy"]} == {1, 2, 3, 4}
    # no count of operations is implied by a count of clauses: questions of 2 and of 3 clauses hold 1 or 2
    for n_clauses in (2, 3):
        assert {len(operations(e.meta)) for e in sets["easy"] if len(e.meta["ops"]) == n_clauses} == {1, 2}
    assert {len(e.meta["ops"]) for e in sets["hard"]} == {3, 4}
    assert {len(e.meta["ops"]) - len(operations(e.meta)) for e in sets["hard"]} == {0, 1}
    mixes = {tuple(s for s, *_ in operations(e.meta)) for e in sets["easy"]}
    assert mixes == {("+",), ("-",), ("+", "+"), ("+", "-"), ("-", "+"), ("-", "-")}  # every mix of one or two
    assert all(e.meta["difficulty"] == d for d, exs in sets.items() for e in exs)


@pytest.mark.parametrize("mix,easy_share", [("mixed", 1 / 2), ("mixed_hard", 1 / 3)])
def test_mixed_draws_each_problem_easy_or_hard(mix, easy_share):
    """The demo's last RL stage trains on a mix: each problem is an easy or a hard one, drawn in turn (mixed:
    one in two easy; mixed_hard, the demo's: one in three), built as that difficulty builds it; held-out
    problems stay out as for the others."""
    mixed = make_problems(1000, mix, seed=3)
    levels = [e.meta["difficulty"] for e in mixed]
    sd = (1000 * easy_share * (1 - easy_share)) ** 0.5
    assert set(levels) == {"easy", "hard"} and abs(levels.count("easy") - 1000 * easy_share) <= 5 * sd
    assert max(len(run) for run in "".join(lv[0] for lv in levels).split("h")) < 15  # interleaved, not in blocks
    for e in mixed:
        n_ops, n_clauses = len(operations(e.meta)), len(e.meta["ops"])
        assert n_ops in (1, 2) and n_ops <= n_clauses <= 4 if e.meta["difficulty"] == "easy" else \
            n_ops in (3, 4) and n_clauses - n_ops in (0, 1) and n_clauses <= 4
        assert e.answer == str(running_values(e.meta)[-1]) and e.id.startswith(f"{mix}-3-")
    assert make_problems(1000, mix, seed=3) == mixed and make_problems(100, mix, seed=4) != mixed[:100]
    heldout = make_problems(200, "easy", seed=1001) + make_problems(200, "hard", seed=1002)
    def numbers(examples):  # what exclude compares: the start and the signed amounts, not the words
        return {(e.meta["start"], tuple((sign, k) for sign, k, *_ in e.meta["ops"])) for e in examples}

    assert numbers(heldout) & numbers(mixed)  # without exclude, some held-out problems recur
    train = synthetic_sets({"difficulty": mix, "n": 1000, "seed": 3}, exclude=heldout)
    assert not numbers(heldout) & numbers(train)
    with pytest.raises(ValueError, match="valid: \\['easy', 'hard', 'mixed', 'mixed_hard'\\]"):
        make_problems(3, "medium", seed=0)


def test_answers_recompute_and_stay_non_negative(sets):
    for e in sets["easy"] + sets["hard"]:
        values = running_values(e.meta)
        assert e.answer == str(values[-1])
        assert min(values) >= 0
        assert 2 <= e.meta["start"] <= 20 and all(1 <= k <= 9 for _, k, *_ in e.meta["ops"])
        assert str(e.meta["start"]) in e.question and e.question.endswith("now?")


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_both_paths_reach_the_answer(sets, difficulty):
    for e in sets[difficulty]:
        match = PATHS.match(parallel_solution(e))
        assert match, parallel_solution(e)
        path1, path2, cited, summary, final = match.groups()
        assert checked_equations(path1) == running_values(e.meta)[1:]  # in order, step by step
        for _, k, verb, *other in e.meta["ops"]:
            assert " ".join([verb, str(k), *other]) in e.question
        signs = [s for s, *_ in operations(e.meta)]
        assert signs.count("+") <= 2 and signs.count("-") <= 2  # regrouped totals of at most two numbers
        assert checked_equations(path2)[-1] == int(e.answer)  # regrouped
        assert path2.startswith("in ") and " out " in path2
        assert summary == (path1 if cited == "one" else path2).split()[-1]  # the cited path's last equation
        assert checked_equations(summary) == [int(final)] and final == e.answer
        assert "-" not in re.sub(r"\d-\d", "", path1 + path2)  # no negative numbers anywhere
        plain = plain_solution(e)
        assert checked_equations(plain) == running_values(e.meta)[1:] and plain.endswith(f"Final Answer: {e.answer}")


def test_summary_cites_either_path_half_the_time():
    easy = make_problems(2000, "easy", seed=1, solution="parallel")
    cites = [PATHS.match(e.solution).group(3) for e in easy]
    assert 900 < cites.count("one") < 1100
    assert make_problems(2000, "easy", seed=1, solution="parallel") == easy  # fixed per question


def test_independent_paths_draw_each_form_per_path():
    """The structured variant's cold start: each path is in order or regrouped, drawn per path, so every pair
    of forms occurs (a quarter each); a path is still the same text as in the fixed-order solution, and the
    summary still copies the cited path's last equation."""
    easy = make_problems(2000, "easy", seed=1, solution="parallel", independent_paths=True)
    fixed = make_problems(2000, "easy", seed=1, solution="parallel")
    pairs = []
    for e, f in zip(easy, fixed):
        path1, path2, cited, summary, final = PATHS.match(e.solution).groups()
        written = PATHS.match(f.solution).groups()[:2]  # (in order, regrouped)
        assert path1 in written and path2 in written and final == e.answer
        assert summary == (path1 if cited == "one" else path2).split()[-1]
        pairs.append("".join("R" if p == written[1] else "O" for p in (path1, path2)))
    for pair in ("OO", "OR", "RO", "RR"):
        assert 400 < pairs.count(pair) < 600, (pair, pairs.count(pair))
    assert make_problems(2000, "easy", seed=1, solution="parallel", independent_paths=True) == easy
    assert synthetic_sets({"difficulty": "easy", "n": 2000, "seed": 1, "solution": "parallel"},
                          independent_paths=True) == easy


def test_distractors_name_another_object_and_add_zero(sets):
    with_distractors = [e for d in sets for e in sets[d] if len(e.meta["ops"]) > len(operations(e.meta))]
    assert len(with_distractors) > 250
    for e in with_distractors:
        obj = e.question.split(".")[0].split()[-1]  # "tom has 14 cards" -> cards
        path1, path2 = PATHS.match(parallel_solution(e)).groups()[:2]
        for i, (sign, k, verb, *other) in enumerate(e.meta["ops"]):
            if sign == "0":
                assert other and other[0] != obj and f"{verb} {k} {other[0]}" in e.question
                assert f"+0={running_values(e.meta)[i]}." in path1
        gains = [k for s, k, *_ in operations(e.meta) if s == "+"]
        assert path2.startswith(f"in {'+'.join(map(str, gains)) or 0}")  # the regrouped path skips them


def test_solutions_are_well_formed_blocks(dtok, sets):
    tags = add_tag_tokens(dtok)
    for e in sets["easy"][:20]:
        ids = dtok.encode(parallel_solution(e), add_special_tokens=False)
        assert not build_structure(ids, tags).malformed


def test_no_unknown_words(dtok, sets):
    unk = dtok.unk_token_id
    for e in sets["easy"] + sets["hard"]:
        for text in (e.question, parallel_solution(e), plain_solution(e)):
            assert unk not in dtok.encode(text, add_special_tokens=False), text
        for instruction in (DEMO_INSTRUCTION, DEMO_PLAIN_INSTRUCTION):
            for template in ("chat", "raw"):
                ids, _ = encode_prompt(dtok, format_prompt(e.question, instruction=instruction), template)
                assert unk not in ids
        assert dtok.decode(dtok.encode(e.question, add_special_tokens=False)) == e.question


def test_lengths_are_short(dtok, sets):
    def n_tokens(text):
        return len(dtok.encode(text, add_special_tokens=False))

    def prompt_len(e):
        return len(encode_prompt(dtok, format_prompt(e.question, instruction=DEMO_INSTRUCTION), "chat")[0])

    table = {
        "easy question": [n_tokens(e.question) for e in sets["easy"]],
        "easy parallel solution": [n_tokens(parallel_solution(e)) for e in sets["easy"]],
        "easy question+parallel": [n_tokens(e.question) + n_tokens(parallel_solution(e)) for e in sets["easy"]],
        "easy chat prompt+parallel+eos": [prompt_len(e) + n_tokens(parallel_solution(e)) + 1 for e in sets["easy"]],
        "hard question": [n_tokens(e.question) for e in sets["hard"]],
        "hard chat prompt": [prompt_len(e) for e in sets["hard"]],
        "hard plain solution": [n_tokens(plain_solution(e)) for e in sets["hard"]],
        "hard parallel solution + eos": [n_tokens(parallel_solution(e)) + 1 for e in sets["hard"]],
    }
    for name, v in table.items():
        print(f"{name:32s} min {min(v):4d} mean {statistics.mean(v):6.1f} max {max(v):4d}")
    assert max(table["easy question+parallel"]) <= 160 and min(table["easy question"]) >= 20
    # configs/demo.yaml's limits, as they are today; nothing is cut
    s0 = pipeline_stages(load_config("demo.yaml"))[0]
    assert (s0.sft.max_total_tokens, s0.data.max_prompt_tokens, s0.rollout.max_new_tokens) == (192, 64, 160)
    assert max(table["easy chat prompt+parallel+eos"]) <= s0.sft.max_total_tokens
    assert max(table["hard chat prompt"]) <= s0.data.max_prompt_tokens
    assert max(table["hard parallel solution + eos"]) <= s0.rollout.max_new_tokens  # a right hard solution fits


def test_seeds_give_mostly_different_problems():
    a, b = make_problems(500, "easy", seed=1), make_problems(500, "easy", seed=2)
    assert len({e.question for e in a} & {e.question for e in b}) <= 10
    assert len({e.question for e in a}) == 500  # distinct within a set
    test = make_problems(200, "easy", seed=99)
    train = make_problems(500, "easy", seed=1, exclude=test)
    assert not {(e.meta["start"], str(e.meta["ops"])) for e in train} & {(e.meta["start"], str(e.meta["ops"]))
                                                                        for e in test}


def test_jsonl_round_trip(tmp_path):
    exs = make_problems(10, "easy", seed=3, solution="parallel")
    write_jsonl(exs, str(tmp_path / "easy.jsonl"))
    assert load_examples(str(tmp_path / "easy.jsonl")) == exs


def test_structured_stages_train_on_independent_paths():
    """A stage's synthetic parallel data follows its variant: fixed order (in order, then regrouped) for the
    causal variant, forms drawn per path for the structured one, whose sampler writes paths independently."""
    data = {"synthetic": {"difficulty": "easy", "n": 200, "seed": 1, "solution": "parallel"}}
    pairs_by_variant = {}
    for variant in ("causal", "structured"):
        train, _ = load_train_data(build_config({"variant": variant, "data": data}), {})
        pairs = {tuple(p.startswith("in ") for p in PATHS.match(e.solution).groups()[:2]) for e in train}
        pairs_by_variant[variant] = pairs
    assert pairs_by_variant["causal"] == {(False, True)}
    assert pairs_by_variant["structured"] == {(False, False), (False, True), (True, False), (True, True)}


def test_mixed_solutions_alternate_parallel_and_plain(sets):
    mixed = make_problems(10, "easy", seed=0, solution="mixed")
    assert [e.solution for e in mixed[0::2]] == [parallel_solution(e) for e in sets["easy"][:10:2]]
    assert [e.solution for e in mixed[1::2]] == [plain_solution(e) for e in sets["easy"][1:10:2]]
    with pytest.raises(ValueError, match="mixed"):
        make_problems(3, "easy", seed=0, solution="half")
