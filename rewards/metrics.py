"""Scoring metrics over several samples per problem: mean@k and the unbiased pass@k.

Implements DESIGN.md "rewards/" (scoring metrics) as used by the evaluation on AIME/AMC/MATH.
"""
from collections import defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k / i), which never forms the huge binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"pass_at_k {name}={value!r} is invalid; it must be an integer >= 0")
    if k > n or c > n:
        raise ValueError(f"pass_at_k needs k <= n and c <= n, got n={n}, c={c}, k={k}")
    if k == 0:
        return 0.0
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    missing = 1.0
    for i in range(n - c + 1, n + 1):
        missing *= 1.0 - k / i
    return 1.0 - missing


def mean_at_k(correct) -> float:
    """Mean accuracy over the samples of each problem, averaged over problems.

    correct: list[list[bool]] (problems x samples), or a flat list[bool] taken as one problem.
    """
    problems = list(correct)
    if problems and not isinstance(problems[0], (list, tuple)):
        problems = [problems]
    if not problems or any(len(samples) == 0 for samples in problems):
        raise ValueError("mean_at_k needs at least one problem and at least one sample per problem")
    return sum(sum(map(bool, samples)) / len(samples) for samples in problems) / len(problems)


def aggregate_by_problem(problem_ids: list, correct: list[bool], k: int | None = None) -> dict:
    """Group flat per-sample results by problem: {"mean_at_k", "pass_at_k", "problems", "samples"}.

    k defaults to the smallest number of samples of any problem; pass@k averages over problems.
    """
    if len(problem_ids) != len(correct):
        raise ValueError(f"problem_ids and correct must have the same length, got "
                         f"{len(problem_ids)} and {len(correct)}")
    groups: dict = defaultdict(list)
    for problem, ok in zip(problem_ids, correct):
        groups[problem].append(bool(ok))
    samples = list(groups.values())
    if not samples:
        raise ValueError("aggregate_by_problem needs at least one sample")
    k = min(len(s) for s in samples) if k is None else k
    pass_k = sum(pass_at_k(len(s), sum(s), k) for s in samples) / len(samples)
    return {"mean_at_k": mean_at_k(samples), "pass_at_k": pass_k, "k": k,
            "problems": len(samples), "samples": len(correct)}
