"""Structured sampling (the Parallel-R1 engine), as rules applied to the rows of a Run.

The main stream samples until `<Parallel>`; its row then branches into `num_paths` rows whose page tables list
the same prefix pages (nothing is copied; the prefix's last page is shared, so every path writes its own pages)
and which decode their paths in the same steps, each from a forced `<Path>` at the position right after
`<Parallel>`. A path ends with a sampled `</Path>`; EOS or any other tag is replaced by a forced `</Path>`, as is
the path length limit. A path that has written its `</Path>` waits, fed no more. When all paths are in, the main
row's table takes every other path's own pages after its own (the summary sees the prefix and all paths; a path
that ends mid-page leaves that page part-filled, which PagePool.fill says), `</Parallel>` newline `<Summary>` are
forced at 1 + the longest path, and the main stream goes on. Tags the structure calls malformed
(model/structure.py) turn the rest of the response causal. Every limit comes from `run.lim` (rows.Limits).
"""
from __future__ import annotations

import re

from .rows import Block, Out, Row

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
    tags, s = run.lim.tags, row.sample
    if tok == tags.parallel_open:
        if s.blocks >= run.lim.max_blocks:
            run.finish(s, "block_limit")  # the extra <Parallel> is the response's last token
            return
        s.blocks += 1
        row.then = "branch"
    elif tok in (tags.path_open, tags.path_close, tags.parallel_close):
        s.malformed = True  # from here on plain causal text, exactly as build_structure reads it


def path_token(run, row: Row, tok: int, logp: float) -> None:
    """A token sampled inside a path."""
    tags = run.lim.tags
    if tok != tags.path_close and (tok in run.lim.stop_ids or tok in run.tag_set):
        run.append_forced(row, tags.path_close)  # EOS or a foreign tag ends the path
        return
    run.append(row, tok, logp, False, row.pos + 1)
    if tok == tags.path_close:
        row.then = "wait"
        return
    limit = run.lim.max_path_tokens
    if limit is not None and row.counter - row.block.out_start >= limit - 1:
        row.queue.append(tags.path_close)  # the path's last token is a forced </Path>


def open_blocks(run) -> None:
    """Rows that wrote <Parallel> branch into their paths, in order: num_paths - 1 new rows listing the same
    pages, each from the forced <Path> at the same position (a pool short of rows sends newer work back)."""
    extra, tags = run.lim.num_paths - 1, run.lim.tags
    for row in run.to_branch:
        s = row.sample
        if s.state != "running" or not run.make_room(s, rows=extra):
            continue  # finished, or sent back to wait (it starts over)
        start = len(row.out) - 1  # the forced <Path> just written
        block = Block(rows=[row], out_start=start, prefix_pages=len(row.pages), budget=run.M - start,
                      opened=run.stats["steps"])
        row.block = block
        for k in range(1, extra + 1):
            out = Out()
            out.append(tags.path_open, 0.0, True, row.pos)  # the path's own forced <Path>
            path = run.new_row(s, run.pages.share(row.pages), out, tok=row.tok, pos=row.pos, base=start,
                               stream=s.blocks * run.lim.num_paths + k)  # a noise stream per path
            path.block = block
            block.rows.append(path)
    run.to_branch = []


def settle_blocks(run) -> None:
    """End of a step: end blocks over budget, join blocks whose paths are all in."""
    blocks = {id(r.block): r.block for r in run.rows if r.pages and r.block is not None}
    for block in blocks.values():
        main = block.rows[0]
        lengths = [len(main.out) - block.out_start] + [len(r.out) for r in block.rows[1:]]  # tokens per path
        if sum(lengths) >= block.budget:
            join_paths(run, block, keep_pages=False)
            run.finish(main.sample, "length")  # cut off inside the block: it stays open
        elif all(r.waiting for r in block.rows):
            st = run.stats
            st["blocks"] += 1
            st["block_steps"] += st["steps"] - block.opened
            st["path_tokens"] += sum(lengths)
            st["longest_path_tokens"] += max(lengths)
            join_paths(run, block, keep_pages=True)
            close_block(run, main)


def join_paths(run, block: Block, keep_pages: bool) -> None:
    """Append paths 2..k to the main stream, in path order, up to the budget, and (keep_pages) their own pages to
    the main row's table. A block cut off by the budget keeps its paths up to the first one left open."""
    main = block.rows[0]
    out = main.out
    main.pos_after = max(r.out.pos[-1] for r in block.rows) + 1
    for r in block.rows[1:]:
        if out.tok[-1] == run.lim.tags.path_close:  # a later path follows only a closed one
            out.extend(r.out, min(len(r.out), run.M - len(out)))
            if keep_pages:
                own = r.pages[block.prefix_pages:]
                run.table_writes += [(main.buf, len(main.pages) + j, p) for j, p in enumerate(own)]
                main.pages += own
                r.pages = r.pages[:block.prefix_pages]  # the main row lists them now
        run.drop_row(r)
    main.block = None
    main.waiting = False


def close_block(run, main: Row) -> None:
    """Force </Parallel> at 1 + the longest path, then newline and <Summary>; the summary is sampled."""
    if len(main.out) >= run.M:
        run.finish(main.sample, "length")
        return
    tags = run.lim.tags
    run.append_forced(main, tags.parallel_close, pos=main.pos_after)
    main.queue = ([run.lim.newline_id] if run.lim.newline_id is not None else []) + [tags.summary_open]
