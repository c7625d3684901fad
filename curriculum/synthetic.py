"""The CPU demo's task: short integer word problems (easy: 1 or 2 operations, hard: 3 or 4; mixed: either, drawn
per problem), their parallel-format and plain solutions, and DEMO_WORDS, the vocabulary for
`build_word_tokenizer` under which every question, solution and demo prompt encodes without `<unk>`."""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import replace
from functools import partial

from .data import Example, write_jsonl  # write_jsonl is re-exported: the demo writes its sets with it
from .prompts import DEMO_INSTRUCTION, DEMO_PLAIN_INSTRUCTION

NAMES = {"tom": "he", "sam": "he", "ben": "he", "max": "he", "ann": "she", "mia": "she", "eva": "she",
         "lily": "she"}
OBJECTS = ("apples", "eggs", "cookies", "pens", "cards", "books", "coins", "shells")
EDIBLE = ("apples", "eggs", "cookies")
GAIN_VERBS = ("buys", "finds", "gets")
LOSS_VERBS = ("gives away", "loses", "sells")  # + "eats" for EDIBLE objects
# difficulty -> allowed numbers of operations, one drawn per problem with equal chances. Easy problems have one
# or two: with exactly two, a question of 3-4 clauses always held 1-2 distractors, so "the count changes twice"
# fitted every cold-start solution as well as reading which clauses name another object; the structured
# variant learned that shortcut (41% of the real operations of held-out hard problems written as "+0").
DIFFICULTIES = {"easy": (1, 2), "hard": (3, 4)}
# a mix -> the difficulties its problems are drawn from, one entry per problem with equal chances: the demo's
# last RL stage trains on every difficulty (the paper's general-math stage), so it learns the hard problems
# without unlearning the easy ones (trained on hard problems only, it lost 23 points of easy accuracy)
MIXES = {"mixed": ("easy", "hard"), "mixed_hard": ("easy", "hard", "hard")}  # mixed_hard: one easy in three
# difficulty -> (fewest, most) distractor clauses: a change to another object ("buys 3 pens"), which leaves
# the asked count alone; at most MAX_CLAUSES clauses in all. Easy questions have 1 to 4 clauses, so the
# cold start teaches one step per clause rather than "two steps, then stop" (trained on exactly two
# clauses, the model never wrote a third step on a hard problem). Hard questions have distractors too, so
# that GRPO on them cannot unlearn skipping distractors.
DISTRACTORS = {"easy": (0, 2), "hard": (0, 1)}
MAX_CLAUSES = 4
START, AMOUNT = (2, 20), (1, 9)  # ranges of the starting count and of each change

_TASK_WORDS = ("has how many now in out path one two eats".split()
               + [w for v in GAIN_VERBS + LOSS_VERBS for w in v.split()])
# the answer line, the chat template's roles, and whatever words the demo instructions use
_FRAME_WORDS = ["Final", "Answer", "system", "user", "assistant"] + re.findall(
    r"[A-Za-z]+", (DEMO_INSTRUCTION + " " + DEMO_PLAIN_INSTRUCTION).replace("{question}", ""))
DEMO_WORDS = tuple(sorted(set(NAMES) | set(NAMES.values()) | set(OBJECTS) | set(_TASK_WORDS)
                          | set(_FRAME_WORDS)))


def _signs(rng: random.Random, n_ops: int) -> list[str]:
    """Gains and losses in random order, at most two of each: easy problems show one of each and every mix of two
    (totals of 0, 1 or 2 numbers in the regrouped path), and a hard problem's totals are again lists of
    at most two numbers, so its regrouped solution is made of pieces the cold start taught."""
    if n_ops <= 2:
        return [rng.choice("+-") for _ in range(n_ops)]
    signs = ["+", "-"] + [rng.choice("+-")] if n_ops == 3 else ["+", "+", "-", "-"]
    rng.shuffle(signs)
    return signs


def _draw_ops(rng: random.Random, start: int, n_ops: int, obj: str) -> list[list]:
    """Operations as [sign, amount, verb]; a loss never exceeds the current count (the order of the signs
    is redrawn until the count stays above zero before every loss)."""
    losses = LOSS_VERBS + (("eats",) if obj in EDIBLE else ())
    while True:
        ops, value = [], start
        for sign in _signs(rng, n_ops):
            if sign == "-" and value < 1:
                break
            hi = AMOUNT[1] if sign == "+" else min(AMOUNT[1], value)
            amount = rng.randint(AMOUNT[0], hi)
            value += amount if sign == "+" else -amount
            ops.append([sign, amount, rng.choice(GAIN_VERBS if sign == "+" else losses)])
        if len(ops) == n_ops:
            return ops


def _add_distractors(rng: random.Random, ops: list[list], obj: str, n: int) -> list[list]:
    """Inserts `n` clauses ["0", amount, verb, other object] at random places among the operations."""
    for _ in range(n):
        other = rng.choice([o for o in OBJECTS if o != obj])
        sign = rng.choice("+-")
        verb = rng.choice(GAIN_VERBS if sign == "+" else LOSS_VERBS + (("eats",) if other in EDIBLE else ()))
        ops.insert(rng.randint(0, len(ops)), ["0", rng.randint(*AMOUNT), verb, other])
    return ops


def _question(name: str, obj: str, start: int, ops: list[list]) -> str:
    """ "tom has 14 cards. he finds 9, buys 3 pens, gives away 5. how many cards now?" (short: every
    space is a token; only a distractor names its object)"""
    changes = ", ".join(" ".join([verb, str(k), *other]) for _, k, verb, *other in ops)
    return f"{name} has {start} {obj}. {NAMES[name]} {changes}. how many {obj} now?"


def problem_answer(start: int, ops: list[list]) -> int:
    """The count after applying `ops` to `start` (distractors, sign "0", change nothing)."""
    return start + sum({"+": k, "-": -k}.get(sign, 0) for sign, k, *_ in ops)


def make_problems(n: int, difficulty: str, seed: int, exclude=(), solution: str | None = None,
                  independent_paths: bool = False) -> list[Example]:
    """`n` distinct problems, deterministic in (difficulty, seed); different seeds give mostly
    different problems. A mix (MIXES) draws each problem's difficulty in turn, and its meta says which.
    meta = {"difficulty", "start", "ops"}: ops lists the question's clauses in order,
    [sign, amount, verb] for an operation ("+" or "-") and ["0", amount, verb, object] for a distractor.

    exclude: examples (e.g. a held-out test set) whose numbers (start and ops) must not recur here.
    solution: None, "parallel" or "plain" fills `Example.solution` with that target; "mixed": the even-numbered
    problems parallel, the odd ones plain (a cold start that leaves RL a parallel ratio to move; the reward study).
    independent_paths: parallel solutions whose paths are independent draws of a form (parallel_solution).
    """
    if difficulty not in DIFFICULTIES and difficulty not in MIXES:
        raise ValueError(f"unknown difficulty {difficulty!r}; valid: {list(DIFFICULTIES) + list(MIXES)}")
    if solution not in (None, "parallel", "plain", "mixed"):
        raise ValueError(f"solution={solution!r}; valid: None, 'parallel', 'plain', 'mixed'")
    rng = random.Random(f"synthetic-{difficulty}-{seed}")  # str seeds are stable across runs
    banned = {_signature(ex.meta) for ex in exclude}
    seen, out = set(), []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        level = rng.choice(MIXES[difficulty]) if difficulty in MIXES else difficulty
        name, obj = rng.choice(sorted(NAMES)), rng.choice(OBJECTS)
        start = rng.randint(*START)
        ops = _draw_ops(rng, start, rng.choice(DIFFICULTIES[level]), obj)
        fewest, most = DISTRACTORS[level]
        if most:
            ops = _add_distractors(rng, ops, obj, min(rng.randint(fewest, most), MAX_CLAUSES - len(ops)))
        meta = {"difficulty": level, "start": start, "ops": ops}
        question = _question(name, obj, start, ops)
        if question in seen or _signature(meta) in banned:
            continue
        seen.add(question)
        ex = Example(f"{difficulty}-{seed}-{len(out)}", question, str(problem_answer(start, ops)), meta=meta)
        out.append(ex)
    if len(out) < n:
        raise ValueError(f"make_problems: only {len(out)} distinct {difficulty} problems found for n={n}; "
                         "ask for fewer or exclude fewer")
    if solution is not None:
        parallel = partial(parallel_solution, independent_paths=independent_paths)
        out = [replace(ex, solution=parallel(ex) if solution == "parallel" or (solution == "mixed" and i % 2 == 0)
                       else plain_solution(ex)) for i, ex in enumerate(out)]
    return out


def synthetic_sets(spec: dict, exclude=(), independent_paths: bool = False) -> list[Example]:
    """The demo task from a config dict (data.synthetic or a benchmark's `synthetic`): {difficulty, n, seed,
    solution?}. independent_paths: see parallel_solution (the structured variant's cold start)."""
    unknown = set(spec) - {"difficulty", "n", "seed", "solution"}
    if unknown:
        raise ValueError(f"data.synthetic: unknown keys {sorted(unknown)}; use difficulty, n, seed, solution")
    return make_problems(spec["n"], spec["difficulty"], spec.get("seed", 0), exclude=exclude,
                         solution=spec.get("solution"), independent_paths=independent_paths)


def _signature(meta: dict) -> tuple:
    return meta["start"], tuple((sign, k) for sign, k, *_ in meta["ops"])  # the numbers, not the verbs


def _in_order(start: int, ops: list[list]) -> str:
    """ "12+5=17. 17+0=17. 17-3=14." : one step per clause; a distractor adds 0."""
    steps, value = [], start
    for sign, k, *_ in ops:
        if sign == "0":
            steps.append(f"{value}+0={value}.")
            continue
        new = value + k if sign == "+" else value - k
        steps.append(f"{value}{sign}{k}={new}.")
        value = new
    return " ".join(steps)


def _total(amounts: list[int]) -> str:
    """ "5", "5+4=9" or "0": a running total written out."""
    if len(amounts) < 2:
        return str(sum(amounts))
    return "+".join(map(str, amounts)) + f"={sum(amounts)}"


def _regrouped(start: int, ops: list[list]) -> str:
    """Total in, total out (distractors left out), the net change, then the start plus or minus the net;
    every number stays non-negative because the net is taken as larger minus smaller."""
    gains = [k for sign, k, *_ in ops if sign == "+"]
    losses = [k for sign, k, *_ in ops if sign == "-"]
    total_in, total_out = sum(gains), sum(losses)
    net = abs(total_in - total_out)
    steps = [f"in {_total(gains)}.", f"out {_total(losses)}."]
    if total_in >= total_out:
        steps += [f"{total_in}-{total_out}={net}.", f"{start}+{net}={start + net}."]
    else:
        steps += [f"{total_out}-{total_in}={net}.", f"{start}-{net}={start - net}."]
    return " ".join(steps)


def parallel_solution(example: Example, independent_paths: bool = False) -> str:
    """Cold-start target: two independent paths (in order; regrouped), the summary, the answer.

    independent_paths (the structured variant's cold start): each path is in order or regrouped, drawn
    per path and question, so a quarter of the solutions hold two in-order paths and a quarter two regrouped
    ones. The structured sampler writes each path without seeing the other, so half of its blocks hold two
    paths of one form; a cold start that never showed such a pair left the summary garbled after them (7.6%
    of held-out responses malformed, 116 of the 122 after two in-order paths).

    The summary cites one path, "path one" or "path two" (half the problems each, fixed per question),
    and copies that path's last equation. On easy problems both paths agree, so the choice is a coin flip
    the cold start cannot learn to make; on hard problems the in-order path (one step per clause) is right
    more often, so there the choice matters and GRPO can learn it (the causal demo's stage 2 cites the in-order
    path in 67% of hard responses, against 56% after the cold start). In the causal solution the in-order
    path comes first: written second, it copied the regrouped path's numbers. The demo's SFT set
    uses easy problems only; the format holds for any number of operations."""
    start, ops, answer = example.meta["start"], example.meta["ops"], example.answer
    paths = [_in_order(start, ops), _regrouped(start, ops)]
    if independent_paths:
        paths = [paths[random.Random(f"{example.question} path {k}").randrange(2)] for k in range(2)]
    cite = zlib.crc32(example.question.encode()) % 2  # 0: path one, 1: path two
    last = paths[cite].rsplit(" ", 1)[-1]  # "23-5=18."
    return (f"<Parallel>\n<Path> {paths[0]} </Path>\n<Path> {paths[1]} </Path>\n</Parallel>\n"
            f"<Summary> path {('one', 'two')[cite]}: {last} </Summary>\nFinal Answer: {answer}")


def plain_solution(example: Example) -> str:
    """The causal baseline's target: the in-order computation and the answer line."""
    return f"{_in_order(example.meta['start'], example.meta['ops'])}\nFinal Answer: {example.answer}"


__all__ = ["DEMO_WORDS", "DEMO_INSTRUCTION", "DEMO_PLAIN_INSTRUCTION", "make_problems", "parallel_solution",
           "plain_solution", "problem_answer", "write_jsonl", "Example"]
