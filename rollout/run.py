"""One `Sampler.generate` call as a state machine over a fixed pool of cache rows (continuous batching).

`Run` owns every piece of sampling state: the prompts still waiting, the rows in the pool, the results.
Each iteration the sampler asks it which prompts to prefill (`admit`), prefills them, lets it copy seeds
into free rows (`spawn`), runs one decode step over the rows in use and hands the sampled tokens back
(`advance`). Finished rows leave the pool at once and the next waiting samples take their rows.

Admission order is sample order. A group is prefilled once, into the row of its last sample (the seed);
the other samples are copied from the seed as rows free up, and the seed starts when the last copy is
made. Structured mode keeps `num_paths - 1` rows free at admission so that a block can always open; a
row that wants to open a block while the pool is short waits (idle) until rows come back, and waiting
rows go before new samples. Which rows share a step never changes a sample (rollout/noise.py).
Block mechanics (branching into paths, merging them back) are in rollout/structured.py.
"""
from __future__ import annotations

from collections import deque

import torch

from .rows import Limits, Rollout, Row, RowPool
from . import structured as st


class Run:
    def __init__(self, pool: RowPool, limits: Limits, num_prompts: int, n: int):
        self.pool, self.lim, self.n, self.N, self.M = pool, limits, n, num_prompts * n, limits.max_new_tokens
        dev = pool.buf.tok.device
        events = set(limits.stop_ids) | (set(limits.tags.as_tuple()) if limits.structured else set())
        self.event_ids = torch.tensor(sorted(events) or [-1], device=dev)
        self.tag_set = set(limits.tags.as_tuple()) if limits.structured else set()
        self.reserve = limits.num_paths - 1 if limits.structured else 0  # rows kept free for a block
        z = lambda dt: torch.zeros(self.N, self.M, dtype=dt, device=dev)  # noqa: E731
        self.res_tok, self.res_pos, self.res_logp, self.res_forced = z(torch.long), z(torch.long), z(torch.float32), z(torch.bool)
        self.res_len = [0] * self.N
        self.reason = [""] * self.N
        self.waiting = deque(range(num_prompts))  # prompts whose samples are not all in the pool yet
        self.seeds: dict[int, tuple[Row, int]] = {}  # prompt -> (its seed row, copies made so far)
        self.to_branch: list[Row] = []  # rows that want to open a block, in order
        self.gone: list[Row] = []  # rows to drop at the end of this step
        self.first_step = [-1] * self.N  # decode step at which each sample started
        # decode steps; for joined blocks: steps they were open and path tokens they hold; blocks that
        # waited for rows before opening
        self.stats = {"steps": 0, "blocks": 0, "block_steps": 0, "path_tokens": 0, "stalled_blocks": 0}

    @property
    def done(self) -> bool:
        return not self.pool.rows and not self.waiting

    # --- admission ---------------------------------------------------------------------------------
    def admit(self, max_prompts: int) -> list[tuple[int, Row]]:
        """Seed rows for the next waiting prompts that free rows can take now (at most `max_prompts`);
        the caller prefills them. Rows waiting to open a block go first: nothing is admitted then."""
        if self.to_branch:
            return []
        free, new = self.pool.free - self.reserve, []
        for p in self.waiting:
            if free <= 0 or len(new) == max_prompts:
                break
            if p not in self.seeds:
                seed = self.pool.add_empty([p * self.n + self.n - 1])[0]
                seed.seed = True
                self.seeds[p] = (seed, 0)
                new.append((p, seed))
                free -= 1
            free -= self.n - 1 - self.seeds[p][1]  # rows its copies will take (spawn)
        return new

    def spawn(self) -> None:
        """Copy seeds into free rows, in sample order; a seed whose copies are all made starts itself."""
        while self.waiting and self.waiting[0] in self.seeds and not self.to_branch:
            p = self.waiting[0]
            seed, made = self.seeds[p]
            count = min(self.n - 1 - made, self.pool.free - self.reserve)
            if count > 0:
                samples = list(range(p * self.n + made, p * self.n + made + count))
                for r in self.pool.add_copies([seed] * count, samples, [0] * count):
                    self._start(r)
                made += count
                self.seeds[p] = (seed, made)
            if made < self.n - 1:
                return  # the pool is full: the rest of this group waits for rows
            seed.seed = False
            self._start(seed)
            del self.seeds[p]
            self.waiting.popleft()

    def _start(self, row: Row) -> None:
        self.first_step[row.sample] = self.stats["steps"]

    # --- one decode step ---------------------------------------------------------------------------
    def advance(self, tok: torch.Tensor, logp: torch.Tensor) -> None:
        """Apply one step's sampled tokens (R,) and log-probs (R,) to every row in the pool."""
        buf, rows = self.pool.buf, self.pool.rows
        R, logp = len(rows), logp.float()  # recorded in float32 whatever the compute dtype
        self.stats["steps"] += 1
        slow = torch.tensor([bool(r.queue or r.then or r.idle or r.block) for r in rows], device=tok.device)
        event = slow | torch.isin(tok, self.event_ids) | (buf.out_len[:R] + 1 >= self.M)  # (R,)
        fast = (~event).nonzero()[:, 0]
        n = buf.out_len[fast]
        buf.out_tok[fast, n], buf.out_logp[fast, n], buf.out_forced[fast, n] = tok[fast], logp[fast], False
        buf.out_pos[fast, n] = buf.pos[fast] + 1
        buf.out_len[fast] += 1
        buf.tok[fast], buf.pos[fast] = tok[fast], buf.pos[fast] + 1
        for i in event.nonzero()[:, 0].tolist():
            self.step_row(rows[i], int(tok[i]), float(logp[i]))
        if self.lim.structured:
            st.settle_blocks(self)
        self.pool.remove(self.gone)
        self.gone = []
        if self.lim.structured:
            st.open_blocks(self)

    def step_row(self, row: Row, tok: int, logp: float) -> None:
        buf, r = self.pool.buf, row.idx
        if row.then == "wait":  # its </Path> is in the cache now: wait for the sibling paths
            row.then, row.waiting = "", True
            return
        if row.idle:
            return
        if row.then == "branch":  # <Parallel> is in the cache: every path starts with a forced <Path>
            row.then = ""
            self.append_forced(row, self.lim.tags.path_open)
            if row not in self.gone:  # the forced <Path> may reach the length limit
                self.to_branch.append(row)
            return
        if row.queue:
            self.append_forced(row, row.queue.pop(0))
            return
        if row.block is not None:
            st.path_token(self, row, tok, logp)
            return
        buf.append(r, tok, logp, False, int(buf.pos[r]) + 1)
        if tok in self.lim.stop_ids:
            self.finish(row, "stop")
        elif self.lim.structured and not row.malformed and tok in self.tag_set:
            st.main_tag(self, row, tok)
        if row not in self.gone and int(buf.out_len[r]) >= self.M:
            self.finish(row, "length")

    def append_forced(self, row: Row, tok: int, pos: int | None = None) -> None:
        buf, r = self.pool.buf, row.idx
        buf.append(r, tok, 0.0, True, int(buf.pos[r]) + 1 if pos is None else pos)
        if row.block is not None:
            if tok == self.lim.tags.path_close:
                row.then = "wait"
        elif int(buf.out_len[r]) >= self.M:  # a path's length is the block's budget (structured.py)
            self.finish(row, "length")

    def finish(self, row: Row, reason: str) -> None:
        buf, r, s = self.pool.buf, row.idx, row.sample
        L = int(buf.out_len[r])
        self.res_tok[s, :L], self.res_pos[s, :L] = buf.out_tok[r, :L], buf.out_pos[r, :L]
        self.res_logp[s, :L], self.res_forced[s, :L] = buf.out_logp[r, :L], buf.out_forced[r, :L]
        self.res_len[s], self.reason[s] = L, reason
        self.gone.append(row)

    # --- the record --------------------------------------------------------------------------------
    def result(self, prompts: list, pad_id: int, cache_bytes: int) -> Rollout:
        dev = self.res_tok.device
        Lp = max(map(len, prompts))
        pids = torch.full((len(prompts), Lp), pad_id, dtype=torch.long, device=dev)
        pmask = torch.zeros(len(prompts), Lp, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):  # left-padded, as the trainer lays a row out
            pids[i, Lp - len(p):], pmask[i, Lp - len(p):] = torch.tensor(p, device=dev), 1
        src = torch.arange(self.N, device=dev) // self.n  # sample s belongs to prompt s // n
        width = max(self.res_len)
        lens = torch.tensor(self.res_len, device=dev)
        mask = torch.arange(width, device=dev)[None, :] < lens[:, None]  # (N, M)
        ids = self.res_tok[:, :width].masked_fill(~mask, pad_id)
        pool = self.pool
        stats = dict(self.stats, pool_rows=pool.cache.capacity, peak_rows=pool.peak, kv_bytes=cache_bytes,
                     slot_use=pool.slots_used / max(pool.row_steps * pool.cache.slots, 1),
                     first_step=tuple(self.first_step))
        return Rollout(pids[src], pmask[src], ids, mask.long(), self.res_logp[:, :width] * mask,
                       (self.res_forced[:, :width] & mask).long(), self.res_pos[:, :width] * mask,
                       tuple(self.reason), self.n, stats)
