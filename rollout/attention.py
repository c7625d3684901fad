"""Attention over the page pool, registered with transformers' attention interface so that the stock Qwen3
modules run the sampler's forwards unchanged: the sampler sets `config._attn_implementation` to PAGED while it
samples and passes `paged=PagedBatch(...)` through the model's keyword arguments, which reach this function.

Each call writes the new keys and values of its layer into the pool, then attends: a prefill over its own keys
(a fresh prompt sees only itself, with the dense causal mask the sampler built), a decode step over the pages of
each row's table with the mask of their filled slots (PagePool.visible). That is the portable version: plain
PyTorch (SDPA), the CPU path and the oracle of the tests; it also runs, and can be captured in a CUDA graph, on
a GPU. What a row may see is its page list: a path's table holds its prefix and itself, a summary's every path.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import PagePool

PAGED = "parallel_r1_paged"
KERNEL = "portable (SDPA over each row's gathered pages)"  # what the opening summary of a stage names


@dataclass(frozen=True)
class PagedBatch:
    """What one sampler forward tells the attention: the pool, where each new token goes, what each row reads."""
    pool: PagePool
    slots: torch.Tensor  # (B*T,) flat slot of each new token (padding: the scratch slot)
    tables: torch.Tensor | None = None  # (B, P) pages each row reads (decode); None: a prefill reads its own keys


ATTENTION_CHUNK_BYTES = 1 << 28  # gathered K/V (and their GQA expansion) a decode step's attention holds at once


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged=None, **kwargs):
    """query (B, H, T, D), key/value (B, H_kv, T, D) after the rotary embedding; attention_mask (B, 1, T, S) bool.
    Returns (B, T, H, D) as transformers' attention functions do. A decode step gathers its rows' pages in chunks
    of rows, so the copy it attends over stays near ATTENTION_CHUNK_BYTES whatever the rows and their lengths."""
    if paged is None:
        raise RuntimeError(f"attention implementation {PAGED!r} is the sampler's; it needs paged=PagedBatch(...)")
    pool, layer = paged.pool, module.layer_idx
    pool.write(layer, key, value, paged.slots)
    if paged.tables is None:  # a prefill: fresh prompts see only themselves
        return _sdpa(query, key, value, attention_mask, scaling), None
    B, H, _, D = query.shape
    per_row = 2 * paged.tables.shape[1] * pool.page_size * D * (H + key.shape[1]) * query.element_size()
    step = max(1, ATTENTION_CHUNK_BYTES // per_row)
    outs = []
    for i in range(0, B, step):
        k, v = pool.gather(layer, paged.tables[i:i + step])  # (b, H_kv, S, D) each
        outs.append(_sdpa(query[i:i + step], k, v, attention_mask[i:i + step], scaling))
    return torch.cat(outs) if len(outs) > 1 else outs[0], None


def _sdpa(query, key, value, mask, scaling):
    out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)  # (B, T, H, D)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAGED, paged_attention)
    # a model called without our dict of masks still gets its padding mask (transformers drops it otherwise)
    AttentionMaskInterface.register(PAGED, sdpa_mask)


_register()


@contextmanager
def paged_attention_mode(model):
    """Run the model's attention through `paged_attention` whatever it trains with; restored afterwards."""
    old = model.config._attn_implementation
    model.config._attn_implementation = PAGED
    try:
        yield
    finally:
        model.config._attn_implementation = old


def prefill_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    """(P, 1, W, W) bool causal mask of left-padded prompts (P, W); a padding row sees itself only (finite)."""
    W = prompt_mask.shape[1]
    causal = torch.ones(W, W, dtype=torch.bool, device=prompt_mask.device).tril()
    eye = torch.eye(W, dtype=torch.bool, device=prompt_mask.device)
    return ((causal & prompt_mask[:, None, :]) | (eye & ~prompt_mask[:, :, None]))[:, None]


def masks_for(model, mask: torch.Tensor) -> dict:
    """The per-layer-type dict of masks that transformers passes through untouched (no mask is rebuilt)."""
    return {kind: mask for kind in set(getattr(model.config, "layer_types", None) or ["full_attention"])}
