"""Stages and the pipeline: a stage is a function from (config, start model) to an output model directory
(`<run_dir>/final`, an HF directory with its tokenizer); the pipeline chains them, each `init_from`
naming an earlier stage. A stage whose final model exists is skipped on a re-run; a stage cut short
resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from grpo.checkpoint import is_complete, write_manifest
from grpo.fsdp import Dist, barrier, model_state_dict, parallelize
from grpo.trainer import train_grpo
from model import apply_structured_attention, build_model, check_tokenizer_fits, load_model, load_tokenizer, save_model
from model.load import resolve_dtype
from model.tags import add_tag_tokens
from model.tokenizer import BASIC_WORDS, build_word_tokenizer

from .config import Config, ConfigError, pipeline_stages, read_yaml, save_config
from .data import PromptStream, load_examples, split_examples
from .evaluate import load_benchmarks, stage_figures
from .prompts import encode_prompt, format_prompt
from .summary import stage_seconds
from . import synthetic


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt_ids: list
    answer: str


class PromptFeed:
    """GRPO prompts: an endless, resumable, seeded stream of encoded questions with their answers."""

    def __init__(self, examples, tokenizer, cfg):
        self.examples, self.tokenizer, self.cfg = examples, tokenizer, cfg
        self.stream = PromptStream(list(range(len(examples))), seed=cfg.seed)
        self.cache: dict[int, list] = {}

    def _ids(self, i: int) -> list:
        if i not in self.cache:
            d = self.cfg.data
            text = format_prompt(self.examples[i].question, d.prompt_style)
            self.cache[i] = encode_prompt(self.tokenizer, text, d.template, d.max_prompt_tokens)[0]
        return self.cache[i]

    def next_batch(self, n: int) -> list[PromptItem]:
        return [PromptItem(self.examples[i].id, self._ids(i), self.examples[i].answer) for i in self.stream.next_batch(n)]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


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
    if d.synthetic:
        exclude = [ex for exs in heldout.values() for ex in exs]
        examples = synthetic.synthetic_sets(d.synthetic, exclude)
    else:
        examples = load_examples(d.train, d.fields, d.limit, d.repair_latex_escapes)
    if d.val:
        return examples, load_examples(d.val, d.fields, d.limit, d.repair_latex_escapes)
    if d.val_size:
        return split_examples(examples, d.val_size, cfg.seed)
    return examples, []


def export_final(model, tokenizer, run_dir: str, d: Dist, **export) -> str:
    """<run_dir>/final: the stage's output as an HF directory (written atomically, with a manifest).
    `export`: save_model's keyword arguments (variant, template, prompt_style)."""
    final, tmp = os.path.join(run_dir, "final"), os.path.join(run_dir, "final.tmp")
    state = model_state_dict(model)  # a collective under FSDP
    if d.main:
        save_model(tmp, model.config, state, tokenizer, **export)
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


def run_stage(cfg: Config, d: Dist, init_dir: str | None = None) -> tuple[str, dict]:
    """Train one stage; returns (final model directory, summary of held-out figures)."""
    final = os.path.join(cfg.run_dir, "final")
    summary_path = os.path.join(cfg.run_dir, "summary.json")
    if is_complete(final) is None and os.path.exists(summary_path):
        with open(summary_path) as f:
            return final, json.load(f)  # done in an earlier run
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    if d.main:
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    tokenizer, tags = make_tokenizer(cfg, init_dir)
    model, compute = make_model(cfg, d, tokenizer, tags, init_dir)
    heldout = heldout_sets(cfg)
    train, val = load_train_data(cfg, heldout)
    if cfg.kind == "sft":
        from .sft import train_sft
        train_sft(cfg, model, tokenizer, tags, train, val, cfg.run_dir, d, compute_dtype=compute)
    else:
        ref = None
        if cfg.grpo.kl_coef > 0:
            ref, _ = make_model(cfg, d, tokenizer, tags, init_dir, trainable=False)
        train_grpo(cfg, model, tokenizer, tags, PromptFeed(train, tokenizer, cfg), cfg.run_dir, d, ref_model=ref,
                   compute_dtype=compute)
    final = export_final(model, tokenizer, cfg.run_dir, d, variant=cfg.variant, template=cfg.data.template,
                         prompt_style=cfg.data.prompt_style)
    summary = {"init_from": init_dir, **stage_seconds(cfg.run_dir)}
    t_eval = time.perf_counter()
    if heldout:
        summary.update(stage_figures(model, tokenizer, tags, heldout, cfg, d))
    summary["seconds_eval"] = time.perf_counter() - t_eval  # the held-out evaluation
    summary["seconds"] = time.perf_counter() - t0  # this run's wall clock for the stage, setup and export included
    if d.main:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    return final, summary


def resolve_init(stage: Config, finals: dict) -> str | None:
    """init_from: an earlier stage of this pipeline -> its final model; a model directory; or the name of a
    stage config (configs/<name>.yaml) -> the final model of its run_dir."""
    name = stage.init_from
    if name is None:
        return None
    if name in finals:
        return finals[name]
    if os.path.isdir(name):
        return name
    try:
        other = read_yaml(name)
    except ConfigError:
        raise ValueError(f"{stage.name}: init_from={name!r} is neither an earlier stage of this pipeline "
                         f"({sorted(finals) or 'none'}), a model directory, nor a config in configs/") from None
    final = os.path.join(other.get("run_dir", os.path.join("runs", name)), "final")
    if is_complete(final) is not None:
        raise ValueError(f"{stage.name}: init_from={name!r} means {final}, which is not there yet: run "
                         f"configs/{name}.yaml first (or the pipeline, configs/pipeline.yaml)")
    return final


def run_pipeline(cfg: Config, d: Dist) -> dict:
    """Run every stage of the config in order; returns {stage name: summary}."""
    finals, summaries = {}, {}
    for stage in pipeline_stages(cfg):
        init = resolve_init(stage, finals)
        finals[stage.name], summaries[stage.name] = run_stage(stage, d, init)
    if cfg.kind == "pipeline" and d.main:
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump({**summaries, "variant": cfg.variant, "seed": cfg.seed}, f, indent=2)
    return summaries
