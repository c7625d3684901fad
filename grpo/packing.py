"""Padding-free micro-batches for the update and the old/ref log-probs (grpo.pack, the default).

Where rows live: each rank samples, scores and computes the advantages of its own whole groups (trainer.py). The
loops here then all-gather the rows of one call (real tokens only: ids, loss mask, log-probs, 3 to 5 float64
numbers a token), plan the same micro-batches on every rank from the rows' lengths (`plan_micro_batches`: each
slot split evenly over the ranks by tokens) and run this rank's share. Moving a row to another rank changes
nothing in the result: its advantage is already computed, and every loss normalisation counts the whole update
on all ranks (grpo/loss.py aggregate), so its gradient is the same wherever it is computed; log-probs go back
to the row's own rank.

A packed micro-batch is its rows' tokens back to back, each row with its own position ids (0.. at its first
token; the structured variant's multiverse positions) and a block-diagonal mask (structured: each block that
row's own path-window mask), by attention implementation:
- flash_attention_2 (causal only): one row of every token, no padding at all; flash-attn's varlen kernel gets
  the sequence bounds (cu_seq_lens) and needs no mask.
- sdpa, eager (CPU), flex_attention: the rows are packed first-fit, longest first, into rows about as wide as
  the longest (`dense_width`), a little padding at their ends. A dense mask costs W^2 per packed row whatever
  it hides, and create_block_mask evaluates the mask densely before FlexAttention skips the empty blocks, so
  one row of every token would cost (all tokens)^2 where this costs (all tokens) x (longest row), as the
  padded layout did.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.patch import structured_attention_mask, structured_tags
from model.structure import BatchStructure, build_structure_batch

from .batching import TrainBatch
from .fsdp import Dist, all_gather_cat, all_reduce
from .logprobs import token_logprobs

VARLEN = ("flash_attention_2", "flash_attention_3")  # take sequence bounds instead of a mask


@dataclass(frozen=True)
class Rows:
    """Rows with their padding cut away: row i is tokens starts[i] .. starts[i] + lengths[i] - 1 of the flat
    tensors, its prompt_len[i] prompt tokens, then its response."""
    input_ids: torch.Tensor  # (S,) long, S = real tokens of all rows
    loss_mask: torch.Tensor  # (S,) 1 on trained tokens
    sampler_logp: torch.Tensor  # (S,)
    old_logp: torch.Tensor | None  # (S,) or None
    ref_logp: torch.Tensor | None  # (S,) or None
    prompt_len: torch.Tensor  # (N,) long
    response_len: torch.Tensor  # (N,) long
    advantages: torch.Tensor  # (N,)

    @property
    def lengths(self) -> torch.Tensor:
        return self.prompt_len + self.response_len  # (N,)

    @property
    def starts(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths  # (N,)


def ragged(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs of counts[i] items (K,) laid end to end: each item's run and its index within the run, (sum,) each."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return owner, torch.arange(len(owner)) - (torch.cumsum(counts, 0) - counts)[owner]


def real_columns(batch: TrainBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) in `batch` of every real token of `rows` (N',), row by row, prompt then response: (S,) each."""
    p, r = batch.prompt_len[rows].cpu(), batch.response_len[rows].cpu()
    owner, within = ragged(p + r)
    return rows.cpu()[owner], batch.response_start - p[owner] + within


def rows_of(batch: TrainBatch, rows: torch.Tensor) -> Rows:
    """Rows `rows` (N',) of a padded batch, padding cut away."""
    i, j = real_columns(batch, rows)

    def flat(t):  # (S,)
        return None if t is None else t[i.to(t.device), j.to(t.device)]

    return Rows(flat(batch.input_ids), flat(batch.loss_mask), flat(batch.sampler_logp), flat(batch.old_logp),
                flat(batch.ref_logp), batch.prompt_len[rows].cpu(), batch.response_len[rows].cpu(),
                batch.advantages[rows.to(batch.advantages.device)])


def gather_rows(rows: Rows, d: Dist) -> tuple[Rows, list[int]]:
    """The rows of every rank in rank order, and how many each rank gave: one all-gather of a float64 matrix of
    the tokens (ids < 2^53 and float32 log-probs are exact in it) and one of the rows, padded to the largest."""
    fields = [rows.input_ids, rows.loss_mask, rows.sampler_logp, rows.old_logp, rows.ref_logp]
    present = [f is not None for f in fields]  # the same on every rank: the config decides
    if d.world == 1:
        return rows, [len(rows.prompt_len)]
    tokens = torch.stack([f.double().to(d.device) for f in fields if f is not None], 1)  # (S, F)
    per_row = torch.stack([rows.prompt_len.double(), rows.response_len.double(),
                           rows.advantages.double().cpu()], 1).to(d.device)  # (N, 3)
    sizes = all_gather_cat(torch.tensor([[tokens.shape[0], per_row.shape[0]]], device=d.device)).tolist()
    s_max, n_max = max(s for s, _ in sizes), max(n for _, n in sizes)
    all_tokens = all_gather_cat(torch.cat([tokens, tokens.new_zeros(s_max - tokens.shape[0], tokens.shape[1])]))
    all_rows = all_gather_cat(torch.cat([per_row, per_row.new_zeros(n_max - per_row.shape[0], 3)]))
    tokens = torch.cat([all_tokens[k * s_max:k * s_max + s] for k, (s, _) in enumerate(sizes)])  # (S_all, F)
    per_row = torch.cat([all_rows[k * n_max:k * n_max + n] for k, (_, n) in enumerate(sizes)]).cpu()  # (N_all, 3)
    cols = iter(tokens.unbind(1))
    ids, loss, sampler, old, ref = (next(cols) if p else None for p in present)
    return Rows(ids.long(), loss.to(rows.loss_mask.dtype), sampler.float(), None if old is None else old.float(),
                None if ref is None else ref.float(), per_row[:, 0].long(), per_row[:, 1].long(),
                per_row[:, 2].to(rows.advantages.dtype)), [n for _, n in sizes]


def plan_micro_batches(lengths: list[int], world: int, budget: int) -> list[list[list[int]]]:
    """slots[k][r]: the rows (indices into `lengths`, tokens per row) that rank r runs as its k-th micro-batch.

    Longest rows first, each into the first slot whose least-loaded rank can take it within `budget` tokens, to
    that rank (a row longer than the budget runs alone on its rank). So every rank runs the same number of
    micro-batches (FSDP's collectives pair them up), the ranks' shares of a slot differ by about a row, the
    longest rows land on different ranks, and rows of similar length share a slot. A rank left without a row
    in a slot (fewer rows than ranks) gets [] there: the caller runs a stand-in at weight 0.
    """
    slots: list[list[list[int]]] = []
    loads: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for slot, load in zip(slots, loads):
            r = min(range(world), key=load.__getitem__)
            if load[r] == 0 or load[r] + n <= budget:
                break
        else:
            slot, load = [[] for _ in range(world)], [0] * world
            slots.append(slot)
            loads.append(load)
            r = 0
        slot[r].append(i)
        load[r] += n
    return slots


def pack_bins(lengths: list[int], width: int | None) -> list[list[int]]:
    """Indices into `lengths` by packed row: first-fit, longest first, into rows of `width` tokens (None: all in
    one row)."""
    if width is None:
        return [list(range(len(lengths)))]
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, free in enumerate(room) if free >= lengths[i]), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(width)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


@dataclass(frozen=True)
class Packed:
    """One packed micro-batch: B rows of `rows` laid into B' packed rows of W tokens."""
    input_ids: torch.Tensor  # (B', W) long, pad_id on padding
    position_ids: torch.Tensor  # (B', W) long
    attention_mask: object  # (B', 1, W, W) bool / float, a BlockMask, or None (varlen kernels)
    model_kwargs: dict  # cu_seq_lens for varlen kernels
    scored: torch.Tensor  # (M,) flat index into input_ids of every response token, row by row
    response_index: torch.Tensor  # (M,) flat index into the (B, R) response layout of the same tokens
    real_tokens: int


def dense_width(lengths: list[int]) -> int:
    """The width of the packed rows of a dense-mask layout: of the longest row and widths up to 1/4 above it in
    steps of 1/32 (a dense mask costs W^2 per packed row: never much wider), the one that packs into the fewest
    tokens, the narrowest among equals. First-fit leaves the ends of rows empty where no short row is left to
    fill them; a slightly wider row often takes one more: 1-9% padding becomes 0.2-3% on RL-like lengths."""
    longest = max(lengths)
    widths = range(longest, longest + longest // 4 + 1, max(1, longest // 32))
    return min(widths, key=lambda w: (len(pack_bins(lengths, w)) * w, w))


def _places(lengths: torch.Tensor, one_row: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Where each of B rows of `lengths` (B,) goes: its packed row and first column (B,) each, the packed rows'
    width W and their number B'. One row of everything, or first-fit rows of `dense_width`."""
    bins = pack_bins(lengths.tolist(), None if one_row else dense_width(lengths.tolist()))
    row_of, offset = torch.empty(len(lengths), dtype=torch.long), torch.empty(len(lengths), dtype=torch.long)
    for k, members in enumerate(bins):
        row_of[members] = k
        offset[members] = torch.cumsum(lengths[members], 0) - lengths[members]
    return row_of, offset, max(int(lengths[b].sum()) for b in bins), len(bins)


def _token_structure(tokens: torch.Tensor, prompt_len: torch.Tensor, lengths: torch.Tensor, tags):
    """(position, block, path) ids (S_mb,) each and malformed (B,) of B rows laid end to end in `tokens` (S_mb,):
    each row's own structure as the padded path builds it (tags in its prompt stay text); causal (tags None):
    positions from 0 at each row's first token, as the sampler counts, and no block."""
    owner, within = ragged(lengths)  # (S_mb,) each
    none = torch.full_like(within, -1)
    if tags is None:
        return within, none, none, torch.zeros(len(lengths), dtype=torch.bool)
    aligned = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)  # (B, L) rows left-aligned
    aligned[owner, within] = tokens
    real = torch.arange(aligned.shape[1])[None, :] < lengths[:, None]  # (B, L)
    s = build_structure_batch(aligned, tags, real.long(), response_start=prompt_len)
    return s.position_ids[owner, within], s.block_ids[owner, within], s.path_ids[owner, within], s.malformed


def pack(rows: Rows, mb: list[int], attn: str, tags=None, pad_id: int = 0, device=None,
         dtype: torch.dtype = torch.float32) -> Packed:
    """Pack rows `mb` of `rows` for a model with attention implementation `attn` (structured when `tags`); the
    mask (eager: of `dtype`) or the varlen bounds with it."""
    p, r = rows.prompt_len[mb], rows.response_len[mb]  # (B,)
    lengths = p + r
    assert int(p.min()) >= 1, "every row starts with a prompt token (the first token has no prediction)"
    if attn in VARLEN and tags is not None:
        raise ValueError(f"structured attention needs sdpa (CPU) or flex_attention (CUDA), not {attn}")
    row_of, offset, width, n_rows = _places(lengths, one_row=attn in VARLEN)
    owner, within = ragged(lengths)  # (S_mb,) each: which row of mb, which of its tokens
    dest = row_of[owner] * width + offset[owner] + within  # (S_mb,) flat packed index of each token
    tokens = rows.input_ids.cpu()[rows.starts[mb][owner] + within]  # (S_mb,)
    shape, n = (n_rows, width), n_rows * width

    def packed(values, fill):  # (S_mb,) -> (B', W) on the device
        out = torch.full((n,), fill, dtype=values.dtype)
        out[dest] = values
        return out.view(shape).to(device)

    ids = packed(tokens, pad_id)
    pos, block, path, malformed = _token_structure(tokens, p, lengths, tags)  # (S_mb,) x 3, (B,)
    positions = packed(pos, 0)
    resp, j = ragged(r)  # (M,) each: which row, which of its response tokens
    scored = row_of[resp] * width + offset[resp] + p[resp] + j  # (M,) flat packed index
    kwargs, mask = {}, None
    if attn in VARLEN:  # one packed row, no padding: the bounds of each sequence are all flash-attn needs
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).to(device, torch.int32)
        kwargs = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": int(lengths.max()),
                  "max_length_k": int(lengths.max())}
    else:
        seg = packed(owner, -1)
        mask = structured_attention_mask(BatchStructure(positions, packed(block, -1), packed(path, -1), seg >= 0,
                                                        malformed.to(device), seg), attn, dtype)
    return Packed(ids, positions, mask, kwargs, scored.to(device), (resp * int(r.max()) + j).to(device),
                  int(lengths.sum()))


def response_view(rows: Rows, mb: list[int], device) -> TrainBatch:
    """Rows `mb` in the response layout (B, R), R = their longest response: what the loss reads (loss mask,
    sampler/old/ref log-probs, advantages); input_ids hold the response tokens, 0 on padding."""
    p, r = rows.prompt_len[mb], rows.response_len[mb]
    R, B = int(r.max()), len(mb)
    resp, j = ragged(r)  # (M,) each
    src = rows.starts[mb][resp] + p[resp] + j  # (M,)

    def layout(t, dtype=None):  # (B, R)
        if t is None:
            return None
        out = torch.zeros(B, R, dtype=dtype or t.dtype, device=device)
        out[resp.to(device), j.to(device)] = t[src.to(t.device)].to(device, out.dtype)
        return out

    attn = layout(torch.ones_like(rows.input_ids))
    return TrainBatch(layout(rows.input_ids), attn, layout(rows.loss_mask), layout(rows.sampler_logp),
                      rows.advantages[mb].to(device), 0, torch.zeros(B, dtype=torch.long), r,
                      layout(rows.old_logp), layout(rows.ref_logp))


def packed_logprobs(model, pk: Packed, shape: tuple[int, int], *, temperature: float, chunk_size: int,
                    with_entropy: bool):
    """token_logprobs of a packed micro-batch, in the (B, R) response layout: logp, and entropy or None."""
    out = token_logprobs(model, pk.input_ids, pk.attention_mask, temperature=temperature, chunk_size=chunk_size,
                         with_entropy=with_entropy, position_ids=pk.position_ids, scored=pk.scored, **pk.model_kwargs)
    logp, entropy = out if with_entropy else (out, None)

    def layout(v):  # (M,) -> (B, R), 0 off the responses; differentiable
        return None if v is None else v.new_zeros(shape[0] * shape[1]).index_put((pk.response_index,), v).view(shape)

    return layout(logp), layout(entropy)


def _planned(model, batch: TrainBatch, budget: int, d: Dist):
    """(all ranks' rows with a loss token, how many each rank gave, the plan, what a micro-batch is packed
    with): the same on every rank. Rows without a loss token add nothing anywhere and are never run."""
    live = (batch.loss_mask.sum(1) > 0).nonzero()[:, 0].cpu()
    rows, counts = gather_rows(rows_of(batch, live), d)
    slots = plan_micro_batches(rows.lengths.tolist(), d.world, budget) if counts and sum(counts) else []
    first = next(iter(model.parameters()))
    how = {"attn": model.config._attn_implementation, "tags": structured_tags(model), "device": d.device,
           "pad_id": getattr(model.config, "pad_token_id", None) or 0,
           "dtype": first.dtype if first.is_floating_point() else torch.float32}
    return live, rows, counts, slots, how


def packed_micro_batches(model, batch: TrainBatch, budget: int, d: Dist, *, temperature: float = 1.0,
                         chunk_size: int = 1024, with_entropy: bool = True) -> Iterator[tuple]:
    """(micro-batch, logp, entropy or None, weight), one at a time, for this rank's share of the rows of `batch`
    (this rank's rows, each with a loss token somewhere on some rank) after spreading them over the ranks: the
    micro-batch is a TrainBatch in the response layout (B, R) (`response_view`), logp and entropy (B, R) carry
    the graph. A slot without a row of this rank runs the shortest row at weight 0 (FSDP pairs the forwards)."""
    _, rows, _, slots, how = _planned(model, batch, budget, d)
    stand_in = [int(torch.argmin(rows.lengths))] if slots else []
    for slot in slots:
        mb = slot[d.rank] or stand_in
        view = response_view(rows, mb, d.device)
        pk = pack(rows, mb, **how)
        logp, entropy = packed_logprobs(model, pk, tuple(view.loss_mask.shape), temperature=temperature,
                                        chunk_size=chunk_size, with_entropy=with_entropy)
        yield view, logp, entropy, 1.0 if slot[d.rank] else 0.0


def packed_batch_logprobs(model, batch: TrainBatch, budget: int, d: Dist, *, temperature: float = 1.0,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log-probs (N, T) of the response tokens of this rank's rows of `batch` that have a loss token,
    column-aligned with it (0 elsewhere), with no graph: computed wherever the plan puts each row, then summed
    into one buffer over the ranks (each token is written by exactly one rank)."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    live, rows, counts, slots, how = _planned(model, batch, budget, d)
    if not slots:
        return out
    first = torch.cumsum(rows.response_len, 0) - rows.response_len  # (N_all,) each row's first response token
    buf = torch.zeros(int(rows.response_len.sum()), device=d.device)  # (M_all,) every response token of every rank
    stand_in = [int(torch.argmin(rows.lengths))]
    with torch.no_grad():
        for slot in slots:
            mb = slot[d.rank] or stand_in
            pk = pack(rows, mb, **how)
            r = rows.response_len[mb]
            logp, _ = packed_logprobs(model, pk, (len(mb), int(r.max())), temperature=temperature,
                                      chunk_size=chunk_size, with_entropy=False)
            if slot[d.rank]:
                resp, j = ragged(r)
                buf[(first[mb][resp] + j).to(d.device)] = logp[resp.to(logp.device), j.to(logp.device)].float()
    if d.world > 1:
        all_reduce(buf)
    mine = torch.arange(sum(counts[:d.rank]), sum(counts[:d.rank + 1]))  # this rank's rows, in `live` order
    resp, j = ragged(rows.response_len[mine])
    out[live[resp], batch.response_start + j] = buf[(first[mine][resp] + j).to(buf.device)].cpu()
    return out
