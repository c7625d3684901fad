"""AdamW and the learning-rate schedule (warmup, then constant / cosine / linear decay), counted in optimizer
updates."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(update: int, warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer update `update` (0-based) of `total`, `warmup` of them warming up.

    Both phases count the updates done once this one is applied: warm-up reaches 1 at update warmup - 1, the
    decay reaches min_ratio at the last update. So the lr at the end of a GRPO step does not depend on how
    many updates the step makes: k updates per step with warmup and total scaled by k give, at each step's
    last update, the lr of one update per step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {list(SCHEDULES)}")
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update + 1 - warmup) / max(1, total - warmup))
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
