"""From a rollout to training tensors, and micro-batches built to a token budget.

Layout of a row: [left padding | prompt | response | right padding], so log-probs, loss masks and
sampler log-probs are all aligned with `input_ids` column by column.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from .fsdp import all_reduce


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
    old_logp: torch.Tensor | None = None  # (N, T) log-probs before the step's updates; None: on-policy
    ref_logp: torch.Tensor | None = None  # (N, T) the reference model's log-probs; None: no KL term

    def select(self, rows) -> "TrainBatch":
        """Rows `rows`, with the columns that are padding in all of them cut away."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        left = self.response_start - int(self.prompt_len[idx].max())
        right = self.response_start + int(self.response_len[idx].max())

        def part(t):  # (len(rows), right - left)
            return None if t is None else t[idx, left:right]

        return TrainBatch(part(self.input_ids), part(self.attention_mask), part(self.loss_mask),
                          part(self.sampler_logp), self.advantages[idx], self.response_start - left,
                          self.prompt_len[idx], self.response_len[idx], part(self.old_logp), part(self.ref_logp))


def cat_batches(parts: list[TrainBatch], pad_id: int) -> TrainBatch:
    """The rows of `parts` one after another, re-padded to one layout: the response columns aligned (left padding
    up to the longest prompt, right padding up to the longest response). pad_id fills the new input_ids padding;
    every other column-aligned tensor gets 0 there, per-row tensors are concatenated."""
    start = max(p.response_start for p in parts)
    right = max(p.input_ids.shape[1] - p.response_start for p in parts)

    def join(name):
        values = [getattr(p, name) for p in parts]
        if name == "response_start":
            return start
        if values[0] is None or values[0].dim() == 1:  # absent, or one value per row
            return None if values[0] is None else torch.cat(values)
        fill = pad_id if name == "input_ids" else 0
        return torch.cat([torch.nn.functional.pad(v, (start - p.response_start,
                                                     right - (v.shape[1] - p.response_start)), value=fill)
                          for v, p in zip(values, parts)])  # (sum of rows, start + right)

    return TrainBatch(**{f.name: join(f.name) for f in fields(TrainBatch)})


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


def aligned_micro_batches(batch: TrainBatch, budget: int, device) -> Iterator[tuple[TrainBatch, list, float]]:
    """(micro-batch, its rows in `batch`, weight) to a budget of `budget` padded tokens, one at a time: the
    micro-batch loop of GRPO and SFT. Every rank gets the same count (FSDP forwards and backwards are
    collectives): the ranks with fewer repeat their last micro-batch at weight 0."""
    groups = micro_batches(batch.prompt_len, batch.response_len, budget)
    n = int(all_reduce(torch.tensor(float(len(groups)), device=device), op="max").item())
    for i in range(n):
        rows = groups[min(i, len(groups) - 1)]
        yield batch.select(rows), rows, 1.0 if i < len(groups) else 0.0


def pack_rows(prompts: list, responses: list, pad_id: int, loss_masks: list | None = None,
              advantages: torch.Tensor | None = None) -> TrainBatch:
    """A TrainBatch from token lists: prompts left-padded, responses right-padded (the sampler's layout).
    loss_masks: per response, 1 where the token is trained (default: all of it)."""
    N, Lp, M = len(prompts), max(map(len, prompts)), max(1, max(map(len, responses)))
    ids = torch.full((N, Lp + M), pad_id, dtype=torch.long)
    attn = torch.zeros(N, Lp + M, dtype=torch.long)
    loss = torch.zeros(N, Lp + M, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, Lp - len(p):Lp], ids[i, Lp:Lp + len(r)] = torch.tensor(p, dtype=torch.long), torch.tensor(r, dtype=torch.long)
        attn[i, Lp - len(p):Lp + len(r)] = 1
        loss[i, Lp:Lp + len(r)] = torch.tensor(loss_masks[i] if loss_masks else [1] * len(r), dtype=torch.long)
    adv = torch.zeros(N) if advantages is None else advantages
    return TrainBatch(ids, attn, loss, torch.zeros(N, Lp + M), adv, Lp, torch.tensor([len(p) for p in prompts]),
                      torch.tensor([len(r) for r in responses]))
