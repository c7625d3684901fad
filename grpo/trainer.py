"""The GRPO loop (DESIGN.md grpo/): sample -> score -> advantages -> old/ref log-probs -> update -> log -> save.

`train_grpo` takes an already-parallelised model (grpo/fsdp.py) and a run directory; the stage code
(curriculum/) builds the model, the prompt feed and the reference model. This file and run.py are the
only readers of the config tree (curriculum/config.py).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, replace

import torch
from tqdm import tqdm

from rewards import RewardPool, RewardSet, parallel_stats

from . import checkpoint as ckpt
from .advantage import expand_to_rows, frac_zero_std, group_advantages, nonzero_std_groups
from .batching import TrainBatch, aligned_micro_batches
from .dumps import TABLE_COLUMNS, sample_records, table_rows, write_dump
from .fsdp import Dist, all_gather_cat, all_gather_lists, all_reduce, clip_grad_norm
from .loop import (StepAbandoned, StopFlag, TrainState, evaluation_due, make_sampler, micro_batch_logprobs,
                   record_best, run_evaluation, save_abandoned, save_or_stop, start_note)
from .loss import grpo_objective
from .optim import build_optimizer
from .packing import packed_batch_logprobs, packed_micro_batches
from .rounds import dynamic_sampling_metrics, sample_groups, sample_round, slot_batch
from .runlog import append_metrics, plot_metrics
from .tracking import Trackers

log = logging.getLogger(__name__)
PLOTS = {"reward": ["reward", "accuracy"], "parallel": ["parallel_ratio", "well_formed"],
         "length": ["completions/mean_length"], "first <Parallel>": ["first_block_position"],
         "held-out mean@k (eval.every)": ["eval/*/mean_at_k"], "held-out parallel ratio": ["eval/*/parallel_ratio"]}


def updates_per_step(g) -> int:
    """Optimizer updates of one GRPO step: mini-batches x PPO epochs (the lr schedule counts these)."""
    return g.prompts_per_step // g.mini_batch_prompts * g.ppo_epochs


def train_grpo(cfg, model, tokenizer, tags, feed, run_dir: str, d: Dist, ref_model=None,
               compute_dtype=torch.float32, reward_fn=None, evaluate_fn=None) -> TrainState:
    """Run cfg.grpo.steps GRPO steps. `feed.next_batch(P)` yields items with `.prompt_ids` and `.answer`;
    the feed and this loop's state are checkpointed every cfg.checkpoint.every steps; an item's `.prompt` (text or
    messages) and `.columns` (its data's other columns), when it has them, go to cfg.reward.funcs. `reward_fn`
    (picklable, `(response, gold, step) -> (float, dict)`) replaces the built-in reward of cfg.reward
    (rewards.RewardSet.from_section). `evaluate_fn(model, last) -> {"eval/<set>/<metric>": value}` (a collective)
    runs every cfg.eval.every steps and at the last (loop.run_evaluation); cfg.checkpoint.keep_best picks the
    best. Every cfg.report.rollouts_every steps the step's samples go to rollouts/ (grpo/dumps.py)."""
    g, ro = cfg.grpo, cfg.rollout
    if g.prompts_per_step % d.world or g.mini_batch_prompts % d.world or g.prompts_per_step % g.mini_batch_prompts:
        raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of grpo.mini_batch_prompts="
                         f"{g.mini_batch_prompts}, and both multiples of the world size {d.world}")
    k = updates_per_step(g)  # optim.warmup_steps counts GRPO steps, the schedule counts updates
    opt, sched = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas,
                                 cfg.optim.warmup_steps * k, g.steps * k, cfg.optim.schedule, cfg.optim.min_lr_ratio)
    state = TrainState()
    where = ckpt.resume(run_dir, cfg.checkpoint.resume, model, opt, sched, state, feed, d, expect={
        "variant": cfg.variant, "model.build": cfg.model.build, "rollout.group_size": ro.group_size,
        "grpo.prompts_per_step": g.prompts_per_step, "grpo.mini_batch_prompts": g.mini_batch_prompts})
    log.info(start_note(cfg.name, where, state.step, g.steps))
    sampler = make_sampler(model, tokenizer, tags, ro, compute_dtype)
    r = cfg.reward
    reward_set = RewardSet.from_section(r, builtin=reward_fn)
    stop = StopFlag()
    bar = tqdm(range(state.step, g.steps), initial=state.step, total=g.steps, desc=cfg.name, disable=not d.main)
    trackers = Trackers(cfg.report.to, run_dir, project=cfg.report.project, config=asdict(cfg), start_step=state.step,
                        enabled=d.main)
    with RewardPool(workers=r.workers, timeout=r.timeout) as pool, stop, trackers:
        for step in bar:
            items = feed.next_batch(g.prompts_per_step)[d.rank::d.world]  # this rank's share of whole groups
            every = cfg.report.rollouts_every
            samples = [] if every and step % every == 0 else None  # this step's samples are dumped
            try:
                metrics = grpo_step(step, items, model, ref_model, sampler, pool, reward_set, opt, sched, tokenizer,
                                    cfg, d, state, stop, feed, samples_out=samples)
            except StepAbandoned:  # weights, optimizer and state.feed are still those of the last finished step
                save_abandoned(run_dir, cfg, model, opt, sched, state, d, tokenizer)
            except FloatingPointError as e:  # checkpoints are only ever written with finite weights
                last = ckpt.latest_name(run_dir)
                raise FloatingPointError(f"{e} " + (f"The last checkpoint, {last}, holds finite weights: resume from "
                                                    f"it with --set checkpoint.resume={last}" if last else
                                                    "No checkpoint had been written yet.")) from None
            state.step = step + 1
            state.feed = feed.state_dict()
            last, new_best = state.step == g.steps, False
            if evaluate_fn is not None and evaluation_due(state.step, cfg.eval.every, last):
                metrics.update(run_evaluation(evaluate_fn, model, last, d))
                new_best = record_best(state, metrics, cfg.checkpoint.keep_best, cfg.checkpoint.best_mode)
            if samples is not None:
                samples = all_gather_lists(samples, d)  # every rank's, rank by rank
            if d.main:
                append_metrics(run_dir, metrics)
                trackers.log(metrics)
                if samples is not None:
                    write_dump(run_dir, step, samples)
                    trackers.log_table("rollouts", TABLE_COLUMNS, table_rows(samples), step)
                acc = metrics["accuracy"]  # None without the built-in reward (reward.mode: none)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", **({} if acc is None else {"acc": f"{acc:.3f}"}))
            save_or_stop(run_dir, cfg, model, opt, sched, state, d, tokenizer, stop, last, new_best)
    if d.main:
        plot_metrics(run_dir, PLOTS)
    return state


def grpo_step(step, items, model, ref_model, sampler, pool, reward_set, opt, sched, tokenizer, cfg, d, state,
              stop: StopFlag | None = None, feed=None, samples_out: list | None = None) -> dict:
    """One GRPO step on this rank's prompts `items` (whole groups), scored with `reward_set` (rewards.RewardSet);
    returns the step's metrics over all ranks. `feed` (the prompt feed, the same on every rank) gives the prompts
    of refill rounds (grpo.max_sampling_rounds > 1). StepAbandoned (on every rank) when `stop` was raised while
    sampling. `samples_out`: a list that receives a record of each sample this rank drew (grpo/dumps.py)."""
    g, G = cfg.grpo, cfg.rollout.group_size
    refill = g.filter_zero_std and g.max_sampling_rounds > 1
    if refill and feed is None:
        raise ValueError("grpo.max_sampling_rounds > 1 draws more prompts: grpo_step needs the prompt feed")
    # 1-2. sample G responses per prompt and score them; refill the groups without signal (grpo/rounds.py)
    rounds, slots = sample_groups(
        items, lambda n: feed.next_batch(n * d.world)[d.rank::d.world],
        lambda new, k: sample_round(k, step, new, model, sampler, pool, reward_set, tokenizer, cfg, d, stop),
        G, refill, g.max_sampling_rounds, d)
    for name, reason in (f for r in rounds for f in r.scores.failures):  # each named once; all counted
        log.warning(f"{'' if d.world == 1 else f'rank {d.rank}: '}reward {name} failed: {reason} (its score is "
                    "left out where a reward function fails; counted in reward/errors and reward/timeouts)")
    batch, rewards = slot_batch(rounds, slots, G, tokenizer.pad_token_id, loss_on_forced=g.loss_on_forced,
                                mask_truncated=g.mask_truncated)  # rewards: (N,) of the slots
    t2 = time.perf_counter()
    # 3. advantages over whole groups (a group never spans ranks); "batch" scaling needs every rank's rewards
    if g.adv_scale == "batch" and d.world > 1:
        everyone = all_gather_cat(rewards.to(d.device)).cpu()
        advantages = group_advantages(everyone, G, "batch").view(d.world, -1)[d.rank]
    else:
        advantages = group_advantages(rewards, G, g.adv_scale)
    batch = replace(batch, advantages=advantages.to(batch.loss_mask.device))
    if samples_out is not None:
        samples_out += sample_records(step, rounds, slots, advantages, G, tokenizer, d.rank)
    kept = nonzero_std_groups(rewards, G)  # (P_rank,) groups with signal
    if g.filter_zero_std:  # DAPO dynamic sampling: groups without signal train nothing
        batch = replace(batch, loss_mask=batch.loss_mask * expand_to_rows(kept, G).to(batch.loss_mask.device)[:, None])
    # 4. old and reference log-probs, only when needed; carried in the batch, so selecting rows selects them
    mini_batches = g.prompts_per_step // g.mini_batch_prompts
    model.train()
    if updates_per_step(g) > 1:  # off-policy after the first update
        batch = replace(batch, old_logp=batch_logprobs(model, batch, cfg, d))
    if g.kl_coef > 0 and ref_model is not None:
        batch = replace(batch, ref_logp=batch_logprobs(ref_model, batch, cfg, d))
    t3 = time.perf_counter()
    # 5. updates: ppo_epochs x mini-batches x micro-batches (the step's split never changes the result)
    update_metrics = []
    rows_per_update = len(items) * G // mini_batches
    for _ in range(g.ppo_epochs):
        for u in range(mini_batches):
            part = batch.select(range(u * rows_per_update, (u + 1) * rows_per_update))
            update_metrics.append(_update(model, opt, sched, part, cfg, d, state))
    t4 = time.perf_counter()
    # 6. metrics of the step, over all ranks
    times = {"sample": sum(r.seconds[0] for r in rounds), "reward": sum(r.seconds[1] for r in rounds),
             "old_ref": t3 - t2, "update": t4 - t3}
    m = _step_metrics(step, rounds, batch, update_metrics, G, d, times, state.tokens_seen)
    if g.filter_zero_std:
        m.update(dynamic_sampling_metrics(rounds, int(kept.sum()), d))
    state.tokens_seen = int(m["num_tokens"])
    return m


def batch_logprobs(model, batch: TrainBatch, cfg, d: Dist) -> torch.Tensor:
    """Per-token log-probs (N, T) of the batch, column-aligned with it, with no graph (old and reference
    log-probs). Packed (grpo.pack): response tokens of the rows with a loss token, 0 elsewhere."""
    g = cfg.grpo
    if g.pack:
        return packed_batch_logprobs(model, batch, g.micro_batch_tokens, d, temperature=cfg.rollout.temperature,
                                     chunk_size=g.logprob_chunk)
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    with torch.no_grad():
        for mb, rows, _ in aligned_micro_batches(batch, cfg.grpo.micro_batch_tokens, d.device):
            logp = micro_batch_logprobs(model, mb, d.device, temperature=cfg.rollout.temperature,
                                        chunk_size=cfg.grpo.logprob_chunk)  # (B, T_mb)
            left = batch.response_start - mb.response_start  # the micro-batch's first column in the batch
            out[torch.as_tensor(rows), left:left + logp.shape[1]] = logp.float().cpu()
    return out


def accumulate_gradients(model, batch: TrainBatch, cfg, d: Dist) -> dict | None:
    """Backward over this rank's rows of one update (`batch`, with its old/ref log-probs or None) in
    micro-batches of cfg.grpo.micro_batch_tokens; gradients add up to those of one pass over all rows on all
    ranks, because the loss is normalised by the token (and sequence) count of the whole update, counted
    before the micro-batch loop and summed over ranks. Returns the update's metrics, or None (nothing run)
    when no rank has a loss token (every group filtered)."""
    g = cfg.grpo
    has_loss = batch.loss_mask.sum(1) > 0  # (B,) rows with a loss token
    counts = torch.stack([batch.loss_mask.sum(), has_loss.sum()]).double()
    num_tokens, num_seqs = all_reduce(counts.to(d.device)).tolist()  # num_seqs: rows with a loss token
    if num_tokens == 0:
        return None
    totals: dict = {}
    for mb, logp, entropy, weight in _scored_micro_batches(model, batch, cfg, d):  # logp, entropy: (B, T)
        old = logp.detach() if mb.old_logp is None else mb.old_logp.to(logp.device)
        ref = None if mb.ref_logp is None else mb.ref_logp.to(logp.device)
        loss, m = grpo_objective(logp, old, mb.advantages, mb.loss_mask, ref_logp=ref, entropy=entropy,
                                 policy=g.policy_loss, clip_low=g.clip_low, clip_high=g.clip_high, clip_c=g.clip_c,
                                 kl_coef=g.kl_coef, kl_kind=g.kl_kind, entropy_coef=g.entropy_coef,
                                 agg_mode=g.agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                                 norm_len=cfg.rollout.max_new_tokens, sampler_logp=mb.sampler_logp.to(logp.device),
                                 correction=g.sampler_correction, tis_cap=g.tis_cap, mis_low=g.mis_low,
                                 mis_high=g.mis_high)
        # FSDP averages gradients over ranks; the loss is already a global mean, so undo the average
        (loss * weight * d.world).backward()
        diff = ((logp.detach() - mb.sampler_logp).abs() * mb.loss_mask).float()
        m["sampling/sampling_logp_difference/mean"] = diff.sum() / num_tokens
        m["sampling/sampling_logp_difference/max"] = diff.max()
        for k, v in m.items():
            if k.endswith("/max"):
                totals[k] = max(totals.get(k, 0.0), float(v) * weight)
            else:
                totals[k] = totals.get(k, 0.0) + float(v) * weight
    return _reduce_metrics(totals, d)


def _scored_micro_batches(model, batch: TrainBatch, cfg, d: Dist):
    """(micro-batch, logp, entropy, weight) of this rank's share of `batch`, forward run, backward left to the
    caller: packed and spread evenly over the ranks (grpo.pack; the micro-batch in the response layout), or
    this rank's rows padded, with the ranks that have fewer micro-batches repeating their last at weight 0."""
    g = cfg.grpo
    if g.pack:
        yield from packed_micro_batches(model, batch, g.micro_batch_tokens, d, temperature=cfg.rollout.temperature,
                                        chunk_size=g.logprob_chunk)
        return
    live = (batch.loss_mask.sum(1) > 0).nonzero()[:, 0].tolist()
    if 0 < len(live) < batch.input_ids.shape[0]:  # the rest add nothing, to the loss or to the metrics: not run
        batch = batch.select(live)  # (filter_zero_std skips up to half the rows of an easy batch)
    for mb, _, weight in aligned_micro_batches(batch, g.micro_batch_tokens, d.device):
        logp, entropy = micro_batch_logprobs(model, mb, d.device, temperature=cfg.rollout.temperature,
                                             chunk_size=g.logprob_chunk, with_entropy=True)  # (B, T) each
        yield mb, logp, entropy, weight


def _update(model, opt, sched, batch: TrainBatch, cfg, d: Dist, state) -> dict | None:
    """One optimizer update over this rank's rows `batch`; a non-finite loss or gradient skips it (counted,
    and fatal after cfg.grpo.max_bad_steps in a row). None when the update had no loss token: then nothing
    runs, not even the optimizer (AdamW would still move the weights by momentum and weight decay)."""
    lr = opt.param_groups[0]["lr"]  # what this update uses; the schedule steps after it
    totals = accumulate_gradients(model, batch, cfg, d)
    if totals is not None:
        grad_norm = float(clip_grad_norm(model, cfg.optim.grad_clip))
        ok = math.isfinite(grad_norm) and all(math.isfinite(v) for v in totals.values())
        if ok:
            opt.step()
            state.bad_in_a_row = 0
        else:  # keep the weights, count it, say so
            state.bad_in_a_row += 1
            state.skipped += 1
            if d.main:
                log.warning(f"step {state.step}: update skipped, non-finite loss or gradient (grad norm {grad_norm}); "
                            f"{state.bad_in_a_row} in a row, the run stops at grpo.max_bad_steps="
                            f"{cfg.grpo.max_bad_steps}")
            if state.bad_in_a_row >= cfg.grpo.max_bad_steps:
                raise FloatingPointError(f"{state.bad_in_a_row} updates in a row had a non-finite loss or gradient "
                                         f"(grad norm {grad_norm}); lower optim.lr or check the data and rewards.")
        opt.zero_grad(set_to_none=True)
        totals.update(grad_norm=grad_norm, skipped_update=float(not ok), learning_rate=lr)
    with warnings.catch_warnings():  # a skipped or empty update still advances the schedule, by design
        warnings.filterwarnings("ignore", message="Detected call of")
        sched.step()
    return totals


def _reduce_metrics(totals: dict, d: Dist) -> dict:
    """Sum the metrics over ranks (maxima for "/max" keys)."""
    keys = sorted(totals)
    sums = all_reduce(torch.tensor([0.0 if k.endswith("/max") else totals[k] for k in keys], device=d.device))
    maxes = all_reduce(torch.tensor([totals[k] if k.endswith("/max") else 0.0 for k in keys], device=d.device), "max")
    return {k: float(mx if k.endswith("/max") else sm) for k, sm, mx in zip(keys, sums.tolist(), maxes.tolist())}


def reward_func_metrics(per_func: dict, d: Dist) -> dict:
    """rewards/<name>/mean and /std (TRL's names; std with n-1, as TRL's nanstd) of each reward's scores over all
    ranks, a None score (no opinion, or failed) left out; None when no score of that reward is left."""
    local = [[sum(v for v in vals if v is not None), sum(v * v for v in vals if v is not None),
              sum(v is not None for v in vals)] for vals in per_func.values()]  # (K, 3)
    totals = all_reduce(torch.tensor(local, dtype=torch.float64, device=d.device).view(-1, 3)).tolist()
    out = {}
    for name, (total, squares, count) in zip(per_func, totals):
        mean = total / count if count else None
        var = (squares - count * mean * mean) / (count - 1) if count > 1 else 0.0
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = math.sqrt(max(var, 0.0)) if count else None
    return out


def _step_metrics(step, rounds, batch, updates, G, d, times, seen: int = 0) -> dict:
    """Step metrics summed over ranks (TRL's names where one exists), of every response the step sampled (all
    its rounds) and of the batch it trained. `updates`: each update's metrics, None for an update without loss
    tokens; a step in which no update ran logs no_update 1 and leaves out what only an update measures (loss,
    entropy, clip ratios, grad_norm, learning_rate, ...)."""
    texts = [t for r in rounds for t in r.texts]
    rewards = torch.cat([r.rewards for r in rounds])  # (N_all,), N_all = N of every round
    components = [c for r in rounds for c in r.scores.components]
    per_func = {k: [v for r in rounds for v in r.scores.per_func[k]] for k in rounds[0].scores.per_func}
    stats = [parallel_stats(t) for t in texts]
    lengths = torch.cat([r.rollout.response_mask.sum(1).float().cpu() for r in rounds])  # (N_all,)
    stopped = torch.tensor([f == "stop" for r in rounds for f in r.rollout.finish_reason])  # ended with a stop token
    first = [s.first_block_position for s in stats if s.first_block_position is not None]
    local = torch.tensor([
        len(texts), float(rewards.sum()), float((rewards ** 2).sum()),
        sum(float(c.get("accuracy", 0.0)) for c in components),
        sum("accuracy" in c for c in components),  # none without the built-in reward (reward.mode: none)
        sum(s.num_blocks > 0 for s in stats), sum(s.well_formed for s in stats),  # DESIGN: >= 1 valid block
        float(lengths.sum()), len(texts) - int(stopped.sum()), frac_zero_std(rewards, G) * len(texts) / G,
        sum(first), len(first), sum(float(r.rollout.response_mask.sum()) for r in rounds),
        sum(r.scores.timeouts for r in rounds), sum(r.scores.errors for r in rounds),
        float(batch.loss_mask.sum()), float(lengths[stopped].sum()), float(stopped.sum()),
        sum(float(r.rollout.prompt_mask.sum() + r.rollout.response_mask.sum()) for r in rounds),  # prompt+completion
    ], dtype=torch.float64, device=d.device)
    n, rs, rs2, acc, n_acc, par, wf, ln, cut, zs, fp, nf, tok, to, err, loss_tok, stop_ln, n_stop, seq_tok = \
        all_reduce(local).tolist()
    max_len, neg_min_len = all_reduce(torch.stack([lengths.max(), -lengths.min()]).to(d.device), op="max").tolist()
    mean = rs / n
    out = {"step": step, "reward": mean, "reward_std": math.sqrt(max(rs2 / n - mean * mean, 0.0)),
           "accuracy": acc / n_acc if n_acc else None, "parallel_ratio": par / n, "well_formed": wf / n,
           "completions/mean_length": ln / n, "completions/min_length": -neg_min_len,
           "completions/max_length": max_len, "completions/clipped_ratio": cut / n,
           "completions/mean_terminated_length": stop_ln / n_stop if n_stop else None,
           "frac_reward_zero_std": zs / (n / G), "first_block_position": fp / nf if nf else None,
           "reward/timeouts": to, "reward/errors": err, "loss_tokens": loss_tok, "num_tokens": seen + seq_tok,
           **reward_func_metrics(per_func, d)}
    ran = [u for u in updates if u is not None]
    out["no_update"] = float(not ran)
    for k in ran[0] if ran else ():
        vals = [u[k] for u in ran]
        out[k] = max(vals) if k.endswith("/max") else sum(vals) / len(vals)
    if ran:
        out["learning_rate"] = ran[-1]["learning_rate"]  # the lr at the end of the step (see optim.lr_factor)
    total = sum(times.values())
    out.update({f"time/{k}": v for k, v in times.items()})
    out["tokens_per_s"] = tok / max(total, 1e-9)
    return out
