"""Per-row state of one `Sampler.generate` call: the cache rows being decoded and their outputs.

A row is one sample's main stream, or one path of a block that sample opened. Rows live in the first
`cache.active` slots of every buffer; tensors here are indexed like the cache rows and move with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import StaticKV


@dataclass(eq=False)
class Row:
    idx: int  # current buffer row
    sample: int  # sample this row writes for (0..N-1)
    block: "Block | None" = None  # the open block, for path rows and the main row while it is path 1
    queue: list = field(default_factory=list)  # forced tokens to append next, in order
    then: str = ""  # what feeding the current token triggers: "" | "branch" | "wait"
    waiting: bool = False  # a finished path waiting for its siblings
    malformed: bool = False  # the main stream wrote a bad tag: no more blocks (model/structure.py)
    blocks: int = 0  # blocks this sample opened
    pos_after: int = 0  # position of </Parallel>: 1 + the longest path of the block just joined


@dataclass(eq=False)
class Block:
    rows: list  # path rows in path order; rows[0] is the sample's main row
    out_start: int  # output index of the first path's <Path>
    slot_start: int  # cache slot of each path's <Path>
    budget: int  # response tokens left for all paths together
    opened: int = 0  # decode step at which the paths branched


class RowBuffers:
    """Per-row tensors: the token to feed, its position and slot, and the response written so far."""

    def __init__(self, rows: int, max_new: int, device):
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.tok, self.pos, self.slot, self.out_len = z(rows), z(rows), z(rows), z(rows)  # (R,) each
        self.out_tok, self.out_pos = z(rows, max_new), z(rows, max_new)  # (R, M)
        self.out_logp = z(rows, max_new, dt=torch.float32)  # (R, M)
        self.out_forced = z(rows, max_new, dt=torch.bool)  # (R, M)

    def tensors(self):
        return [self.tok, self.pos, self.slot, self.out_len, self.out_tok, self.out_pos, self.out_logp, self.out_forced]

    def grow(self, rows: int) -> None:
        if rows <= self.tok.shape[0]:
            return
        new = max(rows, 2 * self.tok.shape[0])
        grown = [torch.cat([t, t.new_zeros((new - t.shape[0], *t.shape[1:]))]) for t in self.tensors()]
        (self.tok, self.pos, self.slot, self.out_len, self.out_tok, self.out_pos, self.out_logp,
         self.out_forced) = grown

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def append(self, r: int, tok: int, logp: float, forced: bool, pos: int) -> None:
        """Write one token to row r's response and make it the token fed next."""
        n = int(self.out_len[r])
        self.out_tok[r, n], self.out_logp[r, n], self.out_forced[r, n], self.out_pos[r, n] = tok, logp, forced, pos
        self.out_len[r] = n + 1
        self.tok[r], self.pos[r] = tok, pos


class RowSet:
    """The rows of a generate call, kept contiguous at the front of the cache and the buffers."""

    def __init__(self, cache: StaticKV, buf: RowBuffers):
        self.cache, self.buf, self.rows = cache, buf, []

    def add_copies(self, src: Row, count: int) -> list[Row]:
        """New rows duplicating `src` (its cache, position and response so far)."""
        start = len(self.rows)
        self.cache.grow(start + count)
        self.buf.grow(start + count)
        dst = torch.arange(start, start + count, device=self.buf.tok.device)
        srcs = torch.full((count,), src.idx, device=dst.device)
        self.cache.copy_rows(dst, srcs)
        self.buf.copy_rows(dst, srcs)
        new = [Row(idx=start + i, sample=src.sample) for i in range(count)]
        self.rows.extend(new)
        self.cache.active = len(self.rows)
        return new

    def remove(self, gone: list[Row]) -> None:
        """Drop rows; rows from the end fill the holes so the live rows stay a prefix."""
        if not gone:
            return
        gone_ids = {id(r) for r in gone}
        keep = [r for r in self.rows if id(r) not in gone_ids]
        n = len(keep)
        holes = sorted(r.idx for r in gone if r.idx < n)
        movers = sorted((r for r in keep if r.idx >= n), key=lambda r: r.idx)
        if holes:
            dev = self.buf.tok.device
            dst, src = torch.tensor(holes, device=dev), torch.tensor([r.idx for r in movers], device=dev)
            self.cache.copy_rows(dst, src)
            self.buf.copy_rows(dst, src)
            for r, h in zip(movers, holes):
                r.idx = h
        self.rows = sorted(keep, key=lambda r: r.idx)
        self.cache.active = n
