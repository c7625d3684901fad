"""Evaluation on the paper's benchmarks (DESIGN.md "Evaluation"; issue 10): k samples per problem, scored
in a RewardPool (one pathological answer cannot stall it), reported as mean@k / unbiased pass@k plus the
parallel-thinking analysis (curriculum/report.py). `evaluate` is what the stages call for their held-out
figures; `cli` is `python run.py eval`. Resumable: samples.jsonl is appended after every scored batch and
a problem whose samples are all there is never sampled again.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import zlib
from contextlib import contextmanager

import torch
from tqdm import tqdm

from model.tokenizer import decode_responses, newline_id, stop_token_ids as stop_ids
from model import apply_structured_attention, remove_structured_attention, structured_tags
from rewards import RewardFn, RewardPool
from rollout import Sampler

from . import report
from .config import (CONFIG_DIR, ConfigError, RewardConfig, benchmark_path, benchmark_specs, build_config,
                     deep_merge, parse_overrides, read_yaml)
from .data import DataError, load_examples
from .models import PROMPT_KEYS, VARIANTS, ModelRef, load_for_eval, prompt_settings, resolve_model, run_models
from .prompts import encode_prompt, format_prompt
from .report import EvalError, resume
from .synthetic import synthetic_sets

# --- the core -------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, tags, benchmarks: dict, *, samples: int | dict = 1, temperature: float | dict = 1.0,
             top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 3000, structured: bool | None = None,
             prompt_style: str = "parallel", instruction: str | None = None, template: str = "raw",
             max_prompt_tokens: int | None = 2000, batch_prompts: int = 32, kv_cache_gb: float | None = None,
             kv_cache_fraction: float = 0.7, seed: int = 0, num_paths: int = 2,
             max_parallel_blocks: int = 4, max_path_tokens: int | None = None, prefill_rows: int = 64,
             max_rows: int = 256, page_size: int = 16, cuda_graphs: str = "auto", out_dir: str | None = None, timeout: float = 10.0, workers: int = 2, label: str = "model",
             restart_if_changed: bool = False, progress: bool = True) -> dict:
    """Sample `samples` responses per problem of each benchmark (name -> list[Example]), score them against
    the gold answers and return {name: figures, ..., "overall": figures} (report.summarize; the keys are
    listed in report.benchmark_figures / parallel_figures). `samples` and `temperature` may be dicts per
    benchmark. structured=None follows the model (patched or not); True patches it for the call.
    `timeout`: seconds per response in the scoring pool (`workers` processes; 0 = in this process).
    With `out_dir`: samples.jsonl (resumed), results.json, results.md and plots, row label `label`; an
    out_dir drawn with other settings raises EvalError, or starts over when `restart_if_changed`."""
    records = sample_and_score(**{k: v for k, v in locals().items() if k != "label"})  # every other argument
    result = report.summarize(records, order=list(benchmarks))
    if out_dir is not None:
        report.write_results(out_dir, label, result)
    return result


def sample_and_score(model, tokenizer, tags, benchmarks: dict, *, samples=1, temperature=1.0, top_p=1.0, top_k=0,
                     max_new_tokens=3000, structured=None, prompt_style="parallel", instruction=None, template="raw",
                     max_prompt_tokens=2000, batch_prompts=32, kv_cache_gb=None, kv_cache_fraction=0.7, seed=0,
                     num_paths=2,
                     max_parallel_blocks=4, max_path_tokens=None, prefill_rows=64, max_rows=256, page_size=16,
                     cuda_graphs="auto", out_dir=None, timeout=10.0,
                     workers=2, restart_if_changed=False, progress=True, rank=0, world=1) -> list[dict]:
    """The scored records (report.make_record) of every sample `evaluate` reports on, finished ones read
    back from out_dir/samples.jsonl and the rest sampled now (see `evaluate` for the arguments). With `world`
    > 1, this rank's records only: each batch's prompts are split in `world` contiguous slices, slice `rank`
    sampled here as the whole batch would sample it (Sampler.generate's first_index), so the records of all
    ranks together are those of one process."""
    if "overall" in benchmarks:
        raise ValueError("a benchmark may not be named 'overall' (the pooled entry of the results)")
    ks, temps = _per_benchmark(samples, benchmarks, "samples"), _per_benchmark(temperature, benchmarks, "temperature")
    with _sampling_mode(model, tags, structured) as structured:
        settings = dict(max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, structured=structured,
                        prompt_style=prompt_style, instruction=instruction, template=template,
                        max_prompt_tokens=max_prompt_tokens, num_paths=num_paths,
                        max_parallel_blocks=max_parallel_blocks, max_path_tokens=max_path_tokens,
                        seed=seed, weights=weights_fingerprint(model) if out_dir else None)
        records = resume(out_dir, settings, benchmarks, ks, temps, restart_if_changed)
        finished = {(r["benchmark"], r["problem_index"]) for r in records}
        sampler = Sampler(model, tags=tags, pad_id=_pad_id(tokenizer), newline_id=newline_id(tokenizer),
                          num_paths=num_paths, max_parallel_blocks=max_parallel_blocks,
                          max_path_tokens=max_path_tokens, prefill_rows=prefill_rows, kv_cache_gb=kv_cache_gb,
                          kv_cache_fraction=kv_cache_fraction, max_rows=max_rows, page_size=page_size,
                          cuda_graphs=cuda_graphs)
        batches = []  # (benchmark, batch index, this rank's first index in the batch's todo, its problems)
        for name, exs in benchmarks.items():
            for b, start in enumerate(range(0, len(exs), batch_prompts)):
                todo = [i for i in range(start, min(start + batch_prompts, len(exs))) if (name, i) not in finished]
                lo, hi = len(todo) * rank // world, len(todo) * (rank + 1) // world  # this rank's slice
                if hi > lo:
                    batches.append((name, b, lo, todo[lo:hi]))
        with RewardPool(workers=workers, timeout=timeout) as pool, \
                tqdm(total=sum(len(mine) for *_, mine in batches), desc="eval", unit="problem",
                     disable=not progress) as bar:
            score = _scorer(pool, RewardFn.from_section(RewardConfig(timeout=timeout), mode="accuracy"))
            for name, b, lo, mine in batches:
                bar.set_description(f"eval {name}")
                batch = _sample_batch(sampler, score, tokenizer, name, benchmarks[name], mine, ks[name], temps[name],
                                      _batch_seed(seed, name, b), settings, lo * ks[name])
                if out_dir is not None:
                    report.append_records(os.path.join(out_dir, "samples.jsonl"), batch)
                records += batch
                bar.update(len(mine))
    return records


def _sample_batch(sampler, score, tokenizer, name, examples, todo, k, temperature, seed, s,
                  first_index: int = 0) -> list[dict]:
    """Sample k responses for each problem index in `todo` in one sampler call (its first sample the
    `first_index`-th of the batch it belongs to), score them, make records."""
    prompts = [encode_prompt(tokenizer, format_prompt(examples[i].question, s["prompt_style"], s["instruction"]),
                             s["template"], s["max_prompt_tokens"])[0] for i in todo]
    rollout = sampler.generate(prompts, n=k, max_new_tokens=s["max_new_tokens"], temperature=temperature,
                               top_p=s["top_p"], top_k=s["top_k"], stop_ids=stop_ids(tokenizer),
                               structured=s["structured"], seed=seed, first_index=first_index)
    texts = decode_responses(tokenizer, rollout.response_ids, rollout.response_mask)  # rows are group-contiguous: row j is problem todo[j // k]
    golds = [examples[i].answer for i in todo for _ in range(k)]
    verdicts = score(texts, golds)
    lengths = rollout.response_mask.sum(1).tolist()
    return [report.make_record(benchmark=name, problem_index=todo[j // k], problem_id=examples[todo[j // k]].id,
                               problem_hash=report.problem_hash(examples[todo[j // k]]), sample=j % k,
                               response=texts[j], gold=golds[j], correct=v.get("correct", False),
                               answer=v.get("answer"), verdict=v.get("verdict", ""), length=lengths[j],
                               finish_reason=rollout.finish_reason[j], temperature=temperature)
            for j, v in enumerate(verdicts)]


def _scorer(pool: RewardPool, reward_fn):
    return lambda texts, golds: pool.score(reward_fn, texts, golds, 0).components


def _batch_seed(seed: int, name: str, batch: int) -> int:
    """A seed per (benchmark, batch of the fixed batch grid): a resumed run draws what the first would have."""
    return seed * 1_000_003 + zlib.crc32(f"{name}/{batch}".encode())


def _per_benchmark(value, benchmarks: dict, what: str) -> dict:
    if not isinstance(value, dict):
        return {name: value for name in benchmarks}
    missing = sorted(set(benchmarks) - set(value))
    if missing:
        raise ValueError(f"{what}: no value for benchmark(s) {missing}; give one number or a dict over "
                         f"{sorted(benchmarks)}")
    return {name: value[name] for name in benchmarks}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextmanager
def _sampling_mode(model, tags, structured: bool | None):
    """Eval mode, and the structured-attention patch for a structured evaluation of a plain model (taken
    off again afterwards); yields whether sampling is structured."""
    patched = structured_tags(model) is not None
    structured = patched if structured is None else structured
    if structured and tags is None:
        raise ValueError("structured evaluation needs the tag ids: pass tags=add_tag_tokens(tokenizer)")
    if patched and not structured:
        raise ValueError("the model carries the structured-attention patch but structured=False; pass "
                         "structured=True (or None), or take the patch off first: remove_structured_attention(model)")
    apply = structured and not patched
    was_training = model.training
    if apply:
        apply_structured_attention(model, tags)
    model.eval()
    try:
        yield structured
    finally:
        if apply:
            remove_structured_attention(model)
        model.train(was_training)


def weights_fingerprint(model) -> str:
    """A short hash of strided samples of a few weight tensors: tells whether out_dir's samples came from
    these weights. Strided views, so a 389M-entry embedding is never copied to sum it."""
    params = list(model.parameters())
    sums = []
    for p in params[:: max(1, len(params) // 8)]:
        flat = p.detach().reshape(-1)
        sums.append(repr(float(flat[:: max(1, flat.numel() // 4096)].double().sum())))
    return hashlib.sha1(",".join(sums).encode()).hexdigest()[:16]


# --- configs, benchmarks, models ------------------------------------------------------------------------

def eval_config(path: str = "eval.yaml", overrides: list | None = None, limit: int | None = None):
    """The validated Config of an evaluation: the YAML file, `--set` overrides, `--limit`."""
    data = deep_merge(read_yaml(path), parse_overrides(overrides))
    if limit is not None:
        data = deep_merge(data, {"eval": {"limit": limit}})
    cfg = build_config(data)
    benchmark_specs(cfg)
    return cfg


def explicit_prompt_keys(path: str = "eval.yaml", overrides: list | None = None) -> set[str]:
    """Which of data.template / data.prompt_style the eval config or `--set` names: those win over the
    settings saved with a model (prompt_settings)."""
    data = deep_merge(read_yaml(path), parse_overrides(overrides)).get("data") or {}
    return {key for key in PROMPT_KEYS if key in data}


def load_benchmarks(cfg, only: list[str] | None = None) -> dict:
    """name -> examples of cfg.eval.benchmarks (or those named in `only`), eval.limit problems each."""
    specs = benchmark_specs(cfg)
    if not specs:
        raise ConfigError("eval.benchmarks is empty; list the benchmarks (see configs/eval.yaml)")
    unknown = sorted(set(only or []) - set(specs))
    if unknown:
        raise ConfigError(f"--benchmarks: unknown name(s) {unknown}; eval.benchmarks has {sorted(specs)}")
    out = {}
    for name, spec in specs.items():
        if only and name not in only:
            continue
        if spec.synthetic is not None:
            out[name] = synthetic_sets(spec.synthetic)[:cfg.eval.limit]
        else:
            out[name] = load_examples(benchmark_path(cfg.eval.data_dir, name, spec), spec.fields, cfg.eval.limit,
                                      spec.repair_latex_escapes)
    return out


def config_kwargs(cfg, benchmarks: dict) -> dict:
    """`evaluate`'s settings from a Config: eval.* benchmarks, rollout, data (prompts), reward (pool)."""
    specs, ro, dc = benchmark_specs(cfg), cfg.rollout, cfg.data
    samples = {n: cfg.eval.samples or specs[n].samples or 1 for n in benchmarks}
    temps = {n: ro.temperature if specs[n].temperature is None else specs[n].temperature for n in benchmarks}
    return dict(samples=samples, temperature=temps, top_p=ro.top_p, top_k=ro.top_k, max_new_tokens=ro.max_new_tokens,
                prompt_style=dc.prompt_style, instruction=dc.instruction, template=dc.template,
                max_prompt_tokens=dc.max_prompt_tokens,
                batch_prompts=cfg.eval.batch_prompts, kv_cache_gb=ro.kv_cache_gb, kv_cache_fraction=ro.kv_cache_fraction,
                seed=cfg.seed,
                num_paths=ro.num_paths, max_parallel_blocks=ro.max_parallel_blocks, max_path_tokens=ro.max_path_tokens,
                prefill_rows=ro.prefill_rows, max_rows=ro.max_rows, page_size=ro.page_size, cuda_graphs=ro.cuda_graphs,
                timeout=cfg.reward.timeout, workers=cfg.reward.workers)


def evaluate_ref(ref: ModelRef, cfg, benchmarks: dict, out_dir: str, progress: bool = True, explicit=()) -> dict:
    """Load `ref`, evaluate it with the config's settings (prompt_settings for the prompt) into out_dir, free it."""
    model, tokenizer, tags = load_for_eval(ref, cfg)
    kw = {**config_kwargs(cfg, benchmarks), **prompt_settings(ref, cfg, explicit)}
    try:
        return evaluate(model, tokenizer, tags, benchmarks, structured=ref.variant == "structured", out_dir=out_dir,
                        label=ref.label, progress=progress, **kw)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def heldout_result(model, tokenizer, tags, heldout: dict, cfg, d, out_dir: str | None = None) -> dict:
    """The held-out evaluation of a stage (report.summarize's result), the same figures on any number of ranks:
    under FSDP each rank samples its slice of every batch (sample_and_score's rank/world) with the full weights
    gathered once, and the records are pooled. `out_dir` (rank 0 writes; one process also resumes from it):
    samples, results and plots. A collective: every rank calls it."""
    kw = config_kwargs(cfg, heldout)
    if d.world == 1:
        return evaluate(model, tokenizer, tags, heldout, out_dir=out_dir, label=cfg.name, restart_if_changed=True,
                        progress=d.main, **kw)
    from grpo.fsdp import all_gather_lists, gathered_for_sampling

    with gathered_for_sampling(model):
        mine = sample_and_score(model, tokenizer, tags, heldout, progress=d.main, rank=d.rank, world=d.world, **kw)
    result = report.summarize(all_gather_lists(mine, d), order=list(heldout))
    if d.main and out_dir is not None:
        report.write_results(out_dir, cfg.name, result)
    return result


class StepEvaluation:
    """The held-out evaluation a stage's training loop runs every eval.every steps (its `evaluate_fn`):
    heldout_result on the live model, logged as step_figures. The last step's is the end-of-stage evaluation:
    written to <run_dir>/heldout and kept in `result`, so the stage's end does not run it again."""

    def __init__(self, tokenizer, tags, heldout: dict, cfg, d):
        self.args, self.cfg, self.d = (tokenizer, tags, heldout), cfg, d
        self.result: dict | None = None

    def __call__(self, model, last: bool) -> dict:
        out_dir = os.path.join(self.cfg.run_dir, "heldout") if last else None
        result = heldout_result(model, *self.args, self.cfg, self.d, out_dir)
        if last:
            self.result = result
        return step_figures(result)


def stage_figures(result: dict, heldout: dict) -> dict:
    """A stage's held-out figures for its summary.json (flat), from heldout_result's `result`: accuracy (the
    Avg. of mean@k), accuracy_<name>, parallel_ratio, format_validity, path_agreement, mean_length,
    blocks_per_response, first_block_position."""
    overall = result.get("overall", {})
    out = {k: overall.get(k) for k in ("parallel_ratio", "format_validity", "path_agreement", "mean_length",
                                       "blocks_per_response", "first_block_position")}
    out["accuracy"] = overall.get("mean_at_k")
    out.update({f"accuracy_{n}": result[n]["mean_at_k"] for n in heldout if n in result})
    return out


def step_figures(result: dict) -> dict:
    """The figures a training step logs of heldout_result's `result`: eval/<set>/<metric> for every benchmark
    and "overall" (report.STEP_METRICS; overall has no pass@k)."""
    return {f"eval/{name}/{key}": figures[key] for name, figures in result.items() for key in report.STEP_METRICS
            if key in figures}


# --- the command line -----------------------------------------------------------------------------------

def _parse(argv: list[str]):
    ap = argparse.ArgumentParser(prog="run.py eval", description="Evaluate a model (or every checkpoint of a run) "
                                 "on the benchmarks of the config: mean@k, pass@k and the parallel-thinking analysis.")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an HF model directory, a checkpoint step-N, or a run directory")
    which.add_argument("--across", metavar="RUN_DIR", help="every checkpoint of a run in step order, then final/")
    ap.add_argument("--config", help="YAML config: a path, or a name in the package's configs/; default: "
                    "configs/eval.yaml")
    ap.add_argument("--limit", type=int, help="problems per benchmark (a quick look)")
    ap.add_argument("--out", help="output directory (default: <run_dir>/<model> or <RUN_DIR>/eval)")
    ap.add_argument("--variant", choices=VARIANTS, help="override the variant saved with the model")
    ap.add_argument("--benchmarks", help="comma-separated subset of eval.benchmarks")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable): --set eval.data_dir=/data --set eval.samples=4")
    return ap.parse_args(argv)


def cli(argv: list[str]) -> int:
    """`python run.py eval ...`: prints the paper-style table and the output directory; 0 on success,
    2 on a bad config, data file, model directory or output directory."""
    args = _parse(argv)
    try:
        config = args.config or os.path.join(CONFIG_DIR, "eval.yaml")  # the package's, from any directory
        cfg = eval_config(config, args.set, args.limit)
        explicit = explicit_prompt_keys(config, args.set)
        benchmarks = load_benchmarks(cfg, args.benchmarks.split(",") if args.benchmarks else None)
        refs = run_models(args.across, args.variant) if args.across else [resolve_model(args.model, args.variant)]
        out = args.out or (os.path.join(args.across, "eval") if args.across
                           else os.path.join(cfg.run_dir, refs[0].label.replace("/", "-")))
        entries = []
        for ref in refs:
            sub = os.path.join(out, ref.name) if args.across else out
            saved = {k: v for k, v in prompt_settings(ref, cfg, explicit).items() if v != getattr(cfg.data, k)}
            if saved:
                print(f"{ref.label}: {', '.join(f'data.{k}={v}' for k, v in saved.items())}, as the model was "
                      "trained (set them in the config or with --set to choose)")
            result = evaluate_ref(ref, cfg, benchmarks, sub, explicit=explicit)
            entries.append({"name": ref.name, "label": ref.label, "step": ref.step, "model": ref.path,
                            "variant": ref.variant, "results": result})
    except (ConfigError, DataError, EvalError, FileNotFoundError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    if args.across:
        report.write_across(out, entries)
        print(report.across_markdown(entries))
    else:
        print(report.results_markdown(refs[0].label, entries[0]["results"]))
    print(f"results: {os.path.abspath(out)}")
    return 0
