"""The sampler's decode forward: one token per row over the page pool, driven by one packed tensor of the rows'
inputs, so that a step is device work a CUDA graph can replay (gpt-fast and nano-vllm capture their decode step).

The host hands over, per row: its line in the page-table buffer, the token it feeds, its position, the slot its
key and value go to, how many entries of its table are in use, and its noise key (sample, stream, counter); one
(8, R) int64 tensor, one host-to-device copy. Everything after is tensor ops that never read the device: the page
fills are raised (PagePool.mark_written), the visible slots masked, the model run. Modes:
- "eager": exact shapes (CPU; CUDA with rollout.cuda_graphs off);
- "buckets": rows padded to a bucket of row counts and tables to a bucket of widths, run eagerly: what a graph
  replays, checkable on CPU;
- "graphs": the same buckets, each captured once per call in a CUDA graph and replayed (CUDA only).
A padding row feeds token 0 at position 0 into the scratch slot and reads only the scratch page.
"""
from __future__ import annotations

import torch

from .attention import PagedBatch
from .cache import PagePool

FIELDS = ("line", "tok", "pos", "slot", "pages", "sample", "stream", "counter")  # rows of the (8, R) pack
MODES = ("eager", "buckets", "graphs")


def buckets(limit: int, small: tuple = (1, 2, 4, 8, 16, 24, 32, 48)) -> list[int]:
    """Sizes a count is padded up to: a few small ones, then steps of a quarter of the next power of two."""
    out = [b for b in small if b < limit]
    b = 64
    while b < limit:
        out.append(b)
        b += max(16, 1 << (b.bit_length() - 3))
    return out + [limit]


def bucket_of(value: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= value)


class Decoder:
    """Owns the device page tables of a generate call and runs its decode steps."""

    def __init__(self, forward, pool: PagePool, max_rows: int, max_pages: int, mode: str, device):
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; valid: {', '.join(MODES)}")
        if mode == "graphs" and torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device: rollout.cuda_graphs off (or auto) on CPU")
        self.forward, self.pool, self.mode, self.device = forward, pool, mode, device
        self.pad_line = max_rows
        self.tables = torch.full((max_rows + 1, max_pages), pool.scratch, dtype=torch.long, device=device)  # (R+1, P)
        self.pad = [self.pad_line, 0, 0, pool.scratch_slot, 1, 0, 0, 0]  # a padding row's pack column
        self.row_sizes, self.page_sizes = buckets(max_rows), buckets(max_pages, small=(1, 2, 4, 8, 16))
        self.graphs: dict = {}
        self.mempool = torch.cuda.graph_pool_handle() if mode == "graphs" else None

    @property
    def nbytes(self) -> int:
        return self.tables.numel() * self.tables.element_size()

    def write_tables(self, writes: list) -> None:
        """Table entries (line, entry, page) set by the host since the last step: one copy, one index_put. A line
        freed and taken again meanwhile may list an entry twice: the last write wins (index_put would pick any)."""
        if writes:
            last = {(line, entry): page for line, entry, page in writes}
            w = torch.tensor([(line, entry, page) for (line, entry), page in last.items()], dtype=torch.long,
                             device=self.device)  # (K, 3)
            self.tables[w[:, 0], w[:, 1]] = w[:, 2]

    def step(self, columns: list, width: int):
        """columns: per row its 8 pack values (FIELDS); width: the most table entries a row uses. Returns the
        (R, V) next-token logits and the (8, R) pack on the device (its noise-key rows are read by the caller)."""
        R = len(columns)
        if self.mode == "eager":
            pack = torch.tensor(columns, dtype=torch.long, device=self.device).T  # (8, R)
            return self._run(pack, width), pack
        Rb, P = bucket_of(R, self.row_sizes), bucket_of(width, self.page_sizes)
        pack = torch.tensor(columns + [self.pad] * (Rb - R), dtype=torch.long, device=self.device).T  # (8, Rb)
        if self.mode == "buckets":
            return self._run(pack, P)[:R], pack[:, :R]
        graph, static, logits = self._graph(Rb, P)
        static.copy_(pack)
        graph.replay()
        return logits[:R], static[:, :R]

    def _run(self, pack: torch.Tensor, P: int) -> torch.Tensor:
        line, tok, pos, slot, pages = pack[0], pack[1], pack[2], pack[3], pack[4]
        tables = self.tables[line, :P]  # (R, P)
        self.pool.mark_written(slot)
        mask = self.pool.visible(tables, pages)  # (R, 1, 1, P * page_size)
        return self.forward(tok[:, None], pos[:, None], mask, PagedBatch(self.pool, slot, tables))  # (R, V)

    def _graph(self, R: int, P: int):
        """The CUDA graph of bucket (R rows, P table entries): captured on first use, with a static pack of
        padding rows (their writes go to the scratch page) and a static logits output."""
        if (R, P) not in self.graphs:
            static = torch.tensor([self.pad] * R, dtype=torch.long, device=self.device).T.contiguous()  # (8, R)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture: kernels picked, workspaces allocated
                for _ in range(2):
                    self._run(static, P)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                logits = self._run(static, P)
            self.graphs[(R, P)] = (graph, static, logits)
        return self.graphs[(R, P)]
