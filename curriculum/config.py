"""The config tree: dataclasses with defaults in code, filled from YAML, every key and type checked.

A YAML file holds only what differs from these defaults. Unknown keys (with the closest valid key
suggested), wrong types, bad choices and missing files stop the run before any work, naming the full
dotted key. `--set grpo.clip_high=0.28` goes through the same check.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A bad config: the message names the dotted key (or file) and what is allowed."""


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face Qwen3 directory (or a checkpoint's model/ directory)
    build: dict | None = None  # instead of path: Qwen3Config fields of a randomly initialised model
    tokenizer: str | None = None  # tokenizer directory; default: `path`; "words" = the local word tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameters (FSDP reduces in fp32)
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False  # activation checkpointing on each decoder layer
    device: str = "auto"  # auto = cuda:<local rank> when CUDA is available, else cpu


@dataclass
class DataConfig:
    train: str | None = None  # JSONL or parquet of questions and answers
    val: str | None = None  # held-out file; when absent, `val_size` rows of train are held out
    val_size: int | float = 0  # rows (int) or a fraction (float) of train held out for validation
    fields: dict = field(default_factory=dict)  # our name -> column, e.g. {question: problem}
    limit: int | None = None  # read only the first rows (debugging)
    repair_latex_escapes: bool = False  # undo the JSON-escape bug of DAPO-Math-17k ("\x0crac")
    prompt_style: Literal["parallel", "plain", "none", "demo", "demo_plain"] = "parallel"
    template: Literal["chat", "raw"] = "raw"  # chat template, or raw text (base models)
    max_prompt_tokens: int = 2000  # longer prompts are cut from the left
    synthetic: dict | None = None  # the demo task instead of files: {easy: n, hard: n, seed: s}


@dataclass
class RolloutConfig:
    group_size: int = 8  # samples per prompt (G)
    max_new_tokens: int = 3000  # response limit, paths and forced tags included
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_paths: int = 2  # paths per block (structured sampling)
    max_parallel_blocks: int = 4  # blocks per response (structured sampling)
    max_path_tokens: int | None = None  # path length limit, tags included (structured sampling)
    prefill_rows: int = 64  # prompts per prefill forward
    # KV cache budget of the sampler (continuous batching: samples flow through the rows that fit)
    kv_cache_gb: float | None = None  # GiB per rank; None = kv_cache_fraction of free CUDA memory, 4 GiB on CPU
    kv_cache_fraction: float = 0.7  # CUDA, kv_cache_gb unset: share of the memory free when sampling starts


@dataclass
class GRPOConfig:
    steps: int = 100  # optimizer-step rounds (one rollout batch each)
    prompts_per_step: int = 256  # P, over all ranks
    mini_batch_prompts: int = 128  # prompts per optimizer update; P / this = updates per step
    ppo_epochs: int = 1  # passes over each rollout batch
    micro_batch_tokens: int = 16384  # padded tokens per forward/backward
    clip_low: float = 0.2
    clip_high: float = 0.2  # 0.28 = DAPO's clip-higher
    clip_c: float | None = None  # dual clip (> 1) for negative advantages
    kl_coef: float = 0.0  # 0: no reference model is loaded or run
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    adv_scale: Literal["group", "batch", "none"] = "group"  # none = Dr. GRPO
    filter_zero_std: bool = False  # drop groups whose rewards are all equal (DAPO dynamic sampling)
    mask_truncated: bool = False  # no loss on responses cut by the length limit
    loss_on_forced: bool = False  # train on forced structural tokens too
    logprob_chunk: int = 1024  # sequence chunk of the chunked log-prob head
    max_bad_steps: int = 3  # stop after this many non-finite updates in a row


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warmup
    min_lr_ratio: float = 0.0  # cosine/linear floor, as a fraction of lr


@dataclass
class RewardConfig:
    mode: Literal["accuracy", "alternating", "parallel_bonus"] = "accuracy"
    window: int = 10  # alternating: steps per window
    accuracy_steps: int = 8  # alternating: accuracy-only steps at the start of each window
    correct: float = 1.0
    wrong: float = -1.0
    correct_parallel: float = 1.2  # alternating: correct with a well-formed block
    bonus: float = 0.2  # parallel_bonus: added for a well-formed block
    format_penalty: float = 0.0  # added when the tags are not well formed (0 = off)
    scaffold_until: int | None = None  # parallel reward off after this step
    workers: int = 2  # reward processes (0 = in-process)
    timeout: float = 10.0  # seconds per response


@dataclass
class SFTConfig:
    epochs: float = 2.0  # passes over the training set
    steps: int | None = None  # instead of epochs: a fixed number of optimizer steps
    batch_size: int = 64  # sequences per optimizer step, over all ranks
    micro_batch_tokens: int = 16384
    max_total_tokens: int = 4096  # prompt + solution
    eval_every: int = 0  # validation loss + sampled format validity every N steps (0 = once per epoch)
    eval_samples: int = 32  # prompts sampled for the format-validity figure


@dataclass
class EvalConfig:
    # name -> {path, samples, temperature, fields, repair_latex_escapes, synthetic}; checked key by key by
    # curriculum.evaluate.BenchmarkSpec (a relative path is read from data_dir; default <data_dir>/<name>.jsonl)
    benchmarks: dict = field(default_factory=dict)
    data_dir: str = "data"  # where benchmark files are looked up by default
    limit: int | None = None  # problems per benchmark (debugging)
    samples: int | None = None  # responses per problem for every benchmark, overriding theirs (quick looks)
    batch_prompts: int = 32  # prompts per sampler call (and per resumable record batch); memory: rollout.kv_cache_gb
    every: int = 0  # stages: held-out evaluation every N steps (0 = at the end only)


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (0 = only the final one)
    keep: int = 3  # complete checkpoints kept
    resume: str = "auto"  # auto = latest complete one in run_dir/checkpoints; never; or a path


@dataclass
class Config:
    name: str = "run"
    kind: Literal["sft", "grpo", "pipeline"] = "grpo"
    variant: Literal["causal", "structured"] = "causal"
    seed: int = 0
    run_dir: str = "runs/run"  # metrics.jsonl, plots, checkpoints, final/ (the HF export)
    init_from: str | None = None  # a model directory, or the name of an earlier stage of the pipeline
    stages: list = field(default_factory=list)  # pipeline: stage files or inline stage dicts, in order
    quick: dict = field(default_factory=dict)  # overrides applied by `run.py --quick`
    short: dict = field(default_factory=dict)  # overrides applied by `run.py --short`
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --- building a typed tree from plain dicts -----------------------------------------------------------

def _check_value(value, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {type(value).__name__}")
        return from_dict(tp, value, key + ".")
    want = origin or tp
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is float and isinstance(value, str):  # YAML reads 1e-6 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {getattr(want, '__name__', want)}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _check_value(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list) -> dict:
    """["grpo.clip_high=0.28", "variant=structured"] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set grpo.clip_high=0.28")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def resolve_config_path(path: str, beside: str | None = None) -> str:
    """A config file from any working directory: `path` as given (absolute, or relative to the current
    directory; first relative to the directory `beside` when given: a pipeline's stage files sit next to
    it), else the same name in the package's configs/ directory, with or without `.yaml` and with or
    without a leading `configs/`: `stage2`, `stage2.yaml` and `configs/stage2.yaml` all work."""
    tried = [os.path.join(beside, path)] if beside else []
    tried.append(path)
    if not os.path.isabs(path):
        parts = os.path.normpath(path).split(os.sep)
        name = os.path.join(*parts[1:]) if parts[0] == "configs" and len(parts) > 1 else path
        names = [n + ext for n in (path, name) for ext in ("", ".yaml") if not (ext and n.endswith((".yaml", ".yml")))]
        tried += [os.path.join(CONFIG_DIR, n) for n in names]
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"config file {path!r} not found (looked for {', '.join(dict.fromkeys(tried))})")


def read_yaml(path: str, beside: str | None = None) -> dict:
    path = resolve_config_path(path, beside)
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def build_config(data: dict) -> Config:
    cfg = from_dict(Config, data)
    if cfg.kind == "pipeline" and not cfg.stages:
        raise ConfigError("kind: pipeline needs a non-empty 'stages' list (stage files or inline stage dicts)")
    return cfg


PIPELINE_ONLY = ("kind", "name", "stages", "quick", "short", "run_dir")


def load_config(path: str, overrides: list | None = None, quick: bool = False, short: bool = False) -> Config:
    """Read a YAML config, apply `--quick` or `--short` (its `quick:` / `short:` block) and `--set` overrides,
    and validate.

    For a pipeline, every stage is resolved here into a full dict: the pipeline's own keys as shared
    defaults, then the stage's keys, then `quick` / `short` and `--set` again, so `--set variant=structured`
    reaches every stage even where a stage sets its variant.
    """
    path = resolve_config_path(path)
    data, here = read_yaml(path), os.path.dirname(path)
    block = "quick" if quick else "short" if short else None
    if block and not data.get(block):
        raise ConfigError(f"--{block}: {path} has no '{block}:' block of overrides to apply")
    late = deep_merge(data[block] if block else {}, parse_overrides(overrides))
    cfg = build_config(deep_merge(data, late))
    if cfg.kind == "pipeline":
        shared = _explicit({k: v for k, v in to_dict(cfg).items() if k not in PIPELINE_ONLY}, to_dict(Config()))
        late_stage = {k: v for k, v in late.items() if k not in PIPELINE_ONLY}
        resolved = []
        for i, entry in enumerate(cfg.stages):
            raw = read_yaml(entry, beside=here) if isinstance(entry, str) else entry
            if not isinstance(raw, dict):
                raise ConfigError(f"stages[{i}]: expected a stage file name or a mapping, got {entry!r}")
            resolved.append(deep_merge(deep_merge(shared, raw), late_stage))
        cfg.stages = resolved
    for stage in pipeline_stages(cfg):
        check_files(stage)
    return cfg


def pipeline_stages(cfg: Config) -> list[Config]:
    """The stages a config runs: itself, or each stage of a pipeline (resolved by load_config) with its
    run_dir set to <run_dir>/<stage name>."""
    if cfg.kind != "pipeline":
        return [cfg]
    out = []
    for i, raw in enumerate(cfg.stages):
        data = dict(raw)
        data.setdefault("name", f"stage{i}")
        data["run_dir"] = os.path.join(cfg.run_dir, data["name"])
        try:
            stage = build_config(data)
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({data['name']}): {e}") from None
        if stage.kind == "pipeline":
            raise ConfigError(f"stages[{i}]: a stage cannot itself be a pipeline")
        out.append(stage)
    return out


def _explicit(values: dict, defaults: dict) -> dict:
    """The parts of `values` that differ from `defaults` (so stage files keep their own settings)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(defaults.get(k), dict):
            sub = _explicit(v, defaults[k])
            if sub:
                out[k] = sub
        elif v != defaults.get(k):
            out[k] = v
    return out


def check_files(cfg: Config) -> None:
    """Missing model, tokenizer or data files stop the run before any work, naming the key."""
    if cfg.kind == "pipeline":
        return
    if cfg.model.path is None and cfg.model.build is None and cfg.init_from is None:
        raise ConfigError("model.path: no model given; set model.path (a local Qwen3 directory), "
                          "model.build (random init) or init_from")
    if cfg.model.path is not None and cfg.init_from is None and not os.path.isdir(cfg.model.path):
        raise ConfigError(f"model.path: directory {cfg.model.path!r} does not exist (models load from local "
                          "paths only; download Qwen3-4B-Base first and point model.path at it)")
    tok = cfg.model.tokenizer
    if tok not in (None, "words") and not os.path.isdir(tok):
        raise ConfigError(f"model.tokenizer: directory {tok!r} does not exist")
    if cfg.data.synthetic is None:
        for key in ("train", "val"):
            path = getattr(cfg.data, key)
            if key == "train" and path is None:
                raise ConfigError("data.train: no training file given (or set data.synthetic for the demo task)")
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"data.{key}: file {path!r} does not exist")


def save_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
