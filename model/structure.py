"""Positions and visibility of the structured ("Unseen") variant, from token ids alone.

Implements DESIGN.md model/structure.py. Pure: ids in, positions and masks out, no model.
A block is `<Parallel> ... </Parallel>`; its paths are mutually invisible and all start at the
position right after `<Parallel>`; what follows the block sees every path and continues at
1 + the longest path. Malformed tags never raise: from the first one on the text is plain causal.

The compact form (`BatchStructure`) stores per token a block id and a path id; visibility is then
    visible[i, j] = j <= i and both real and not (same block, both in a path, different paths)
which is what the dense SDPA mask and the FlexAttention `mask_mod` both evaluate. Several sequences packed
into one row (the trainer's padding-free micro-batches) also carry a segment id per token, and a token then
sees only tokens of its own segment: the mask is block-diagonal, one structured block per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tags import TagIds

_MAIN, _BETWEEN, _IN_PATH = 0, 1, 2  # outside blocks; in a block between paths; inside a path


@dataclass(frozen=True)
class Structure:
    position_ids: torch.Tensor  # (T,) long
    visible: torch.Tensor  # (T, T) bool, True = row may attend to column
    malformed: bool


@dataclass(frozen=True)
class BatchStructure:
    position_ids: torch.Tensor  # (B, T) long; 0 on padding
    block_ids: torch.Tensor  # (B, T) long; block index for tokens inside a path span, else -1
    path_ids: torch.Tensor  # (B, T) long; path index within its block, else -1
    valid: torch.Tensor  # (B, T) bool; False on padding
    malformed: torch.Tensor  # (B,) bool; per sequence (per segment when packed)
    segment_ids: torch.Tensor | None = None  # (B, T) long; packed rows: which sequence a token belongs to

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool visibility; padding rows and columns are all False."""
        T = self.valid.shape[1]
        idx = torch.arange(T, device=self.valid.device)
        causal = idx[None, :] <= idx[:, None]  # (T, T)
        both = self.valid[:, :, None] & self.valid[:, None, :]  # (B, T, T)
        if self.segment_ids is not None:  # packed sequences never see each other
            both = both & (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])
        in_path = self.path_ids >= 0
        sibling = (
            (self.block_ids[:, :, None] == self.block_ids[:, None, :])
            & in_path[:, :, None]
            & in_path[:, None, :]
            & (self.path_ids[:, :, None] != self.path_ids[:, None, :])
        )  # (B, T, T)
        return (causal[None] & both & ~sibling)[:, None]


def _row_segments(tag_events, n: int, start: int, tags: TagIds):
    """Walk the tags of one row (compressed to its n real tokens) and cut it into segments.

    Returns (segments, malformed); a segment is (first_index, position_of_first, block, path)
    and runs until the next segment's first index.
    """
    segs = [[0, start, -1, -1]]
    mode, block, path = _MAIN, -1, -1
    open_pos = 0  # position of the current block's <Parallel>
    max_end = -1  # largest position of a closed path's last token in the current block
    closed = 0  # paths closed in the current block
    blocks = 0

    def pos_of(i):  # position of token i under the segments cut so far
        s = next(s for s in reversed(segs) if s[0] <= i)
        return s[1] + (i - s[0])

    for i, tag in tag_events:
        if mode == _MAIN:
            if tag == tags.parallel_open:
                open_pos = pos_of(i)
                block, path, closed, max_end = blocks, 0, 0, -1
                blocks += 1
                segs.append([i + 1, open_pos + 1, block, path])  # tentative span of path 0
                mode = _BETWEEN
                continue
            bad = tag in (tags.path_open, tags.path_close, tags.parallel_close)
        elif mode == _BETWEEN:
            if tag == tags.path_open:
                mode = _IN_PATH
                continue
            if tag == tags.parallel_close and closed > 0:
                # tokens since the last </Path> (and </Parallel> itself) are the block's close
                segs[-1] = [segs[-1][0], max_end + 1, -1, -1]
                mode = _MAIN
                continue
            bad = tag in (tags.parallel_open, tags.path_close, tags.parallel_close)
        else:  # _IN_PATH
            if tag == tags.path_close:
                max_end = max(max_end, pos_of(i))
                closed += 1
                path += 1
                segs.append([i + 1, open_pos + 1, block, path])  # tentative span of the next path
                mode = _BETWEEN
                continue
            bad = tag in (tags.parallel_open, tags.path_open, tags.parallel_close)
        if bad:
            segs.append([i, pos_of(i - 1) + 1 if i > 0 else start, -1, -1])
            return segs, True
    return segs, False


def build_structure_batch(
    input_ids: torch.Tensor,
    tags: TagIds,
    attention_mask: torch.Tensor | None = None,
    response_start: int | torch.Tensor | None = None,
    start_position: int = 0,
) -> BatchStructure:
    """Structure of a padded batch.

    input_ids: (B, T); attention_mask: (B, T), 1 = real token (padding on either side).
    response_start: column (int or (B,)) before which tags are ordinary text, e.g. an instruction
    prompt that quotes the tags; None = tags count everywhere.
    start_position: position id of each row's first real token.
    """
    B, T = input_ids.shape
    device = input_ids.device
    valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    tag_ids = torch.tensor(tags.as_tuple()[:4], device=device)
    is_tag = torch.isin(input_ids, tag_ids) & valid
    if response_start is not None:
        rs = torch.as_tensor(response_start, device=device).reshape(-1, 1)
        is_tag &= torch.arange(T, device=device)[None, :] >= rs
    # compressed index of each real token (padding may sit anywhere, real tokens keep their order)
    rank = valid.long().cumsum(1) - 1  # (B, T)
    counts = valid.sum(1).tolist()
    rows, cols = is_tag.nonzero(as_tuple=True)
    events = [[] for _ in range(B)]
    for r, c, t in zip(rows.tolist(), rank[rows, cols].tolist(), input_ids[rows, cols].tolist()):
        events[r].append((c, t))

    position_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    block_ids = torch.full((B, T), -1, dtype=torch.long, device=device)
    path_ids = torch.full((B, T), -1, dtype=torch.long, device=device)
    malformed = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        n = counts[b]
        if n == 0:
            continue
        if not events[b]:  # the common case: plain causal text
            seg_pos, seg_block, seg_path = (torch.full((n,), v, dtype=torch.long) for v in (start_position, -1, -1))
            offset = torch.arange(n)
        else:
            segs, malformed[b] = _row_segments(events[b], n, start_position, tags)
            starts = torch.tensor([s[0] for s in segs] + [n])
            lengths = starts[1:] - starts[:-1]  # (S,) tokens per segment, some may be 0
            desc = torch.tensor([s[1:] for s in segs], dtype=torch.long)  # (S, 3)
            per_token = desc.repeat_interleave(lengths, dim=0)  # (n, 3)
            seg_pos, seg_block, seg_path = per_token.unbind(1)
            offset = torch.arange(n) - starts[:-1].repeat_interleave(lengths)
        cols_b = valid[b].nonzero(as_tuple=True)[0]
        position_ids[b, cols_b] = (seg_pos + offset).to(device)
        block_ids[b, cols_b] = seg_block.to(device)
        path_ids[b, cols_b] = seg_path.to(device)
    return BatchStructure(position_ids, block_ids, path_ids, valid, malformed.to(device))


def build_structure(ids, tags: TagIds, start_position: int = 0) -> Structure:
    """Positions (T,), visibility (T, T) and the malformed flag of one unpadded sequence."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    s = build_structure_batch(ids, tags, start_position=start_position)
    return Structure(s.position_ids[0], s.dense_mask()[0, 0], bool(s.malformed[0]))
