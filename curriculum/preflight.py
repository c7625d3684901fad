"""Everything a run checks before any work (DESIGN.md "Non-negotiables"): the rules that tie config keys
together, every file a stage will read (model, tokenizer, init_from, data, end-of-stage benchmarks, the
checkpoint to resume) with the first rows of each data file, and what a re-run may change. `run.py` calls
`preflight` after `load_config`, with `--dry-run` too, so a bad input stops with one line naming the key.
"""
from __future__ import annotations

import json
import math
import os

from grpo.tracking import tracker_names
from rewards import RewardFunc, RewardFuncError, check_reward_func

from .config import Config, ConfigError, benchmark_path, benchmark_specs, pipeline_stages, read_yaml
from .data import FIELDS, DataError, Patterns, check_file, compile_pattern
from .report import STEP_METRICS
from .synthetic import DIFFICULTIES, MIXES

PEEK_ROWS = 100  # data rows read at config time; the whole file is read when its stage starts
SYNTHETIC_KEYS = ("difficulty", "n", "seed", "solution")  # curriculum.synthetic.make_problems' arguments


def preflight(cfg: Config, world: int = 1) -> list[str]:
    """Check every stage of `cfg` for a run on `world` ranks; ConfigError on the first problem. Returns the
    notes worth printing (settings that are legal but do nothing)."""
    earlier: dict = {}
    for stage in pipeline_stages(cfg):
        try:
            check_rules(stage, world)
            check_files(stage, earlier)
        except ConfigError as e:
            raise ConfigError(f"{stage.name}: {e}" if cfg.kind == "pipeline" else str(e)) from None
        earlier[stage.name] = os.path.join(stage.run_dir, "final")
    notes = []
    if cfg.kind != "pipeline" and cfg.init_from is not None and cfg.model.path is not None:
        notes.append(f"model.path ({cfg.model.path}) is not used: init_from ({cfg.init_from}) gives the starting "
                     "weights" + ("" if cfg.model.tokenizer else " and the tokenizer"))
    return notes


def check_rules(cfg: Config, world: int) -> None:
    """Rules between keys (each key's own type and range are checked when the config is read)."""
    g, s, r = cfg.grpo, cfg.sft, cfg.reward
    if cfg.kind == "grpo":
        if g.prompts_per_step % g.mini_batch_prompts:
            raise ConfigError(f"grpo.prompts_per_step={g.prompts_per_step} must be a multiple of "
                              f"grpo.mini_batch_prompts={g.mini_batch_prompts} (whole updates per step)")
        for key, value in (("grpo.prompts_per_step", g.prompts_per_step),
                           ("grpo.mini_batch_prompts", g.mini_batch_prompts)):
            if value % world:
                raise ConfigError(f"{key}={value} must be a multiple of the world size {world} (every rank takes "
                                  "whole groups)")
        if cfg.rollout.temperature == 0:
            raise ConfigError("rollout.temperature: 0 (greedy) gives every sample of a group the same response, so "
                              "no advantage; GRPO needs a temperature > 0")
        check_objective_keys(g, cfg.rollout, r)
    if cfg.kind == "sft":
        if s.batch_size % world:
            raise ConfigError(f"sft.batch_size={s.batch_size} must be a multiple of the world size {world}")
        if s.max_total_tokens <= cfg.data.max_prompt_tokens:
            raise ConfigError(f"sft.max_total_tokens={s.max_total_tokens} must exceed data.max_prompt_tokens="
                              f"{cfg.data.max_prompt_tokens}, or a long prompt leaves no room for its solution")
    if r.accuracy_steps > r.window:
        raise ConfigError(f"reward.accuracy_steps={r.accuracy_steps} must be at most reward.window={r.window}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"optim.betas: {betas!r}; give two numbers in [0, 1), e.g. [0.9, 0.999]")
    v = cfg.data.val_size
    if (isinstance(v, float) and not 0 < v < 1) or (isinstance(v, int) and v < 0):
        raise ConfigError(f"data.val_size: {v!r}; give a count (int >= 0) or a fraction (float in (0, 1))")
    unknown = sorted(set(cfg.data.fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"data.fields: unknown name(s) {unknown}; the names to map are {list(FIELDS)}")
    check_prompt_keys(cfg)
    if cfg.kind == "grpo":
        check_reward_keys(r)
    if cfg.data.synthetic is not None:
        check_synthetic(cfg.data.synthetic, "data.synthetic")
    try:
        tracker_names(cfg.report.to)
    except ValueError as e:
        raise ConfigError(f"report.to: {e}") from None
    for name, spec in benchmark_specs(cfg).items():
        if spec.synthetic is not None:
            check_synthetic(spec.synthetic, f"eval.benchmarks.{name}.synthetic")
    check_eval_keys(cfg)


def check_eval_keys(cfg: Config) -> None:
    """checkpoint.keep_best names eval/<set>/<metric> of a benchmark the stage evaluates (or overall) and a
    metric a step logs (report.STEP_METRICS), and needs eval.every > 0. (eval.every without benchmarks does
    nothing, as `--set eval.benchmarks={}` turns every held-out evaluation off.)"""
    names = list(cfg.eval.benchmarks)
    key = cfg.checkpoint.keep_best
    if key is None:
        return
    parts = key.split("/")
    metrics = [m for m in STEP_METRICS if not (len(parts) == 3 and parts[1] == "overall" and m == "pass_at_k")]
    if len(parts) != 3 or parts[0] != "eval" or parts[1] not in names + ["overall"] or parts[2] not in metrics:
        raise ConfigError(f"checkpoint.keep_best={key!r}: give eval/<set>/<metric> with <set> one of "
                          f"{names + ['overall']} (eval.benchmarks) and <metric> one of {list(STEP_METRICS)} "
                          "(overall has no pass_at_k), e.g. eval/" + (names[0] if names else "<set>") + "/mean_at_k")
    if not cfg.eval.every:
        raise ConfigError(f"checkpoint.keep_best={key!r} needs evaluations during the stage: set eval.every > 0")


def check_prompt_keys(cfg: Config) -> None:
    """data.instruction holds {question} once; data.answer_pattern / question_pattern compile with a group."""
    d = cfg.data
    if d.instruction is not None and d.instruction.count("{question}") != 1:
        raise ConfigError(f"data.instruction must hold '{{question}}' exactly once (where the question goes): "
                          f"{d.instruction[:80]!r}")
    for key in ("answer_pattern", "question_pattern"):
        if getattr(d, key) is not None:
            try:
                compile_pattern(getattr(d, key), f"data.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def check_objective_keys(g, ro, r) -> None:
    """The policy loss, sampler correction, dynamic sampling and overlong-penalty keys fit together."""
    if g.clip_c is not None and g.policy_loss != "ppo_clip":
        raise ConfigError(f"grpo.clip_c (the dual clip) belongs to policy_loss ppo_clip, not {g.policy_loss}; "
                          "remove grpo.clip_c")
    if g.sampler_correction != "none" and g.loss_on_forced:
        raise ConfigError(f"grpo.sampler_correction: {g.sampler_correction} weighs each loss token by the sampler's "
                          "log-prob of it, and forced tokens (grpo.loss_on_forced: true) were not sampled; set "
                          "grpo.sampler_correction: none or grpo.loss_on_forced: false")
    if g.max_sampling_rounds > 1 and not g.filter_zero_std:
        raise ConfigError(f"grpo.max_sampling_rounds={g.max_sampling_rounds} refills the groups that "
                          "grpo.filter_zero_std drops; set grpo.filter_zero_std: true (or max_sampling_rounds: 1)")
    if r.overlong_buffer is not None and r.overlong_buffer.len > ro.max_new_tokens:
        raise ConfigError(f"reward.overlong_buffer.len={r.overlong_buffer.len} must be at most "
                          f"rollout.max_new_tokens={ro.max_new_tokens} (the penalty ramps over the last `len` tokens "
                          "of the response limit)")


def check_reward_keys(r) -> None:
    """reward.funcs are "module:function" strings with distinct names, one weight each; some reward is on."""
    if r.mode == "none" and not r.funcs:
        raise ConfigError("reward.mode is none and reward.funcs is empty: nothing would score the responses; "
                          "name your functions in reward.funcs or choose a built-in mode")
    if not all(isinstance(spec, str) for spec in r.funcs):
        raise ConfigError(f"reward.funcs: {r.funcs!r}; give a list of 'module:function' strings")
    if r.weights is not None and (len(r.weights) != len(r.funcs) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in r.weights)):
        raise ConfigError(f"reward.weights: {r.weights!r}; give one number per reward.funcs entry "
                          f"({len(r.funcs)}), or leave it out for 1 each")
    names = ([r.mode] if r.mode != "none" else []) + [RewardFunc(spec).name for spec in r.funcs]
    names += ["overlong"] if r.overlong_buffer is not None else []
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"reward.funcs: the name(s) {twice} appear twice (the built-in reward is named after "
                          "reward.mode, reward.overlong_buffer's part overlong); each reward needs its own name for "
                          "rewards/<name>/mean")


def check_synthetic(spec: dict, key: str) -> None:
    """The demo task's spec: {difficulty, n, seed, solution}."""
    unknown = sorted(set(spec) - set(SYNTHETIC_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown keys {unknown}; use {list(SYNTHETIC_KEYS)}")
    if spec.get("difficulty") not in {**DIFFICULTIES, **MIXES}:
        raise ConfigError(f"{key}.difficulty: {spec.get('difficulty')!r}; choose one of "
                          f"{list(DIFFICULTIES) + list(MIXES)}")
    n = spec.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{key}.n: {n!r}; give the number of problems (an int >= 1)")
    if spec.get("solution") not in (None, "parallel", "plain", "mixed"):
        raise ConfigError(f"{key}.solution: {spec['solution']!r}; choose parallel, plain, mixed (half each) or leave "
                          "it out")


def check_files(cfg: Config, earlier: dict | None = None) -> None:
    """Every file the stage will read exists, and each data file's first rows load: model (model.path or
    init_from), tokenizer, data.train / data.val, the end-of-stage benchmarks, an explicit checkpoint.resume.
    `earlier`: name -> final/ of the pipeline's earlier stages (init_from may name them before they exist)."""
    if cfg.model.path is None and cfg.model.build is None and cfg.init_from is None:
        raise ConfigError("model.path: no model given; set model.path (a local Qwen3 directory), "
                          "model.build (random init) or init_from")
    if cfg.init_from is not None:
        resolve_init(cfg, earlier or {})
    elif cfg.model.path is not None:
        check_model_dir(cfg.model.path, "model.path", "models load from local paths only; download "
                        "Qwen3-4B-Base first and point model.path at it")
    tok = cfg.model.tokenizer
    if tok not in (None, "words") and not os.path.isdir(tok):
        raise ConfigError(f"model.tokenizer: directory {tok!r} does not exist")
    if cfg.data.synthetic is None:
        if cfg.data.train is None:
            raise ConfigError("data.train: no training file given (or set data.synthetic for the demo task)")
        d = cfg.data
        for key in ("train", "val"):
            path = getattr(d, key)
            if path is not None:
                chats = check_data(path, d.fields, f"data.{key}", d.limit, need_solution=cfg.kind == "sft",
                                   patterns=Patterns(d.answer_pattern, d.question_pattern))
                if chats:
                    check_conversational(cfg, f"data.{key}", earlier or {})
    if cfg.kind == "grpo":
        for i, spec in enumerate(cfg.reward.funcs):
            try:
                check_reward_func(spec)
            except RewardFuncError as e:
                raise ConfigError(f"reward.funcs[{i}]: {e}") from None
    for name, spec in benchmark_specs(cfg).items():
        if spec.synthetic is None:
            check_data(benchmark_path(cfg.eval.data_dir, name, spec), spec.fields, f"eval.benchmarks.{name}",
                       cfg.eval.limit, hint="; set eval.data_dir, or --set eval.benchmarks={} to skip the "
                                            "end-of-stage evaluation")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not os.path.isdir(resume):
        raise ConfigError(f"checkpoint.resume: {resume!r} is not a directory; give auto, never or a checkpoint "
                          "directory (<run_dir>/checkpoints/step-N)")


def check_model_dir(path: str, key: str, hint: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: directory {path!r} does not exist ({hint})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}: {path!r} holds no config.json; point it at a Hugging Face model directory")


def check_data(path: str, fields, key: str, limit: int | None, need_solution: bool = False, hint: str = "",
               patterns: Patterns | None = None) -> int:
    """The first rows of a data file load (only those a run reads, when it reads `limit`); returns how many of
    them are conversational (their prompt a list of messages)."""
    try:
        return check_file(path, fields, min(PEEK_ROWS, limit or PEEK_ROWS), need_solution, patterns)
    except (DataError, FileNotFoundError, ImportError, ValueError) as e:
        raise ConfigError(f"{key}: {e}{hint}") from None


def check_conversational(cfg: Config, key: str, earlier: dict) -> None:
    """Conversational rows are rendered with the chat template as written: data.template chat, a tokenizer that
    has a chat template, and no data.instruction (it would not apply to them)."""
    why = f"{key} holds conversational rows (its prompt column is a list of {{role, content}} messages)"
    if cfg.data.template != "chat":
        raise ConfigError(f"{why}; they are rendered with the tokenizer's chat template: set data.template: chat")
    if cfg.data.instruction is not None:
        raise ConfigError(f"{why}, which are the prompt as written: data.instruction would not apply to them. "
                          "Remove it, or build prompts from the question instead (map fields.question and set "
                          "fields.prompt: null)")
    source = cfg.model.tokenizer or resolve_init(cfg, earlier) or cfg.model.path
    if source not in (None, "words") and os.path.isdir(source) and not has_chat_template(source):
        raise ConfigError(f"{why}, rendered with the chat template, but the tokenizer in {source} has none; use a "
                          "tokenizer with one (model.tokenizer), or build prompts from the question with "
                          "data.template: raw")


def has_chat_template(directory: str) -> bool:
    """Whether the tokenizer saved in `directory` carries a chat template (a file of its own, or in its config)."""
    if any(os.path.isfile(os.path.join(directory, f)) for f in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def resolve_init(stage: Config, earlier: dict) -> str | None:
    """The model directory `init_from` names: an earlier stage of this pipeline (earlier: name -> its final/,
    which may not exist yet), a model directory, or the name of a stage config (configs/<name>.yaml) whose
    run_dir/final must exist. ConfigError otherwise."""
    name = stage.init_from
    if name is None:
        return None
    if name in earlier:
        return earlier[name]
    if os.path.isdir(name):
        check_model_dir(name, "init_from", "")
        return name
    try:
        other = read_yaml(name)
    except ConfigError:
        raise ConfigError(f"init_from: {name!r} is neither an earlier stage of this pipeline "
                          f"({sorted(earlier) or 'none'}), a model directory, nor a config in configs/") from None
    final = os.path.join(other.get("run_dir") or os.path.join("runs", name), "final")
    if not os.path.isfile(os.path.join(final, "manifest.json")):
        raise ConfigError(f"init_from: {name!r} means {final}, which is not there yet: run configs/{name}.yaml "
                          "first (or the whole pipeline, configs/pipeline.yaml)")
    return final


# --- re-runs: which keys may differ between a run directory's saved config and this one ------------------

# Keys that say where, how fast or how often a stage runs, not what it computes, so a resumed or finished
# stage may differ in them: the device and kernels (same math, other rounding), the micro-batch split (one
# step's gradients do not depend on it: tests/test_trainer.py), the sampler's memory knobs (a sample does not
# depend on them), the reward pool's size, checkpoint cadence, the end-of-stage evaluation (it runs after
# training and reads the final model), the experiment trackers. Every other key changes the training, so it must
# match.
RUN_ONLY_KEYS = ("name", "run_dir", "quick", "short", "model.device", "model.attn_implementation",
                 "model.gradient_checkpointing", "rollout.prefill_rows", "rollout.kv_cache_gb",
                 "rollout.kv_cache_fraction", "rollout.page_size", "rollout.max_rows", "rollout.cuda_graphs",
                 "grpo.micro_batch_tokens", "grpo.logprob_chunk", "sft.micro_batch_tokens",
                 "sft.eval_every", "sft.eval_samples", "reward.workers", "checkpoint", "eval", "report")
# The length of a stage: raising it continues a finished stage from its last checkpoint.
LENGTH_KEYS = ("grpo.steps", "sft.steps", "sft.epochs")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings stay whole."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, now: dict, defaults: dict) -> tuple[list[str], list[str]]:
    """(keys that change the training, length keys that were raised) between a saved resolved config and
    this one, as dotted keys. Keys of RUN_ONLY_KEYS (or under them) are ignored; a key one side lacks counts
    as its default (a config saved by an older version of the project)."""
    a, b, base = flatten(saved), flatten(now), flatten(defaults)
    changed, longer = [], []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RUN_ONLY_KEYS):
            continue
        old, new = a.get(key, base.get(key)), b.get(key, base.get(key))
        if old == new:
            continue
        if key in LENGTH_KEYS and _raised(old, new):
            longer.append(key)
        else:
            changed.append(f"{key} ({old!r} -> {new!r})")
    return changed, longer


def _raised(old, new) -> bool:
    """A length key that grew (sft.steps None means 'by epochs': going from None to a count is a change)."""
    return old is not None and new is not None and new > old
