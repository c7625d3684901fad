"""From a rollout to training tensors, and micro-batches built to a token budget.

Layout of a row: [left padding | prompt | response | right padding], so log-probs, loss masks and
sampler log-probs are all aligned with `input_ids` column by column.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainBatch:
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T) 1 on prompt and response tokens
    loss_mask: torch.Tensor  # (N, T) 1 on tokens whose log-prob is trained (sampled response tokens)
    sampler_logp: torch.Tensor  # (N, T) the sampler's log-prob of each response token
    advantages: torch.Tensor  # (N,)
    response_start: int  # first response column
    prompt_len: torch.Tensor  # (N,) real prompt tokens per row
    response_len: torch.Tensor  # (N,) real response tokens per row

    def select(self, rows: list) -> "TrainBatch":
        """Rows `rows`, with the columns that are padding in all of them cut away."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        left = self.response_start - int(self.prompt_len[idx].max())
        right = self.response_start + int(self.response_len[idx].max())
        cols = slice(left, right)
        return TrainBatch(self.input_ids[idx, cols], self.attention_mask[idx, cols], self.loss_mask[idx, cols],
                          self.sampler_logp[idx, cols], self.advantages[idx], self.response_start - left,
                          self.prompt_len[idx], self.response_len[idx])


def make_batch(rollout, advantages: torch.Tensor, *, loss_on_forced: bool = False,
               mask_truncated: bool = False) -> TrainBatch:
    """Training tensors of a Rollout. Forced tokens are context, not actions, unless loss_on_forced."""
    ids, attn, start = rollout.sequences()
    trained = rollout.response_mask.bool()  # (N, M)
    if not loss_on_forced:
        trained &= ~rollout.forced_mask.bool()
    if mask_truncated:
        cut = torch.tensor([r != "stop" for r in rollout.finish_reason], device=trained.device)
        trained &= ~cut[:, None]
    pad = torch.zeros_like(rollout.prompt_ids)
    loss_mask = torch.cat([pad, trained.long()], dim=1)
    sampler_logp = torch.cat([pad.float(), rollout.logprobs], dim=1)
    return TrainBatch(ids, attn, loss_mask, sampler_logp, advantages, start, rollout.prompt_mask.sum(1),
                      rollout.response_mask.sum(1))


def micro_batches(prompt_len: torch.Tensor, response_len: torch.Tensor, budget: int) -> list[list[int]]:
    """Group rows so each group's padded size (rows x (longest prompt + longest response)) stays within
    `budget` tokens; longest rows first, so similar lengths share a micro-batch. A row longer than the
    budget gets a micro-batch of its own."""
    order = sorted(range(len(prompt_len)), key=lambda i: -(int(prompt_len[i]) + int(response_len[i])))
    groups, cur, pmax, rmax = [], [], 0, 0
    for i in order:
        p, r = max(pmax, int(prompt_len[i])), max(rmax, int(response_len[i]))
        if cur and (len(cur) + 1) * (p + r) > budget:
            groups.append(cur)
            cur, p, r = [], int(prompt_len[i]), int(response_len[i])
        cur.append(i)
        pmax, rmax = p, r
    if cur:
        groups.append(cur)
    return groups
