"""rewards/math.py: answer extraction, equivalence on real benchmark answers, the time limit."""
import json
import os
import random
import threading
import time

import pytest

from rewards import extract_answer, is_equivalent, judge_equivalence
from rewards.math import symbolic_equal

from .conftest import data_file


def read_jsonl(path: str) -> list[dict]:
    with open(path) as lines:
        return [json.loads(line) for line in lines]


# ---------------------------------------------------------------- extract_answer

@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\nFinal Answer: 7", "7"),
    ("Final Answer: 5\nwait, no.\nFinal Answer: 7.", "7"),                   # the last one wins
    ("\\boxed{3}\nFinal Answer: 4", "4"),                                   # Final Answer beats boxed
    ("Final Answer: 4 \n\\boxed{3}", "4"),                                  # ... wherever the box is
    ("Final Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),                      # surrounding $ and period
    ("Final Answer: \\$18.", "\\$18"),                                      # a currency \$ stays
    ("**Final Answer:** 19", "19"),                                         # markdown bold
    ("Final Answer:\n\n  42\n", "42"),                                      # answer on the next line
    ("Final Answer: \\boxed{12}", "12"),                                    # a box inside is unwrapped
    ("Final Answer: 1,080 dollars", "1,080 dollars"),                       # rest of the line
    ("the answer is \\boxed{\\frac{a}{b}} done", "\\frac{a}{b}"),           # nested braces
    ("\\boxed{1} then \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # the last box
    ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"),
    ("\\boxed{2} and a cut-off \\boxed{\\frac{1", "2"),                      # unbalanced: earlier box
    ("no answer here", None),
    ("Final Answer:", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------- hand-written equivalence table

EQUAL = [
    ("18", "18"), ("$1,080.", "1080"), ("1,080", "1080"), ("\\$1,080", "1080"), ("18 dollars", "18"),
    ("$18.00", "18"), ("18.", "18"), ("-5", "-5"), ("−5", "-5"), ("1,000,000", "1000000"),
    ("5 \\text{ cm}", "5"), ("90^\\circ", "90"), ("90", "90^\\circ"),
    ("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "1/2"), ("\\dfrac{3}{4}", "0.75"),
    ("\\frac12", "0.5"), ("0.333333", "\\frac{1}{3}"), ("2.50", "2.5"), ("3.0", "3"),
    ("50%", "50"), ("50", "50\\%"), ("0.5", "50%"), ("50\\%", "50%"),
    ("(1,2)", "(1, 2)"), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(3, pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("[1, 2)", "[1,2)"),
    ("(-\\infty, 0]", "(-\\infty,0]"), ("\\{1, 2\\}", "\\{2, 1\\}"), ("1, -2", "-2, 1"),
    ("(6,31,-1)", "(6, 31, -1)"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("2\\sqrt{3}", "\\sqrt{12}"), ("x=5", "5"),
    ("p-q", "-q+p"), ("x^2+2x+1", "(x+1)^2"), ("\\pi", "\\pi"), ("6-5i", "6 - 5i"),
    ("\\text{Evelyn}", "\\text{Evelyn}"), ("\\$32,\\!348", "32348"), ("11\\sqrt2", "11\\sqrt{2}"),
    ("2^{10}", "1024"), ("\\cot x", "\\cot x"),
]
UNEQUAL = [
    ("17", "18"), ("1,080", "1008"), ("18 dollars", "19"), ("0.5", "50"), ("1/3", "0.33"),
    ("\\frac{1}{2}", "0.25"), ("(1,2)", "[1,2]"), ("(1,2]", "[1,2)"), ("(1,2,3)", "(1,2)"),
    ("\\{1, 2\\}", "\\{1, 3\\}"), ("2\\sqrt{3}", "3\\sqrt{2}"), ("x^2+1", "(x+1)^2"),
    ("\\pi", "3"), ("6+5i", "6-5i"), ("-5", "5"), ("x=5", "6"), ("50%", "5"),
    ("\\text{Evelyn}", "\\text{Bob}"), ("", "18"), (None, "18"), ("9^9^9^9", "1"),
    ("2", "2\\pi"), ("12", "1,2"),
]


@pytest.mark.parametrize("pred, gold", EQUAL)
def test_equivalent_pairs(pred, gold):
    assert is_equivalent(pred, gold) is True


@pytest.mark.parametrize("pred, gold", UNEQUAL)
def test_unequal_pairs(pred, gold):
    assert is_equivalent(pred, gold) is False


def test_percent_convention_is_one_sided():
    # Gold 50% accepts 50 and 0.5; without a % sign on either side 0.5 and 50 differ.
    assert is_equivalent("50", "50%") and is_equivalent("0.5", "50%") and is_equivalent("50%", "0.5")
    assert not is_equivalent("0.5", "50") and not is_equivalent("50", "0.5")


# ---------------------------------------------------------------- real data, every row

def test_gsm8k_every_solution_answer_equals_gold():
    rows = read_jsonl(data_file("gsm8k_test.jsonl"))
    assert len(rows) == 1319
    unequal = [row["id"] for row in rows
               if not is_equivalent(row["solution_raw"].split("####")[-1], row["answer"])]
    assert unequal == []


def test_math500_every_answer_equals_itself_boxed_and_after_final_answer():
    rows = read_jsonl(data_file("math500_test.jsonl"))
    assert len(rows) == 500
    boxed = [r["answer"] for r in rows
             if not is_equivalent(extract_answer(f"So we get \\boxed{{{r['answer']}}}"), r["answer"])]
    final = [r["answer"] for r in rows
             if not is_equivalent(extract_answer(f"Work.\nFinal Answer: {r['answer']}"), r["answer"])]
    assert boxed == [] and final == []


def test_math500_every_answer_parses_and_verifies_symbolically():
    # The string fast path accepts identical answers on its own; this pins that math-verify
    # (the path that decides every non-identical pair) also reads every gold form of MATH-500.
    rows = read_jsonl(data_file("math500_test.jsonl"))
    assert [r["answer"] for r in rows if not symbolic_equal(r["answer"], r["answer"])] == []


@pytest.mark.parametrize("name, limit", [("gsm8k_test.jsonl", 0.02), ("math500_test.jsonl", 0.05)])
def test_shuffled_pairs_are_mostly_unequal(name, limit):
    golds = [row["answer"] for row in read_jsonl(data_file(name))]
    shuffled = golds[:]
    random.Random(0).shuffle(shuffled)
    equal = [(p, g) for p, g in zip(shuffled, golds) if is_equivalent(p, g)]
    assert len(equal) / len(golds) < limit
    # The few equal pairs are the same answer written the same or an equivalent way.
    assert all(p == g or (p, g) == ("90", "90^\\circ") for p, g in equal), equal


# ---------------------------------------------------------------- time limit in any thread

TOWERS = ["9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "\\frac{1}{9^{9^{9^{9}}}}"]


def timed_verdict(pred: str, gold: str, timeout: float) -> tuple[str, float]:
    start = time.perf_counter()
    verdict = judge_equivalence(pred, gold, timeout=timeout)
    return verdict, time.perf_counter() - start


@pytest.mark.parametrize("tower", ["9^9^9^9"] + TOWERS)
def test_towers_are_false_within_the_time_limit_in_the_main_thread(tower):
    assert is_equivalent("x+1", "1+x")  # the checker process is up before the clock starts
    verdict, seconds = timed_verdict(tower, "1", timeout=1.5)
    assert verdict in ("unequal", "timeout") and seconds < 1.5 + 1.0


def test_tower_is_false_within_the_time_limit_in_a_worker_thread():
    assert is_equivalent("x+1", "1+x")
    results = []
    thread = threading.Thread(target=lambda: results.append(timed_verdict(TOWERS[0], "1", 1.5)))
    thread.start()
    thread.join(timeout=30)
    (verdict, seconds), = results
    assert verdict == "timeout" and seconds < 1.5 + 1.0
    assert is_equivalent("\\frac{1}{2}", "0.5")  # the killed checker was replaced


def test_threads_check_at_the_same_time(tmp_path):
    # Each thread takes a checker process of its own: a check that hangs does not block the others. The
    # hanging check waits on an event (a FIFO that the test opens once the others are done), not on a
    # clock, and the checks meant to pass get a generous limit, so a busy machine cannot decide the result.
    from rewards.math import _CHECKERS
    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    hung = threading.Thread(target=lambda: _CHECKERS.call(os.open, (fifo, os.O_RDONLY), timeout=300))
    hung.start()
    results = {}

    def check(name, pred, gold):
        results[name] = judge_equivalence(pred, gold, timeout=120)

    threads = [threading.Thread(target=check, args=("square", "x^2+2x+1", "(x+1)^2")),
               threading.Thread(target=check, args=("sqrt", "\\sqrt{12}", "2\\sqrt{3}"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == {"square": "equal", "sqrt": "equal"}
    assert hung.is_alive()  # still waiting for its event: the two checks did not queue behind it
    os.close(os.open(fifo, os.O_WRONLY))  # the event
    hung.join(timeout=300)
    assert not hung.is_alive()


def test_checker_process_has_its_memory_capped():
    import resource

    from rewards.math import _CHECKERS, CHECKER_MEMORY_LIMIT
    soft, _ = _CHECKERS.call(resource.getrlimit, (resource.RLIMIT_AS,), timeout=5.0)
    assert soft == CHECKER_MEMORY_LIMIT


def test_zero_timeout_is_an_error_not_a_kill():
    assert judge_equivalence("x^2", "x*x", timeout=0) == "error"
