"""Sampler throughput and memory: our paged Sampler vs transformers' `model.generate` on GRPO-shaped work.

"ratio" = our useful tokens/s / generate's (> 1: ours is faster). Useful tokens are response tokens up to and
including EOS. Both sample the same prompts x n from the same tiny Qwen3 (random init, EOS-biased head so response
lengths spread from a few tokens to the limit).
At a stage-2-like limit (max_new_tokens 4x the throughput runs', 2x in --quick, far above most responses), under budgets
(bytes) worth R rows of prompt + max_new_tokens slots, what the static-row engine this one replaced could hold:
- "rows_in_flight_ratio": mean samples in flight per decode step, ours / the static engine's (continuous batching
  in R = N/32 rows, as ours with max_rows R), same budget, same prompts x n (target >= 3);
- "equal_memory_ratio": our tokens/s under R = N/8 rows' bytes / `generate` run in chunks of R sequences (the best
  it does in that memory; target >= 3); "budget_peak_ratio": bytes allocated / the budget (<= 1);
- "refill_ratio": our tokens/s under N/4 rows' bytes / ours with every sample at once (>= 0.9).
"prompt_kv_ratio": KV slots a group of n samples holds for its prompt / the prompt's length (<= 1.25).
Structured: "block_step_ratio" = decode steps a 2-path block stays open / the steps writing both paths one after
the other (< 1); "block_longest_ratio" = steps it stays open / its longest path's tokens (<= 1.05).
"host_ms_per_step": one decode step of a 36-layer, hidden-64 Qwen3 (compute nil: the time is host work, what a GPU
would wait on) at 64 rows, beside the same model's bare forward of 64 tokens on transformers' StaticCache and our
step's forward alone; a CUDA graph replays the forward's kernels without that host work.
Full run only: decode-step seconds of a Qwen3-0.6B-shaped model at 1, 8 and 32 rows / the weight-streaming bound
and / the same model's bare forward of as many rows (at 32 rows the CPU is compute-bound, not bandwidth-bound).

    python benchmarks/sampler.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import build_model  # noqa: E402
from model.tokenizer import build_word_tokenizer  # noqa: E402
from model.tags import add_tag_tokens  # noqa: E402
from rollout import Sampler, kv_bytes_per_token  # noqa: E402


def tiny_model(vocab: int, hidden: int, layers: int, eos: int, eos_bias: float, heads: int = 4):
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
               max_position_embeddings=4096, tie_word_embeddings=False)
    m = build_model(cfg, seed=0).eval()
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = eos_bias  # lengths spread: P(EOS) per step is a few percent
    m.lm_head = head
    return m


def time_ours(sampler, prompts, n, max_new, eos, seed):
    t0 = time.perf_counter()
    r = sampler.generate(prompts, n=n, max_new_tokens=max_new, temperature=1.0, stop_ids=[eos], seed=seed)
    return time.perf_counter() - t0, int(r.response_mask.sum()), r


def time_generate_chunked(model, prompts, n, max_new, eos, pad, seed, rows: int):
    """generate over prompts in chunks of `rows` sequences (rows // n prompts x n samples each)."""
    per = max(1, rows // n)
    runs = [time_generate(model, prompts[a:a + per], n, max_new, eos, pad, seed + a) for a in range(0, len(prompts), per)]
    return sum(s for s, _ in runs), sum(t for _, t in runs)


def time_generate(model, prompts, n, max_new, eos, pad, seed):
    Lp = max(map(len, prompts))
    ids = torch.tensor([[pad] * (Lp - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (Lp - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=n, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
    seconds = time.perf_counter() - t0
    resp = out[:, Lp:]
    hit = (resp == eos).int()
    first = torch.where(hit.any(1), hit.argmax(1) + 1, torch.full_like(hit[:, 0], resp.shape[1]))
    return seconds, int(first.sum())


class TriggerHead(torch.nn.Module):
    """The model's own head plus a scripted bias: `<Parallel>` right after a trigger token, and no
    path-closing tag or EOS anywhere, so every path runs to the path length limit."""

    def __init__(self, head, model, trigger: int, open_id: int, banned: list):
        super().__init__()
        self.head, self.trigger, self.open_id = head, trigger, open_id
        self.last = None
        model.model.register_forward_pre_hook(self._record, with_kwargs=True)
        self.register_buffer("bias", torch.zeros(head.out_features))
        self.bias[banned + [open_id]] = -30.0

    def _record(self, module, args, kwargs):
        self.last = kwargs["input_ids"][:, -1]  # (R,) the token fed last in each row

    def forward(self, h):
        logits = self.head(h) + self.bias
        fire = (self.last == self.trigger).to(logits.dtype)[:, None, None] * 60.0
        logits[..., self.open_id] += fire[..., 0]
        return logits


def block_figures(model, tok, tags, path_len: int, seeds: int = 3) -> dict:
    """Steps 2-path blocks stay open vs their path tokens (sequential writing) and vs their longest path."""
    trigger = tok.convert_tokens_to_ids("solve")
    banned = [t for t in tags.as_tuple() if t != tags.parallel_open] + [tok.eos_token_id]
    model.lm_head = TriggerHead(model.lm_head, model, trigger, tags.parallel_open, banned)
    sampler = Sampler(model, tags=tags, pad_id=tok.pad_token_id, max_path_tokens=path_len)
    prompt = tok.encode("hello world solve", add_special_tokens=False)
    steps = tokens = longest = 0
    for seed in range(seeds):
        r = sampler.generate([prompt], n=1, max_new_tokens=2 * path_len + 8, structured=True, seed=seed)
        assert r.stats["blocks"] == 1, r.stats
        steps, tokens = steps + r.stats["block_steps"], tokens + r.stats["path_tokens"]
        longest += r.stats["longest_path_tokens"]
    model.lm_head = model.lm_head.head
    return {"block_step_ratio": round(steps / tokens, 3), "block_longest_ratio": round(steps / longest, 3),
            "block_steps": steps, "sequential_block_steps": tokens, "longest_path_tokens": longest}


def row_bytes(model, width: int) -> int:
    """Bytes of one static cache row of `width` slots (K, V and its valid mask): the engine this one replaced."""
    c = model.config
    return width * (kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 4) + 1)


def budget_figures(model, tags, pad, prompts, n, max_new, eos, repeats: int) -> dict:
    """Ours under the bytes of N/8 static rows vs generate in chunks of N/8 sequences, the samples in flight in
    those bytes, the budget held; ours under N/4 rows' bytes vs every sample at once (refill)."""
    N = len(prompts) * n
    width = max(map(len, prompts)) + max_new
    rows = max(n, N // 8)  # >= n: generate's chunks hold whole groups
    budget = (rows + 0.5) * row_bytes(model, width)
    small = Sampler(model, tags=tags, pad_id=pad, kv_cache_gb=budget / 2**30, max_rows=N)
    refill = Sampler(model, tags=tags, pad_id=pad, kv_cache_gb=(N // 4 + 0.5) * row_bytes(model, width) / 2**30,
                     max_rows=N)
    every = Sampler(model, tags=tags, pad_id=pad, max_rows=N)
    timed = {"small": [], "refill": [], "every": [], "chunked": []}
    runs = []
    for seed in range(repeats):
        for name, sampler in (("small", small), ("refill", refill), ("every", every)):
            s, t, r = time_ours(sampler, prompts, n, max_new, eos, seed)
            timed[name].append((s, t))
            if name == "small":
                runs.append(r)
        timed["chunked"].append(time_generate_chunked(model, prompts, n, max_new, eos, pad, seed, rows))
    tps = {k: sum(t for _, t in v) / sum(s for s, _ in v) for k, v in timed.items()}
    stats = runs[0].stats
    return {"equal_memory_ratio": round(tps["small"] / tps["chunked"], 3),
            "budget_peak_ratio": round(stats["kv_bytes"] / budget, 3),
            "refill_ratio": round(tps["refill"] / tps["every"], 3), "static_rows": rows,
            "peak_rows": stats["peak_rows"], "pages": stats["pages"], "preempted": stats["preempted"],
            "budget_tokens_per_s": round(tps["small"], 1), "refill_tokens_per_s": round(tps["refill"], 1),
            "all_rows_tokens_per_s": round(tps["every"], 1), "generate_chunked_tokens_per_s": round(tps["chunked"], 1),
            "budget_decode_steps": stats["steps"], "slot_use": round(stats["slot_use"], 3)}


def rows_in_flight(model, pad, prompts, n, max_new, eos) -> dict:
    """Mean samples in flight: ours under the bytes of R = N/32 static rows vs continuous batching in R rows."""
    N = len(prompts) * n
    rows = max(2, N // 32)
    budget = (rows + 0.5) * row_bytes(model, max(map(len, prompts)) + max_new) / 2**30
    paged = Sampler(model, pad_id=pad, kv_cache_gb=budget, max_rows=N).generate(prompts, n=n, max_new_tokens=max_new,
                                                                               stop_ids=[eos], seed=0)
    static = Sampler(model, pad_id=pad, max_rows=rows).generate(prompts, n=n, max_new_tokens=max_new, stop_ids=[eos],
                                                                seed=0)
    return {"rows_in_flight_ratio": round(paged.stats["mean_samples"] / static.stats["mean_samples"], 3),
            "in_flight_rows": rows, "in_flight_paged": round(paged.stats["mean_samples"], 1),
            "in_flight_static": round(static.stats["mean_samples"], 1), "in_flight_preempted": paged.stats["preempted"]}


def prompt_kv_ratio(model, pad, n: int = 8, length: int = 100) -> dict:
    """Slots a group of n samples holds for its prompt: each sample writes one token (one page of its own), so
    the peak's other pages are the prompt's."""
    sampler = Sampler(model, pad_id=pad)
    r = sampler.generate([[7 + i % 50 for i in range(length)]], n=n, max_new_tokens=2, seed=0)  # no stop: 2 tokens
    prompt_slots = (r.stats["peak_pages"] - n) * r.stats["page_size"]
    return {"prompt_kv_ratio": round(prompt_slots / length, 3), "prompt_tokens": length}


def host_figures(rows: int = 64, steps: int = 24) -> dict:
    """Milliseconds per decode step of a 36-layer hidden-64 Qwen3 at `rows` rows: ours (whole step, and its
    forward alone) and transformers' forward of one token per row over its StaticCache."""
    from transformers import StaticCache

    model = build_model(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=36,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=1024), seed=0).eval()
    sampler = Sampler(model, pad_id=0)
    forwards = []
    sampler._forward = (lambda f: lambda *a: (forwards.append(time.perf_counter()), f(*a),
                                              forwards.append(time.perf_counter()))[1])(sampler._forward)
    prompts = [[1 + i % 7, 2, 3, 4] for i in range(rows // 8)]
    sampler.generate(prompts, n=8, max_new_tokens=4, seed=0)  # warm-up
    forwards.clear()
    t0 = time.perf_counter()
    r = sampler.generate(prompts, n=8, max_new_tokens=steps + 1, seed=0)  # no stop id: all rows run every step
    total = time.perf_counter() - t0
    spans = [b - a for a, b in zip(forwards[::2], forwards[1::2])]  # the prefill first, then the decode forwards
    ours_ms = (total - spans[0]) / r.stats["steps"] * 1e3
    fwd_ms = statistics.mean(spans[1:]) * 1e3
    cache = StaticCache(config=model.config, max_cache_len=64)
    kw = {"cache" if "cache" in type(model).forward.__code__.co_varnames else "past_key_values": cache}
    ids = torch.zeros(rows, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, position_ids=torch.zeros(rows, 1, dtype=torch.long), use_cache=True, **kw)
        t0 = time.perf_counter()
        for t in range(steps):
            model(input_ids=ids, position_ids=torch.full((rows, 1), 3 + t), use_cache=True, **kw)
    bare_ms = (time.perf_counter() - t0) / steps * 1e3
    return {"host_ms_per_step": round(ours_ms, 2), "host_forward_ms": round(fwd_ms, 2),
            "host_bookkeeping_ms": round(ours_ms - fwd_ms, 2), "static_cache_forward_ms": round(bare_ms, 2),
            "host_rows": rows}


QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1000000.0, tie_word_embeddings=True)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes/s moved by a large tensor copy (read + write), the best of three."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def decode_vs_bandwidth(rows_list=(1, 8, 32), steps: int = 6) -> dict:
    """Seconds per decode step of a 0.6B-shaped Qwen3 at each row count / parameter bytes over bandwidth, and /
    the same model's bare forward of one token per row (no cache, no sampling): what the engine adds to it."""
    model = build_model(QWEN3_06B, seed=0).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = param_bytes / copy_bandwidth()
    sampler = Sampler(model, pad_id=0)
    out = {"qwen3_06b_param_bytes": param_bytes, "weight_streaming_bound_s": round(bound, 4)}
    for rows in rows_list:
        sampler.generate([[1, 2, 3, 4]], n=rows, max_new_tokens=2, seed=0)  # warm-up
        t0 = time.perf_counter()
        r = sampler.generate([[1, 2, 3, 4]], n=rows, max_new_tokens=steps + 1, seed=0)  # no stop id: all run `steps`
        per_step = (time.perf_counter() - t0) / r.stats["steps"]
        ids = torch.zeros(rows, 1, dtype=torch.long)
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(steps):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        bare = (time.perf_counter() - t0) / steps
        out[f"decode_step_s_rows{rows}"] = round(per_step, 4)
        out[f"decode_vs_bound_rows{rows}"] = round(per_step / bound, 2)
        out[f"decode_vs_bare_forward_rows{rows}"] = round(per_step / bare, 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    tok = build_word_tokenizer()
    tags = add_tag_tokens(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    P, n, max_new, repeats = (8, 8, 96, 1) if args.quick else (16, 8, 256, 3)
    model = tiny_model(len(tok), 128 if args.quick else 256, 4, eos, eos_bias=1.5)
    sampler = Sampler(model, tags=tags, pad_id=pad, max_rows=P * n)
    words = "hello world solve the problem how many apples".split()  # prompts of 4..8 tokens
    prompts = [tok.encode(" ".join(words[: 3 + i % 5]) + f" {i}", add_special_tokens=False) for i in range(P)]
    time_ours(sampler, prompts, n, 16, eos, 0)  # warm-up
    time_generate(model, prompts, n, 16, eos, pad, 0)
    ours, theirs = [], []
    for seed in range(repeats):
        ours.append(time_ours(sampler, prompts, n, max_new, eos, seed)[:2])
        theirs.append(time_generate(model, prompts, n, max_new, eos, pad, seed))
    ours_tps = sum(t for _, t in ours) / sum(s for s, _ in ours)
    gen_tps = sum(t for _, t in theirs) / sum(s for s, _ in theirs)
    # a stage-2-like limit: most responses far below max_new_tokens (the static engine sized every row for it)
    long_new = (2 if args.quick else 4) * max_new
    budget = budget_figures(model, tags, pad, prompts, n, long_new, eos, repeats=repeats)
    figures = {**budget, **rows_in_flight(model, pad, prompts, n, long_new, eos), **prompt_kv_ratio(model, pad), **block_figures(model, tok, tags, 16 if args.quick else 48),
               **host_figures(steps=8 if args.quick else 24)}
    if not args.quick:
        figures.update(decode_vs_bandwidth())
    print(f"ours {ours_tps:.0f} tok/s, generate {gen_tps:.0f} tok/s; {figures}")
    print(json.dumps({**figures, "ratio": round(ours_tps / gen_tps, 3), "ours_tokens_per_s": round(ours_tps, 1),
                      "generate_tokens_per_s": round(gen_tps, 1), "prompts": P, "n": n, "max_new_tokens": max_new,
                      "budget_max_new_tokens": long_new,
                      "mean_useful_tokens": statistics.mean(t for _, t in ours) / (P * n),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
