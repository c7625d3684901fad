"""AdamW and the learning-rate schedule (warmup, then constant / cosine / linear decay), counted in optimizer
updates."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(update: int, warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer update `update` (0-based) of `total`, `warmup` of them warming up.

    The decay counts as transformers' get_linear/cosine_schedule_with_warmup do, by the updates done before this
    one: the first update after warm-up runs at the full rate (progress 0) and the last at progress
    (total - warmup - 1) / (total - warmup), above the floor, so no update is wasted at lr min_ratio * lr = 0.
    The warm-up counts this update too, (update + 1) / warmup, reaching 1 at its last update: transformers starts
    at update / warmup, and its first update at lr 0 would throw away a whole GRPO mini-batch."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {list(SCHEDULES)}")
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def build_optimizer(model, lr: float, weight_decay: float, betas, warmup_updates: int, total_updates: int,
                    schedule: str = "constant", min_ratio: float = 0.0):
    """AdamW over the trainable parameters, with a LambdaLR stepped once per optimizer update (warm-up and
    length in updates: GRPO makes several per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda u: lr_factor(u, warmup_updates, total_updates, schedule, min_ratio))
    return opt, sched
