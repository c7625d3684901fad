"""Peak memory and time of `grpo.logprobs.token_logprobs` vs the naive full-logits path
(DESIGN.md Benchmarks: benchmarks/logprobs.py), forward + backward at Qwen3's 151,936-token vocabulary.

"ratio" = peak memory of ours / peak memory of the naive path (< 1 is better; target <= 0.25);
"time_ratio" = median seconds of ours / naive (< 1 is better; target <= 1.3). Both variants compute
loss = sum of the per-token log-probs of the same ids on the same seeded tiny Qwen3 and backpropagate it
into the model. Peak memory is the rise of the process's high-water mark over the measured first
forward+backward: each variant runs in a fresh subprocess, and on CPU we read getrusage(RUSAGE_SELF)
.ru_maxrss (the peak resident set size) after minus before that region (model, weights and inputs are
already resident, so the figure is what the step itself adds); on CUDA torch.cuda.max_memory_allocated
minus the allocated bytes before it. Times: both variants in one process, interleaved, after one
warm-up round; the median of --repeats runs each.

    python benchmarks/logprobs.py            # B x T = 8 x 1024, chunk 1024 tokens
    python benchmarks/logprobs.py --quick    # B x T = 4 x 256, chunk 256 tokens, < 1 minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.logprobs import token_logprobs  # noqa: E402
from model import build_model  # noqa: E402

VOCAB = 151_936


def naive_logprobs(model, input_ids, attention_mask, temperature):
    """The baseline: full (B, T, V) float32 logits, log_softmax, gather. Returns (B, T-1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    if temperature != 1.0:  # no extra (B, T, V) copy when it would change nothing
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)  # (B, T, V)
    return logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


def step(variant, model, input_ids, attention_mask, args) -> None:
    """One forward + backward of loss = sum of log-probs."""
    if variant == "ours":
        logp = token_logprobs(model, input_ids, attention_mask, temperature=args.temperature,
                              chunk_size=args.chunk_size)
    else:
        logp = naive_logprobs(model, input_ids, attention_mask, args.temperature)
    logp.sum().backward()
    model.zero_grad(set_to_none=True)


def setup(args):
    """The seeded tiny Qwen3 at the full vocabulary and the (B, T) ids, on args.device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = dict(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=args.hidden // 4, max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True)
    model = build_model(config, seed=0, attn_implementation="sdpa", device=device)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen).to(device)  # (B, T)
    return model, input_ids, torch.ones_like(input_ids)


def peak_bytes(variant: str, args) -> int:
    """Run in a fresh process: how much the first forward+backward raises the memory high-water mark."""
    model, input_ids, attention_mask = setup(args)
    cuda = input_ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    step(variant, model, input_ids, attention_mask, args)
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def median_seconds(args) -> dict[str, float]:
    """Both variants in one process, interleaved, so a busy shared machine slows both alike."""
    model, input_ids, attention_mask = setup(args)
    times = {"ours": [], "naive": []}
    for i in range(args.repeats + 1):  # the first round warms up and is not counted
        for variant in times:
            if input_ids.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(variant, model, input_ids, attention_mask, args)
            if input_ids.device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:
                times[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(t) for variant, t in times.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="B x T = 4 x 256, chunk 256 tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per float32 logits chunk (ours)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", choices=("ours", "naive"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.chunk_size = 4, 256, 256
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:  # child: one variant's peak memory as one JSON line
        print(json.dumps({"peak_bytes": int(peak_bytes(args.variant, args))}))
        return
    peaks = {}
    for variant in ("ours", "naive"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--batch", str(args.batch),
               "--seq", str(args.seq), "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--chunk-size", str(args.chunk_size), "--temperature", str(args.temperature),
               "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[variant] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
        print(f"{variant:>5}: peak {peaks[variant] / 2**20:9.1f} MiB", flush=True)
    seconds = median_seconds(args)
    print(f" time: ours {seconds['ours']:.3f} s, naive {seconds['naive']:.3f} s (median of {args.repeats})")
    print(json.dumps({
        "ratio": peaks["ours"] / peaks["naive"], "time_ratio": seconds["ours"] / seconds["naive"],
        "ours_peak_bytes": peaks["ours"], "naive_peak_bytes": peaks["naive"],
        "ours_seconds": seconds["ours"], "naive_seconds": seconds["naive"],
        "B": args.batch, "T": args.seq, "V": VOCAB, "hidden": args.hidden, "layers": args.layers,
        "chunk_size": args.chunk_size, "temperature": args.temperature, "repeats": args.repeats,
        "device": args.device, "memory": "cuda max_memory_allocated rise" if args.device.startswith("cuda")
        else "ru_maxrss rise over the first step, fresh process per variant",
    }))


if __name__ == "__main__":
    main()
