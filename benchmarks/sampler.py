"""Sampler throughput: our Sampler vs transformers' `model.generate` on GRPO-shaped work.

"ratio" = our useful tokens/s / generate's useful tokens/s (> 1: ours is faster). Useful tokens are
response tokens up to and including EOS. Both sample the same prompts x n from the same tiny Qwen3
(random init, EOS-biased head so response lengths spread from a few tokens to the limit).
"block_step_ratio" = decode steps our structured sampler spends on a 2-path block / the steps needed to
write both paths one after the other (< 1: paths decoded simultaneously).

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
from rollout import Sampler  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = build_word_tokenizer()
    tags = add_tag_tokens(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    P, n, max_new, repeats = (4, 8, 96, 2) if args.quick else (8, 8, 256, 3)
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
    steps, seq_steps = block_step_ratio(model, tok, tags, path_len=16 if args.quick else 48)
    print(f"ours {ours_tps:.0f} tok/s, generate {gen_tps:.0f} tok/s; block steps {steps} vs {seq_steps}")
    print(json.dumps({
        "ratio": round(ours_tps / gen_tps, 3), "ours_tokens_per_s": round(ours_tps, 1),
        "generate_tokens_per_s": round(gen_tps, 1), "block_step_ratio": round(steps / seq_steps, 3),
        "block_steps": steps, "sequential_block_steps": seq_steps, "prompts": P, "n": n, "max_new_tokens": max_new,
        "mean_useful_tokens": statistics.mean(t for _, t in ours) / (P * n), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
