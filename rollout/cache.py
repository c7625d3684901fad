"""The sampler's paged KV cache (DESIGN.md rollout/sampler.py "Memory"): one pool of fixed-size pages bought by
the budget, and its host-side bookkeeping.

Keys and values live in `k[layer]`, `v[layer]` of shape (pages + 1, page_size, H_kv, D); the last page is a
scratch page that takes the writes of padding. A sequence is a *page table* (a host list of page ids). A page is
written by one sequence, in order, and read by every table that lists it: a group's prompt by its samples, a
block's prefix by its paths, every path by the summary. A page listed by more than one table is never written
again (its sharers start new pages), so a partly filled page may sit inside a table: `fill[p]`, the tokens
written to page p, says which of its slots a reader sees. Nothing is ever copied to share. Keys are stored after
the rotary embedding, so the order of slots does not matter to attention (rollout/attention.py).

The pool is allocated uninitialised and cleared lazily: a reader's masked slots still enter its matmul with
weight 0, so they must hold finite numbers, which only pages handed out at least once need. Pages are handed out
lowest id first and freed pages are reused first, so the pages ever used are [0, PageTables.touched), and
`PagePool.clear` zeroes that range as it grows: a call sized for its longest samples (most of the pool never
used) costs the pages it uses, not a memset of the whole budget (0.38 s of a 2.4 s benchmark call on CPU).
"""
from __future__ import annotations

import math

import torch

GiB = 2**30
CPU_DEFAULT_KV_BYTES = 4 * GiB  # the CPU budget when rollout.kv_cache_gb is unset (the demo needs a few MiB)
DEFAULT_PAGE_SIZE = 16  # tokens per page: small pages waste little at the end of each shared segment


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V that one cached token takes over all layers (Qwen3-4B in bf16: 147,456 = 144 KiB)."""
    return 2 * num_layers * kv_heads * head_dim * dtype_bytes


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


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


def sample_pages(prompt_tokens: int, max_new_tokens: int, page_size: int, blocks: int = 0, num_paths: int = 2) -> int:
    """Pages one sample holds at most: its prompt's, its response's, and one partly filled page per segment that
    starts on a new page (the response after the shared prompt; each path of each block, whose prefix is shared)."""
    return pages_for(prompt_tokens, page_size) + pages_for(max_new_tokens, page_size) + 1 + blocks * num_paths


def table_bytes(rows: int, max_pages: int) -> int:
    """Bytes of the device page tables: one int64 row of `max_pages` per row in flight, plus the padding row."""
    return (rows + 1) * max_pages * 8


def pool_pages(budget_bytes: int, page_size: int, bytes_per_token: int, tables: int = 0) -> int:
    """Pages (besides the scratch page) that `budget_bytes` buys after `tables` bytes of page tables: K and V of
    `page_size` tokens plus the page's int32 fill counter each."""
    return max(0, (budget_bytes - tables) // (page_size * bytes_per_token + 4) - 1)


def uninitialized(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A pool buffer as allocated (whatever the memory held; PagePool.clear zeroes what gets used)."""
    return torch.empty(shape, dtype=dtype, device=device)


class PagePool:
    """The device side: K and V pages per layer and each page's fill. Written by the attention function."""

    def __init__(self, num_layers: int, pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (pages + 1, page_size, kv_heads, head_dim)  # the last page is the scratch page
        self.k = [uninitialized(shape, dtype, device) for _ in range(num_layers)]
        self.v = [uninitialized(shape, dtype, device) for _ in range(num_layers)]
        self.fill = torch.zeros(pages + 1, dtype=torch.int32, device=device)  # (pages + 1,) tokens written
        self.page_size, self.scratch = page_size, pages
        self.fill[pages] = 1  # padding rows see the scratch page's first slot: never an empty softmax
        self.cleared = 0  # pages [0, cleared) hold finite numbers (zeros or keys and values written since)
        for buf in (*self.k, *self.v):
            buf[pages].zero_()

    def clear(self, touched: int) -> None:
        """Zero pages [cleared, touched) of every layer before anything reads them (one slice per buffer, only
        when the pages ever handed out grew)."""
        if touched > self.cleared:
            for buf in (*self.k, *self.v):
                buf[self.cleared:touched].zero_()
            self.cleared = touched

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.fill))

    @property
    def scratch_slot(self) -> int:
        return self.scratch * self.page_size

    def mark_written(self, slots: torch.Tensor) -> None:
        """Raise the fill of the pages that `slots` (flat slot ids, page * page_size + offset) write to. A page
        reused after being freed starts over: the largest offset written now is its fill."""
        self.fill.scatter_reduce_(0, slots // self.page_size, (slots % self.page_size + 1).to(torch.int32),
                                  "amax", include_self=False)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """key/value (B, H_kv, T, D) after the rotary embedding, into flat slots (B*T,)."""
        H, D = key.shape[1], key.shape[3]
        for buf, new in ((self.k[layer], key), (self.v[layer], value)):
            buf.view(-1, H, D).index_copy_(0, slots, new.transpose(1, 2).reshape(-1, H, D).to(buf.dtype))

    def gather(self, layer: int, tables: torch.Tensor):
        """Keys and values of the pages in `tables` (R, P), as (R, H_kv, P * page_size, D) each."""
        R, P = tables.shape
        out = []
        for buf in (self.k[layer], self.v[layer]):
            kv = buf.index_select(0, tables.reshape(-1))  # (R * P, page_size, H_kv, D)
            out.append(kv.view(R, P * self.page_size, kv.shape[-2], kv.shape[-1]).transpose(1, 2))
        return out

    def visible(self, tables: torch.Tensor, num_pages: torch.Tensor) -> torch.Tensor:
        """(R, 1, 1, P * page_size) bool: the filled slots of each row's first `num_pages` (R,) table pages."""
        R, P = tables.shape
        offset = torch.arange(self.page_size, device=tables.device)
        filled = offset < self.fill[tables][..., None]  # (R, P, page_size)
        listed = torch.arange(P, device=tables.device)[None, :] < num_pages[:, None]  # (R, P)
        return (filled & listed[..., None]).view(R, 1, 1, P * self.page_size)


class PageTables:
    """The host side: which pages are free, how many tables list each page, and how full each page is (a mirror
    of PagePool.fill kept without reading the device)."""

    def __init__(self, pages: int, page_size: int):
        self.page_size = page_size
        self.free = list(range(pages - 1, -1, -1))  # popped from the end: lowest ids first
        self.refs = [0] * pages
        self.fill = [0] * pages
        self.peak = 0  # most pages in use at once
        self.touched = 0  # pages [0, touched) were handed out at least once (ids go lowest first, reuse first)
        self.tokens = 0  # tokens written to the pages in use

    @property
    def total(self) -> int:
        return len(self.refs)

    @property
    def in_use(self) -> int:
        return self.total - len(self.free)

    def take(self) -> int | None:
        """A free page (listed once, empty), or None when the pool is dry."""
        if not self.free:
            return None
        p = self.free.pop()
        self.refs[p], self.fill[p] = 1, 0
        self.peak = max(self.peak, self.in_use)
        self.touched = max(self.touched, p + 1)
        return p

    def share(self, pages: list[int]) -> list[int]:
        """One more table lists `pages`; returns a copy of the list for it."""
        for p in pages:
            self.refs[p] += 1
        return list(pages)

    def release(self, pages: list[int]) -> None:
        """A table that listed `pages` is gone; pages no table lists any more are free."""
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)
                self.tokens -= self.fill[p]

    def writable(self, p: int) -> bool:
        """Page p may take the next token of the one table that lists it."""
        return self.refs[p] == 1 and self.fill[p] < self.page_size

    def next_slot(self, p: int) -> int:
        """The flat slot of page p's next token; counts it as written."""
        self.fill[p] += 1
        self.tokens += 1
        return p * self.page_size + self.fill[p] - 1
