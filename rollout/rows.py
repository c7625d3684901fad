"""The host-side records of one `Sampler.generate` call (plain Python, no tensors: the host never waits on the
device to decide anything) and the `Rollout` record the call returns.

A *group* is a prompt and its n samples; its prompt is prefilled once into pages the group holds while any of its
samples may still need them. A *sample* owns its response so far and one *row* per stream it decodes: its main
row, plus the other paths' rows while a block is open. A row is a page table, the token it feeds next and where
its tokens go (`out`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.tags import TagIds


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
    # "steps" (decode forwards), "prefills" (prefill forwards); joined "blocks", the "block_steps" they were open,
    # their "path_tokens" and "longest_path_tokens" (the longest path of each, summed); the pool: "pages",
    # "page_size", "peak_pages" (most in use at once), "kv_bytes" (its allocation), "max_rows" (rows a decode step
    # may carry), "peak_rows", "mean_rows" (rows per decode step), "mean_samples" (samples in flight per step),
    # "slot_use" (share of the slots of the pages in use holding a token, over the decode steps), "preempted"
    # (samples sent back to wait when the pool ran dry) and "recomputed_tokens" (what they had written);
    # "first_step": the decode step at which each sample (last) started
    stats: dict

    def sequences(self):
        """(ids, attention_mask, response_start): prompt and response side by side, (N, Lp+M)."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask, self.prompt_ids.shape[1]


class Out:
    """A token stream being written: tokens, the sampler's log-probs (0 for forced ones), forced flags, positions."""
    __slots__ = ("tok", "logp", "forced", "pos")

    def __init__(self):
        self.tok, self.logp, self.forced, self.pos = [], [], [], []

    def __len__(self) -> int:
        return len(self.tok)

    def append(self, tok: int, logp: float, forced: bool, pos: int) -> None:
        self.tok.append(tok)
        self.logp.append(logp)
        self.forced.append(forced)
        self.pos.append(pos)

    def extend(self, other: "Out", length: int) -> None:
        """Append the first `length` tokens of `other`."""
        for name in self.__slots__:
            getattr(self, name).extend(getattr(other, name)[:length])


@dataclass(eq=False)
class Group:
    index: int
    prompt: list  # token ids
    samples: list = field(default_factory=list)  # its Samples, in order
    pages: list | None = None  # the prompt's pages while resident (the group lists them once itself)
    first: list | None = None  # per sample: (token, log-prob) drawn from the prefill's last logits

    @property
    def waiting(self) -> list:
        return [s for s in self.samples if s.state == "waiting"]


@dataclass(eq=False)
class Sample:
    index: int  # 0..N-1, its row in the Rollout
    group: Group
    out: Out = field(default_factory=Out)  # the response so far (an open block's other paths join it at the close)
    state: str = "waiting"  # waiting | running | done
    rows: list = field(default_factory=list)  # its rows in the pool: the main row first
    blocks: int = 0  # blocks it opened
    malformed: bool = False  # the main stream wrote a bad tag: no more blocks (model/structure.py)
    held: int = 0  # pages its rows held when it was last sent back (it restarts when that many are free)


@dataclass(eq=False)
class Block:
    rows: list  # path rows in path order; rows[0] is the sample's main row
    out_start: int  # index in the response of the first path's <Path>
    prefix_pages: int  # table entries every path shares (the pages up to <Path>)
    budget: int  # response tokens left for all paths together
    opened: int = 0  # decode step at which the paths branched


@dataclass(eq=False)
class Row:
    sample: Sample
    buf: int  # its line of the device page-table buffer
    pages: list  # its page table
    out: Out  # the sample's response (main row) or the path's own tokens from its <Path> on (other path rows)
    base: int = 0  # noise counter of out[0]: 0, or a path row's <Path> index in the response
    stream: int = 0  # noise stream: 0 for the main row, one per path of each block
    tok: int = 0  # token fed at the next decode step
    pos: int = 0  # its position id
    queue: list = field(default_factory=list)  # forced tokens to append next, in order
    then: str = ""  # what feeding the current token triggers: "" | "branch" | "wait"
    waiting: bool = False  # a finished path waiting for its siblings (fed no more)
    block: Block | None = None  # the open block, for path rows and the main row while it is path 1
    pos_after: int = 0  # position of </Parallel>: 1 + the longest path of the block just joined

    @property
    def counter(self) -> int:
        """The noise counter of the token this row samples next (rollout/noise.py)."""
        return self.base + len(self.out)
