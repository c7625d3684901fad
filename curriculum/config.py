"""The config tree: dataclasses with defaults in code, filled from YAML, every key and type checked
(curriculum.schema does the checking).

A YAML file holds only what differs from these defaults. Unknown keys (with the closest valid key
suggested), wrong types, bad choices and missing files stop the run before any work, naming the full
dotted key. `--set grpo.clip_high=0.28` goes through the same check.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from .schema import ConfigError, from_dict, matching, parse_overrides, ranged, to_dict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


PLAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a stage name becomes a directory under run_dir: no '/', no '..'


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face Qwen3 directory (or a checkpoint's model/ directory)
    build: dict | None = None  # instead of path: Qwen3Config fields of a randomly initialised model
    tokenizer: str | None = None  # tokenizer directory; default: `path`; "words" = the local word tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameters (FSDP reduces in fp32)
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False  # activation checkpointing on each decoder layer
    # auto = cuda:<local rank> when CUDA is available, else cpu
    device: str = matching("auto", r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N")


@dataclass
class DataConfig:
    # .jsonl / .parquet (read directly), .csv / .arrow (through `datasets`), or a directory written by
    # datasets' save_to_disk (one split: <dir>/train of a DatasetDict); never a hub name
    train: str | None = None
    val: str | None = None  # held-out file; when absent, `val_size` rows of train are held out
    val_size: int | float = 0  # rows (int >= 0) or a fraction (float in (0, 1)) of train held out for validation
    # our name (id, question, answer, solution, prompt) -> column; dotted for nested values and list items,
    # e.g. {answer: reward_model.ground_truth, question: prompt.0.content}. A `prompt` holding a list of
    # {role, content} messages (TRL's conversational form) is the prompt as written, rendered with the chat
    # template (data.template: chat); prompt_style and instruction do not apply to it. The other columns go to
    # reward.funcs as keyword arguments.
    fields: dict = field(default_factory=dict)
    # regex whose first group is the gold answer, searched in the answer column: GSM8K's published form
    # (answer "... #### 72") loads with answer_pattern: '####\s*(.+)'
    answer_pattern: str | None = None
    # regex whose first group is the question, searched in the question column (strip another prompt's wrapper)
    question_pattern: str | None = None
    limit: int | None = ranged(None, ge=1)  # read only the first rows (debugging)
    repair_latex_escapes: bool = False  # undo the JSON-escape bug of DAPO-Math-17k ("\x0crac")
    prompt_style: Literal["parallel", "plain", "none", "demo", "demo_plain"] = "parallel"
    instruction: str | None = None  # the prompt text with {question} once, instead of prompt_style's
    template: Literal["chat", "raw"] = "raw"  # chat template, or raw text (base models)
    max_prompt_tokens: int = ranged(2000, ge=1)  # longer prompts are cut from the left
    # the demo task instead of files: {difficulty, n, seed, solution}; `solution: parallel` writes the paths in a
    # fixed order for the causal variant and draws each path's form for the structured one (as it samples them);
    # `solution: mixed`: half parallel, half plain (even / odd problems)
    synthetic: dict | None = None


@dataclass
class RolloutConfig:
    group_size: int = ranged(8, ge=2)  # samples per prompt (G); a group of one has no advantage
    max_new_tokens: int = ranged(3000, ge=1)  # response limit, paths and forced tags included
    temperature: float = ranged(1.0, ge=0.0)  # 0 = greedy (evaluation only; GRPO needs > 0)
    top_p: float = ranged(1.0, gt=0.0, le=1.0)
    top_k: int = ranged(0, ge=0)  # 0 = off
    num_paths: int = ranged(2, ge=2)  # paths per block (structured sampling)
    max_parallel_blocks: int = ranged(4, ge=0)  # blocks per response (structured sampling)
    max_path_tokens: int | None = ranged(None, ge=1)  # path length limit, tags included (structured sampling)
    prefill_rows: int = ranged(64, ge=1)  # prompts per prefill forward
    # the sampler's paged KV cache (rollout/cache.py): the budget buys pages, samples flow through them
    # GiB per rank; None = kv_cache_fraction of free CUDA memory, 4 GiB on CPU
    kv_cache_gb: float | None = ranged(None, gt=0.0)
    # CUDA, kv_cache_gb unset: share of the memory free when sampling starts
    kv_cache_fraction: float = ranged(0.7, gt=0.0, le=1.0)
    page_size: int = ranged(16, ge=1)  # tokens per KV page; each shared segment (prompt, block prefix) wastes < 1
    max_rows: int = ranged(256, ge=2)  # rows one decode step carries at most (samples + the paths of open blocks)
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # replay decode steps from CUDA graphs (auto: on CUDA)


@dataclass
class GRPOConfig:
    steps: int = ranged(100, ge=1)  # optimizer-step rounds (one rollout batch each)
    prompts_per_step: int = ranged(256, ge=1)  # P, over all ranks
    mini_batch_prompts: int = ranged(128, ge=1)  # prompts per optimizer update; P / this = updates per step
    ppo_epochs: int = ranged(1, ge=1)  # passes over each rollout batch
    # tokens per forward/backward: real tokens when packed, rows x longest row when not (a longer row runs alone)
    micro_batch_tokens: int = ranged(16384, ge=1)
    # padding-free micro-batches: rows back to back with their own positions and a block-diagonal mask, spread
    # evenly over the ranks by tokens; false: each rank's rows padded to the longest of their micro-batch
    pack: bool = True
    # ppo_clip: PPO's clipped ratio per token (GRPO, DAPO); gspo: the sequence's ratio (geometric mean of its
    # tokens'), clipped per sequence (Zheng et al. 2025); cispo: a clipped, detached importance weight on
    # -A * logp, so every token keeps its gradient (MiniMax-M1 2025)
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = "ppo_clip"
    # clip range [1 - clip_low, 1 + clip_high]; unset = the policy loss's published one (grpo/loss.py
    # OBJECTIVE_DEFAULTS): ppo_clip 0.2 / 0.2, gspo 3e-4 / 4e-4, cispo no lower bound / 4.0 (weights up to 5)
    # clip_low 1.0 with clip_high 1e9: no clip (the ratio is > 0 and never near 1e9), the README's one-line edit
    clip_low: float | None = ranged(None, ge=0.0, le=1.0)
    clip_high: float | None = ranged(None, ge=0.0)  # 0.28 = DAPO's clip-higher
    clip_c: float | None = ranged(None, gt=1.0)  # dual clip (> 1) for negative advantages (ppo_clip only)
    kl_coef: float = ranged(0.0, ge=0.0)  # 0: no reference model is loaded or run
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    # unset = the policy loss's own: seq-mean-token-mean for gspo (its objective is a mean over sequences),
    # token-mean otherwise
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = None
    adv_scale: Literal["group", "batch", "none"] = "group"  # none = Dr. GRPO
    # sampler vs trainer log-probs (sampling/sampling_logp_difference): tis weighs each token's policy loss by
    # min(exp(old - sampler), tis_cap); mis drops the sequences whose ratio exp(sum(old - sampler)) leaves
    # [mis_low, mis_high] (TRL's vllm_importance_sampling_correction, verl's rollout_correction)
    sampler_correction: Literal["none", "tis", "mis"] = "none"
    tis_cap: float = ranged(2.0, ge=1.0)  # tis: the largest weight (verl's rollout_is_threshold)
    mis_low: float = ranged(0.5, gt=0.0, lt=1.0)  # mis: band of kept sequence ratios (verl's Seq-MIS 0.5_2.0)
    mis_high: float = ranged(2.0, gt=1.0)
    filter_zero_std: bool = False  # drop groups whose rewards are all equal (DAPO dynamic sampling)
    # with filter_zero_std: sample more prompts, up to this many rounds a step, until prompts_per_step groups have
    # signal (DAPO's refill; verl's max_num_gen_batches); 1 = train on the groups left from one round
    max_sampling_rounds: int = ranged(1, ge=1)
    mask_truncated: bool = False  # no loss on responses cut by the length limit
    loss_on_forced: bool = False  # train on forced structural tokens too
    logprob_chunk: int = ranged(1024, ge=1)  # sequence chunk of the chunked log-prob head
    max_bad_steps: int = ranged(3, ge=1)  # stop after this many non-finite updates in a row


@dataclass
class OptimConfig:
    # AdamW moves every weight by about lr per update, so an lr above 1 is a typo (0 = frozen weights)
    lr: float = ranged(1e-6, ge=0.0, le=1.0)
    weight_decay: float = ranged(0.0, ge=0.0)
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # two numbers in [0, 1)
    grad_clip: float = ranged(1.0, ge=0.0)  # max gradient norm; 0 = off
    warmup_steps: int = ranged(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warmup
    min_lr_ratio: float = ranged(0.0, ge=0.0, le=1.0)  # cosine/linear floor, as a fraction of lr


@dataclass
class OverlongBuffer:
    """DAPO's soft overlong punishment (Yu et al. 2025), a part of the reward named "overlong": 0 up to
    rollout.max_new_tokens - len response tokens, then down linearly to -penalty at max_new_tokens."""
    len: int = ranged(4096, ge=1)  # the buffer, in response tokens (DAPO: 4096 of 20480); <= rollout.max_new_tokens
    penalty: float = ranged(1.0, ge=0.0)  # the penalty at the response limit (DAPO: 1.0)


@dataclass
class RewardConfig:
    """The reward: the built-in accuracy / parallel reward (rewards.RewardFn.from_section reads the fields it
    shares with this section) plus your own functions (`funcs`), and the pool that runs them (`workers`,
    `timeout`). A step's reward is built-in + sum of weights[i] * funcs[i] (a None score left out)."""
    # the built-in reward; none = only `funcs` (their weighted sum replaces it)
    mode: Literal["accuracy", "alternating", "parallel_bonus", "none"] = "accuracy"
    # "module:function" (importable from the current directory or PYTHONPATH; not __main__), called like TRL's
    # reward_funcs: fn(prompts, completions, completion_ids, answer, step, trainer_state, **columns) ->
    # list[float | None], once per group, within timeout x group_size seconds; metrics rewards/<function>/mean
    funcs: list = field(default_factory=list)
    weights: list | None = None  # one number per funcs entry (default 1 each); the built-in's weight is 1
    window: int = ranged(10, ge=1)  # alternating: steps per window
    accuracy_steps: int = ranged(8, ge=0)  # alternating: accuracy-only steps at the start of each window (<= window)
    correct: float = 1.0
    wrong: float = -1.0
    correct_parallel: float = 1.2  # alternating: correct with a well-formed block
    bonus: float = 0.2  # parallel_bonus: added for a well-formed block
    format_penalty: float = 0.0  # added when the tags are not well formed (0 = off)
    scaffold_until: int | None = ranged(None, ge=0)  # parallel reward off after this step
    # {len, penalty}: DAPO's soft overlong penalty as a reward part (rewards/overlong/mean); unset = off
    overlong_buffer: OverlongBuffer | None = None
    workers: int = ranged(2, ge=0)  # reward processes (0 = in-process)
    timeout: float = ranged(10.0, gt=0.0)  # seconds per response (the equivalence check gets half)


@dataclass
class SFTConfig:
    epochs: float = ranged(2.0, gt=0.0)  # passes over the training set
    steps: int | None = ranged(None, ge=1)  # instead of epochs: a fixed number of optimizer steps
    batch_size: int = ranged(64, ge=1)  # sequences per optimizer step, over all ranks
    micro_batch_tokens: int = ranged(16384, ge=1)
    max_total_tokens: int = ranged(4096, ge=2)  # prompt + solution (> data.max_prompt_tokens)
    eval_every: int = ranged(0, ge=0)  # validation loss + sampled format validity every N steps (0 = once per epoch)
    eval_samples: int = ranged(32, ge=0)  # prompts sampled for the format-validity figure


@dataclass
class BenchmarkSpec:
    """One entry of eval.benchmarks (checked like every config key)."""
    path: str | None = None  # JSONL/parquet; relative paths are read from eval.data_dir; default <name>.jsonl
    samples: int | None = ranged(None, ge=1)  # responses per problem (the k of mean@k, pass@k); default 1
    temperature: float | None = ranged(None, ge=0.0)  # default rollout.temperature
    fields: dict | None = None  # our name -> column, as data.fields
    repair_latex_escapes: bool = False  # undo the "\x0crac" JSON-escape damage (curriculum.data)
    synthetic: dict | None = None  # the demo task instead of a file: {difficulty, n, seed}


@dataclass
class EvalConfig:
    # name -> BenchmarkSpec fields, checked key by key; `--set eval.benchmarks={}` turns the end-of-stage
    # evaluation off (a relative path is read from data_dir; default <data_dir>/<name>.jsonl)
    benchmarks: dict = field(default_factory=dict)
    data_dir: str = "data"  # where benchmark files are looked up by default
    limit: int | None = ranged(None, ge=1)  # problems per benchmark (debugging)
    samples: int | None = ranged(None, ge=1)  # responses per problem for every benchmark, overriding theirs
    batch_prompts: int = ranged(32, ge=1)  # prompts per sampler call (and per resumable record batch); memory: rollout.kv_cache_gb
    # stages: held-out evaluation of eval.benchmarks every N steps and at the last (eval/<set>/<metric> in
    # metrics.jsonl; the last is the end-of-stage one); 0 = at the end only
    every: int = ranged(0, ge=0)


@dataclass
class CheckpointConfig:
    every: int = ranged(50, ge=0)  # steps between checkpoints (0 = only the final one)
    keep: int = ranged(3, ge=0)  # complete checkpoints kept (0 = all)
    # auto = the latest complete one in run_dir/checkpoints; never = start over (an earlier attempt in run_dir
    # is moved aside); or a checkpoint directory (a deliberate fork: its config may differ from this one)
    resume: str = "auto"
    # eval/<set>/<metric> (set: a benchmark of eval.benchmarks or overall; needs eval.every > 0): the checkpoint
    # of the best evaluation is kept beside the last `keep` and exported as <run_dir>/best; null = off
    keep_best: str | None = None
    best_mode: Literal["max", "min"] = "max"  # whether keep_best's metric is better higher (max) or lower (min)


@dataclass
class ReportConfig:
    """Experiment trackers beside metrics.jsonl: the same records under the same names, written by rank 0."""
    # tensorboard (<run_dir>/tensorboard), wandb (offline unless WANDB_MODE is set; <run_dir>/wandb), trackio (its
    # local store); each is an extra: pip install 'parallel-r1[wandb]'. A name alone is a list of one.
    to: list | str = field(default_factory=list)
    project: str = "parallel-r1"  # the wandb / trackio project; a run is named after the stage's run_dir
    # GRPO: every sample of every N-th step (0, N, 2N, ...) to <run_dir>/rollouts/step-<N>.jsonl.gz, and a few
    # rows as a table to the trackers; 0 = off
    rollouts_every: int = ranged(0, ge=0)


@dataclass
class Config:
    name: str = matching("run", PLAIN_NAME, "a plain name (letters, digits, '.', '_', '-'; a pipeline stage's "
                         "run directory is <run_dir>/<name>)")
    kind: Literal["sft", "grpo", "pipeline"] = "grpo"
    variant: Literal["causal", "structured"] = "causal"
    seed: int = ranged(0, ge=0)
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
    report: ReportConfig = field(default_factory=ReportConfig)


SECTIONS = tuple(name for name, tp in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(tp))


def deep_merge(base: dict, extra: dict, top: bool = True) -> dict:
    """`extra` over `base`, mappings merged key by key. An empty mapping replaces (`--set eval.benchmarks={}`
    empties the benchmarks), except for a whole section at the top level, where it changes nothing."""
    out = dict(base)
    for k, v in (extra or {}).items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and (v or (top and k in SECTIONS))
        out[k] = deep_merge(out[k], v, top=False) if merge else v
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
    and validate every key's type and range (curriculum.preflight checks the rules between keys and the files).

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
    pipeline_stages(cfg)  # every stage builds
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
        try:
            stage = build_config(data)  # the name is checked here: a plain name, so run_dir stays inside
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({data['name']}): {e}") from None
        if stage.kind == "pipeline":
            raise ConfigError(f"stages[{i}]: a stage cannot itself be a pipeline")
        if stage.name in [s.name for s in out]:
            raise ConfigError(f"stages[{i}]: a second stage named {stage.name!r}; stage names must differ (each "
                              "is a directory under run_dir)")
        stage.run_dir = os.path.join(cfg.run_dir, stage.name)
        out.append(stage)
    return out


def benchmark_specs(cfg: Config) -> dict:
    """name -> BenchmarkSpec of cfg.eval.benchmarks, every key checked."""
    specs = {}
    for name, entry in cfg.eval.benchmarks.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"eval.benchmarks.{name}: expected a mapping such as {{path: {name}.jsonl, samples: 16}}")
        specs[name] = from_dict(BenchmarkSpec, entry, f"eval.benchmarks.{name}.")
    return specs


def benchmark_path(data_dir: str, name: str, spec: BenchmarkSpec) -> str:
    """The file of a benchmark: spec.path (relative to data_dir; an absolute path stays), default <name>.jsonl."""
    return os.path.join(data_dir, spec.path or f"{name}.jsonl")


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


def save_config(cfg: Config, path: str) -> None:
    """Written beside and renamed: a reader (another rank, a re-run after a crash) sees the old file or the
    whole new one, never half of it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(path + ".tmp", path)
