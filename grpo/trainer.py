"""The GRPO loop (DESIGN.md grpo/): sample -> score -> advantages -> old/ref log-probs -> update -> log -> save.

`train_grpo` takes an already-parallelised model (grpo/fsdp.py) and a run directory; the stage code
(curriculum/) builds the model, the prompt feed and the reference model. This file and run.py are the
only readers of the config tree (curriculum/config.py).
"""
from __future__ import annotations

import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from model.patch import structured_tags
from model.tokenizer import decode_responses, newline_id, stop_token_ids
from rewards import RewardFn, RewardPool, parallel_stats
from rollout import Sampler

from . import checkpoint as ckpt
from .advantage import frac_zero_std, group_advantages, nonzero_std_groups
from .batching import TrainBatch, make_batch, micro_batches
from .fsdp import Dist, all_gather_cat, all_reduce, clip_grad_norm, gathered_for_sampling
from .logprobs import token_logprobs
from .loss import grpo_objective
from .optim import build_optimizer
from .runlog import append_metrics, plot_metrics

PLOTS = {"reward": ["reward", "accuracy"], "parallel": ["parallel_ratio", "well_formed"],
         "length": ["completions/mean_length"], "first <Parallel>": ["first_block_position"]}


@dataclass
class TrainState:
    """What a checkpoint needs besides model and optimizer to continue exactly."""
    step: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0
    feed: dict = field(default_factory=dict)


class StopRequested(Exception):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stops."""


def make_sampler(model, tokenizer, tags, ro, compute_dtype=None) -> Sampler:
    """The sampler of a stage, from its `rollout` config. `compute_dtype` is the KV cache's dtype: under FSDP
    mixed precision the (fp32) sharded parameters do not tell it."""
    return Sampler(model, tags=tags, pad_id=tokenizer.pad_token_id, newline_id=newline_id(tokenizer),
                   num_paths=ro.num_paths, max_parallel_blocks=ro.max_parallel_blocks,
                   max_path_tokens=ro.max_path_tokens, prefill_rows=ro.prefill_rows, dtype=compute_dtype)


def train_grpo(cfg, model, tokenizer, tags, feed, run_dir: str, d: Dist, ref_model=None,
               compute_dtype=torch.float32, reward_fn=None) -> TrainState:
    """Run cfg.grpo.steps GRPO steps. `feed.next_batch(P)` yields items with `.prompt_ids` and `.answer`;
    the feed and this loop's state are checkpointed every cfg.checkpoint.every steps. `reward_fn`
    (picklable, `(response, gold, step) -> (float, dict)`) defaults to the RewardFn of cfg.reward."""
    g, ro = cfg.grpo, cfg.rollout
    if g.prompts_per_step % d.world or g.mini_batch_prompts % d.world or g.prompts_per_step % g.mini_batch_prompts:
        raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of grpo.mini_batch_prompts="
                         f"{g.mini_batch_prompts}, and both multiples of the world size {d.world}")
    opt, sched = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas,
                                 cfg.optim.warmup_steps, g.steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
    state = TrainState()
    ckpt.resume(run_dir, cfg.checkpoint.resume, model, opt, sched, state, feed, d, expect={
        "variant": cfg.variant, "model.build": cfg.model.build, "rollout.group_size": ro.group_size,
        "grpo.prompts_per_step": g.prompts_per_step, "grpo.mini_batch_prompts": g.mini_batch_prompts})
    sampler = make_sampler(model, tokenizer, tags, ro, compute_dtype)
    r = cfg.reward
    reward_fn = reward_fn or RewardFn.from_section(r)
    stop = _StopFlag()
    bar = tqdm(range(state.step, g.steps), initial=state.step, total=g.steps, desc=cfg.name, disable=not d.main)
    with RewardPool(workers=r.workers, timeout=r.timeout) as pool, stop:
        for step in bar:
            items = feed.next_batch(g.prompts_per_step)[d.rank::d.world]  # this rank's share of whole groups
            metrics = grpo_step(step, items, model, ref_model, sampler, pool, reward_fn, opt, sched, tokenizer,
                                cfg, d, state)
            state.step = step + 1
            state.feed = feed.state_dict()
            if d.main:
                append_metrics(run_dir, metrics)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            save_or_stop(run_dir, cfg, model, opt, sched, state, d, tokenizer, stop, last=state.step == g.steps)
    if d.main:
        plot_metrics(run_dir, PLOTS)
    return state


def save_or_stop(run_dir, cfg, model, opt, sched, state, d, tokenizer, stop, last: bool) -> None:
    """End of a step (GRPO and SFT alike): a checkpoint when one is due, at the last step, or when Ctrl-C /
    SIGTERM asked to stop (all ranks decide together); then StopRequested if asked before the last step."""
    stopping = stop.requested(d)
    if stopping or last or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
        ckpt.save(run_dir, model, opt, sched, state, d, tokenizer, config=asdict(cfg), keep=cfg.checkpoint.keep)
    if stopping and not last:
        raise StopRequested(f"stopped at step {state.step}; checkpoint saved in {run_dir}/checkpoints")


def grpo_step(step, items, model, ref_model, sampler, pool, reward_fn, opt, sched, tokenizer, cfg, d, state) -> dict:
    g, ro, G = cfg.grpo, cfg.rollout, cfg.rollout.group_size
    t0 = time.perf_counter()
    # 1. sample G responses per prompt
    model.eval()
    with torch.no_grad(), gathered_for_sampling(model):
        rollout = sampler.generate([it.prompt_ids for it in items], n=G, max_new_tokens=ro.max_new_tokens,
                                   temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                   stop_ids=stop_token_ids(tokenizer), structured=structured_tags(model) is not None,
                                   seed=cfg.seed * 1_000_003 + step * d.world + d.rank)
    t1 = time.perf_counter()
    # 2. score
    texts = decode_responses(tokenizer, rollout.response_ids, rollout.response_mask)
    scores = pool.score(reward_fn, texts, [it.answer for it in items for _ in range(G)], step)
    rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # (N,)
    t2 = time.perf_counter()
    # 3. advantages over whole groups (a group never spans ranks); "batch" scaling needs every rank's rewards
    if g.adv_scale == "batch" and d.world > 1:
        everyone = all_gather_cat(rewards.to(d.device)).cpu()
        advantages = group_advantages(everyone, G, "batch").view(d.world, -1)[d.rank]
    else:
        advantages = group_advantages(rewards, G, g.adv_scale)
    batch = make_batch(rollout, advantages.to(rollout.logprobs.device), loss_on_forced=g.loss_on_forced,
                       mask_truncated=g.mask_truncated)
    if g.filter_zero_std:  # DAPO dynamic sampling: groups without signal train nothing
        keep = nonzero_std_groups(rewards, G).repeat_interleave(G).to(batch.loss_mask.device)
        batch = TrainBatch(**{**batch.__dict__, "loss_mask": batch.loss_mask * keep[:, None]})
    # 4. old and reference log-probs, only when needed
    updates = g.prompts_per_step // g.mini_batch_prompts
    on_policy = updates == 1 and g.ppo_epochs == 1
    model.train()
    old_logp = None if on_policy else _logprobs_no_grad(model, batch, cfg, d)
    ref_logp = _logprobs_no_grad(ref_model, batch, cfg, d) if g.kl_coef > 0 and ref_model is not None else None
    t3 = time.perf_counter()
    # 5. updates: ppo_epochs x mini-batches x micro-batches (the step's split never changes the result)
    update_metrics = []
    rows_per_update = len(items) * G // updates
    for _ in range(g.ppo_epochs):
        for u in range(updates):
            rows = list(range(u * rows_per_update, (u + 1) * rows_per_update))
            update_metrics.append(_update(model, opt, sched, batch, rows, old_logp, ref_logp, cfg, d, state))
    t4 = time.perf_counter()
    # 6. metrics of the step, over all ranks
    return _step_metrics(step, rollout, texts, scores, rewards, update_metrics, G, sched, d,
                         {"sample": t1 - t0, "reward": t2 - t1, "old_ref": t3 - t2, "update": t4 - t3})


def accumulate_gradients(model, batch: TrainBatch, rows, old_logp, ref_logp, cfg, d: Dist) -> dict:
    """Backward over `rows` of the batch in micro-batches of cfg.grpo.micro_batch_tokens; gradients add up
    to those of one pass over all rows on all ranks, because the loss is normalised by the token (and
    sequence) count of the whole update, counted before the micro-batch loop and summed over ranks."""
    g = cfg.grpo
    sub = batch.select(rows)
    num_tokens = all_reduce(sub.loss_mask.sum().float().to(d.device)).item()
    num_seqs = all_reduce(torch.tensor(float(len(rows)), device=d.device)).item()
    groups = micro_batches(sub.prompt_len, sub.response_len, g.micro_batch_tokens)
    # every rank must run the same number of forward/backward passes (FSDP collectives): pad with
    # zero-weight repeats of a real micro-batch
    n_micro = int(all_reduce(torch.tensor(float(len(groups)), device=d.device), op="max").item())
    totals: dict = {}
    for i in range(n_micro):
        idx = groups[min(i, len(groups) - 1)]
        mb = sub.select(idx)
        kw = _model_kwargs(model, mb, d)
        logp, entropy = token_logprobs(model, kw.pop("input_ids"), kw.pop("attention_mask"),
                                       temperature=cfg.rollout.temperature, chunk_size=g.logprob_chunk,
                                       with_entropy=True, **kw)
        old = logp.detach() if old_logp is None else _rows(old_logp, batch, rows, idx, mb)
        ref = None if ref_logp is None else _rows(ref_logp, batch, rows, idx, mb)
        loss, m = grpo_objective(logp, old, mb.advantages, mb.loss_mask, ref_logp=ref, entropy=entropy,
                                 clip_low=g.clip_low, clip_high=g.clip_high, clip_c=g.clip_c, kl_coef=g.kl_coef,
                                 kl_kind=g.kl_kind, entropy_coef=g.entropy_coef, agg_mode=g.agg_mode,
                                 num_tokens=num_tokens, num_seqs=num_seqs, norm_len=cfg.rollout.max_new_tokens)
        weight = 0.0 if i >= len(groups) else 1.0
        # FSDP averages gradients over ranks; the loss is already a global mean, so undo the average
        (loss * weight * d.world).backward()
        diff = ((logp.detach() - mb.sampler_logp).abs() * mb.loss_mask).float()
        m["sampler_logp_diff/mean"] = diff.sum() / max(num_tokens, 1)
        m["sampler_logp_diff/max"] = diff.max()
        for k, v in m.items():
            if k.endswith("/max"):
                totals[k] = max(totals.get(k, 0.0), float(v) * weight)
            else:
                totals[k] = totals.get(k, 0.0) + float(v) * weight
    return _reduce_metrics(totals, d)


def _update(model, opt, sched, batch: TrainBatch, rows, old_logp, ref_logp, cfg, d: Dist, state) -> dict:
    """One optimizer update over `rows`; a non-finite loss or gradient skips it (counted, and fatal after
    cfg.grpo.max_bad_steps in a row)."""
    totals = accumulate_gradients(model, batch, rows, old_logp, ref_logp, cfg, d)
    grad_norm = float(clip_grad_norm(model, cfg.optim.grad_clip))
    ok = math.isfinite(grad_norm) and all(math.isfinite(v) for v in totals.values())
    if ok:
        opt.step()
        state.bad_in_a_row = 0
    else:  # keep the weights, count it
        state.bad_in_a_row += 1
        state.skipped += 1
        if state.bad_in_a_row >= cfg.grpo.max_bad_steps:
            raise FloatingPointError(f"{state.bad_in_a_row} updates in a row had a non-finite loss or gradient "
                                     f"(grad norm {grad_norm}); lower optim.lr or check the data and rewards. "
                                     "The last checkpoint is intact.")
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped update still advances the schedule, by design
        warnings.filterwarnings("ignore", message="Detected call of")
        sched.step()
    totals["grad_norm"], totals["skipped_update"] = grad_norm, float(not ok)
    return totals


def _reduce_metrics(totals: dict, d: Dist) -> dict:
    """Sum the metrics over ranks (maxima for "/max" keys)."""
    keys = sorted(totals)
    sums = all_reduce(torch.tensor([0.0 if k.endswith("/max") else totals[k] for k in keys], device=d.device))
    maxes = all_reduce(torch.tensor([totals[k] if k.endswith("/max") else 0.0 for k in keys], device=d.device), "max")
    return {k: float(mx if k.endswith("/max") else sm) for k, sm, mx in zip(keys, sums.tolist(), maxes.tolist())}


def _model_kwargs(model, mb: TrainBatch, d: Dist) -> dict:
    kw = {"input_ids": mb.input_ids.to(d.device), "attention_mask": mb.attention_mask.to(d.device)}
    if structured_tags(model) is not None:
        kw["response_start"] = mb.response_start  # tags inside the prompt stay plain text
    return kw


def _rows(full: torch.Tensor, batch: TrainBatch, rows, idx, mb: TrainBatch) -> torch.Tensor:
    """The columns of precomputed per-token values (over the whole batch) that micro-batch `mb` covers."""
    sel = torch.as_tensor(rows)[torch.as_tensor(idx)]
    left = batch.response_start - mb.response_start
    return full[sel, left:left + mb.input_ids.shape[1]].to(mb.loss_mask.device)


def _logprobs_no_grad(model, batch: TrainBatch, cfg, d: Dist) -> torch.Tensor:
    """Per-token log-probs of the whole batch (N, T) with no graph, micro-batched."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    groups = micro_batches(batch.prompt_len, batch.response_len, cfg.grpo.micro_batch_tokens)
    n_micro = int(all_reduce(torch.tensor(float(len(groups)), device=d.device), op="max").item())
    with torch.no_grad():
        for i in range(n_micro):
            idx = groups[min(i, len(groups) - 1)]
            mb = batch.select(idx)
            kw = _model_kwargs(model, mb, d)
            logp = token_logprobs(model, kw.pop("input_ids"), kw.pop("attention_mask"),
                                  temperature=cfg.rollout.temperature, chunk_size=cfg.grpo.logprob_chunk, **kw)
            left = batch.response_start - mb.response_start
            out[torch.as_tensor(idx), left:left + logp.shape[1]] = logp.float().cpu()
    return out


def _step_metrics(step, rollout, texts, scores, rewards, updates, G, sched, d, times) -> dict:
    """Step metrics summed over ranks (TRL's names where one exists)."""
    stats = [parallel_stats(t) for t in texts]
    lengths = rollout.response_mask.sum(1).float()
    first = [s.first_block_position for s in stats if s.first_block_position is not None]
    local = torch.tensor([
        len(texts), float(rewards.sum()), float((rewards ** 2).sum()),
        sum(float(c.get("accuracy", 0.0)) for c in scores.components),
        sum(s.num_blocks > 0 for s in stats), sum(s.well_formed for s in stats),  # DESIGN: >= 1 valid block
        float(lengths.sum()), sum(r != "stop" for r in rollout.finish_reason), frac_zero_std(rewards, G) * len(texts) / G,
        sum(first), len(first), float(rollout.response_mask.sum()), scores.timeouts, scores.errors,
    ], dtype=torch.float64, device=d.device)
    n, rs, rs2, acc, par, wf, ln, cut, zs, fp, nf, tok, to, err = all_reduce(local).tolist()
    max_len = all_reduce(lengths.max().to(d.device), op="max").item()
    mean = rs / n
    out = {"step": step, "reward": mean, "reward_std": math.sqrt(max(rs2 / n - mean * mean, 0.0)),
           "accuracy": acc / n, "parallel_ratio": par / n, "well_formed": wf / n,
           "completions/mean_length": ln / n, "completions/max_length": max_len, "completions/clipped_ratio": cut / n,
           "frac_reward_zero_std": zs / (n / G), "first_block_position": fp / nf if nf else None,
           "reward/timeouts": to, "reward/errors": err, "learning_rate": sched.get_last_lr()[0]}
    for k in updates[0]:
        vals = [u[k] for u in updates]
        out[k] = max(vals) if k.endswith("/max") else sum(vals) / len(vals)
    total = sum(times.values())
    out.update({f"time/{k}": v for k, v in times.items()})
    out["tokens_per_s"] = tok / max(total, 1e-9)
    return out


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the end of the step. A second Ctrl-C
    abandons the step at once (KeyboardInterrupt): the last checkpoint stays the latest complete one."""

    def __enter__(self):
        self.flag, self.old = False, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, d: Dist) -> bool:
        flag = torch.tensor(float(self.flag), device=d.device)
        return bool(all_reduce(flag, op="max").item())  # every rank stops at the same step

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
