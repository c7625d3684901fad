"""Fuzz: random strings and tag soups never make the reward, extraction or format checks raise,
and every call stays inside its time limit."""
import random
import string
import time

from rewards import extract_answer, is_equivalent, parallel_stats, parallel_stats_ids

from .test_rewards_schedule import make_reward

PIECES = ["<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>", "<Path", "Parallel>",
          "{", "}", "{{", "}}", "\\boxed{", "\\boxed {", "\\fbox{", "Final Answer:", "final answer:", "\n",
          " ", "$", "\\$", "%", "\\%", ".", ",", "1,080", "-", "0.5", "18", "9^9^9^9", "^{", "\\frac{",
          "\\sqrt{", "\\left(", "\\right)", "(", ")", "[", "]", "\\{", "\\}", "\\infty", "\\pi", "x", "=",
          "\\text{", "dollars", "**", "/", "\\", "i", "e", "\\circ", "−", "∞", "\x00", "é", "😀"]
GOLDS = ["18", "0.5", "\\frac{1}{2}", "(1,2)", "50\\%", "x^2+1", "\\text{(C)}", "1080", "-3", "\\pi"]


def tag_soup(rng: random.Random, max_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def noise(rng: random.Random, max_chars: int) -> str:
    alphabet = string.printable + "{}{}\\\\$$<>/" + "éπ∞😀\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_chars)))


def test_extraction_and_format_checks_never_raise():
    rng = random.Random(0)
    tag_ids = (101, 102, 103, 104, 105, 106)
    slowest = 0.0
    for index in range(4000):
        text = tag_soup(rng, 60) if index % 2 else noise(rng, 300)
        start = time.perf_counter()
        answer = extract_answer(text)
        stats = parallel_stats(text)
        ids_stats = parallel_stats_ids([rng.choice((1, 2, 101, 102, 103, 104, 105, 106)) for _ in range(50)],
                                       tag_ids, {1})
        slowest = max(slowest, time.perf_counter() - start)
        assert answer is None or isinstance(answer, str)
        assert stats.well_formed == (stats.reasons == ()) and isinstance(ids_stats.num_blocks, int)
        assert stats.first_block_position is None or 0.0 <= stats.first_block_position < 1.0
        assert stats.num_blocks <= len(stats.paths_per_block)
    assert slowest < 0.1, slowest  # pure string scanning, no symbolic work


def test_reward_never_raises_and_stays_within_its_time_limit():
    rng = random.Random(1)
    reward_fn = make_reward(mode="alternating", timeout=1.0)
    is_equivalent("x+1", "1+x")  # start the checker process before timing
    times, verdicts = [], {}
    for index in range(2000):
        gold = rng.choice(GOLDS)
        text = tag_soup(rng, 40) if index % 3 else noise(rng, 200)
        if index % 4 == 0:  # make sure many responses carry an answer to check
            text += "\nFinal Answer: " + tag_soup(rng, 6)
        elif index % 4 == 1:
            text += "\nFinal Answer: " + gold
        if index % 500 == 2:  # a tower that hangs sympy: killed at the limit
            text += "\nFinal Answer: 9^{9^{9^{9}}}"
        start = time.perf_counter()
        reward, parts = reward_fn(text, gold, step=rng.randint(0, 30))
        times.append(time.perf_counter() - start)
        assert reward in (1.0, 1.2, -1.0) and isinstance(parts, dict)
        verdicts[parts["verdict"]] = verdicts.get(parts["verdict"], 0) + 1
    print(f"\nfuzz reward calls: max {max(times):.3f} s, mean {sum(times) / len(times) * 1000:.1f} ms, "
          f"verdicts {verdicts}")
    assert verdicts["timeout"] == 4 and verdicts["equal"] > 400
    # A check that times out costs its 1 s limit; the next call may also wait for the killed
    # checker's replacement to start (well under a second).
    assert max(times) < 1.0 + 1.5


ADVERSARIAL = [
    "\\boxed{" * 20_000 + "x",                                  # a repetition loop of unclosed boxes
    "Final Answer: 1 " + "a" * 50_000 + "!",                    # letter runs (regex backtracking)
    "Final Answer: " + "$" * 50_000,
    "Final Answer: " + "1," * 30_000 + "0",
    "<Parallel><Path>" * 20_000,
    ("<Parallel><Path>x</Path><Path>y</Path></Parallel>\n<Summary>s</Summary>\n") * 3_000,
    "{" * 50_000 + "}" * 50_000,
    "Final Answer:\n" * 20_000,
    "\\frac{" * 10_000 + "1" + "}" * 10_000,
]


def test_long_adversarial_inputs_stay_fast_outside_the_checker():
    # Everything that runs in the caller's process (not in the killable checker) must be close
    # to linear in the response length. Quiet, each of these 50k-320k character responses takes
    # under 0.05 s; a quadratic pass over them would take minutes. The best of three runs under a
    # 2 s limit keeps a busy machine (or a collector pause) from deciding the test.
    from rewards.math import _canonical_text, _plain_number

    def run(text):
        start = time.perf_counter()
        answer = extract_answer(text)
        parallel_stats(text)
        if answer is not None:
            _canonical_text(answer)
            _plain_number(answer)
        return time.perf_counter() - start

    for text in ADVERSARIAL:
        assert min(run(text) for _ in range(3)) < 2.0, text[:40]


def test_long_adversarial_rewards_stay_within_the_time_limit():
    reward_fn = make_reward(mode="alternating", timeout=1.0)
    is_equivalent("x+1", "1+x")
    for text in ADVERSARIAL[:4]:
        start = time.perf_counter()
        reward, parts = reward_fn(text, "18", step=9)
        assert reward == -1.0 and time.perf_counter() - start < 1.0 + 1.5, (text[:40], parts)
