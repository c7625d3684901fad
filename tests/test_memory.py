"""curriculum/memory.py and footprint.py: the memory plan's figures against measured allocations of a real small Qwen3 on CPU
(parameters, gradients and AdamW states after a step; the sampler's page pool for the plan's pages; the storages autograd keeps
for backward), the stage-2 plan of a Qwen3-4B-shaped model checked by hand, and run.py's fit verdict."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import curriculum.memory as memory
from curriculum.config import build_config, deep_merge, load_config, pipeline_stages
from curriculum.footprint import GiB, Arch, activation_bytes
from curriculum.memory import first_problem, format_plan, memory_plan, parse_bytes, plan_headline, stage_plans
from grpo.logprobs import token_logprobs
from grpo.optim import build_optimizer
from model import apply_structured_attention, build_model
from rollout import Sampler
from rollout.cache import PagePool, table_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small but not trivial: the MLP, attention, norms and the head each carry a real share of the activations
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             head_dim=32, vocab_size=4000, max_position_embeddings=1024, tie_word_embeddings=True)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=32768, rope_theta=1000000, torch_dtype="bfloat16", model_type="qwen3",
                architectures=["Qwen3ForCausalLM"])
B, T = 4, 512  # one micro-batch of 2048 tokens: rows of data.max_prompt_tokens + rollout.max_new_tokens


def small_config(**extra):
    """A GRPO stage on SMALL whose largest micro-batch is exactly B rows of T tokens; `extra`: config sections."""
    return build_config(deep_merge({
        "model": {"build": SMALL}, "data": {"synthetic": {"difficulty": "easy", "n": 8}, "max_prompt_tokens": 256},
        "rollout": {"max_new_tokens": T - 256}, "grpo": {"micro_batch_tokens": B * T}}, extra))


def within(measured: float, predicted: float, tol: float = 0.15) -> bool:
    print(f"measured / predicted = {measured / predicted:.4f}")
    return abs(measured / predicted - 1) <= tol


def storage_bytes(tensors) -> int:
    """Bytes of the unique storages behind `tensors`."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_shapes_are_those_of_the_real_model(tied):
    model = build_model(dict(SMALL, tie_word_embeddings=tied))
    assert Arch.from_config(dict(SMALL, tie_word_embeddings=tied)).param_shapes() == \
        {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_states_match_a_real_model_after_one_optimizer_step():
    torch.manual_seed(0)
    model = build_model(SMALL).train()
    opt, _ = build_optimizer(model, 1e-3, 0.0, [0.9, 0.999], 0, 10)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 64))
    token_logprobs(model, ids).sum().backward()
    opt.step()
    plan = memory_plan(small_config(), SMALL, world_size=1)  # CPU, one process: float32, nothing sharded
    params = list(model.parameters())
    assert within(storage_bytes(params), plan.parameters)
    assert within(storage_bytes([p.grad for p in params]), plan.gradients)
    assert within(storage_bytes([t for s in opt.state.values() for t in s.values()]), plan.optimizer)
    assert plan.gathered == plan.fsdp_units == plan.reference == 0


def test_kv_pool_is_the_samplers_page_pool():
    """The plan's pages are what rollout.Sampler buys for the largest call (prompts of data.max_prompt_tokens), and
    its bytes are the PagePool's plus the page tables', within the budget."""
    cfg = small_config(rollout={"kv_cache_gb": 0.01})
    plan = memory_plan(cfg, SMALL)
    a = Arch.from_config(SMALL)
    assert plan.kv_width == T and plan.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4  # K and V, layers, heads, dim, fp32
    assert plan.kv_min_pages == 256 // 16 + (T - 256) // 16 + 1 == 33  # prompt, response, the response's first page
    assert plan.kv_rows == min(256, plan.kv_samples)  # rollout.max_rows
    page = 16 * plan.kv_bytes_per_token + 4  # K and V of 16 tokens, the page's fill counter
    tables = (plan.kv_rows + 1) * 33 * 8
    assert plan.kv_pages == (int(0.01 * GiB) - tables) // page - 1 == 324  # the last page is the scratch page
    model = build_model(SMALL, seed=0)
    prompts = [[7] * 256] * (plan.kv_samples // plan.kv_group)
    sampler = Sampler(model, kv_cache_gb=0.01, max_rows=256)
    pool_plan = sampler.pool_plan(prompts, plan.kv_group, T - 256, False, "cpu")
    assert (pool_plan.pages, pool_plan.rows, pool_plan.table_width) == (plan.kv_pages, plan.kv_rows, 33)
    pool = PagePool(a.layers, plan.kv_pages, 16, a.kv_heads, a.head_dim, torch.float32, torch.device("cpu"))
    measured = storage_bytes([*pool.k, *pool.v, pool.fill]) + table_bytes(plan.kv_rows, 33)
    assert measured == plan.kv_pool <= plan.kv_budget
    # groups of 8 share a prompt of 16 pages: at the length limit 8 * 324 // (16 + 8 * 17) samples fit at once
    assert plan.kv_group == 8 and plan.samples_held(1.0) == 8 * 324 // (16 + 8 * 17) == 17
    assert plan.samples_held(0.25) == 8 * 324 // (16 + 8 * (64 // 16 + 1)) == 46


def saved_bytes(model, ids, mask, chunk: int, **kwargs) -> int:
    """Bytes of the unique storages (parameters excluded) that one forward of `token_logprobs` leaves for backward:
    those autograd saves (saved-tensor hooks) and, under activation checkpointing, the tensors each decoder layer
    is called with, which the checkpoint keeps to recompute the layer."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def layer_inputs(module, args, kw):
        for v in [*args, *kw.values()]:
            for t in v if isinstance(v, tuple) else (v,):
                keep(t)

    hooks = [layer.register_forward_pre_hook(layer_inputs, with_kwargs=True) for layer in model.model.layers] \
        if model.is_gradient_checkpointing else []
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        token_logprobs(model, ids, mask, chunk_size=chunk, with_entropy=True, **kwargs)
    for h in hooks:
        h.remove()
    return sum(kept.values())


def micro_batch():
    torch.manual_seed(1)
    ids = torch.randint(10, SMALL["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :100] = 0  # left padding: the attention takes a dense mask, as in training
    return ids, mask


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("variant", ["causal", "structured"])
def test_activations_match_what_autograd_keeps(checkpointing, variant, tags):
    cfg = small_config(model={"gradient_checkpointing": checkpointing}, variant=variant)
    model = build_model(SMALL).train()
    kwargs = {}
    if variant == "structured":
        apply_structured_attention(model, tags)
        kwargs["response_start"] = 256
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = micro_batch()
    plan = memory_plan(cfg, SMALL)
    measured = saved_bytes(model, ids, mask, cfg.grpo.logprob_chunk, **kwargs)
    assert within(measured, plan.saved_ckpt if checkpointing else plan.saved)


@pytest.mark.parametrize("dtype,attn", [("bfloat16", "sdpa"), ("float32", "eager")])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_formula_in_bfloat16_and_eager(dtype, attn, checkpointing):
    """The GPU's compute dtype (norms upcast to float32, the mask converted to bf16) and eager attention (float32
    probabilities), measured on CPU through the same formula the plan uses."""
    model = build_model(SMALL, dtype=dtype, attn_implementation=attn).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = micro_batch()
    measured = saved_bytes(model, ids, mask, 1024)
    e = torch.finfo(getattr(torch, dtype)).bits // 8
    assert within(measured, activation_bytes(Arch.from_config(SMALL), B * T, T, e, attn, checkpointing))


# --- the stage-2 plan of Qwen3-4B-Base on 8 x 80 GB ---------------------------------------------------------------

@pytest.fixture()
def qwen3_4b(tmp_path):
    """A directory holding only a Qwen3-4B-Base-shaped config.json, and a one-row training file."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    for name in ("train.jsonl", "amc23.jsonl"):  # stage 2's training file and its end-of-stage benchmark
        (tmp_path / name).write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    return str(tmp_path)


def stage2(model_dir: str, *overrides):
    return load_config("stage2.yaml", [f"init_from={model_dir}", f"data.train={model_dir}/train.jsonl",
                                       f"eval.data_dir={model_dir}", *overrides])


def test_stage2_plan_of_qwen3_4b_by_hand(qwen3_4b):
    plan = memory_plan(stage2(qwen3_4b), QWEN3_4B, world_size=8, device_bytes=80 * 10**9)
    layer = 2 * 4096 * 2560 + 2 * 1024 * 2560 + 3 * 9728 * 2560 + 2 * 128 + 2 * 2560
    n = 151936 * 2560 + 36 * layer + 2560  # tied head: the embedding counts once
    assert plan.num_params == n == 4_022_468_096
    assert plan.parameters == plan.gradients == n // 8 * 4  # float32 shards (every dim 0 divides by 8)
    assert plan.optimizer == 2 * n // 8 * 4 and plan.reference == 0
    assert plan.gathered == n * 2  # bf16
    assert plan.kv_bytes_per_token == 36 * 8 * 128 * 2 * 2 == 147_456  # layers x KV heads x dim x (K, V) x bf16
    free = 80 * 10**9 - 3 * GiB - 3 * (n // 8 * 4) - n * 2  # when sampling starts
    assert plan.kv_budget == int(0.7 * free)
    # pages of 16 tokens: 2,359,296 bytes of K and V and a 4-byte fill each; the page tables of 256 rows x 314
    # entries (one sample at its longest: 125 prompt pages, 188 response pages, one partly filled page) come first
    assert plan.kv_min_pages == 2000 // 16 + 3000 // 16 + 1 + 1 == 314 and plan.kv_rows == 256
    assert plan.kv_pages == (plan.kv_budget - 257 * 314 * 8) // 2_359_300 - 1 == 18_601
    # the largest call: AMC23's 16 samples a problem, 32 problems; groups of 16 share their 125 prompt pages
    assert (plan.kv_samples, plan.kv_group) == (512, 16)
    assert plan.samples_held(1.0) == 18_601 * 16 // (125 + 16 * 189) == 94  # vs 59 static rows of 5000 tokens
    assert plan.samples_held(0.25) == 18_601 * 16 // (125 + 16 * (47 + 1)) == 333
    assert plan.micro_batch_tokens == 32768 and plan.checkpointing
    assert plan.saved_ckpt >= 36 * 32768 * 2560 * 2  # at least every layer's input in bf16
    assert plan.problem is None and plan.peak_sampling < 80 * 10**9 and plan.peak_update < 80 * 10**9
    table = format_plan(plan)
    assert "144 KiB per token, 18601 pages of 16 tokens" in table and "fit: fits" in table
    assert "holds 94 samples at the length limit (5000 tokens), 180 with responses at half" in table
    assert plan_headline(plan) == (f"peak {plan.peak_sampling / GiB:.2f} GiB while sampling, {plan.peak_update / GiB:.2f}"
                                   " GiB while updating (of 74.51 GiB, fits); KV pool 18601 pages of 16 tokens, 94 "
                                   "samples at the length limit, 333 at a quarter of it")


def run_py(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def dry_run_args(model_dir: str, device: str) -> list:
    return ["--dry-run", "--config", "configs/stage2.yaml", "--set", f"init_from={model_dir}",
            "--set", f"data.train={model_dir}/train.jsonl", "--set", f"eval.data_dir={model_dir}",
            "--world-size", "8", "--device-memory", device]


def test_dry_run_of_stage2_fits_8_x_80gb(qwen3_4b):
    r = run_py(*dry_run_args(qwen3_4b, "80GB"))
    assert r.returncode == 0, r.stderr
    assert "memory per rank, stage2 (grpo, causal): Qwen3 of 4.02B parameters, 8 ranks" in r.stdout
    assert "fit: fits" in r.stdout and r.stderr.strip() == ""


def test_dry_run_on_24gb_stops_with_one_sentence_naming_the_knob(qwen3_4b, capsys):
    import run
    assert run.main(dry_run_args(qwen3_4b, "24GB")) == 2
    out, err = capsys.readouterr()
    assert "fit: DOES NOT FIT" in out and err.count("\n") == 1 and err.startswith("memory: stage2: ")
    # the pages that fit hold a sample at its longest; the prefill beside them does not fit
    assert "leaves 1.9 GiB beside the KV pool" in err and "lower rollout.kv_cache_fraction to at most 0.25" in err


@pytest.mark.parametrize("overrides,knob", [
    (["grpo.micro_batch_tokens=400000"], "lower grpo.micro_batch_tokens (now 400000) to at most "),
    (["model.gradient_checkpointing=false"], "lower grpo.micro_batch_tokens (now 32768) to at most "),
    (["model.gradient_checkpointing=false", "rollout.max_new_tokens=10000", "rollout.kv_cache_gb=30"],
     ": set model.gradient_checkpointing: true"),  # not even one row of 12000 tokens fits without it
    (["rollout.kv_cache_gb=70"], "rollout.kv_cache_gb 70 does not fit beside"),
    # one sample at its longest: 314 pages + the scratch page of 2,359,300 B and the tables: 0.69 GiB
    (["rollout.kv_cache_gb=0.5"], "buys 226 pages of 16 tokens, but one sample at its longest (5000 tokens: "
                                  "data.max_prompt_tokens + rollout.max_new_tokens) needs 314: raise "
                                  "rollout.kv_cache_gb to at least 0.7"),
    (["rollout.kv_cache_fraction=0.99"], "lower rollout.kv_cache_fraction to at most 0.9"),
])
def test_a_plan_that_cannot_fit_names_the_knob(qwen3_4b, overrides, knob):
    cfg = stage2(qwen3_4b, *overrides)
    problem = first_problem(stage_plans(pipeline_stages(cfg), 8, 80 * 10**9))
    assert problem.startswith("stage2: ") and knob in problem
    if "to at most" in knob and "micro_batch" in knob:  # the largest micro-batch that fits, to 1024 tokens
        best = int(problem.split(knob)[1].split()[0])
        fits = lambda n: memory_plan(stage2(qwen3_4b, *overrides, f"grpo.micro_batch_tokens={n}"), QWEN3_4B, 8,
                                     80 * 10**9).problem is None  # noqa: E731
        assert fits(best) and not fits(best + 1024)


def test_dry_run_without_the_model_says_what_to_pass(qwen3_4b):
    cfg = load_config("stage2.yaml", [f"data.train={qwen3_4b}/train.jsonl", "run_dir=/nonexistent/stage2"])
    [(stage, note)] = stage_plans(pipeline_stages(cfg), 8, 80 * 10**9)
    assert isinstance(note, str) and "\n" not in note
    assert "init_from: 'stage1' means runs/stage1/final" in note and "pass --set init_from=DIR or --set model.path=DIR" in note


def test_the_demo_plans_every_stage_from_model_build():
    cfg = load_config("demo.yaml")
    plans = stage_plans(pipeline_stages(cfg))
    assert [s.name for s, _ in plans] == ["stage0", "stage1", "stage2"]
    assert all(p.device_bytes is None and p.problem is None for _, p in plans)  # CPU: no fit verdict
    assert len({p.num_params for _, p in plans}) == 1 and "fit: not checked" in format_plan(plans[0][1])


def test_a_real_run_checks_the_fit_before_any_work(qwen3_4b, tmp_path, monkeypatch, capsys):
    import run
    monkeypatch.setattr(memory, "run_device_bytes", lambda device: 24 * 10**9)  # as if on a 24 GB GPU
    monkeypatch.setenv("WORLD_SIZE", "8")
    run_dir = tmp_path / "run"
    assert run.main(["--config", "stage2.yaml", "--set", f"init_from={qwen3_4b}", "--set", f"run_dir={run_dir}",
                     "--set", f"data.train={qwen3_4b}/train.jsonl", "--set", f"eval.data_dir={qwen3_4b}"]) == 2
    assert capsys.readouterr().err.startswith("memory: stage2: rollout.kv_cache_fraction 0.7 leaves")
    assert not run_dir.exists()  # nothing was written: the model was never built


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 GiB") == 3 * 2**29 and parse_bytes("85899345920") == 85899345920
    for bad in ("80XB", "lots", "-1GB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_bytes(bad)


@pytest.mark.slow
def test_sharded_states_and_gathered_copy_on_two_ranks(tmp_path):
    """FSDP2 on 2 gloo ranks: float32 shards of parameters, gradients and AdamW states, and the full copy
    gathered for sampling, as each rank holds them (tests/memory_worker.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), os.path.join(ROOT, "tests", "memory_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = memory_plan(small_config(), SMALL, world_size=2)
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("parameters", "gradients", "optimizer", "gathered"):
            assert within(measured[key], getattr(plan, key)), (rank, key)
