"""The sampler's KV cache: a fixed pool of rows written by slot (gpt-fast's `setup_caches`), and its budget.

Buffers are allocated once per generate call at (rows, kv_heads, slots, head_dim) per layer, never more
rows than the budget holds (`pool_rows`); each decode forward writes one token per row at that row's own
slot, so rows advance independently (a row that branches into paths, a row that absorbs its paths' keys).
Only the first `active` rows are computed: finished rows are swapped out of that prefix and new rows
copied into it, never the whole cache. Keys are stored after the rotary embedding, so slot order does not
matter to attention; what a row may see is its `valid` slots.

It is driven by the stock transformers Qwen3 attention, which calls `update(key, value, layer_idx, ...)`.
"""
from __future__ import annotations

import torch

GiB = 2**30
CPU_DEFAULT_KV_BYTES = 4 * GiB  # the CPU budget when rollout.kv_cache_gb is unset (the demo needs a few MiB)


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V that one cached token takes over all layers (Qwen3-4B in bf16: 147,456 = 144 KiB)."""
    return 2 * num_layers * kv_heads * head_dim * dtype_bytes


def pool_rows(budget_bytes: int, width: int, bytes_per_token: int) -> int:
    """Cache rows of `width` slots that fit in `budget_bytes`: K, V and the (R, S) bool `valid` mask."""
    return int(budget_bytes // (width * (bytes_per_token + 1)))


def min_pool_rows(n: int, structured: bool, num_paths: int) -> int:
    """Rows a pool needs to make progress: a prompt's seed row and one sample copied from it (n > 1), plus the
    rows of one block's other paths when structured (rollout/run.py admission)."""
    return (2 if n > 1 else 1) + (num_paths - 1 if structured else 0)


def kv_budget_bytes(kv_cache_gb: float | None, kv_cache_fraction: float, device: torch.device) -> int:
    """The sampler's KV budget: `kv_cache_gb` GiB when given; else on CUDA `kv_cache_fraction` of the device
    memory free when sampling starts (after the gathered model, like vLLM's gpu_memory_utilization but
    of what is free); else (CPU) a fixed CPU_DEFAULT_KV_BYTES."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * GiB)
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # ours to reuse, not "used"
        return int(kv_cache_fraction * (free + cached))
    return CPU_DEFAULT_KV_BYTES


class StaticKV:
    def __init__(self, num_layers: int, rows: int, kv_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, kv_heads, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(rows, slots, dtype=torch.bool, device=device)  # (R, S) slots a row sees
        self.active = 0  # rows [0, active) are computed by a decode step
        self.prefill_rows = None  # (P,) long: the rows a prefill forward writes; None while decoding
        self.slot = None  # (active,) long: where a decode step writes
        self.width = 0  # slots [0, width) are attended over

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.valid))

    # --- the interface the transformers attention calls -------------------------------------------
    def update(self, key, value, layer_idx, *args, **kwargs):
        """key/value: (rows, H_kv, q, D). A prefill writes q tokens at slots 0..q-1 of `prefill_rows` and
        attends over those alone; a decode step writes one token per active row at its slot."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.prefill_rows is not None:
            q = key.shape[2]
            k[self.prefill_rows, :, :q], v[self.prefill_rows, :, :q] = key, value
            return key, value
        rows = torch.arange(key.shape[0], device=key.device)
        k[rows, :, self.slot] = key[:, :, 0]  # (n, H_kv, D)
        v[rows, :, self.slot] = value[:, :, 0]
        n = key.shape[0]
        return k[:n, :, : self.width], v[:n, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    # --- row management ---------------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """(active, 1, 1, width) bool attention mask for a one-token step."""
        return self.valid[: self.active, None, None, : self.width]

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor, width: int) -> None:
        """Row dst[i] := row src[i]: keys and values of slots [0, width), the whole `valid` row. The
        right-hand side is gathered first, so overlapping dst and src are safe."""
        for buf in (*self.k, *self.v):
            buf[dst, :, :width] = buf[src, :, :width]
        self.valid[dst] = self.valid[src]

    def copy_slots(self, dst_row: int, dst_start: int, src_row: int, src_start: int, n: int) -> None:
        """Move n slots of one row into another row at another offset (a path joining its block)."""
        for buf in (*self.k, *self.v):
            buf[dst_row, :, dst_start:dst_start + n] = buf[src_row, :, src_start:src_start + n]
        self.valid[dst_row, dst_start:dst_start + n] = self.valid[src_row, src_start:src_start + n]
