"""Group-relative advantages (DESIGN.md grpo/advantage.py) and the no-signal group statistics.

Rows i*G .. i*G+G-1 of a reward vector are the G samples of prompt i; a group whose rewards are all
equal carries no learning signal and gets advantages of exactly 0.
"""
from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N,) -> (P, G) float view, after checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor of shape (N,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one sample has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}: "
                         f"N must be prompts x group_size, laid out group-contiguous")
    if not rewards.is_floating_point():
        rewards = rewards.float()  # bool / int rewards (e.g. 0/1 accuracy)
    return rewards.view(-1, group_size)  # (P, G)


def nonzero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """BoolTensor (P,): True where a group's rewards are not all equal (it carries signal).

    rewards: (N,), N = P * group_size. Equality is exact, the same test that zeroes advantages.
    """
    grouped = _grouped(rewards, group_size)  # (P, G)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (TRL logs it as "frac_reward_zero_std").

    rewards: (N,). Returns 0.0 for an empty batch.
    """
    signal = nonzero_std_groups(rewards, group_size)  # (P,)
    return 0.0 if signal.numel() == 0 else 1.0 - signal.float().mean().item()


def expand_to_rows(group_values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat a per-group tensor (P, ...) to its rows (P*G, ...), e.g. the DAPO keep-mask of
    `nonzero_std_groups` turned into a row mask for the dynamic-sampling filter."""
    return group_values.repeat_interleave(group_size, dim=0)  # (N, ...)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each reward minus its group mean, divided by (unbiased std + eps).

    rewards: (N,) float, N = P * group_size, group-contiguous. Returns (N,) in the rewards' float dtype.
    scale: "group" (std of the group), "batch" (std of all N rewards) or "none" (Dr. GRPO, no division).
    Groups whose rewards are all equal get exactly 0 under every scale.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {', '.join(SCALES)}")
    grouped = _grouped(rewards, group_size)  # (P, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (P, G)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)  # std is unbiased (n-1) by default
    elif scale == "batch":
        centered = centered / (grouped.std() + eps)
    # mean() of equal floats can differ from them in the last bit; pin no-signal groups to exactly 0
    signal = (grouped.amax(dim=1) != grouped.amin(dim=1))[:, None]  # (P, 1)
    return torch.where(signal, centered, torch.zeros_like(centered)).reshape(-1)  # (N,)
