"""Phases 1-2 of a GRPO step (grpo/trainer.py): sample G responses per prompt and score them, in rounds when DAPO's
dynamic sampling refills (grpo.filter_zero_std with grpo.max_sampling_rounds > 1). A group whose rewards are all
equal has no signal; more prompts are drawn until the step holds prompts_per_step groups with signal or the
rounds run out (verl's filter_groups with max_num_gen_batches).

Slots: each rank trains its share of the first round's prompts, P/world groups, in that order. A group without
signal leaves its slot empty (masked, as filter_zero_std does in one round); a later round fills this rank's
empty slots, in order, with this rank's own new groups with signal, and drops the rest (sampled and logged, not
trained). No group moves between ranks, so no rollout crosses them: a rank whose share came out short samples
on until every rank is full. All ranks run the same rounds and draw the same prompts from the feed, each its
share, deciding together with one all-gather per round, so the feed stays the same on every rank and its
position after the step is what the checkpoint keeps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from model.patch import structured_tags
from model.tokenizer import decode_responses, stop_token_ids
from rewards import BatchScores, RewardInputs, score_step
from rollout import SamplingAborted

from .advantage import nonzero_std_groups
from .batching import TrainBatch, cat_batches, make_batch
from .fsdp import Dist, all_gather_cat, all_reduce, gathered_for_sampling

ROUND_SEED = 1_000_000_007  # round k of a step samples with seed + k * ROUND_SEED: never another step's seed


@dataclass(frozen=True)
class Round:
    """One sampling round on this rank: its prompts, the sampler's Rollout, the responses' text and scores,
    the total rewards (N,) = (len(items) * G,), and the seconds spent sampling and scoring."""
    items: list
    rollout: object
    texts: list
    scores: BatchScores
    rewards: torch.Tensor
    seconds: tuple


def sample_round(k: int, step: int, items, model, sampler, pool, reward_set, tokenizer, cfg, d: Dist,
                 stop=None) -> Round:
    """Round k of step `step`: G samples of each prompt of `items`, decoded and scored. A stop asked for while
    sampling abandons the rollout (minutes at scale): StepAbandoned on every rank."""
    ro, G = cfg.rollout, cfg.rollout.group_size
    t0 = time.perf_counter()
    model.eval()
    rollout = None
    with torch.no_grad(), gathered_for_sampling(model):
        try:
            rollout = sampler.generate([it.prompt_ids for it in items], n=G, max_new_tokens=ro.max_new_tokens,
                                       temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                       stop_ids=stop_token_ids(tokenizer),
                                       structured=structured_tags(model) is not None,
                                       seed=cfg.seed * 1_000_003 + step * d.world + d.rank + k * ROUND_SEED,
                                       should_stop=stop.asked if stop else None)
        except SamplingAborted:
            pass
    if stop is not None:
        stop.after_sampling(d)  # all ranks agree before the update's collectives
    t1 = time.perf_counter()
    texts = decode_responses(tokenizer, rollout.response_ids, rollout.response_mask)
    inputs = reward_inputs(items, texts, rollout, G, cfg.grpo.steps, ro.max_new_tokens, extras=bool(reward_set.funcs))
    scores = score_step(pool, reward_set, inputs, step)
    rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # (N,)
    return Round(items, rollout, texts, scores, rewards, (t1 - t0, time.perf_counter() - t1))


def reward_inputs(items, texts: list[str], rollout, G: int, steps: int, max_new_tokens: int,
                  extras: bool) -> RewardInputs:
    """What the rewards see of a round: responses, gold answers and response lengths in tokens (N = P*G rows,
    group-contiguous); with `extras` (reward.funcs are set) also each row's prompt, response token ids and its
    data's other columns."""
    def per_row(values):
        return [v for v in values for _ in range(G)]
    answers = per_row(it.answer for it in items)
    lengths = dict(completion_lengths=rollout.response_mask.sum(1).tolist(), max_completion_length=max_new_tokens)
    if not extras:
        return RewardInputs(texts, answers, G, max_steps=steps, **lengths)
    names = dict.fromkeys(k for it in items for k in getattr(it, "columns", {}))  # a row lacking a column gets None
    columns = {k: per_row(getattr(it, "columns", {}).get(k) for it in items) for k in names}
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
    return RewardInputs(texts, answers, G, prompts=per_row(getattr(it, "prompt", None) for it in items),
                        completion_ids=ids, columns=columns, max_steps=steps, **lengths)


def sample_groups(first: list, draw, run_round, G: int, refill: bool, max_rounds: int,
                  d: Dist) -> tuple[list[Round], list[tuple[int, int]]]:
    """The rounds of a step and its slots: (round, group) per slot, this rank's P/world groups in training order.

    first: this rank's prompts of round 0; draw(n): this rank's n prompts of the next n * world from the feed;
    run_round(items, k) -> Round. With `refill` (filter_zero_std), rounds go on while any rank has an empty slot
    and max_rounds allow; each draws, per rank, the largest missing count divided by the share of groups with
    signal so far (at most P/world), so one more round usually fills every slot."""
    rounds = [run_round(first, 0)]
    slots = [(0, i) for i in range(len(first))]
    empty = [j for j, has in enumerate(nonzero_std_groups(rounds[0].rewards, G).tolist()) if not has] if refill else []
    drawn, kept = len(first), len(first) - len(empty)
    for k in range(1, max_rounds if refill else 1):
        counts = all_gather_cat(torch.tensor([[len(empty), drawn, kept]], dtype=torch.float64, device=d.device))
        need, drawn_all, kept_all = int(counts[:, 0].max()), float(counts[:, 1].sum()), float(counts[:, 2].sum())
        if need == 0:
            break
        n = len(first) if kept_all == 0 else min(len(first), math.ceil(need * drawn_all / kept_all))
        rounds.append(run_round(draw(n), k))
        good = [i for i, has in enumerate(nonzero_std_groups(rounds[-1].rewards, G).tolist()) if has]
        for j, i in zip(empty, good):
            slots[j] = (k, i)
        empty = empty[len(good):]
        drawn, kept = drawn + n, kept + len(good)
    return rounds, slots


def slot_batch(rounds: list[Round], slots: list, G: int, pad_id: int, **make_kw) -> tuple[TrainBatch, torch.Tensor]:
    """The training batch of the slots (rows group by group, in slot order; advantages 0, set by the caller) and
    their rewards (N,). make_kw: make_batch's keywords."""
    rows = [(r, i * G + j) for r, i in slots for j in range(G)]  # (round, row in it) of each training row
    rewards = torch.stack([rounds[r].rewards[row] for r, row in rows])  # (N,)
    used = sorted({r for r, _ in slots})
    batches = {r: make_batch(rounds[r].rollout, torch.zeros(len(rounds[r].texts)), **make_kw) for r in used}
    if used == [0]:  # one round's batch as it is: a step without refill trains exactly as before refilling existed
        return batches[0], rewards
    parts = [batches[r].select([row for rr, row in rows if rr == r]) for r in used]  # each round's rows, in order
    order = torch.tensor([k for r in used for k, (rr, _) in enumerate(rows) if rr == r])  # training row of each
    return cat_batches(parts, pad_id).select(order.argsort()), rewards


def dynamic_sampling_metrics(rounds: list[Round], kept: int, d: Dist) -> dict:
    """dynamic_sampling/rounds (sampling rounds of the step), /sampled_groups (groups sampled in them) and
    /kept_groups (groups with signal trained, at most prompts_per_step), over all ranks; `kept`: this rank's."""
    sampled = sum(len(r.items) for r in rounds)
    total = all_reduce(torch.tensor([float(sampled), float(kept)], dtype=torch.float64, device=d.device)).tolist()
    return {"dynamic_sampling/rounds": len(rounds), "dynamic_sampling/sampled_groups": total[0],
            "dynamic_sampling/kept_groups": total[1]}
