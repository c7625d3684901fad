"""Stages and the pipeline: a stage is a function from (config, start model) to an output model directory
(`<run_dir>/final`, an HF directory with its tokenizer); the pipeline chains them, each `init_from`
naming an earlier stage. A run owns its run directories (a lock), reads every stage's data before any
work, and decides per stage what a re-run does (`plan_stage`): skip a finished stage with the same
config, continue one whose step count was raised, resume one cut short, start over on request; a stage
whose config changed otherwise is refused, naming the keys.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import yaml

from grpo import checkpoint as ckpt
from grpo.fsdp import Dist, broadcast_object, parallelize
from grpo.runlog import RunDirBusy, RunLock
from grpo.trainer import train_grpo
from model import apply_structured_attention, build_model, check_tokenizer_fits, load_model, load_tokenizer
from model.load import resolve_dtype
from model.tags import add_tag_tokens
from model.tokenizer import BASIC_WORDS, build_word_tokenizer
from rewards import ARGUMENTS

from .config import Config, ConfigError, pipeline_stages, save_config, to_dict
from .console import stage_opening
from .data import Patterns, PromptStream, load_examples, split_examples
from .evaluate import StepEvaluation, heldout_result, load_benchmarks, stage_figures
from .preflight import config_diff, flatten, resolve_init
from .prompts import encode_prompts, example_prompt
from .summary import stage_seconds
from . import synthetic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One GRPO prompt. `prompt`: its text before the template (or a conversational row's messages) and `columns`:
    the example's other fields and columns, both for reward.funcs (rewards.RewardInputs)."""
    id: str
    prompt_ids: list
    answer: str
    prompt: str | list = ""
    columns: dict = field(default_factory=dict)


class PromptFeed:
    """GRPO prompts: an endless, resumable, seeded stream of encoded questions with their answers. Every
    prompt is encoded up front; `cut` counts those longer than data.max_prompt_tokens (cut from the left)."""

    def __init__(self, examples, tokenizer, cfg):
        self.examples = examples
        self.stream = PromptStream(list(range(len(examples))), seed=cfg.seed)
        self.ids, self.cut = encode_stage_prompts(tokenizer, examples, cfg)
        self.style, self.instruction = cfg.data.prompt_style, cfg.data.instruction

    def next_batch(self, n: int) -> list[PromptItem]:
        return [self._item(i) for i in self.stream.next_batch(n)]

    def _item(self, i: int) -> PromptItem:
        ex = self.examples[i]
        # columns named like a reward function's own arguments (rewards.ARGUMENTS) would be shadowed: left out
        columns = {k: v for k, v in {"id": ex.id, "question": ex.question, "solution": ex.solution, **ex.meta}.items()
                   if k not in ARGUMENTS}
        return PromptItem(ex.id, self.ids[i], ex.answer, example_prompt(ex, self.style, self.instruction), columns)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def encode_stage_prompts(tokenizer, examples, cfg: Config) -> tuple[list, int]:
    """(prompt ids per example, how many were longer than data.max_prompt_tokens and cut from the left)."""
    d = cfg.data
    return encode_prompts(tokenizer, [example_prompt(ex, d.prompt_style, d.instruction) for ex in examples],
                          d.template, d.max_prompt_tokens)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_tokenizer(cfg: Config, init_dir: str | None):
    """The stage's tokenizer, with the six tags: from init_from, model.tokenizer, model.path, or built."""
    source = cfg.model.tokenizer
    if source == "words" or (source is None and init_dir is None and cfg.model.path is None):
        words = synthetic.DEMO_WORDS if cfg.data.synthetic else BASIC_WORDS
        tok = build_word_tokenizer(words)
        return tok, add_tag_tokens(tok)
    return load_tokenizer(source or init_dir or cfg.model.path)


def make_model(cfg: Config, d: Dist, tokenizer, tags, init_dir: str | None, trainable: bool = True):
    """Load (init_from / model.path) or build (model.build) the model, patch it for the structured variant,
    and shard it over the ranks."""
    structured = cfg.variant == "structured"
    cuda = d.device.type == "cuda"
    compute = resolve_dtype(cfg.model.dtype) if cuda else torch.float32
    # several ranks: fp32 master weights, FSDP computes in `compute`; one process: the dtype as given
    load_dtype = torch.float32 if d.world > 1 else compute
    attn = cfg.model.attn_implementation
    path = init_dir or cfg.model.path
    if path is not None:
        model = load_model(path, load_dtype, attn, d.device, structured)
    else:
        build = dict(cfg.model.build)
        build.setdefault("vocab_size", len(tokenizer))
        build.setdefault("eos_token_id", tokenizer.eos_token_id)
        build.setdefault("pad_token_id", tokenizer.pad_token_id)
        model = build_model(build, cfg.seed, load_dtype, attn, d.device, structured)
    check_tokenizer_fits(model, tokenizer, path or "model.build")
    if structured:
        apply_structured_attention(model, tags)
    model = parallelize(model, d, compute_dtype=compute, activation_checkpointing=cfg.model.gradient_checkpointing,
                        trainable=trainable)
    return model, compute


def heldout_sets(cfg: Config) -> dict:
    """name -> examples of the held-out benchmarks in cfg.eval.benchmarks (files or synthetic)."""
    if not cfg.eval.benchmarks:
        return {}
    return load_benchmarks(cfg)


def load_train_data(cfg: Config, heldout: dict):
    d = cfg.data
    patterns = Patterns(d.answer_pattern, d.question_pattern)
    if d.synthetic:
        exclude = [ex for exs in heldout.values() for ex in exs]
        # the structured variant samples its paths independently; its cold start shows such pairs
        examples = synthetic.synthetic_sets(d.synthetic, exclude, independent_paths=cfg.variant == "structured")
    else:
        examples = load_examples(d.train, d.fields, d.limit, d.repair_latex_escapes, patterns)
    if d.val:
        return examples, load_examples(d.val, d.fields, d.limit, d.repair_latex_escapes, patterns)
    if d.val_size:
        return split_examples(examples, d.val_size, cfg.seed)
    return examples, []


def say(d: Dist, line: str) -> None:
    if d.main and line:
        log.info(line)


def run_stage(cfg: Config, d: Dist, init_dir: str | None = None, plan: "Plan | None" = None,
              data: tuple | None = None, memory: str | None = None) -> tuple[str, dict]:
    """Train one stage; returns (final model directory, summary of held-out figures). `plan` (plan_stage's
    decision, made here when None) says whether it is skipped, resumed or started over; `data` is
    (heldout, train, val) when the caller has read them already; `memory`: the memory plan's headline for the
    opening summary (curriculum.memory.plan_headline)."""
    plan = plan or agree(plan_stage(cfg, d), d)
    final = os.path.join(cfg.run_dir, "final")
    summary_path = os.path.join(cfg.run_dir, "summary.json")
    say(d, plan.note)
    if plan.action == "skip":
        with open(summary_path) as f:
            return final, json.load(f)
    if plan.action == "start over":
        move_aside(cfg.run_dir, d)
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, resume="never"))
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    if d.main:
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    tokenizer, tags = make_tokenizer(cfg, init_dir)
    heldout, train, val = data or read_stage_data(cfg)  # every data error before the model is built
    feed = PromptFeed(train, tokenizer, cfg) if cfg.kind == "grpo" else None
    cut = feed.cut if feed else encode_stage_prompts(tokenizer, train + val, cfg)[1]  # SFT encodes its own
    if cut:
        say(d, f"{cfg.name}: {cut} of {len(feed.ids) if feed else len(train) + len(val)} prompts are longer than "
               f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} and are cut from the left (their start is lost)")
    summary = {"init_from": init_dir, "prompts_cut": cut}
    model, compute = make_model(cfg, d, tokenizer, tags, init_dir)
    say(d, stage_opening(cfg, d.device, d.world, model, compute, init_dir, (len(train), len(val)), cut, memory))
    step_eval = StepEvaluation(tokenizer, tags, heldout, cfg, d) if heldout and cfg.eval.every else None
    if cfg.kind == "sft":
        from .sft import train_sft
        state = train_sft(cfg, model, tokenizer, tags, train, val, cfg.run_dir, d, compute_dtype=compute,
                          evaluate_fn=step_eval)
    else:
        ref = None
        if cfg.grpo.kl_coef > 0:
            ref, _ = make_model(cfg, d, tokenizer, tags, init_dir, trainable=False)
        state = train_grpo(cfg, model, tokenizer, tags, feed, cfg.run_dir, d, ref_model=ref, compute_dtype=compute,
                           evaluate_fn=step_eval)
    final = ckpt.export_model(final, model, tokenizer, d, cfg.run_dir, config=to_dict(cfg))
    summary.update(stage_seconds(cfg.run_dir))  # seconds_eval: the evaluations during training so far
    t_eval = time.perf_counter()
    if heldout:  # the last step's evaluation when eval.every ran it in this process, else now
        result = step_eval.result if step_eval is not None and step_eval.result is not None else \
            heldout_result(model, tokenizer, tags, heldout, cfg, d, os.path.join(cfg.run_dir, "heldout"))
        summary.update(stage_figures(result, heldout))
    summary["seconds_eval"] += time.perf_counter() - t_eval  # the held-out evaluations, end of stage included
    if state.best:  # checkpoint.keep_best: which step, its value, where its export is
        step_dir = os.path.join(cfg.run_dir, "checkpoints", f"step-{state.best['step']}")
        summary["best"] = {**state.best, "checkpoint": step_dir, "export": os.path.join(cfg.run_dir, "best")}
    summary["seconds"] = time.perf_counter() - t0  # this run's wall clock for the stage, setup and export included
    if d.main:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    return final, summary


def read_stage_data(cfg: Config) -> tuple[dict, list, list]:
    """(held-out benchmarks, train, val) of a stage, every file read whole (DataError naming file:line)."""
    heldout = heldout_sets(cfg)
    return (heldout, *load_train_data(cfg, heldout))


# --- re-runs --------------------------------------------------------------------------------------------

# what a stage leaves in its run directory; a start-over moves these into <run_dir>/earlier-<k>
OUTPUTS = ("config.yaml", "metrics.jsonl", "training.png", "checkpoints", "final", "best", "rollouts", "summary.json",
           "heldout", "tensorboard", "wandb")  # the last two: report.to's


@dataclass(frozen=True)
class Plan:
    """What a run does with a stage's run directory, decided before any work."""
    action: str  # "skip" | "train" (from step 0, or from the latest checkpoint) | "start over"
    note: str = ""  # the line printed for it ("" for a first run)


def plan_stage(cfg: Config, d: Dist, upstream_trained: bool = False) -> Plan:
    """Compare the stage's resolved config with the one saved in its run directory (preflight.config_diff):
    the same and finished -> skip; only grpo.steps / sft.steps / sft.epochs raised -> train on from the last
    checkpoint; not finished -> resume; any other difference -> ConfigError naming the keys, unless
    checkpoint.resume is never (start over) or a checkpoint directory (a deliberate fork).
    `upstream_trained`: the stage's init_from was trained in this run, so its earlier outputs are stale."""
    run_dir, mode = cfg.run_dir, cfg.checkpoint.resume
    earlier = [name for name in OUTPUTS if os.path.exists(os.path.join(run_dir, name))]
    if mode == "never" or upstream_trained:
        why = ("checkpoint.resume is never" if mode == "never" else
               f"its starting model, {cfg.init_from}, was trained in this run")
        return Plan("start over", f"stage {cfg.name}: starting over ({why}); the earlier attempt is moved to "
                                  f"{run_dir}/earlier-N" if earlier else "")
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(saved_path):
        return Plan("train")
    with open(saved_path) as f:
        saved = yaml.safe_load(f) or {}
    changed, longer = config_diff(saved, to_dict(cfg), to_dict(Config()))
    final_there = os.path.exists(os.path.join(run_dir, "final"))
    if changed and mode == "auto" and not ckpt.list_checkpoints(run_dir) and not final_there:
        return Plan("start over", f"stage {cfg.name}: the earlier attempt left no checkpoint and had another config "
                                  f"({'; '.join(changed)}); starting over, its files moved to {run_dir}/earlier-N")
    if mode != "auto":
        return Plan("train", f"stage {cfg.name}: resuming from {mode}" +
                    (f" with a changed config: {'; '.join(changed)}" if changed else ""))
    if changed:
        raise ConfigError(f"{run_dir} holds a run of {cfg.name} with another config: {'; '.join(changed)}. "
                          "Start over there with --set checkpoint.resume=never (the earlier attempt is kept in "
                          f"{run_dir}/earlier-N), use another run_dir, or fork a checkpoint explicitly "
                          f"(checkpoint.resume: {run_dir}/checkpoints/step-N)")
    where = ckpt.latest_name(run_dir)
    finished = os.path.exists(os.path.join(run_dir, "summary.json"))
    if finished and ckpt.defect(os.path.join(run_dir, "final"), d=d) is None:
        if not longer:
            evals = flatten(saved.get("eval") or {}) != flatten(to_dict(cfg.eval))
            return Plan("skip", f"stage {cfg.name} already finished, skipping ({run_dir}/final)" +
                        ("; its summary.json figures were computed with the earlier eval settings" if evals else ""))
        more = ", ".join(f"{k} {flatten(saved).get(k)} -> {flatten(to_dict(cfg)).get(k)}" for k in longer)
        return Plan("train", f"stage {cfg.name}: extending the finished stage ({more}) from {where}")
    if where:
        return Plan("train", f"stage {cfg.name}: resuming from {where}")
    return Plan("train", f"stage {cfg.name}: no checkpoint yet, starting at step 0" if "metrics.jsonl" in earlier
                else "")


def agree(plans, d: Dist):
    """Rank 0's plans, on every rank. Each rank plans from the run directories as it finds them; a rank that
    planned late could see files rank 0 had begun to write for the stage (its config.yaml, half written) and
    decide otherwise (start over while rank 0 trains: both ranks then wait forever in different
    collectives). The broadcast is also the barrier: no rank writes before every rank has planned."""
    return broadcast_object(plans if d.main else None)


def move_aside(run_dir: str, d: Dist) -> None:
    """Move a stage's earlier outputs into <run_dir>/earlier-<k> (nothing is deleted). Rank 0 moves, every
    rank learns whether it could (a collective)."""
    error = None
    if d.main:
        present = [name for name in OUTPUTS if os.path.exists(os.path.join(run_dir, name))]
        k = 1
        while os.path.exists(os.path.join(run_dir, f"earlier-{k}")):
            k += 1
        try:
            for name in present:
                os.makedirs(os.path.join(run_dir, f"earlier-{k}"), exist_ok=True)
                os.replace(os.path.join(run_dir, name), os.path.join(run_dir, f"earlier-{k}", name))
        except OSError as e:
            error = f"could not move the earlier attempt in {run_dir} aside: {e}"
    error = broadcast_object(error)
    if error:
        raise RunDirBusy(error)


@contextmanager
def own_run_dirs(paths: list[str], d: Dist):
    """Hold the lock (grpo.runlog.RunLock) of every run directory in `paths` while the block runs; rank 0
    takes them and tells the others, so every rank raises RunDirBusy when one is held by another run."""
    locks, error = [], None
    if d.main:
        try:
            for path in dict.fromkeys(paths):
                locks.append(RunLock(path).acquire())
        except (RunDirBusy, OSError) as e:  # OSError: the directory cannot be made or locked at all
            error = str(e)
            for lock in locks:
                lock.release()
            locks = []
    error = broadcast_object(error)
    if error:
        raise RunDirBusy(error)
    for lock in locks:
        if lock.took_over:
            log.warning(f"note: {os.path.dirname(lock.path)} was left locked by {lock.took_over}, which is no longer "
                        "running; this run takes it over")
    try:
        yield
    finally:
        for lock in locks:
            lock.release()


def run_pipeline(cfg: Config, d: Dist, memory: dict | None = None) -> dict:
    """Run every stage of the config in order; returns {stage name: summary}. Before any training: the run
    directories are locked, every stage's data is read whole and every stage's plan is made (a refusal
    comes before the first stage trains). `memory`: stage name -> the memory plan's headline."""
    stages = pipeline_stages(cfg)
    with own_run_dirs([cfg.run_dir] + [s.run_dir for s in stages], d):
        plans, trained = [], set()
        for stage in stages:
            plans.append(plan_stage(stage, d, upstream_trained=stage.init_from in trained))
            if plans[-1].action != "skip":
                trained.add(stage.name)
        plans = agree(plans, d)
        data = {s.name: read_stage_data(s) for s, p in zip(stages, plans) if p.action != "skip"}
        finals, summaries = {}, {}
        for stage, plan in zip(stages, plans):
            init = resolve_init(stage, finals)
            finals[stage.name], summaries[stage.name] = run_stage(stage, d, init, plan, data.get(stage.name),
                                                                  (memory or {}).get(stage.name))
        if cfg.kind == "pipeline" and d.main:
            with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
                json.dump({**summaries, "variant": cfg.variant, "seed": cfg.seed}, f, indent=2)
    return summaries
