"""What the GRPO loop (grpo/trainer.py) and the SFT loop (curriculum/sft.py) share: the loop state a checkpoint
carries, Ctrl-C / SIGTERM handling and the end-of-step save, the held-out evaluation every eval.every steps and
the best checkpoint it picks, a stage's sampler, and the forward that scores a micro-batch the way the sampler
saw it."""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field

import torch

from model.patch import structured_tags
from model.tokenizer import newline_id
from rollout import Sampler

from . import checkpoint as ckpt
from .batching import TrainBatch
from .fsdp import Dist, all_reduce
from .logprobs import token_logprobs


@dataclass
class TrainState:
    """What a checkpoint needs besides model and optimizer to continue exactly."""
    step: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0
    tokens_seen: int = 0  # prompt and completion tokens of every step so far, all ranks (TRL's num_tokens)
    feed: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # checkpoint.keep_best's record: {"metric", "step", "value"}


class StopRequested(Exception):
    """Ctrl-C / SIGTERM: the run saved a checkpoint and stops."""


class StepAbandoned(Exception):
    """A stop was asked for while this step was sampling: every rank drops the step (the weights are those of
    the last finished step) so that the stop is saved within torchrun's grace period."""


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the end of the step, or at once when the flag
    comes while the step is still sampling (`sampling_stop`: the rollout is abandoned, nothing has changed
    yet, and under torchrun the workers are killed 30 s after the signal). A second Ctrl-C abandons the step
    at once (KeyboardInterrupt): the last checkpoint stays the latest complete one."""

    def __enter__(self):
        self.flag, self.old = False, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        # under torchrun a terminal Ctrl-C reaches a worker twice (from the terminal, then forwarded by torchrun,
        # which kills the workers 30 s later anyway): only a lone process takes a second one as "stop now"
        if self.flag and signum == signal.SIGINT and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, d: Dist) -> bool:
        flag = torch.tensor(float(self.flag), device=d.device)
        return bool(all_reduce(flag, op="max").item())  # every rank stops at the same step

    def asked(self) -> bool:
        """This rank's flag, no collective: what the sampler polls between decode steps."""
        return self.flag

    def after_sampling(self, d: Dist) -> None:
        """The collective every rank runs once its sampling ended or was abandoned, before anything of the step
        changes the weights: StepAbandoned on every rank when any rank was asked to stop."""
        if self.requested(d):
            raise StepAbandoned

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def start_note(name: str, where: str | None, step: int, steps: int) -> str:
    """The line a training loop says before its first step: where it resumed (ckpt.resume's answer) or that it
    starts at step 0."""
    if where:
        return f"{name}: resumed from {where} (step {step} of {steps})"
    return f"{name}: starting at step 0 of {steps}"


def save_abandoned(run_dir, cfg, model, opt, sched, state, d, tokenizer) -> None:
    """A stop that came while step `state.step` was sampling: save the last finished step (unless its checkpoint
    is there already) and raise StopRequested."""
    done = os.path.join(run_dir, "checkpoints", f"step-{state.step}")
    if state.step and ckpt.latest_name(run_dir) != done:
        ckpt.save(run_dir, model, opt, sched, state, d, tokenizer, config=asdict(cfg), keep=cfg.checkpoint.keep)
    saved = f"checkpoint of step {state.step} in {run_dir}/checkpoints" if state.step else "no step had finished"
    raise StopRequested(f"stopped while sampling step {state.step + 1}, which was dropped; {saved}")


def save_or_stop(run_dir, cfg, model, opt, sched, state, d, tokenizer, stop: StopFlag, last: bool,
                 new_best: bool = False) -> None:
    """End of a step (GRPO and SFT alike): a checkpoint when one is due, at the last step, when this step's
    evaluation is the best so far (`new_best`: then also exported as <run_dir>/best), or when Ctrl-C / SIGTERM
    asked to stop (all ranks decide together); then StopRequested if asked before the last step. Rotation
    never removes the best checkpoint (state.best)."""
    stopping = stop.requested(d)
    if stopping or last or new_best or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
        path = ckpt.save(run_dir, model, opt, sched, state, d, tokenizer, config=asdict(cfg),
                         keep=cfg.checkpoint.keep, protect=state.best.get("step"))
        if new_best:
            ckpt.export_best(path, os.path.join(run_dir, "best"), run_dir, d)
    if stopping and not last:
        raise StopRequested(f"stopped at step {state.step}; checkpoint saved in {run_dir}/checkpoints")


def evaluation_due(step: int, every: int, last: bool) -> bool:
    """Whether the held-out evaluation runs after `step` updates: every `every` steps and at the last step
    (which the stage's end then reuses), never when every is 0 (the stage evaluates at its end only)."""
    return every > 0 and (step % every == 0 or last)


def run_evaluation(evaluate_fn, model, last: bool, d: Dist) -> dict:
    """evaluate_fn(model, last) -> {"eval/<set>/<metric>": value} on every rank (a collective), plus its seconds
    as time/eval. Every RNG is put back afterwards, so a run with evaluations trains on exactly the random
    stream of one without (and a resumed run stays bit-identical)."""
    t0 = time.perf_counter()
    with ckpt.rng_preserved():
        figures = evaluate_fn(model, last)
    model.train()
    return {**figures, "time/eval": time.perf_counter() - t0}


def better(value, best, mode: str = "max") -> bool:
    """Whether `value` beats the best so far (`best` None: nothing yet); a missing or NaN value never does."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def record_best(state: TrainState, metrics: dict, key: str | None, mode: str = "max") -> bool:
    """checkpoint.keep_best's bookkeeping after an evaluation: when metrics[key] beats state.best, state.best
    becomes {"metric": key, "step": state.step, "value": ...} and True is returned (save and export it)."""
    best = state.best.get("value") if state.best.get("metric") == key else None  # another metric's: none yet
    if not key or key not in metrics or not better(metrics[key], best, mode):
        return False
    state.best = {"metric": key, "step": state.step, "value": float(metrics[key])}
    return True


def make_sampler(model, tokenizer, tags, ro, compute_dtype=None) -> Sampler:
    """The sampler of a stage, from its `rollout` config section (limits and KV budget). `compute_dtype` is the
    KV cache's dtype: under FSDP mixed precision the (fp32) sharded parameters do not tell it."""
    return Sampler.from_section(model, tags, ro, pad_id=tokenizer.pad_token_id, newline_id=newline_id(tokenizer),
                                dtype=compute_dtype)


def micro_batch_logprobs(model, mb: TrainBatch, device, *, temperature: float = 1.0, chunk_size: int = 1024,
                         with_entropy: bool = False):
    """token_logprobs of a micro-batch (B, T) as the sampler computed them: a causal model gets positions
    counted from each row's first real token, as the sampler's prefill does, so a row's log-probs do not
    depend on how much left padding its micro-batch has (RoPE is shift-invariant only in exact arithmetic:
    fp32 drifts with the shift); a structured model builds its positions and path mask from the tags."""
    ids, attn = mb.input_ids.to(device), mb.attention_mask.to(device)  # (B, T)
    if structured_tags(model) is not None:
        kw = {"response_start": mb.response_start}  # tags inside the prompt stay plain text
    else:
        kw = {"position_ids": (attn.long().cumsum(1) - 1).clamp(min=0)}  # (B, T)
    return token_logprobs(model, ids, attn, temperature=temperature, chunk_size=chunk_size,
                          with_entropy=with_entropy, **kw)
