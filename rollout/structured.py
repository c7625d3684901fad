"""Structured sampling (the Parallel-R1 engine), as rules applied to the rows of a Run.

The main stream samples until `<Parallel>`; its row then branches into `num_paths` rows that share the
prefix (cache rows copied) and decode their paths in the same steps, each from a forced `<Path>` at
the position right after `<Parallel>`. A path ends with a sampled `</Path>`; EOS or any other tag is
replaced by a forced `</Path>`, as is the path length limit. When all paths are in, the first row
takes the other paths' keys (slot order is free: keys carry their rotary positions), forces
`</Parallel>` newline `<Summary>` at 1 + the longest path, and the main stream goes on.
Tags the structure calls malformed (model/structure.py) turn the rest of the response causal.
Every limit comes from `run.lim` (rows.Limits); a block opens only when the pool has rows for its paths.
"""
from __future__ import annotations

import re

from .rows import Block, Row

# What structured sampling writes between the tags: `<Path>` forced right after `<Parallel>` and right
# after the previous `</Path>`, `</Parallel>` right after the last `</Path>`, then newline `<Summary>`.
_LAYOUT = ((re.compile(r"<Parallel>\s*<Path>"), "<Parallel><Path>"),
           (re.compile(r"</Path>\s*<Path>"), "</Path><Path>"),
           (re.compile(r"</Path>\s*</Parallel>\s*<Summary>"), "</Path></Parallel>\n<Summary>"),
           (re.compile(r"</Path>\s*</Parallel>"), "</Path></Parallel>"))


def sampler_layout(text: str) -> str:
    """`text` with the whitespace between block tags as structured sampling produces it, so that a
    model fine-tuned on it (structured SFT) sees in training exactly the token sequences that the
    sampler forces: `<Parallel>\\n<Path>` in a solution would otherwise teach a newline the sampler
    never lets the model write, and the forced `<Parallel><Path>` would be out of distribution."""
    for pattern, replacement in _LAYOUT:
        text = pattern.sub(replacement, text)
    return text


def main_tag(run, row: Row, tok: int) -> None:
    """A tag sampled in the main stream (not malformed so far)."""
    tags = run.lim.tags
    if tok == tags.parallel_open:
        if row.blocks >= run.lim.max_blocks:
            run.finish(row, "block_limit")  # the extra <Parallel> is the response's last token
            return
        row.blocks += 1
        row.then = "branch"
    elif tok in (tags.path_open, tags.path_close, tags.parallel_close):
        row.malformed = True  # from here on plain causal text, exactly as build_structure reads it


def path_token(run, row: Row, tok: int, logp: float) -> None:
    """A token sampled inside a path."""
    tags, buf, r = run.lim.tags, run.pool.buf, row.idx
    if tok != tags.path_close and (tok in run.lim.stop_ids or tok in run.tag_set):
        run.append_forced(row, tags.path_close)  # EOS or a foreign tag ends the path
        return
    buf.append(r, tok, logp, False, int(buf.pos[r]) + 1)
    if tok == tags.path_close:
        row.then = "wait"
        return
    limit = run.lim.max_path_tokens
    if limit is not None and int(buf.out_len[r]) - row.block.out_start >= limit - 1:
        row.queue.append(tags.path_close)  # the path's last token is a forced </Path>


def open_blocks(run) -> None:
    """Rows that wrote <Parallel> branch into their paths, in order, while the pool has rows for them;
    the others wait (idle, nothing written) and go first at the next step."""
    buf, extra = run.pool.buf, run.lim.num_paths - 1
    while run.to_branch and run.pool.free >= extra:
        row = run.to_branch.pop(0)
        row.stalled = False
        streams = [row.blocks * run.lim.num_paths + k for k in range(1, extra + 1)]  # a noise stream per path
        copies = run.pool.add_copies([row] * extra, [row.sample] * extra, streams)
        start = int(buf.out_len[row.idx]) - 1  # the forced <Path> just written
        block = Block(rows=[row] + copies, out_start=start, slot_start=int(buf.slot[row.idx]), budget=run.M - start,
                      opened=run.stats["steps"])
        for r in block.rows:
            r.block = block
    for row in run.to_branch:
        run.stats["stalled_blocks"] += not row.stalled
        row.stalled = True


def settle_blocks(run) -> None:
    """End of a step: end blocks over budget, merge blocks whose paths are all in."""
    buf = run.pool.buf
    blocks = {id(r.block): r.block for r in run.pool.rows if r.block is not None}
    for block in blocks.values():
        used = sum(int(buf.out_len[r.idx]) - block.out_start for r in block.rows)
        if used >= block.budget:
            join_paths(run, block, with_cache=False)
            run.finish(block.rows[0], "length")  # cut off inside the block: it stays open
        elif all(r.waiting for r in block.rows):
            run.stats["blocks"] += 1
            run.stats["block_steps"] += run.stats["steps"] - block.opened
            run.stats["path_tokens"] += used
            join_paths(run, block, with_cache=True)
            close_block(run, block.rows[0])


def join_paths(run, block: Block, with_cache: bool) -> None:
    """Append paths 2..k to the first row's response (and cache), in path order, up to the budget.
    A block cut off by the budget keeps its paths up to the first one left open."""
    buf, cache, main = run.pool.buf, run.pool.cache, block.rows[0]
    m, s0 = main.idx, block.out_start
    main.pos_after = max(int(buf.out_pos[r.idx, int(buf.out_len[r.idx]) - 1]) for r in block.rows) + 1
    for r in block.rows[1:]:
        if int(buf.out_tok[m, int(buf.out_len[m]) - 1]) != run.lim.tags.path_close:
            run.gone.append(r)  # cut off inside an open path: a later path cannot follow it
            continue
        length = min(int(buf.out_len[r.idx]) - s0, run.M - int(buf.out_len[m]))
        at = int(buf.out_len[m])
        for t in (buf.out_tok, buf.out_pos, buf.out_logp, buf.out_forced):
            t[m, at:at + length] = t[r.idx, s0:s0 + length]
        buf.out_len[m] = at + length
        if with_cache:
            cache.copy_slots(m, int(buf.slot[m]), r.idx, block.slot_start, length)
            buf.slot[m] += length
        run.gone.append(r)
    for r in block.rows:
        r.block = None
    main.waiting = False


def close_block(run, main: Row) -> None:
    """Force </Parallel> at 1 + the longest path, then newline and <Summary>; the summary is sampled."""
    if int(run.pool.buf.out_len[main.idx]) >= run.M:
        run.finish(main, "length")
        return
    tags = run.lim.tags
    run.append_forced(main, tags.parallel_close, pos=main.pos_after)
    main.queue = ([run.lim.newline_id] if run.lim.newline_id is not None else []) + [tags.summary_open]
