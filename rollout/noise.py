"""Per-sample random streams for the sampler: one counter-based uniform per row and decode step.

A draw depends only on (seed, sample, stream, counter), never on which other rows shared the decode
batch or in what order samples were admitted, so a sample is the same whatever the KV budget (DESIGN.md
rollout/sampler.py). The uniforms come from a 32-bit integer hash (Wellons' lowbias32) evaluated on int64
tensors; products are split into 16-bit halves so no int64 multiply ever overflows. The sampler turns a
row's uniform into a token by inverse CDF (rollout.sampler.sample_next): one hash per row, not one per
vocabulary entry as Gumbel-max would need, which matters at Qwen3's 151,936 entries.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), without int64 overflow: x = hi * 2^16 + lo."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective 32-bit hash with good avalanche; x holds values in [0, 2^32) (int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed: int, sample: torch.Tensor, stream: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """(R,) int64 keys, one per row, from the row's sample index, stream id and token counter."""
    key = mix32(torch.full_like(sample, seed & M32) ^ 0x9E3779B9)
    for part in (sample, stream, counter):
        key = mix32(key ^ (part & M32))
    return key


def uniforms(keys: torch.Tensor) -> torch.Tensor:
    """(R,) float64 uniforms in (0, 1) with 53 random bits, from (R,) row keys."""
    hi, lo = mix32(keys ^ 0x68E31DA4), mix32(keys ^ 0xB5297A4D)
    return ((hi << 21) + (lo >> 11)).to(torch.float64).add_(0.5).div_(2.0**53)
