"""The structured-attention patch (DESIGN.md model/patch.py), applied to a built model from outside.

`apply_structured_attention(model, tags)` hooks the Qwen3 decoder stack so that a plain
`model(input_ids=..., attention_mask=...)` builds multiverse position ids and the path-window mask
from the token ids (model/structure.py) and hands them to the stock attention as a 4D mask, which
transformers passes through untouched (so its packed-sequence detection never sees our restarted
positions). The modelling code stays stock; `remove_structured_attention` takes the hook off.

Masks per attention implementation: sdpa gets a dense bool (B, 1, T, T) mask (the CPU path; no -inf
anywhere, so padded rows stay finite); eager a float mask with finfo.min; flex_attention (CUDA) a
BlockMask evaluated from per-token block/path ids, never materialised densely.
flash_attention_2 cannot take an arbitrary mask and is refused.
"""
from __future__ import annotations

import torch

from .structure import BatchStructure, build_structure_batch
from .tags import TagIds

_HANDLE = "_structured_attention_handle"


def _flex_block_mask(s: BatchStructure):
    from torch.nn.attention.flex_attention import create_block_mask

    valid, block, path = s.valid, s.block_ids, s.path_ids
    # packed sequences: a per-token segment id keeps them apart; unpacked, every token is in segment 0
    seg = torch.zeros_like(block) if s.segment_ids is None else s.segment_ids

    def mask_mod(b, h, q, kv):
        sibling = (block[b, q] == block[b, kv]) & (path[b, q] >= 0) & (path[b, kv] >= 0) & (path[b, q] != path[b, kv])
        seen = (kv <= q) & valid[b, q] & valid[b, kv] & (seg[b, q] == seg[b, kv]) & ~sibling
        return seen | ((q == kv) & ~valid[b, q])  # a padded row sees itself only: finite, ignored

    B, T = valid.shape
    return create_block_mask(mask_mod, B, None, T, T, device=valid.device)


def structured_attention_mask(s: BatchStructure, attn_implementation: str, dtype: torch.dtype = torch.float32):
    """The 4D mask (or BlockMask) that makes the stock attention follow structure `s`."""
    if attn_implementation == "flex_attention":
        return _flex_block_mask(s)
    if attn_implementation == "flash_attention_2":
        raise ValueError("structured attention needs attn_implementation sdpa (CPU) or flex_attention (CUDA); "
                         "flash_attention_2 cannot express the path-window mask")
    mask = s.dense_mask()  # (B, 1, T, T)
    T = mask.shape[-1]
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    mask = mask | (eye & ~s.valid[:, None, :, None])  # padded rows see themselves: no empty softmax
    if attn_implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _hook(tags: TagIds):
    def pre_forward(module, args, kwargs):
        response_start = kwargs.pop("response_start", None)
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is not None and mask is not None and getattr(mask, "ndim", 4) == 4:
            return args, kwargs  # the caller built positions and mask itself (the sampler, the trainer)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("a structured model is not driven with a transformers cache: sample with rollout.Sampler")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("the structured model needs input_ids: positions and paths are read from the tags")
        s = build_structure_batch(input_ids, tags, mask, response_start=response_start)
        kwargs["position_ids"] = s.position_ids
        kwargs["attention_mask"] = structured_attention_mask(
            s, module.config._attn_implementation, module.embed_tokens.weight.dtype)
        return args, kwargs

    return pre_forward


def apply_structured_attention(model, tags: TagIds):
    """Patch `model` (a Qwen3ForCausalLM) in place; returns it. Applying twice is a no-op."""
    if getattr(model, _HANDLE, None) is None:
        handle = model.model.register_forward_pre_hook(_hook(tags), with_kwargs=True)
        setattr(model, _HANDLE, handle)
        model.structured_tags = tags
    return model


def remove_structured_attention(model):
    """Restore stock behaviour; returns the model."""
    handle = getattr(model, _HANDLE, None)
    if handle is not None:
        handle.remove()
        setattr(model, _HANDLE, None)
        model.structured_tags = None
    return model


def structured_tags(model) -> TagIds | None:
    """The tags a patched model reads its structure from, or None for a plain causal model."""
    return getattr(model, "structured_tags", None)
