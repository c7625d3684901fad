"""One `Sampler.generate` call: after each step, what every row appends and which samples end.

Most rows just append the token they sampled (one vectorised write). Rows that sampled a stop token
or a tag, reached a limit, or have forced tokens queued go through `step_row`; block mechanics
(branching into paths, merging them back) are in rollout/structured.py.
"""
from __future__ import annotations

import torch

from .rows import Row, RowSet
from . import structured as st


class Run:
    def __init__(self, sampler, rows: RowSet, N: int, M: int, structured: bool, stop_ids: set):
        self.sampler, self.rows, self.N, self.M = sampler, rows, N, M
        self.structured, self.stop, self.tags = structured, stop_ids, sampler.tags
        dev = rows.buf.tok.device
        events = set(stop_ids) | (set(self.tags.as_tuple()) if structured else set())
        self.event_ids = torch.tensor(sorted(events) or [-1], device=dev)
        self.tag_set = set(self.tags.as_tuple()) if structured else set()
        z = lambda dt: torch.zeros(N, M, dtype=dt, device=dev)  # noqa: E731
        self.res_tok, self.res_pos, self.res_logp, self.res_forced = z(torch.long), z(torch.long), z(torch.float32), z(torch.bool)
        self.res_len = [0] * N
        self.reason = [""] * N
        self.gone: list[Row] = []  # rows to drop at the end of this step
        self.branching: list[Row] = []  # rows that open their paths at the end of this step
        # decode steps, and for joined blocks: steps they were open and path tokens they hold
        self.stats = {"steps": 0, "blocks": 0, "block_steps": 0, "path_tokens": 0}

    def advance(self, tok: torch.Tensor, logp: torch.Tensor) -> None:
        """Apply one step's sampled tokens (R,) and log-probs (R,) to every row."""
        buf, rows = self.rows.buf, self.rows.rows
        R = len(rows)
        self.stats["steps"] += 1
        slow = torch.tensor([bool(r.queue or r.then or r.waiting or r.block) for r in rows], device=tok.device)
        event = slow | torch.isin(tok, self.event_ids) | (buf.out_len[:R] + 1 >= self.M)  # (R,)
        fast = (~event).nonzero()[:, 0]
        n = buf.out_len[fast]
        buf.out_tok[fast, n], buf.out_logp[fast, n], buf.out_forced[fast, n] = tok[fast], logp[fast], False
        buf.out_pos[fast, n] = buf.pos[fast] + 1
        buf.out_len[fast] += 1
        buf.tok[fast], buf.pos[fast] = tok[fast], buf.pos[fast] + 1
        for i in event.nonzero()[:, 0].tolist():
            self.step_row(rows[i], int(tok[i]), float(logp[i]))
        if self.structured:
            st.settle_blocks(self)
        self.rows.remove(self.gone)
        self.gone = []

    def step_row(self, row: Row, tok: int, logp: float) -> None:
        buf, r = self.rows.buf, row.idx
        if row.then == "wait":  # its </Path> is in the cache now: wait for the sibling paths
            row.then, row.waiting = "", True
            return
        if row.waiting:
            return
        if row.then == "branch":  # <Parallel> is in the cache: every path starts with a forced <Path>
            row.then, row.queue = "", [self.tags.path_open]
            self.branching.append(row)
        if row.queue:
            self.append_forced(row, row.queue.pop(0))
            return
        if row.block is not None:
            st.path_token(self, row, tok, logp)
            return
        buf.append(r, tok, logp, False, int(buf.pos[r]) + 1)
        if tok in self.stop:
            self.finish(row, "stop")
        elif self.structured and not row.malformed and tok in self.tag_set:
            st.main_tag(self, row, tok)
        if row not in self.gone and int(buf.out_len[r]) >= self.M:
            self.finish(row, "length")

    def append_forced(self, row: Row, tok: int, pos: int | None = None) -> None:
        buf, r = self.rows.buf, row.idx
        buf.append(r, tok, 0.0, True, int(buf.pos[r]) + 1 if pos is None else pos)
        if row.block is not None:
            if tok == self.tags.path_close:
                row.then = "wait"
        elif int(buf.out_len[r]) >= self.M:  # a path's length is the block's budget (structured.py)
            self.finish(row, "length")

    def finish(self, row: Row, reason: str) -> None:
        buf, r, s = self.rows.buf, row.idx, row.sample
        L = int(buf.out_len[r])
        self.res_tok[s, :L], self.res_pos[s, :L] = buf.out_tok[r, :L], buf.out_pos[r, :L]
        self.res_logp[s, :L], self.res_forced[s, :L] = buf.out_logp[r, :L], buf.out_forced[r, :L]
        self.res_len[s], self.reason[s] = L, reason
        self.gone.append(row)

    def result(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, pad_id: int):
        from .sampler import Rollout

        width = max(self.res_len)
        lens = torch.tensor(self.res_len, device=self.res_tok.device)
        mask = torch.arange(width, device=lens.device)[None, :] < lens[:, None]  # (N, M)
        ids = self.res_tok[:, :width].masked_fill(~mask, pad_id)
        return Rollout(prompt_ids, prompt_mask, ids, mask.long(), self.res_logp[:, :width] * mask,
                       (self.res_forced[:, :width] & mask).long(), self.res_pos[:, :width] * mask,
                       tuple(self.reason), n, dict(self.stats))
