"""Scores a batch of responses in a few worker processes, with a time limit per response.

Implements the batch side of DESIGN.md "rewards/": one pathological answer cannot stall a
training step; it scores as wrong and its worker is killed (with the checker it started) and replaced.
"""
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import NamedTuple

from .worker import START_TIMEOUT, WorkerFailure, WorkerProcess


@dataclass(frozen=True)
class BatchScores:
    """Scores in input order. `timeouts` counts scores that ran past a time limit (the pool's or the equivalence
    check's), `errors` those that failed otherwise (a worker died, a reward function raised or returned something
    unusable), over every reward function: the trainer logs them (reward/timeouts, reward/errors). `per_func`:
    name -> (N,) scores of each reward function (None where it failed or had no opinion); `failures`: (name,
    reason) of each failure the pool had not named before, for the log (rewards.step)."""
    rewards: list[float]
    components: list[dict]
    seconds: float
    timeouts: int
    errors: int = 0
    per_func: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)


class Job(NamedTuple):
    """One call for a worker: `fn(*args)` within `limit` seconds. A worker first runs `intro` (fn, args) once per
    `key` (untimed: importing a reward's module is not charged to any item's limit)."""
    fn: object
    args: tuple
    limit: float
    key: object
    intro: tuple


class Outcome(NamedTuple):
    """What a Job gave: its value, or `error` (a reason; "" when it ran) and whether it ran past its limit."""
    value: object
    error: str = ""
    timeout: bool = False


def _failed_score(reward_fn, reason: str, timeout: bool) -> tuple[float, dict]:
    # RewardFn knows its own "wrong" value and component keys; any other callable gets -1.
    if hasattr(reward_fn, "score_failure"):
        return reward_fn.score_failure(reason, timeout=timeout)
    return -1.0, {"correct": False, "timeout": timeout, "error": reason}


def _as_score(reward_fn, outcome: Outcome) -> tuple[float, dict]:
    if outcome.error:
        return _failed_score(reward_fn, outcome.error, outcome.timeout)
    try:
        reward, components = outcome.value
        return float(reward), components
    except (TypeError, ValueError) as error:  # a custom reward_fn returning the wrong shape
        return _failed_score(reward_fn, f"bad reward result: {error}", timeout=False)


def _check_batch(responses: list[str], golds: list[str]) -> None:
    if len(responses) != len(golds):
        raise ValueError(f"responses and golds must have the same length, got "
                         f"{len(responses)} responses and {len(golds)} golds")


class RewardPool:
    """`workers` long-lived processes scoring `reward_fn(response, gold, step)`; reuse it across
    steps (`with RewardPool(2) as pool: pool.score(...)`), then `close()`. workers=0 scores in
    this process (no per-response time limit beyond the equivalence check's own)."""

    def __init__(self, workers: int = 2, timeout: float = 10.0):
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"RewardPool workers={workers!r} is invalid; "
                             f"use an integer >= 0 (0 = score in this process)")
        if not timeout > 0:
            raise ValueError(f"RewardPool timeout={timeout!r} is invalid; use seconds > 0")
        self.timeout = timeout
        self.named: set = set()  # (reward name, timeout?) failures already named: each is named once per pool
        self._workers = [self._new_worker() for _ in range(workers)]
        self._knows: dict[int, set] = {}  # slot -> the Job keys its worker has been introduced to

    @staticmethod
    def _new_worker() -> WorkerProcess:
        # warm: each worker starts its equivalence checker before it reports ready (see WorkerProcess)
        return WorkerProcess(preload=("rewards",), warm=True)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill the worker processes; the pool cannot score afterwards."""
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def score(self, reward_fn, responses: list[str], golds: list[str], step: int) -> BatchScores:
        """Scores of responses[i] against golds[i] at `step`, in input order."""
        _check_batch(responses, golds)
        start = time.perf_counter()
        intro = (_unpickled, (reward_fn,))
        outcomes = self.run([Job(reward_fn, (r, g, step), self.timeout, type(reward_fn), intro)
                             for r, g in zip(responses, golds)])
        results = [_as_score(reward_fn, o) for o in outcomes]
        parts = [c if isinstance(c, dict) else {} for _, c in results]
        timeouts = sum(bool(c.get("timeout")) for c in parts)
        errors = sum(bool(c.get("error")) and not c.get("timeout") for c in parts)
        return BatchScores(rewards=[float(r) for r, _ in results], components=[c for _, c in results],
                           seconds=time.perf_counter() - start, timeouts=timeouts, errors=errors)

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """The outcome of every job, in input order: in the workers (a job past its limit is killed with its
        worker, which is replaced), or in this process when there are none (no limit; an exception is its error)."""
        if self._workers:
            return self._run_in_workers(jobs)
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(Outcome(job.fn(*job.args)))
            except Exception as error:
                outcomes.append(Outcome(None, f"{type(error).__name__}: {error}"[:2000]))
        return outcomes

    def _run_in_workers(self, jobs: list[Job]) -> list[Outcome]:
        results: list = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        busy: dict[int, tuple] = {}  # worker slot -> (job index, or None for an introduction to `key`; key, deadline)
        while pending or busy:
            for slot, worker in enumerate(self._workers):
                # only a ready worker takes an item: a replacement (and its checker, see _new_worker) starts
                # outside every item's time limit, while the ready ones go on
                if slot not in busy and pending and worker.poll_ready():
                    job = jobs[pending[0]]
                    if job.key not in self._knows.setdefault(slot, set()):  # its module is imported untimed, too
                        self._submit(slot, *job.intro, START_TIMEOUT)
                        busy[slot] = (None, job.key, time.monotonic() + START_TIMEOUT)
                        continue
                    index = pending.popleft()
                    self._submit(slot, job.fn, job.args, job.limit)
                    busy[slot] = (index, job.key, time.monotonic() + job.limit)
            starting = [w.reply_connection for s, w in enumerate(self._workers) if s not in busy and not w.ready]
            next_deadline = min((deadline for *_, deadline in busy.values()), default=time.monotonic() + START_TIMEOUT)
            ready = wait([self._workers[slot].reply_connection for slot in busy] + (starting if pending else []),
                         timeout=max(0.0, next_deadline - time.monotonic()))
            if not ready and not busy:
                raise WorkerFailure(f"no reward worker process became ready in {START_TIMEOUT:g} s")
            for slot in [s for s in busy if self._workers[s].reply_connection in ready]:
                index, key, _ = busy.pop(slot)
                if index is None:  # the introduction: the worker knows this key now (or cannot: items say why)
                    self._introduced(slot, key)
                else:
                    results[index] = self._receive(slot)
            for slot in [s for s, (*_, d) in busy.items() if d <= time.monotonic()]:
                index, key, _ = busy.pop(slot)
                self._replace(slot)
                if index is None:
                    self._knows[slot] = {key}  # its items get the normal limit from here on
                    continue
                results[index] = Outcome(None, f"scoring ran past {jobs[index].limit:g} s", timeout=True)
        return results

    def _submit(self, slot: int, fn, args: tuple, limit: float) -> None:
        try:
            self._workers[slot].submit(fn, args, limit)
        except WorkerFailure:
            self._replace(slot)  # died between batches: a fresh worker takes the task
            self._workers[slot].submit(fn, args, limit)

    def _receive(self, slot: int) -> Outcome:
        try:
            return Outcome(self._workers[slot].receive())
        except WorkerFailure as error:
            if not self._workers[slot].alive():
                self._replace(slot)
            return Outcome(None, str(error))

    def _introduced(self, slot: int, key) -> None:
        try:
            self._workers[slot].receive()
        except WorkerFailure:
            if not self._workers[slot].alive():
                self._replace(slot)
                return
        self._knows.setdefault(slot, set()).add(key)

    def _replace(self, slot: int) -> None:
        # The new worker starts in the background; it takes items once it has reported ready.
        self._workers[slot].kill()
        self._workers[slot] = self._new_worker()
        self._knows.pop(slot, None)


def _unpickled(reward_fn) -> None:
    """Sent to a worker before its first item of a reward: unpickling the reward imports the module that
    defines it, outside every item's time limit."""


def score_batch(reward_fn, responses: list[str], golds: list[str], step: int,
                workers: int = 2, timeout: float = 10.0) -> BatchScores:
    """One-off batch scoring (starts and stops its own RewardPool; reuse a RewardPool in loops).

    reward_fn: a picklable `(response, gold, step) -> (float, dict)`, e.g. a RewardFn.
    """
    with RewardPool(workers=workers, timeout=timeout) as pool:
        return pool.score(reward_fn, responses, golds, step)
