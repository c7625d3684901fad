"""The rows of one `Sampler.generate` call: a fixed pool of KV-cache rows, what each row holds, and the
`Rollout` record the call returns.

A row is one sample's main stream, one path of a block that sample opened, or a prompt waiting to be
copied to its samples (the *seed*: a group is prefilled once into the row of its last sample, and the
others are copied from it as rows free up). Live rows are the first `pool.active` rows of every buffer;
tensors here are indexed like the cache rows and move with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.tags import TagIds

from .cache import StaticKV


@dataclass(frozen=True)
class Limits:
    """What a generate call may write: passed in by the sampler, read by the rules (run.py, structured.py)."""
    max_new_tokens: int  # response limit, paths and forced tags included
    stop_ids: frozenset  # token ids that end a response (EOS)
    structured: bool = False
    tags: TagIds | None = None
    num_paths: int = 2  # paths per block
    max_blocks: int = 4  # blocks per response
    max_path_tokens: int | None = None  # path length limit, tags included
    newline_id: int | None = None  # forced between </Parallel> and <Summary>


@dataclass(frozen=True)
class Rollout:
    """prompts x n samples, group-contiguous: rows i*n .. i*n+n-1 are prompt i's samples."""

    prompt_ids: torch.Tensor  # (N, Lp) left-padded with pad_id
    prompt_mask: torch.Tensor  # (N, Lp) 1 on prompt tokens
    response_ids: torch.Tensor  # (N, M) right-padded with pad_id
    response_mask: torch.Tensor  # (N, M) 1 up to and including the stop token
    logprobs: torch.Tensor  # (N, M) sampler log-prob under logits/temperature; 0 on forced tokens and padding
    forced_mask: torch.Tensor  # (N, M) 1 on forced tokens (structured tags: context, not actions)
    position_ids: torch.Tensor  # (N, M) position id of each response token
    finish_reason: tuple  # per sample: "stop" | "length" | "block_limit"
    group_size: int
    # decode "steps"; joined "blocks", the "block_steps" they were open, their "path_tokens", the
    # "stalled_blocks" that waited for rows; the pool: "pool_rows", "peak_rows" (most rows in use at
    # once), "kv_bytes" (the cache's allocation), "slot_use" (share of the slots of the rows in use that held
    # a token, over all decode steps: what rows sized to real lengths would save); "first_step" of each sample
    stats: dict

    def sequences(self):
        """(ids, attention_mask, response_start): prompt and response side by side, (N, Lp+M)."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask, self.prompt_ids.shape[1]


@dataclass(eq=False)
class Row:
    idx: int  # current pool row
    sample: int  # sample this row writes for (0..N-1)
    block: "Block | None" = None  # the open block, for path rows and the main row while it is path 1
    queue: list = field(default_factory=list)  # forced tokens to append next, in order
    then: str = ""  # what feeding the current token triggers: "" | "branch" | "wait"
    waiting: bool = False  # a finished path waiting for its siblings
    seed: bool = False  # a prefilled prompt whose sibling samples are still to be copied from it
    stalled: bool = False  # wants to open a block, but the pool has no rows for its paths yet
    malformed: bool = False  # the main stream wrote a bad tag: no more blocks (model/structure.py)
    blocks: int = 0  # blocks this sample opened
    pos_after: int = 0  # position of </Parallel>: 1 + the longest path of the block just joined

    @property
    def idle(self) -> bool:
        """Fed in decode steps (rows are a contiguous prefix) but writes nothing it keeps."""
        return self.waiting or self.seed or self.stalled


@dataclass(eq=False)
class Block:
    rows: list  # path rows in path order; rows[0] is the sample's main row
    out_start: int  # output index of the first path's <Path>
    slot_start: int  # cache slot of each path's <Path>
    budget: int  # response tokens left for all paths together
    opened: int = 0  # decode step at which the paths branched


class RowBuffers:
    """Per-row tensors: the token to feed, its position and slot, the row's random stream, and the
    response written so far."""

    def __init__(self, rows: int, max_new: int, device):
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.tok, self.pos, self.slot, self.out_len = z(rows), z(rows), z(rows), z(rows)  # (R,) each
        self.sample, self.stream = z(rows), z(rows)  # (R,) the noise key of the row (rollout/noise.py)
        self.out_tok, self.out_pos = z(rows, max_new), z(rows, max_new)  # (R, M)
        self.out_logp = z(rows, max_new, dt=torch.float32)  # (R, M)
        self.out_forced = z(rows, max_new, dt=torch.bool)  # (R, M)

    def tensors(self):
        return [self.tok, self.pos, self.slot, self.out_len, self.sample, self.stream, self.out_tok, self.out_pos,
                self.out_logp, self.out_forced]

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def append(self, r: int, tok: int, logp: float, forced: bool, pos: int) -> None:
        """Write one token to row r's response and make it the token fed next."""
        n = int(self.out_len[r])
        self.out_tok[r, n], self.out_logp[r, n], self.out_forced[r, n], self.out_pos[r, n] = tok, logp, forced, pos
        self.out_len[r] = n + 1
        self.tok[r], self.pos[r] = tok, pos


class RowPool:
    """The cache rows of a generate call, a fixed number of them; rows in use are kept contiguous at the
    front (the decode step computes exactly `active` rows) by moving the last rows into the holes."""

    def __init__(self, cache: StaticKV, buf: RowBuffers):
        self.cache, self.buf, self.rows = cache, buf, []
        self.peak = 0  # most rows in use at once
        self.slots_used, self.row_steps = 0, 0  # slots holding a token / rows in use, summed over decode steps

    @property
    def free(self) -> int:
        return self.cache.capacity - len(self.rows)

    def _take(self, count: int) -> torch.Tensor:
        start = len(self.rows)
        if count > self.free:
            raise RuntimeError(f"row pool overrun: {count} rows asked, {self.free} free")  # admission's invariant
        self.cache.active = start + count
        self.peak = max(self.peak, self.cache.active)
        return torch.arange(start, start + count, device=self.buf.tok.device)

    def add_empty(self, samples: list[int]) -> list[Row]:
        """New rows for prompts about to be prefilled (their cache is written by the prefill)."""
        idx = self._take(len(samples))
        for t in self.buf.tensors():
            t[idx] = 0
        self.cache.valid[idx] = False  # a previous occupant's slots
        self.buf.sample[idx] = torch.tensor(samples, device=idx.device)
        new = [Row(idx=int(i), sample=s) for i, s in zip(idx.tolist(), samples)]
        self.rows.extend(new)
        return new

    def add_copies(self, src: list[Row], samples: list[int], streams: list[int]) -> list[Row]:
        """New rows duplicating the rows `src` (cache, position, response so far), one per entry."""
        dst = self._take(len(src))
        srcs = torch.tensor([r.idx for r in src], device=dst.device)
        self.copy_rows(dst, srcs)
        self.buf.sample[dst] = torch.tensor(samples, device=dst.device)
        self.buf.stream[dst] = torch.tensor(streams, device=dst.device)
        new = [Row(idx=int(i), sample=s) for i, s in zip(dst.tolist(), samples)]
        self.rows.extend(new)
        return new

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst[i] := row src[i]: keys and values of the slots written so far, the rest as it is."""
        self.cache.copy_rows(dst, src, width=int(self.buf.slot[src].max()))
        self.buf.copy_rows(dst, src)

    def remove(self, gone: list[Row]) -> None:
        """Drop rows; rows from the end fill the holes so the rows in use stay a prefix."""
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
            self.copy_rows(dst, src)
            for r, h in zip(movers, holes):
                r.idx = h
        self.rows = sorted(keep, key=lambda r: r.idx)
        self.cache.active = n
