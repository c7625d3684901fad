"""The memory plan per rank (issue 15; DESIGN.md rollout/sampler.py "Memory"): what a stage holds on one
device while sampling and while updating, from the model's config.json alone (no weights, no model built).
`run.py --dry-run` prints it; a run that cannot fit stops before any work with one message naming the knob. The
figures follow the code (curriculum/stages.py make_model, grpo/fsdp.py, grpo/logprobs.py, rollout/cache.py);
tests/test_memory.py measures them on CPU."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace

from model.load import resolve_attention
from rollout.cache import kv_budget_bytes, kv_bytes_per_token, pages_for, pool_pages, sample_pages, table_bytes

from .config import Config
from .footprint import (CUDA_RESERVE_BYTES, DTYPE_BYTES, GiB, PREFETCHED_LAYERS, Arch, activation_bytes,
                        backward_work_bytes, sampling_work_bytes)

# --- the plan ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one stage, and whether its peaks fit `device_bytes` (None: CPU ranks, not checked)."""
    stage: str
    kind: str
    structured: bool
    num_paths: int
    world: int
    device_bytes: int | None
    compute_dtype: str
    attention: str
    num_params: int
    parameters: int  # sharded parameters (fp32 master weights under FSDP; the dtype loaded in one process)
    gradients: int
    optimizer: int  # AdamW exp_avg + exp_avg_sq
    reference: int  # the frozen reference model (grpo.kl_coef > 0)
    gathered: int  # full parameters in the compute dtype while sampling (FSDP only)
    kv_budget: int
    kv_budget_source: str  # how the budget was set
    kv_width: int  # tokens of one sample at its longest: data.max_prompt_tokens + rollout.max_new_tokens
    kv_bytes_per_token: int
    kv_page_size: int
    kv_pages: int  # pages the budget buys (rollout.cache.pool_pages), at most what the largest call can use
    kv_samples: int  # samples of the largest sampler call a rank makes
    kv_group: int  # the largest group of that call (its samples share their prompt's pages)
    kv_rows: int  # rows a decode step carries at most: rollout.max_rows, or the call's samples x paths
    kv_min_pages: int  # one sample at its longest (rollout.cache.sample_pages): the pool must hold it
    kv_table_width: int  # entries of a page table: one sample's pages
    prefill: tuple  # (prompts, tokens) of the largest prefill forward
    sampling_work: int
    fsdp_units: int  # FSDP units gathered at once during the update, with their unsharded gradients
    micro_batch_tokens: int  # tokens of the largest micro-batch (at least one full row)
    checkpointing: bool  # model.gradient_checkpointing: which activation figure applies
    saved: int  # activations saved for backward, without activation checkpointing
    saved_ckpt: int  # the same with it
    activations: int  # saved + the backward working set, without activation checkpointing
    activations_ckpt: int  # the same with it
    reserve: int  # CUDA context and allocator allowance
    kv_max_new: int = 0  # rollout.max_new_tokens
    kv_blocks: int = 0  # blocks a structured response may open (rollout.max_parallel_blocks), 0 when causal
    problem: str | None = None  # the one message when it cannot fit

    @property
    def kv_pool(self) -> int:
        """Bytes of the page pool (K, V and the fill of each page, the scratch page included) and its page tables
        (rollout.cache.PagePool, rollout.decode.Decoder)."""
        page = self.kv_page_size * self.kv_bytes_per_token + 4
        return (self.kv_pages + 1) * page + table_bytes(self.kv_rows, self.kv_table_width)

    def samples_held(self, response_share: float) -> int:
        """Samples the pool holds at once when every response is `response_share` of rollout.max_new_tokens long
        and every prompt data.max_prompt_tokens, groups of kv_group sharing their prompt's pages."""
        prompt = self.kv_width - self.kv_max_new
        own = sample_pages(0, max(1, round(response_share * self.kv_max_new)), self.kv_page_size,
                           self.kv_blocks, self.num_paths)
        per_group = pages_for(prompt, self.kv_page_size) + self.kv_group * own
        return min(self.kv_samples, self.kv_pages * self.kv_group // per_group)

    @property
    def micro_batch_key(self) -> str:
        return f"{self.kind}.micro_batch_tokens"

    @property
    def resident(self) -> int:
        """What stays on the device through the whole step: parameters, optimizer states, the reference model."""
        return self.parameters + self.optimizer + self.reference

    @property
    def peak_sampling(self) -> int:
        return self.reserve + self.resident + self.gathered + self.kv_pool + self.sampling_work

    @property
    def peak_update(self) -> int:
        act = self.activations_ckpt if self.checkpointing else self.activations
        return self.reserve + self.resident + self.gradients + self.fsdp_units + act


def sampling_calls(cfg: Config, world: int) -> tuple[int, int, int]:
    """(prompts, samples, largest group) of the largest sampler call a rank makes in a stage: a GRPO step or
    SFT's format check, and the stage's held-out evaluation when it has one."""
    if cfg.kind == "grpo":
        prompts, group = max(1, cfg.grpo.prompts_per_step // world), cfg.rollout.group_size
    else:
        prompts, group = max(1, math.ceil(cfg.sft.eval_samples / world)), 1
    calls = [(prompts, prompts * group, group)]
    if cfg.eval.benchmarks:
        k = max(cfg.eval.samples or (b or {}).get("samples") or 1 for b in cfg.eval.benchmarks.values())
        calls.append((cfg.eval.batch_prompts, cfg.eval.batch_prompts * k, k))
    return tuple(max(call[i] for call in calls) for i in range(3))


def memory_plan(cfg: Config, model_config: dict, world_size: int = 1, device_bytes: int | None = None,
                sharded: bool | None = None) -> MemoryPlan:
    """The memory plan of one stage (a resolved sft or grpo Config) per rank. `model_config`: the model's
    config.json as a dict. `device_bytes`: the device's size; given, the plan is for CUDA ranks (compute in
    model.dtype) and says whether it fits; None: CPU ranks (float32, rollout.cache's CPU budget), unchecked.
    `sharded`: whether FSDP wraps the model, as grpo.fsdp.parallelize's `shard` (None: when world_size > 1)."""
    a, cuda, w, ro = Arch.from_config(model_config), device_bytes is not None, world_size, cfg.rollout
    fsdp = w > 1 if sharded is None else sharded
    structured, grpo = cfg.variant == "structured", cfg.kind == "grpo"
    compute = cfg.model.dtype if cuda else "float32"  # make_model: CPU ranks compute in float32
    e = DTYPE_BYTES[compute]
    master = 4 if fsdp else e  # FSDP keeps float32 master shards; one process keeps the dtype it loaded
    params = a.numel(w) * master
    reference = params if grpo and cfg.grpo.kl_coef > 0 else 0
    gathered = a.numel() * e if fsdp else 0
    # the root unit (embeddings, head, final norm) stays gathered from forward to backward with its gradient;
    # each prefetched layer has its unsharded gradient too and the float32 copy FSDP reduce-scatters
    units = a.numel(part="root") * 2 * e + PREFETCHED_LAYERS * a.numel(part="layer") * (2 * e + 4) if fsdp else 0
    reserve = CUDA_RESERVE_BYTES if cuda else 0
    width = cfg.data.max_prompt_tokens + ro.max_new_tokens
    bpt = kv_bytes_per_token(a.layers, a.kv_heads, a.head_dim, e)
    # free when sampling starts: gradients are freed after each update (zero_grad(set_to_none=True))
    free = device_bytes - reserve - params * 3 - reference - gathered if cuda else None  # params + 2 AdamW states
    if ro.kv_cache_gb is not None or not cuda:
        budget = kv_budget_bytes(ro.kv_cache_gb, ro.kv_cache_fraction, "cpu")
        source = "the CPU default" if ro.kv_cache_gb is None else f"rollout.kv_cache_gb {ro.kv_cache_gb:g}"
    else:  # kv_budget_bytes on CUDA, with the memory free when sampling starts predicted
        budget = int(ro.kv_cache_fraction * max(free, 0))
        source = f"rollout.kv_cache_fraction {ro.kv_cache_fraction:g} of {free / GiB:.1f} GiB free"
    prompts, samples, group = sampling_calls(cfg, w)
    blocks = ro.max_parallel_blocks if structured else 0
    ps, paths = ro.page_size, ro.num_paths if structured else 1
    min_pages = sample_pages(cfg.data.max_prompt_tokens, ro.max_new_tokens, ps, blocks, ro.num_paths)
    rows = min(ro.max_rows, samples * paths)  # as rollout.sampler.Sampler.pool_plan
    own = sample_pages(0, ro.max_new_tokens, ps, blocks, ro.num_paths)
    wanted = prompts * pages_for(cfg.data.max_prompt_tokens, ps) + samples * own
    pages = min(pool_pages(budget, ps, bpt, table_bytes(rows, min_pages)), wanted)
    prefill = (min(ro.prefill_rows, prompts), cfg.data.max_prompt_tokens)
    row_tokens = width if grpo else cfg.sft.max_total_tokens
    tokens = max(cfg.grpo.micro_batch_tokens if grpo else cfg.sft.micro_batch_tokens, row_tokens)
    attn = cfg.model.attn_implementation  # what a training forward runs; "auto" as model.load resolves it
    attn = resolve_attention(attn, "cuda" if cuda else "cpu", structured) if attn == "auto" else attn

    def activations(n: int, ckpt: bool) -> tuple[int, int]:  # (saved, saved + backward working set)
        saved = activation_bytes(a, n, row_tokens, e, attn, ckpt, entropy=grpo)
        return saved, saved + backward_work_bytes(a, n, row_tokens, e, attn, ckpt, cfg.grpo.logprob_chunk)

    (saved, act), (saved_ckpt, act_ckpt) = activations(tokens, False), activations(tokens, True)
    plan = MemoryPlan(
        stage=cfg.name, kind=cfg.kind, structured=structured, num_paths=ro.num_paths, world=w,
        device_bytes=device_bytes, compute_dtype=compute, attention=attn, num_params=a.numel(), parameters=params,
        gradients=params, optimizer=2 * params, reference=reference, gathered=gathered, kv_budget=budget,
        kv_budget_source=source, kv_width=width, kv_bytes_per_token=bpt, kv_page_size=ps, kv_pages=pages,
        kv_samples=samples, kv_group=group, kv_rows=rows, kv_min_pages=min_pages, kv_table_width=min_pages,
        kv_max_new=ro.max_new_tokens, kv_blocks=blocks, prefill=prefill,
        sampling_work=sampling_work_bytes(a, *prefill, rows, e, min_pages * ps), fsdp_units=units,
        micro_batch_tokens=tokens, checkpointing=cfg.model.gradient_checkpointing, saved=saved,
        saved_ckpt=saved_ckpt, activations=act, activations_ckpt=act_ckpt, reserve=reserve)
    if not cuda:
        return plan
    fixed = plan.peak_update - (act_ckpt if plan.checkpointing else act)
    fits = lambda n, ckpt: fixed + activations(n, ckpt)[1] <= device_bytes  # noqa: E731
    return replace(plan, problem=fit_problem(plan, cfg, free, row_tokens, fits))


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def fit_problem(plan: MemoryPlan, cfg: Config, free: int, row_tokens: int, fits) -> str | None:
    """The one message for a plan whose sampling or update peak exceeds the device, naming the knob to turn;
    None when it fits. `free`: bytes free when sampling starts; `fits(tokens, checkpointing)`: whether the
    update fits with a micro-batch of that many tokens."""
    ro, dev, work = cfg.rollout, plan.device_bytes, plan.sampling_work
    on = f"on a {_gib(dev)} device ({_gib(plan.reserve)} reserved)"
    more_ranks = "use more ranks (torchrun --nproc_per_node; --world-size in a dry run)"
    beside = f"the model states ({_gib(plan.resident)}), the gathered copy ({_gib(plan.gathered)})"
    if free <= work:
        return f"{beside} and the sampling working set ({_gib(work)}) do not fit {on}: {more_ranks}"
    if plan.kv_pages < plan.kv_min_pages:
        need = replace(plan, kv_pages=plan.kv_min_pages).kv_pool
        if ro.kv_cache_gb is not None:
            knob = f"raise rollout.kv_cache_gb to at least {math.ceil(need / GiB * 10) / 10:g}"
        elif need <= free - work:
            knob = f"raise rollout.kv_cache_fraction (now {ro.kv_cache_fraction:g}) to at least {need / free:.2f}"
        else:
            knob = f"lower rollout.max_new_tokens (now {ro.max_new_tokens}) or {more_ranks}"
        return (f"the KV budget ({plan.kv_budget_source}: {_gib(plan.kv_budget)}) buys {plan.kv_pages} page"
                f"{'s' * (plan.kv_pages != 1)} of {plan.kv_page_size} tokens, but one sample at its longest "
                f"({plan.kv_width} tokens: data.max_prompt_tokens + rollout.max_new_tokens) needs "
                f"{plan.kv_min_pages}: {knob}")
    if plan.peak_sampling > dev:  # (a fraction-set budget leaves 1 - fraction free)
        if ro.kv_cache_gb is not None:
            return (f"rollout.kv_cache_gb {ro.kv_cache_gb:g} does not fit beside {beside} and the sampling working "
                    f"set ({_gib(work)}) {on}: lower it to at most {(free - work) / GiB:.1f} or unset it")
        left = _gib((1 - ro.kv_cache_fraction) * free)
        return (f"rollout.kv_cache_fraction {ro.kv_cache_fraction:g} leaves {left} beside the KV pool, but sampling "
                f"needs {_gib(work)} (a prefill of {plan.prefill[0]} prompts x {plan.prefill[1]} tokens): lower "
                f"rollout.kv_cache_fraction to at most {1 - work / free:.2f} or rollout.prefill_rows (now "
                f"{ro.prefill_rows})")
    if plan.peak_update <= dev:
        return None
    ckpt = plan.checkpointing
    now = cfg.grpo.micro_batch_tokens if cfg.kind == "grpo" else cfg.sft.micro_batch_tokens
    act = plan.activations_ckpt if ckpt else plan.activations
    head = (f"the update needs {_gib(plan.peak_update)} {on}, {_gib(act)} of it for a micro-batch of "
            f"{plan.micro_batch_tokens} tokens ({'with' if ckpt else 'without'} activation checkpointing): ")
    if not fits(row_tokens, ckpt):
        if not ckpt and fits(row_tokens, True):
            return head + "set model.gradient_checkpointing: true"
        return head + f"even one row of {row_tokens} tokens does not fit: {more_ranks} or shorter sequences"
    lo, hi = row_tokens, plan.micro_batch_tokens  # the largest micro-batch that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid, ckpt) else (lo, mid - 1)
    knob = f"lower {plan.micro_batch_key} (now {now}) to at most {max(row_tokens, lo // 1024 * 1024)}"
    return head + knob + ("" if ckpt else " or set model.gradient_checkpointing: true")


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table for the console, GiB per rank."""
    w, dt, fsdp = plan.world, plan.compute_dtype, plan.gathered > 0
    share = f"1/{w} per rank" if fsdp else "one process: not sharded"
    kind = "structured" if plan.structured else "causal"
    size = f"{plan.num_params / 1e9:.2f}B" if plan.num_params >= 1e9 else f"{plan.num_params / 1e6:.1f}M"
    lines = [f"memory per rank, {plan.stage} ({plan.kind}, {kind}): Qwen3 of {size} parameters, "
             f"{w} rank{'s' * (w > 1)}, {dt} compute, {plan.attention} attention",
             f"  {'':30}{'GiB':>9}"]
    row = lambda label, n, note: lines.append(f"  {label:30}{n / GiB:9.2f}  {note}")  # noqa: E731
    master = "float32" if fsdp else dt
    row("parameters", plan.parameters, f"{master}, {share}")
    row("gradients", plan.gradients, f"{master}, {share}")
    row("optimizer states", plan.optimizer, f"AdamW exp_avg + exp_avg_sq, {master}, {share}")
    row("reference model", plan.reference, "grpo.kl_coef > 0: sharded like the parameters" if plan.reference
        else "none (grpo.kl_coef = 0)")
    row("gathered copy (sampling)", plan.gathered, f"all parameters in {dt}" if fsdp else "none: one process")
    held = [plan.samples_held(share) for share in (1.0, 0.5, 0.25)]
    row("KV pool (sampling)", plan.kv_pool, f"budget {plan.kv_budget / GiB:.2f} GiB ({plan.kv_budget_source}): "
        f"{plan.kv_bytes_per_token / 1024:g} KiB per token, {plan.kv_pages} pages of {plan.kv_page_size} tokens")
    lines.append(f"  {'':41}holds {held[0]} samples at the length limit ({plan.kv_width} tokens), {held[1]} with "
                 f"responses at half the limit, {held[2]} at a quarter (groups of {plan.kv_group} share their "
                 f"prompt); the largest sampler call {plan.kv_samples} samples, at most {plan.kv_rows} rows a decode "
                 f"step (rollout.max_rows); one sample at its longest needs {plan.kv_min_pages} pages")
    row("sampling working set", plan.sampling_work,
        f"prefill of {plan.prefill[0]} prompts x {plan.prefill[1]} tokens (or a decode step's logits)")
    row("FSDP units (update)", plan.fsdp_units,
        f"root + {PREFETCHED_LAYERS} decoder layers gathered, with gradients" if fsdp else "none: one process")
    for ckpt, label in ((True, "activations, checkpointed"), (False, "activations, not checkpointed")):
        saved, total = (plan.saved_ckpt, plan.activations_ckpt) if ckpt else (plan.saved, plan.activations)
        used = f"  <- model.gradient_checkpointing: {str(ckpt).lower()}" if ckpt == plan.checkpointing else ""
        row(label, total, f"{plan.micro_batch_tokens} tokens ({plan.micro_batch_key}): {saved / GiB:.2f} saved "
            f"+ {(total - saved) / GiB:.2f} backward working set{used}")
    if plan.reserve:
        row("CUDA context, allocator", plan.reserve, "fixed allowance")
    row("peak while sampling", plan.peak_sampling, "parameters, optimizer, reference, gathered, KV, working set")
    row("peak while updating", plan.peak_update, "parameters, optimizer, reference, gradients, units, activations")
    if plan.device_bytes is None:
        lines.append("  fit: not checked (CPU ranks; --device-memory 80GB plans for a GPU of that size)")
    else:
        peak = max(plan.peak_sampling, plan.peak_update)
        verdict = "fits" if plan.problem is None else "DOES NOT FIT"
        lines.append(f"  fit: {verdict}: peak {peak / GiB:.2f} of {plan.device_bytes / GiB:.2f} GiB per device")
    return "\n".join(lines)


def plan_headline(plan: MemoryPlan | str) -> str:
    """The plan in one line, for a stage's opening summary: both peaks against the device, the KV pool. `plan`
    may be stage_plans' note saying why there is none."""
    if isinstance(plan, str):
        return "not planned (the model's config.json was not there before the run)"
    size = lambda n: f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    if plan.device_bytes is None:
        fit = "CPU: not checked"
    else:
        fit = f"of {size(plan.device_bytes)}, {'fits' if plan.problem is None else 'DOES NOT FIT'}"
    return (f"peak {size(plan.peak_sampling)} while sampling, {size(plan.peak_update)} while updating ({fit}); "
            f"KV pool {plan.kv_pages} pages of {plan.kv_page_size} tokens, {plan.samples_held(1.0)} samples at "
            f"the length limit, {plan.samples_held(0.25)} at a quarter of it")


# --- the stages of a config ----------------------------------------------------------------------------------

def stage_model_config(stage: Config, earlier: dict) -> dict:
    """config.json (a dict) of the model a stage starts from: an earlier stage's of this pipeline (same shapes),
    that of init_from's or model.path's directory, or model.build (vocab_size, when unset, from the stage's
    tokenizer, as make_model does). FileNotFoundError or ValueError when it cannot be read yet."""
    if stage.init_from in earlier:
        return earlier[stage.init_from]
    if stage.init_from is None and stage.model.path is None:
        build = dict(stage.model.build or {})
        if "vocab_size" not in build:
            from .stages import make_tokenizer
            build["vocab_size"] = len(make_tokenizer(stage, None)[0])
        return build
    from .stages import resolve_init
    path = stage.model.path if stage.init_from is None else resolve_init(stage, {})
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} does not exist")
    with open(config_file) as f:
        return json.load(f)


def stage_plans(stages: list, world_size: int = 1, device_bytes: int | None = None) -> list:
    """(stage, MemoryPlan or a one-line note saying why there is none) for each stage, in order."""
    out, earlier = [], {}
    for stage in stages:
        try:
            earlier[stage.name] = model_config = stage_model_config(stage, earlier)
        except (OSError, ValueError) as e:  # not there yet (an earlier stage's output), or unreadable
            out.append((stage, f"memory plan of {stage.name}: no model config.json yet ({e}); pass "
                               "--set init_from=DIR or --set model.path=DIR (a directory holding config.json)"))
            continue
        out.append((stage, memory_plan(stage, model_config, world_size, device_bytes)))
    return out


def first_problem(plans: list) -> str | None:
    """The message of the first stage whose plan cannot fit, naming the stage; None when all fit."""
    for stage, plan in plans:
        if isinstance(plan, MemoryPlan) and plan.problem:
            return f"{stage.name}: {plan.problem}"
    return None


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '85899345920' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a size: write e.g. 80GB, 80GiB or a number of bytes")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def run_device_bytes(device: str = "auto") -> int | None:
    """Total memory of the CUDA device this rank would run on (grpo.fsdp.init_distributed's choice), or None
    when it runs on CPU."""
    import torch
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not cuda:
        return None
    index = torch.device(device).index if device.startswith("cuda:") else int(os.environ.get("LOCAL_RANK", 0))
    return torch.cuda.get_device_properties(index).total_memory
