"""Sampler throughput: our Sampler vs transformers' `model.generate` on GRPO-shaped work.

"ratio" = our useful tokens/s / generate's useful tokens/s (> 1: ours is faster). Useful tokens are
response tokens up to and including EOS. Both sample the same prompts x n from the same tiny Qwen3
(random init, EOS-biased head so response lengths spread from a few tokens to the limit).
"block_step_ratio" = decode steps our structured sampler spends on a 2-path block / the steps needed to
write both paths one after the other (< 1: paths decoded simultaneously).
Under a KV budget of R = N/8 rows (continuous batching; N = P x n samples, 8 waves): "equal_memory_ratio" =
our tokens/s with R rows / `model.generate` run in chunks of R sequences (the best generate does in the same
memory; target >= 3); "budget_peak_ratio" = bytes of the KV pool allocated / the budget (must be <= 1).
"refill_ratio" = our tokens/s with N/4 rows / ours with every row at once (target >= 0.9): all at once, the
batch thins out as samples finish; a quarter of the rows, refilled at once, stays full.
Full run only: decode-step seconds of a Qwen3-0.6B-shaped model (random weights, 151,936 vocabulary) at 1, 8
and 32 rows / the weight-streaming bound (parameter bytes / the memory bandwidth of a large tensor copy).

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


def tiny_model(vocab: int, hidden: int, layers: int, eos: int, eos_bias: float):
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
               tie_word_embeddings=False)
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
    return time.perf_counter() - t0, int(r.response_mask.sum())


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


def block_step_ratio(model, tok, tags, path_len: int, seeds: int = 3):
    """Decode steps a 2-path block stays open / path tokens it holds (writing them in sequence)."""
    trigger = tok.convert_tokens_to_ids("solve")
    banned = [t for t in tags.as_tuple() if t != tags.parallel_open] + [tok.eos_token_id]
    model.lm_head = TriggerHead(model.lm_head, model, trigger, tags.parallel_open, banned)
    sampler = Sampler(model, tags=tags, pad_id=tok.pad_token_id, max_path_tokens=path_len)
    prompt = tok.encode("hello world solve", add_special_tokens=False)
    steps = tokens = 0
    for seed in range(seeds):
        r = sampler.generate([prompt], n=1, max_new_tokens=2 * path_len + 8, structured=True, seed=seed)
        assert r.stats["blocks"] == 1, r.stats
        steps, tokens = steps + r.stats["block_steps"], tokens + r.stats["path_tokens"]
    return steps, tokens


def budgeted(model, tags, pad, prompts, max_new, rows: int) -> tuple[Sampler, float]:
    """A sampler whose KV budget holds exactly `rows` rows of this call's width, and that budget in bytes."""
    c = model.config
    width = max(map(len, prompts)) - 1 + max_new
    per_row = width * (kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 4) + 1)
    budget = (rows + 0.5) * per_row  # bytes: room for `rows` rows, not one more
    return Sampler(model, tags=tags, pad_id=pad, kv_cache_gb=budget / 2**30), budget


def budget_figures(model, tags, pad, prompts, n, max_new, eos, repeats: int) -> dict:
    """Ours under a budget of N/8 rows vs generate in chunks of N/8 sequences (and the budget held); ours under
    N/4 rows vs ours with every row at once (refill: the pool stays full where all-at-once thins out)."""
    N = len(prompts) * n
    small, budget = budgeted(model, tags, pad, prompts, max_new, max(n, N // 8))  # >= n: generate's whole groups
    refill, _ = budgeted(model, tags, pad, prompts, max_new, N // 4)
    every = Sampler(model, tags=tags, pad_id=pad)
    r = small.generate(prompts, n=n, max_new_tokens=max_new, stop_ids=[eos], seed=0)
    assert N >= 8 * r.stats["pool_rows"], r.stats
    timed = {"small": [], "refill": [], "every": [], "chunked": []}
    for seed in range(repeats):
        for name, sampler in (("small", small), ("refill", refill), ("every", every)):
            timed[name].append(time_ours(sampler, prompts, n, max_new, eos, seed))
        timed["chunked"].append(time_generate_chunked(model, prompts, n, max_new, eos, pad, seed, r.stats["pool_rows"]))
    tps = {k: sum(t for _, t in v) / sum(s for s, _ in v) for k, v in timed.items()}
    return {"equal_memory_ratio": round(tps["small"] / tps["chunked"], 3),
            "budget_peak_ratio": round(r.stats["kv_bytes"] / budget, 3),
            "refill_ratio": round(tps["refill"] / tps["every"], 3), "budget_rows": r.stats["pool_rows"],
            "refill_rows": N // 4, "budget_tokens_per_s": round(tps["small"], 1),
            "refill_tokens_per_s": round(tps["refill"], 1), "all_rows_tokens_per_s": round(tps["every"], 1),
            "generate_chunked_tokens_per_s": round(tps["chunked"], 1), "budget_decode_steps": r.stats["steps"],
            "slot_use": round(r.stats["slot_use"], 3)}


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
    """Seconds per decode step of a 0.6B-shaped Qwen3 at each row count / parameter bytes over bandwidth."""
    model = build_model(QWEN3_06B, seed=0).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = param_bytes / copy_bandwidth()
    sampler = Sampler(model, pad_id=0)
    out = {"qwen3_06b_param_bytes": param_bytes, "weight_streaming_bound_s": round(bound, 4)}
    for rows in rows_list:
        sampler.generate([[1, 2, 3, 4]], n=rows, max_new_tokens=2, seed=0)  # warm-up
        t0 = time.perf_counter()
        r = sampler.generate([[1, 2, 3, 4]], n=rows, max_new_tokens=steps, seed=0)  # no stop id: all run `steps`
        per_step = (time.perf_counter() - t0) / r.stats["steps"]
        out[f"decode_step_s_rows{rows}"] = round(per_step, 4)
        out[f"decode_vs_bound_rows{rows}"] = round(per_step / bound, 2)
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
    P, n, max_new, repeats = (8, 8, 96, 2) if args.quick else (16, 8, 256, 3)
    model = tiny_model(len(tok), 128 if args.quick else 256, 4, eos, eos_bias=1.5)
    sampler = Sampler(model, tags=tags, pad_id=pad)
    words = "hello world solve the problem how many apples".split()  # prompts of 4..8 tokens
    prompts = [tok.encode(" ".join(words[: 3 + i % 5]) + f" {i}", add_special_tokens=False) for i in range(P)]
    time_ours(sampler, prompts, n, 16, eos, 0)  # warm-up
    time_generate(model, prompts, n, 16, eos, pad, 0)
    ours, theirs = [], []
    for seed in range(repeats):
        s, t = time_ours(sampler, prompts, n, max_new, eos, seed)
        ours.append((s, t))
        s, t = time_generate(model, prompts, n, max_new, eos, pad, seed)
        theirs.append((s, t))
    ours_tps = sum(t for _, t in ours) / sum(s for s, _ in ours)
    gen_tps = sum(t for _, t in theirs) / sum(s for s, _ in theirs)
    budget = budget_figures(model, tags, pad, prompts, n, max_new, eos, repeats=repeats)
    big = {} if args.quick else decode_vs_bandwidth()
    steps, seq_steps = block_step_ratio(model, tok, tags, path_len=16 if args.quick else 48)
    print(f"ours {ours_tps:.0f} tok/s, generate {gen_tps:.0f} tok/s; block steps {steps} vs {seq_steps}; "
          f"budget {budget}; 0.6B {big}")
    print(json.dumps({**budget, **big,
        "ratio": round(ours_tps / gen_tps, 3), "ours_tokens_per_s": round(ours_tps, 1),
        "generate_tokens_per_s": round(gen_tps, 1), "block_step_ratio": round(steps / seq_steps, 3),
        "block_steps": steps, "sequential_block_steps": seq_steps, "prompts": P, "n": n, "max_new_tokens": max_new,
        "mean_useful_tokens": statistics.mean(t for _, t in ours) / (P * n), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
