"""rollout/noise.py: the counter-based hash and the uniforms it feeds the sampler's inverse-CDF draw."""
import math
import random

import torch

from rollout import sample_next
from rollout.noise import M32, mix32, stream_keys, uniforms


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 in plain Python integers (the reference)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def test_mix32_matches_the_reference_without_overflow():
    rng = random.Random(0)
    xs = [0, 1, 0xFFFF, 0x10000, M32, M32 - 1, 2**31] + [rng.randrange(2**32) for _ in range(2000)]
    got = mix32(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [lowbias32(x) for x in xs]
    assert all(0 <= g <= M32 for g in got)


def test_keys_differ_per_sample_stream_and_counter():
    s = torch.arange(64).repeat_interleave(64)
    t = torch.arange(64).repeat(64)
    keys = {tuple(stream_keys(7, s, torch.full_like(s, k), t).tolist()) for k in range(3)}
    assert len(keys) == 3
    flat = stream_keys(7, s, torch.zeros_like(s), t)
    assert len(set(flat.tolist())) == 64 * 64  # no collisions among 4096 (sample, counter) pairs
    assert not torch.equal(flat, stream_keys(8, s, torch.zeros_like(s), t))  # the seed matters
    assert torch.equal(flat, stream_keys(7, s, torch.zeros_like(s), t))  # and nothing else does


def test_uniforms_are_uniform_with_53_bits():
    keys = stream_keys(0, torch.arange(50000), torch.zeros(50000, dtype=torch.long), torch.zeros(50000, dtype=torch.long))
    u = uniforms(keys)
    assert u.dtype == torch.float64 and 0 < float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / 50000
    assert (hist - 0.1).abs().max() < 0.006  # ~4.5 standard errors
    assert len(set((u * 2**53).long().tolist())) == 50000


def test_inverse_cdf_draws_from_the_filtered_softmax():
    """20,000 draws for the same logits, one uniform each: frequencies match softmax(logits / T) with top-k and
    top-p applied, tokens outside them are never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(20000, 1)
    u = uniforms(stream_keys(0, torch.arange(20000), torch.zeros(20000, dtype=torch.long),
                             torch.zeros(20000, dtype=torch.long)))
    for T, top_k, top_p, keep in ((1.0, 0, 1.0, 5), (0.7, 0, 1.0, 5), (1.0, 3, 1.0, 3), (1.0, 0, 0.6, 2)):
        tok, logp = sample_next(logits, T, top_p=top_p, top_k=top_k, uniform=u)
        scaled = logits[0] / T
        kept = scaled.topk(keep).indices
        want = torch.zeros(5).index_put_((kept,), torch.softmax(scaled[kept], -1))
        freq = torch.bincount(tok, minlength=5).double() / 20000
        assert (freq - want).abs().max() < 0.012, (T, top_k, top_p, freq, want)  # ~4 standard errors
        assert (freq[want == 0] == 0).all()
        # the recorded log-prob is under logits / T, unfiltered (what the trainer computes)
        assert torch.allclose(logp, torch.log_softmax(logits / T, -1).gather(-1, tok[:, None])[:, 0])


def test_top_k_1_is_greedy_and_records_tempered_logprobs():
    """One rule for greedy choices: the token is the argmax, its log-prob is under logits / T (T > 0)."""
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    tok, logp = sample_next(logits, 0.7, top_k=1)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(logp, torch.log_softmax(logits / 0.7, -1).gather(-1, tok[:, None])[:, 0])
    tok0, logp0 = sample_next(logits, 0.0)
    assert torch.equal(tok0, tok) and torch.allclose(logp0, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0])
