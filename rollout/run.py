"""One `Sampler.generate` call as a state machine over the page pool (continuous batching), kept on the host.

Each iteration the sampler asks `schedule()` which waiting samples start now (their first token was drawn from
their group's prefill) and which groups to prefill; `decode_rows()` gives every row it feeds a slot to write,
taking a new page when its last one is full or shared; after the forwards and one read of the sampled tokens,
`advance()` applies them. Finished rows give their pages back at once and waiting samples take their place.

Admission is in group order: a sample starts when a row is free (structured: `num_paths - 1` kept free for a
block) and the pool keeps a free page per decoding row; the next groups are prefilled ahead, so a freed row is
refilled at the next step. When a row needs a page and the pool is dry, the newest work goes first: a prompt
prefilled ahead, else the newest running sample, which is *preempted*: its pages go back and it starts over
later. Its noise is counter-based (rollout/noise.py), so it writes the same tokens again: a sample depends on its
prompt, its index and the seed, never on the budget or on which samples shared its steps. The oldest running
sample is never preempted for a newer one, so the pool never deadlocks as long as one sample fits (checked
before sampling). Block mechanics (paths as page lists, the join) are in rollout/structured.py.
"""
from __future__ import annotations

import torch

from . import structured as st
from .cache import PageTables, pages_for
from .rows import Group, Limits, Out, Rollout, Row, Sample


class Run:
    def __init__(self, prompts: list, n: int, limits: Limits, pages: PageTables, max_rows: int):
        self.lim, self.n, self.M, self.pages = limits, n, limits.max_new_tokens, pages
        self.groups = [Group(i, list(p)) for i, p in enumerate(prompts)]
        for g in self.groups:
            g.samples = [Sample(g.index * n + j, g) for j in range(n)]
        self.samples = [s for g in self.groups for s in g.samples]
        self.pending = list(self.groups)  # groups with a sample not finished, in order
        self.rows: list[Row] = []  # rows in the pool (decoding or waiting), in the order they were made
        self.free_bufs = list(range(max_rows - 1, -1, -1))  # lines of the device page-table buffer
        self.table_writes: list[tuple[int, int, int]] = []  # (line, entry, page) to upload before the next forward
        self.tag_set = set(limits.tags.as_tuple()) if limits.structured else set()
        self.reserve = limits.num_paths - 1 if limits.structured else 0  # rows kept free so a block can open
        self.to_branch: list[Row] = []  # rows that wrote <Parallel> this step, in order
        self.results: list = [None] * len(self.samples)  # per sample: (Out, finish reason)
        self.first_step = [-1] * len(self.samples)
        self.running = 0  # samples in the pool
        self.stats = {"steps": 0, "prefills": 0, "blocks": 0, "block_steps": 0, "path_tokens": 0,
                      "longest_path_tokens": 0, "preempted": 0, "recomputed_tokens": 0, "row_steps": 0,
                      "peak_rows": 0, "sample_steps": 0, "slot_steps": 0, "token_steps": 0}

    @property
    def done(self) -> bool:
        return not self.pending

    # --- admission ---------------------------------------------------------------------------------
    def schedule(self, prefill_rows: int) -> list[Group]:
        """Start waiting samples of resident groups, in order, while a row and the watermark allow; return the
        groups to prefill now (pages taken; their first tokens are drawn with this step's)."""
        decoding = sum(not r.waiting for r in self.rows)
        blocked = False
        for g in self.pending:
            if g.first is None:
                continue  # not prefilled yet
            for s in g.waiting:  # a sample sent back restarts when what it held is free again (no ping-pong)
                if len(self.free_bufs) <= self.reserve or len(self.pages.free) <= decoding + (s.held if decoding else 0):
                    blocked = True
                    break
                self.start(s)
                decoding += sum(not r.waiting for r in s.rows)
            if blocked:
                break
        ready = sum(len(g.waiting) for g in self.pending if g.first is not None)
        new = []
        for g in self.pending:
            if g.pages is not None or not g.waiting:
                continue
            need = pages_for(len(g.prompt), self.pages.page_size)
            if (len(new) == prefill_rows or ready >= len(self.free_bufs) + self.n
                    or len(self.pages.free) < need + decoding + 1):
                break
            g.pages = [self.pages.take() for _ in range(need)]
            new.append(g)
            ready += len(g.waiting)
        return new

    def start(self, s: Sample) -> None:
        """Sample s's main row lists its prompt's pages; its first token (drawn at the prefill) is applied as if
        sampled by a decode step."""
        g = s.group
        s.state = "running"
        self.running += 1
        self.first_step[s.index] = self.stats["steps"]
        row = self.new_row(s, self.pages.share(g.pages), s.out, tok=g.prompt[-1], pos=len(g.prompt) - 1)
        tok, logp = g.first[s.index - g.index * self.n]
        self.step_row(row, tok, logp)

    def new_row(self, s: Sample, pages: list, out: Out, *, tok: int, pos: int, base: int = 0, stream: int = 0) -> Row:
        row = Row(s, self.free_bufs.pop(), pages, out, base=base, stream=stream, tok=tok, pos=pos)
        self.table_writes += [(row.buf, j, p) for j, p in enumerate(pages)]
        self.rows.append(row)
        s.rows.append(row)
        return row

    def drop_row(self, row: Row) -> None:
        self.pages.release(row.pages)
        row.pages = []
        self.free_bufs.append(row.buf)
        row.sample.rows.remove(row)

    # --- pages ---------------------------------------------------------------------------------------
    def decode_rows(self) -> list[tuple[Row, int]]:
        """The rows fed this step, oldest sample first, with the flat slot each writes; a row whose last page is
        shared or full gets a new one (making room when the pool is dry)."""
        fed = []
        for row in sorted((r for r in self.rows if not r.waiting), key=lambda r: r.sample.index):
            if row.sample.state != "running":
                continue  # preempted to make room for an older row
            if not row.pages or not self.pages.writable(row.pages[-1]):
                if not self.pages.free and not self.make_room(row.sample):
                    continue
                p = self.pages.take()
                self.table_writes.append((row.buf, len(row.pages), p))
                row.pages.append(p)
            fed.append((row, self.pages.next_slot(row.pages[-1])))
        self._forget_gone()
        return [(r, slot) for r, slot in fed if r.sample.state == "running"]

    def make_room(self, s: Sample, rows: int = 0) -> bool:
        """Free a page (or `rows` row lines) for sample s by sending the newest work back: a prompt prefilled
        ahead whose samples are not running, else the newest running sample. False when s itself was the newest
        and went back."""
        while not (len(self.free_bufs) >= rows if rows else self.pages.free):
            running = [x for x in self.samples if x.state == "running" and x is not s]
            idle = [g for g in self.pending if g.pages is not None and not any(x.state == "running" for x in g.samples)]
            newest = max(running, key=lambda x: x.index, default=None)
            if not rows and idle and (newest is None or idle[-1].index * self.n > newest.index):
                self.drop_prompt(idle[-1])
            elif newest is not None and newest.index > s.index:
                self.preempt(newest)
            elif not rows and idle:
                self.drop_prompt(idle[-1])
            else:
                self.preempt(s)
                return False
        return True

    def preempt(self, s: Sample) -> None:
        """Send a running sample back to wait: its pages go back, it will start over from its prompt."""
        s.held = len({p for row in s.rows for p in row.pages if self.pages.refs[p] == 1})  # what it frees
        for row in list(s.rows):
            self.drop_row(row)
        self.stats["preempted"] += 1
        self.stats["recomputed_tokens"] += len(s.out)
        s.out, s.blocks, s.malformed, s.state = Out(), 0, False, "waiting"
        self.running -= 1

    def drop_prompt(self, g: Group) -> None:
        self.pages.release(g.pages)
        g.pages = g.first = None

    def _forget_gone(self) -> None:
        self.rows = [r for r in self.rows if r.pages]

    # --- one step ------------------------------------------------------------------------------------
    def advance(self, fed: list, tokens: list, logps: list, drawn: list[Group], first: list) -> None:
        """Apply one step: the tokens (and log-probs) sampled for the fed rows, in order, then the first tokens
        drawn for each sample of the groups prefilled this step (n per group, in order)."""
        st_ = self.stats
        if fed:
            st_["steps"] += 1
            st_["row_steps"] += len(fed)
            st_["peak_rows"] = max(st_["peak_rows"], len(fed))
            st_["sample_steps"] += self.running
            st_["slot_steps"] += self.pages.in_use * self.pages.page_size
            st_["token_steps"] += self.pages.tokens
        for (row, _), tok, logp in zip(fed, tokens, logps):
            if row.sample.state == "running" and row.pages:
                self.step_row(row, tok, logp)
        for i, g in enumerate(drawn):
            g.first = first[i * self.n:(i + 1) * self.n]
        st_["prefills"] += bool(drawn)
        if self.lim.structured:
            st.settle_blocks(self)
            st.open_blocks(self)
        self._forget_gone()

    def step_row(self, row: Row, tok: int, logp: float) -> None:
        if row.then == "wait":  # its </Path> is in the cache now: wait for the sibling paths
            row.then, row.waiting = "", True
            return
        if row.then == "branch":  # <Parallel> is in the cache: every path starts with a forced <Path>
            row.then = ""
            self.append_forced(row, self.lim.tags.path_open)
            if row.sample.state == "running":  # the forced <Path> may reach the length limit
                self.to_branch.append(row)
            return
        if row.queue:
            self.append_forced(row, row.queue.pop(0))
            return
        if row.block is not None:
            st.path_token(self, row, tok, logp)
            return
        self.append(row, tok, logp, False, row.pos + 1)
        if tok in self.lim.stop_ids:
            self.finish(row.sample, "stop")
        elif self.lim.structured and not row.sample.malformed and tok in self.tag_set:
            st.main_tag(self, row, tok)
        if row.sample.state == "running" and len(row.out) >= self.M:
            self.finish(row.sample, "length")

    @staticmethod
    def append(row: Row, tok: int, logp: float, forced: bool, pos: int) -> None:
        """Write one token to the row's stream and make it the token fed next."""
        row.out.append(tok, logp, forced, pos)
        row.tok, row.pos = tok, pos

    def append_forced(self, row: Row, tok: int, pos: int | None = None) -> None:
        self.append(row, tok, 0.0, True, row.pos + 1 if pos is None else pos)
        if row.block is not None:
            if tok == self.lim.tags.path_close:
                row.then = "wait"
        elif len(row.out) >= self.M:  # a path's length is the block's budget (structured.py)
            self.finish(row.sample, "length")

    def finish(self, s: Sample, reason: str) -> None:
        for row in list(s.rows):
            self.drop_row(row)
        s.state = "done"
        self.running -= 1
        self.results[s.index] = (s.out, reason)
        g = s.group
        if all(x.state == "done" for x in g.samples):
            self.drop_prompt(g)
            self.pending.remove(g)

    # --- the record --------------------------------------------------------------------------------
    def result(self, pad_id: int, device, kv_bytes: int, max_rows: int) -> Rollout:
        Lp = max(len(g.prompt) for g in self.groups)
        plen = torch.tensor([len(s.group.prompt) for s in self.samples])  # (N,)
        pids = torch.stack([torch.cat([torch.full((Lp - len(s.group.prompt),), pad_id), torch.tensor(s.group.prompt)])
                            for s in self.samples])  # (N, Lp) left-padded, as the trainer lays a row out
        pmask = (torch.arange(Lp)[None, :] >= Lp - plen[:, None]).long()  # (N, Lp)
        outs = [out for out, _ in self.results]

        def padded(name, value, dtype):  # (N, M) right-padded
            rows = [torch.tensor(getattr(out, name), dtype=dtype) for out in outs]
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)

        lengths = [len(out) for out in outs]
        mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()  # (N, M)
        tensors = [t.to(device) for t in (pids, pmask, padded("tok", pad_id, torch.long), mask,
                                          padded("logp", 0.0, torch.float32), padded("forced", 0, torch.long),
                                          padded("pos", 0, torch.long))]
        st_, pages = self.stats, self.pages
        steps = max(st_["steps"], 1)
        stats = {k: v for k, v in st_.items() if k not in ("row_steps", "sample_steps", "slot_steps", "token_steps")}
        stats.update(pages=pages.total, page_size=pages.page_size, peak_pages=pages.peak, kv_bytes=kv_bytes,
                     max_rows=max_rows, mean_rows=st_["row_steps"] / steps, mean_samples=st_["sample_steps"] / steps,
                     slot_use=st_["token_steps"] / max(st_["slot_steps"], 1), first_step=tuple(self.first_step))
        return Rollout(*tensors, tuple(reason for _, reason in self.results), self.n, stats)
