"""The checks to run the day a CUDA machine is lent (issue 15): one script, under 10 minutes on one GPU.

    python benchmarks/gpu_check.py             # CUDA: the figures below; JSON last line
    python benchmarks/gpu_check.py --smoke     # CPU: the same code paths on a tiny model in float32 (no figures)

On a Qwen3-0.6B-shaped model (random weights, the real 151,936 vocabulary) in bf16:
- "ratio": our sampler's tokens/s (decode steps replayed from CUDA graphs) / `model.generate`'s, same prompts x
  n, EOS-biased lengths (> 1: faster); "graphs_ratio": ours with CUDA graphs / ours eager (rollout.cuda_graphs);
- under a KV budget worth R rows of prompt + max_new_tokens slots (the static-row engine this one replaced):
  "equal_memory_ratio": ours / generate in chunks of R sequences; "rows_in_flight_ratio": our mean samples in
  flight / continuous batching in R rows (the static engine's, as ours with max_rows R) and "paged_vs_static_rows"
  the tokens/s ratio of the two; "kv_pool_vs_budget" (the pool's allocation / the budget, <= 1) and
  "sampling_peak_vs_budget" (peak torch.cuda.max_memory_allocated above the model while sampling / the budget:
  the pool plus logits and temporaries);
- "flex_vs_sdpa_max_diff" and "flex_vs_sdpa_time_ratio": the structured forward+backward of the decoder with
  FlexAttention's BlockMask vs SDPA's dense mask (hidden states compared);
- "fsdp_step_s" and "plan_vs_measured_peak": one GRPO stage of two steps (sample, reward, update) with FSDP2
  on a one-rank group, bf16 compute, fp32 master weights and reductions, against the memory plan's
  predicted peak (curriculum/memory.py).
CI never runs this; without CUDA and without --smoke it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from curriculum.config import build_config  # noqa: E402
from curriculum.memory import memory_plan  # noqa: E402
from curriculum.stages import PromptFeed, load_train_data, make_tokenizer  # noqa: E402
from grpo.fsdp import close_distributed, init_distributed, parallelize  # noqa: E402
from grpo.trainer import train_grpo  # noqa: E402
from model import TagIds, apply_structured_attention, build_model  # noqa: E402
from rollout import Sampler, kv_bytes_per_token  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1000000.0, tie_word_embeddings=True)
SMOKE = dict(QWEN3_06B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
TAGS = TagIds(151669, 151670, 151671, 151672, 151673, 151674)  # where Qwen3's tokenizer puts the six tags
EOS = 151643


class BiasedHead(torch.nn.Module):
    """The model's (tied) head plus a bias on EOS, so response lengths spread instead of all hitting the limit."""

    def __init__(self, head, eos: int, bias: float):
        super().__init__()
        self.head = head
        self.register_buffer("bias", torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device))
        self.bias[eos] = bias

    def forward(self, h):
        return self.head(h) + self.bias


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def generate_tokens(model, prompts, n, max_new, pad=0):
    """Useful tokens (through EOS) of model.generate over `prompts` x n."""
    dev = model.device
    Lp = max(map(len, prompts))
    ids = torch.tensor([[pad] * (Lp - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (Lp - len(p)) + [1] * len(p) for p in prompts], device=dev)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=n, max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=pad)
    hit = (out[:, Lp:] == EOS).int()
    return int(torch.where(hit.any(1), hit.argmax(1) + 1, torch.full_like(hit[:, 0], hit.shape[1])).sum())


def sampling_figures(model, dev, P: int, n: int, max_new: int, rows: int) -> dict:
    """Ours (graphs and eager) vs generate (all at once and in chunks of `rows`), the paged pool vs `rows` static
    rows in the same bytes, and the KV budget held."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (int(torch.randint(20, 200, (1,), generator=g)),), generator=g).tolist()
               for _ in range(P)]
    c = model.config
    width = max(map(len, prompts)) + max_new
    bpt = kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, model.dtype.itemsize)
    budget = (rows + 0.5) * width * (bpt + 1)  # the bytes of `rows` static rows, not one more
    graphs = "on" if dev.type == "cuda" else "buckets"  # on CPU: the shapes a graph replays, run eagerly
    ours, eager = Sampler(model, pad_id=0, cuda_graphs=graphs), Sampler(model, pad_id=0, cuda_graphs="off")
    pooled = Sampler(model, pad_id=0, kv_cache_gb=budget / 2**30, cuda_graphs=graphs, max_rows=P * n)
    static = Sampler(model, pad_id=0, max_rows=rows, cuda_graphs=graphs)
    for s in (ours, eager):
        s.generate(prompts[:2], n=2, max_new_tokens=8)  # warm-up
    generate_tokens(model, prompts[:2], 2, 8)
    run = lambda s: s.generate(prompts, n=n, max_new_tokens=max_new, stop_ids=[EOS], seed=0)  # noqa: E731
    s_ours, r = timed(lambda: run(ours), dev)
    s_eager, _ = timed(lambda: run(eager), dev)
    s_gen, gen_tokens = timed(lambda: generate_tokens(model, prompts, n, max_new), dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    s_pool, rp = timed(lambda: run(pooled), dev)
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else rp.stats["kv_bytes"]
    s_static, rs = timed(lambda: run(static), dev)
    per = max(1, rows // n)
    s_chunk, chunk_tokens = timed(lambda: sum(generate_tokens(model, prompts[a:a + per], n, max_new)
                                              for a in range(0, P, per)), dev)
    tokens = int(r.response_mask.sum())
    return {"ratio": round(tokens / s_ours / (gen_tokens / s_gen), 3), "ours_tokens_per_s": round(tokens / s_ours, 1),
            "graphs_ratio": round(s_eager / s_ours, 3), "eager_tokens_per_s": round(tokens / s_eager, 1),
            "generate_tokens_per_s": round(gen_tokens / s_gen, 1),
            "equal_memory_ratio": round(int(rp.response_mask.sum()) / s_pool / (chunk_tokens / s_chunk), 3),
            "rows_in_flight_ratio": round(rp.stats["mean_samples"] / rs.stats["mean_samples"], 3),
            "paged_vs_static_rows": round(s_static / s_pool, 3), "static_rows": rows, "pages": rp.stats["pages"],
            "preempted": rp.stats["preempted"], "kv_pool_vs_budget": round(rp.stats["kv_bytes"] / budget, 3),
            "sampling_peak_vs_budget": round(peak / budget, 3),
            "mean_response_tokens": round(tokens / (P * n), 1)}


def structured_batch(B: int, T: int, g) -> torch.Tensor:
    """(B, T) ids: text, a two-path block, a summary, text."""
    rows = []
    for _ in range(B):
        a, p = T // 4, T // 5
        ids = torch.randint(0, 150000, (T,), generator=g)
        ids[a], ids[a + 1], ids[a + p], ids[a + p + 1], ids[a + 2 * p] = (TAGS.parallel_open, TAGS.path_open,
                                                                          TAGS.path_close, TAGS.path_open,
                                                                          TAGS.path_close)
        ids[a + 2 * p + 1], ids[a + 2 * p + 2] = TAGS.parallel_close, TAGS.summary_open
        rows.append(ids)
    return torch.stack(rows)


def flex_vs_sdpa(model, dev, B: int, T: int) -> dict:
    """The structured decoder forward+backward under both masks: hidden states and time."""
    apply_structured_attention(model, TAGS)
    ids = structured_batch(B, T, torch.Generator().manual_seed(1)).to(dev)
    out = {}
    for impl in ("sdpa", "flex_attention"):
        model.config._attn_implementation = impl

        def step():
            h = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
            h.float().square().mean().backward()
            return h.detach().float()

        step()  # warm-up (flex compiles its kernel)
        model.zero_grad(set_to_none=True)
        out[impl] = timed(step, dev)
        model.zero_grad(set_to_none=True)
    model.config._attn_implementation = "sdpa"
    (t_s, h_s), (t_f, h_f) = out["sdpa"], out["flex_attention"]
    return {"flex_vs_sdpa_max_diff": float((h_s - h_f).abs().max()), "flex_vs_sdpa_time_ratio": round(t_f / t_s, 3),
            "sdpa_fwd_bwd_s": round(t_s, 3), "flex_fwd_bwd_s": round(t_f, 3)}


def fsdp_step(model_cfg: dict, dev, smoke: bool) -> dict:
    """Two GRPO steps with FSDP2 on a one-rank group, then the measured peak against the memory plan."""
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    d = init_distributed(dev.type)
    run_dir = tempfile.mkdtemp(prefix="gpu_check_")
    cfg = build_config({
        "name": "gpu_check", "kind": "grpo", "run_dir": run_dir, "model": {"tokenizer": "words", "dtype": "bfloat16",
                                                                          "gradient_checkpointing": True},
        "data": {"synthetic": {"difficulty": "easy", "n": 256, "seed": 1}, "prompt_style": "demo", "max_prompt_tokens": 64},
        "rollout": {"group_size": 4, "max_new_tokens": 64 if smoke else 256},
        "grpo": {"steps": 2, "prompts_per_step": 8, "mini_batch_prompts": 8, "micro_batch_tokens": 4096},
        "optim": {"lr": 1e-6}, "reward": {"workers": 0}, "checkpoint": {"every": 0}})
    try:
        tokenizer, tags = make_tokenizer(cfg, None)
        model = build_model(model_cfg, seed=0, dtype="float32", device=dev)  # fp32 master weights
        model = parallelize(model, d, compute_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                            activation_checkpointing=True, shard=True)
        train, _ = load_train_data(cfg, {})
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds, _ = timed(lambda: train_grpo(cfg, model, tokenizer, tags, PromptFeed(train, tokenizer, cfg), run_dir, d,
                                              compute_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32), dev)
        total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        plan = memory_plan(cfg, model_cfg, world_size=1, device_bytes=total, sharded=True)
        out = {"fsdp_step_s": round(seconds / 2, 2)}
        if dev.type == "cuda":
            predicted = max(plan.peak_sampling, plan.peak_update) - plan.reserve
            out.update(plan_vs_measured_peak=round(predicted / torch.cuda.max_memory_allocated(dev), 3),
                       measured_peak_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2))
        return out
    finally:
        close_distributed()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="run every check on CPU with a tiny model (no figures)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print(json.dumps({"skipped": "no CUDA device (use --smoke for a CPU run of the code paths)"}))
        return
    dev = torch.device("cpu" if args.smoke else "cuda")
    shape, dtype = (SMOKE, "float32") if args.smoke else (QWEN3_06B, "bfloat16")
    model = build_model(shape, seed=0, dtype=dtype, attn_implementation="sdpa", device=dev).eval()
    model.lm_head = BiasedHead(model.lm_head, EOS, bias=8.0)  # P(EOS) ~ 2% per step at near-uniform logits
    figures = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)"}
    P, n, max_new, rows = (4, 4, 16, 4) if args.smoke else (32, 8, 512, 32)
    figures.update(sampling_figures(model, dev, P, n, max_new, rows))
    if dev.type == "cuda":  # flex has no backward on CPU
        figures.update(flex_vs_sdpa(build_model(shape, seed=0, dtype=dtype, attn_implementation="sdpa", device=dev),
                                    dev, B=8, T=1024))
    del model
    figures.update(fsdp_step(dict(shape, vocab_size=512) if args.smoke else shape, dev, args.smoke))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
