"""Stage 0: cold-start SFT on parallel-format solutions (loss on response tokens only).

Same machinery as GRPO: the chunked log-prob head, rank-aligned micro-batches to a token budget, the
loss normalised by the step's global token count, checkpoints and metrics.jsonl. The structured
variant trains with the structure's positions and path-window mask (the patched model builds them
from the ids; prompts are plain text via `response_start`). Each epoch (or every `sft.eval_every`
steps): the validation loss, and the share of sampled validation responses that are well formed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from grpo import checkpoint as ckpt
from grpo.batching import TrainBatch, aligned_micro_batches, pack_rows
from grpo.fsdp import Dist, all_reduce, clip_grad_norm, gathered_for_sampling
from grpo.loop import (StopFlag, TrainState, evaluation_due, make_sampler, micro_batch_logprobs, record_best,
                       run_evaluation, save_or_stop, start_note)
from grpo.loss import aggregate
from grpo.optim import build_optimizer
from grpo.runlog import append_metrics, plot_metrics
from grpo.tracking import Trackers
from model.patch import structured_tags
from model.tokenizer import decode_responses, stop_token_ids
from rewards import parallel_stats
from rollout import SamplingAborted, sampler_layout

from .data import PromptStream
from .prompts import encode_prompt, encode_sft_example, example_prompt

log = logging.getLogger(__name__)
PLOTS = {"loss": ["loss", "eval_loss"], "format": ["format_validity", "parallel_ratio"],
         "held-out mean@k (eval.every)": ["eval/*/mean_at_k"], "held-out format": ["eval/*/format_validity"]}


def encode_examples(tokenizer, examples, cfg) -> list[tuple[list, list, list]]:
    """(prompt ids, solution ids + EOS, loss mask) per example with a solution. Structured variant: the
    solutions' blocks in the layout the structured sampler forces (rollout.sampler_layout)."""
    out = []
    for ex in examples:
        if not ex.solution:
            raise ValueError(f"example {ex.id}: SFT needs a solution (the `solution` field) for every row")
        text = example_prompt(ex, cfg.data.prompt_style, cfg.data.instruction)
        solution = sampler_layout(ex.solution) if cfg.variant == "structured" else ex.solution
        ids, mask = encode_sft_example(tokenizer, text, solution, cfg.data.template, cfg.data.max_prompt_tokens,
                                       cfg.sft.max_total_tokens)
        n_prompt = mask.index(1) if 1 in mask else len(mask)
        out.append((ids[:n_prompt], ids[n_prompt:], mask[n_prompt:]))
    return out


def sft_batch(rows, pad_id: int) -> TrainBatch:
    return pack_rows([r[0] for r in rows], [r[1] for r in rows], pad_id, loss_masks=[r[2] for r in rows])


def mean_nll(model, batch: TrainBatch, cfg, d: Dist, backward: bool = False) -> float:
    """Token-mean NLL of the batch over all ranks, micro-batch by micro-batch; with `backward`, its
    gradient is accumulated too (the SFT step); without it no autograd graph is built (the validation loss)."""
    num_tokens = all_reduce(batch.loss_mask.sum().float().to(d.device)).item()
    total = 0.0
    for mb, _, weight in aligned_micro_batches(batch, cfg.sft.micro_batch_tokens, d.device):
        with torch.set_grad_enabled(backward):
            logp = micro_batch_logprobs(model, mb, d.device, chunk_size=cfg.grpo.logprob_chunk)  # (B, T)
            loss = aggregate(-logp, mb.loss_mask.to(logp.device), "token-mean", num_tokens=num_tokens)
        if backward:
            (loss * weight * d.world).backward()  # FSDP averages over ranks; the loss is a global mean already
        total += float(loss.detach()) * weight
    return float(all_reduce(torch.tensor(total, device=d.device)).item())


def validation_loss(model, rows, cfg, d: Dist) -> float:
    return mean_nll(model, sft_batch(rows, 0), cfg, d) if rows else float("nan")


def format_figures(model, tokenizer, tags, examples, cfg, d: Dist, seed: int, compute_dtype=None,
                   should_stop=None) -> dict:
    """Sample one response per validation prompt: shares that are well formed / hold a valid block. A stop
    asked for meanwhile (`should_stop`) abandons the sampling: no figures, and the step is saved as it is."""
    if not examples:
        return {}
    prompts = [encode_prompt(tokenizer, example_prompt(ex, cfg.data.prompt_style, cfg.data.instruction),
                             cfg.data.template, cfg.data.max_prompt_tokens)[0] for ex in examples]
    ro = cfg.rollout
    sampler = make_sampler(model, tokenizer, tags, ro, compute_dtype)
    model.eval()
    stats = []
    with torch.no_grad(), gathered_for_sampling(model):
        try:
            r = sampler.generate(prompts, n=1, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                                 stop_ids=stop_token_ids(tokenizer), structured=structured_tags(model) is not None,
                                 seed=seed, should_stop=should_stop)
            stats = [parallel_stats(t) for t in decode_responses(tokenizer, r.response_ids, r.response_mask)]
        except SamplingAborted:
            pass
    model.train()
    local = torch.tensor([len(stats), sum(s.well_formed for s in stats), sum(s.num_blocks > 0 for s in stats),
                          float(not stats)], dtype=torch.float64, device=d.device)
    n, wf, par, abandoned = all_reduce(local).tolist()  # every rank takes part, abandoned or not
    return {} if abandoned else {"format_validity": wf / n, "parallel_ratio": par / n}


def train_sft(cfg, model, tokenizer, tags, train, val, run_dir: str, d: Dist, compute_dtype=None,
              evaluate_fn=None) -> TrainState:
    """Run the SFT stage; returns the final loop state (checkpoints under run_dir/checkpoints).
    `compute_dtype`: the model's compute dtype (the format check's KV cache; see grpo.loop.make_sampler).
    `evaluate_fn`: the held-out evaluation every cfg.eval.every steps (as grpo.trainer.train_grpo's)."""
    s = cfg.sft
    if s.batch_size % d.world:
        raise ValueError(f"sft.batch_size={s.batch_size} must be a multiple of the world size {d.world}")
    rows = encode_examples(tokenizer, train, cfg)
    val_rows = encode_examples(tokenizer, val, cfg)[d.rank::d.world]
    steps = s.steps or max(1, math.ceil(s.epochs * len(rows) / s.batch_size))
    steps_per_epoch = max(1, len(rows) // s.batch_size)
    opt, sched = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas,
                                 cfg.optim.warmup_steps, steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
    stream, state = PromptStream(list(range(len(rows))), seed=cfg.seed), TrainState()
    where = ckpt.resume(run_dir, cfg.checkpoint.resume, model, opt, sched, state, stream, d,
                        expect={"variant": cfg.variant, "model.build": cfg.model.build, "sft.batch_size": s.batch_size})
    log.info(start_note(cfg.name, where, state.step, steps))
    every = s.eval_every or steps_per_epoch
    model.train()
    bar = tqdm(range(state.step, steps), initial=state.step, total=steps, desc=cfg.name, disable=not d.main)
    trackers = Trackers(cfg.report.to, run_dir, project=cfg.report.project, config=asdict(cfg), start_step=state.step,
                        enabled=d.main)
    with StopFlag() as stop, trackers:
        for step in bar:
            t0 = time.perf_counter()
            batch = sft_batch([rows[i] for i in stream.next_batch(s.batch_size)[d.rank::d.world]], 0)
            loss = mean_nll(model, batch, cfg, d, backward=True)
            grad_norm = float(clip_grad_norm(model, cfg.optim.grad_clip))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"SFT step {step}: non-finite loss {loss} or gradient norm {grad_norm}; "
                                         "lower optim.lr. The last checkpoint is intact.")
            lr = opt.param_groups[0]["lr"]  # what this update uses; the schedule steps after it
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            tokens, loss_tokens = all_reduce(torch.stack([batch.attention_mask.sum(), batch.loss_mask.sum()])
                                             .double().to(d.device)).tolist()
            state.tokens_seen += int(tokens)
            t1 = time.perf_counter()
            m = {"step": step, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "loss_tokens": loss_tokens,
                 "num_tokens": state.tokens_seen,
                 "tokens_per_s": tokens / (t1 - t0), "time/update": t1 - t0}
            state.step, state.feed = step + 1, stream.state_dict()
            last = state.step == steps
            if state.step % every == 0 or last:
                m["eval_loss"] = validation_loss(model, val_rows, cfg, d)
                t2 = time.perf_counter()
                m.update(format_figures(model, tokenizer, tags, val[: s.eval_samples][d.rank::d.world], cfg, d,
                                        should_stop=stop.asked,
                                        seed=cfg.seed + step, compute_dtype=compute_dtype))
                m["time/eval_loss"], m["time/sample"] = t2 - t1, time.perf_counter() - t2  # the sampled format check
            new_best = False
            if evaluate_fn is not None and evaluation_due(state.step, cfg.eval.every, last):
                m.update(run_evaluation(evaluate_fn, model, last, d))
                new_best = record_best(state, m, cfg.checkpoint.keep_best, cfg.checkpoint.best_mode)
            if d.main:
                append_metrics(run_dir, m)
                trackers.log(m)
                bar.set_postfix(loss=f"{loss:.3f}")
            save_or_stop(run_dir, cfg, model, opt, sched, state, d, tokenizer, stop, last, new_best)
    if d.main:
        plot_metrics(run_dir, PLOTS)
    return state
