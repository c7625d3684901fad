"""Rewards: answer extraction and equivalence, parallel-format checks, the reward schedule, your own reward
functions by name, batch scoring and evaluation metrics (DESIGN.md "rewards/"). Plain Python: no torch, no model."""
from .math import extract_answer, is_equivalent, judge_equivalence
from .metrics import aggregate_by_problem, mean_at_k, pass_at_k
from .parallel import ParallelStats, parallel_stats, parallel_stats_ids, path_agreement, path_answers
from .length import OverlongPenalty
from .funcs import ARGUMENTS, RewardFunc, RewardFuncError, StepState, check_reward_func, load_reward_func
from .pool import BatchScores, RewardPool, score_batch
from .schedule import MODES, RewardFn, reward_kind
from .step import RewardInputs, RewardSet, score_step

__all__ = [
    "extract_answer", "is_equivalent", "judge_equivalence",
    "ParallelStats", "parallel_stats", "parallel_stats_ids", "path_answers", "path_agreement",
    "RewardFn", "reward_kind", "MODES",
    "BatchScores", "RewardPool", "score_batch",
    "RewardFunc", "RewardFuncError", "StepState", "ARGUMENTS", "check_reward_func", "load_reward_func",
    "RewardSet", "RewardInputs", "score_step", "OverlongPenalty",
    "pass_at_k", "mean_at_k", "aggregate_by_problem",
]
