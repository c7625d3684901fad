"""DAPO's soft overlong punishment (Yu et al. 2025, "Overlong Reward Shaping") as a reward part: a response that
nears the length limit loses reward gradually instead of only being cut. Plain Python: lengths in, a float out."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OverlongPenalty:
    """With L_max the response limit in tokens and L_cache = `buffer`: 0 for a response of at most
    L_max - L_cache tokens, then linear down to -`penalty` at L_max, and -`penalty` beyond."""
    buffer: int
    penalty: float = 1.0

    def __post_init__(self):
        if isinstance(self.buffer, bool) or not isinstance(self.buffer, int) or self.buffer < 1:
            raise ValueError(f"OverlongPenalty.buffer={self.buffer!r} is invalid; it must be an integer >= 1 (tokens)")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, (int, float)) or not (
                math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError(f"OverlongPenalty.penalty={self.penalty!r} is invalid; it must be a finite number >= 0")

    def __call__(self, length: int, max_length: int) -> float:
        """The penalty of a response of `length` tokens under a limit of `max_length` (>= buffer) tokens."""
        free = max_length - self.buffer  # the longest response without penalty
        if length <= free:
            return 0.0
        return -self.penalty * min(1.0, (length - free) / self.buffer)
