"""Scores a batch of responses in a few worker processes, with a time limit per response.

Implements the batch side of DESIGN.md "rewards/": one pathological answer cannot stall a
training step; it scores as wrong and its worker is killed (with the checker it started) and replaced.
"""
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from .worker import START_TIMEOUT, WorkerFailure, WorkerProcess


@dataclass(frozen=True)
class BatchScores:
    """Scores in input order. `timeouts` counts responses whose scoring ran past a time limit (the pool's or
    the equivalence check's), `errors` those whose scoring failed otherwise (a worker died, the reward or
    the checker raised): both scored as wrong, so the trainer logs them (reward/timeouts, reward/errors)."""
    rewards: list[float]
    components: list[dict]
    seconds: float
    timeouts: int
    errors: int = 0


def _failed_score(reward_fn, reason: str, timeout: bool) -> tuple[float, dict]:
    # RewardFn knows its own "wrong" value and component keys; any other callable gets -1.
    if hasattr(reward_fn, "score_failure"):
        return reward_fn.score_failure(reason, timeout=timeout)
    return -1.0, {"correct": False, "timeout": timeout, "error": reason}


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
        self._workers = [self._new_worker() for _ in range(workers)]
        self._knows: dict[int, type] = {}  # slot -> the reward type its worker has unpickled (imported)

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
        if not self._workers:
            results = [self._score_here(reward_fn, r, g, step) for r, g in zip(responses, golds)]
        else:
            results = self._score_in_workers(reward_fn, responses, golds, step)
        parts = [c if isinstance(c, dict) else {} for _, c in results]
        timeouts = sum(bool(c.get("timeout")) for c in parts)
        errors = sum(bool(c.get("error")) and not c.get("timeout") for c in parts)
        return BatchScores(rewards=[float(r) for r, _ in results], components=[c for _, c in results],
                           seconds=time.perf_counter() - start, timeouts=timeouts, errors=errors)

    @staticmethod
    def _score_here(reward_fn, response: str, gold: str, step: int) -> tuple[float, dict]:
        try:
            return reward_fn(response, gold, step)
        except Exception as error:  # a custom reward_fn that raises still scores as wrong
            return _failed_score(reward_fn, f"{type(error).__name__}: {error}", timeout=False)

    def _score_in_workers(self, reward_fn, responses, golds, step) -> list:
        results: list = [None] * len(responses)
        pending = deque(range(len(responses)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (response index, deadline)
        while pending or busy:
            for slot, worker in enumerate(self._workers):
                # only a ready worker takes an item: a replacement (and its checker, see _new_worker) starts
                # outside every item's time limit, while the ready ones go on
                if slot not in busy and pending and worker.poll_ready():
                    if self._knows.get(slot) is not type(reward_fn):  # its module is imported untimed, too
                        self._submit(slot, _unpickled, (reward_fn,))
                        busy[slot] = (None, time.monotonic() + START_TIMEOUT)
                        continue
                    index = pending.popleft()
                    self._submit(slot, reward_fn, (responses[index], golds[index], step))
                    busy[slot] = (index, time.monotonic() + self.timeout)
            starting = [w.reply_connection for s, w in enumerate(self._workers) if s not in busy and not w.ready]
            next_deadline = min((deadline for _, deadline in busy.values()), default=time.monotonic() + START_TIMEOUT)
            ready = wait([self._workers[slot].reply_connection for slot in busy] + (starting if pending else []),
                         timeout=max(0.0, next_deadline - time.monotonic()))
            if not ready and not busy:
                raise WorkerFailure(f"no reward worker process became ready in {START_TIMEOUT:g} s")
            for slot in [s for s in busy if self._workers[s].reply_connection in ready]:
                index, _ = busy.pop(slot)
                if index is None:  # the introduction: the worker knows this reward now (or cannot: items say why)
                    self._introduced(slot, reward_fn)
                else:
                    results[index] = self._receive(slot, reward_fn)
            for slot in [s for s, (_, d) in busy.items() if d <= time.monotonic()]:
                index, _ = busy.pop(slot)
                self._replace(slot)
                if index is None:
                    self._knows[slot] = type(reward_fn)  # its items get the normal limit from here on
                    continue
                reason = f"scoring ran past {self.timeout:g} s"
                results[index] = _failed_score(reward_fn, reason, timeout=True)
        return results

    def _submit(self, slot: int, reward_fn, args: tuple) -> None:
        try:
            self._workers[slot].submit(reward_fn, args, self.timeout)
        except WorkerFailure:
            self._replace(slot)  # died between batches: a fresh worker takes the task
            self._workers[slot].submit(reward_fn, args, self.timeout)

    def _receive(self, slot: int, reward_fn) -> tuple[float, dict]:
        try:
            reward, components = self._workers[slot].receive()
            return float(reward), components
        except WorkerFailure as error:
            if not self._workers[slot].alive():
                self._replace(slot)
            return _failed_score(reward_fn, str(error), timeout=False)
        except (TypeError, ValueError) as error:  # a custom reward_fn returning the wrong shape
            return _failed_score(reward_fn, f"bad reward result: {error}", timeout=False)

    def _introduced(self, slot: int, reward_fn) -> None:
        try:
            self._workers[slot].receive()
        except WorkerFailure:
            if not self._workers[slot].alive():
                self._replace(slot)
                return
        self._knows[slot] = type(reward_fn)

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
