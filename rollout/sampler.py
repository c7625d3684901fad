"""Our batched sampler (DESIGN.md rollout/sampler.py): P prompts x n samples under a KV budget, on a paged cache.

The budget buys pages (rollout/cache.py); a sequence holds the pages its tokens fill. Each prompt is prefilled once
into pages its group's samples share, and its last logits give every sample its first token; samples then flow
through the pool (continuous batching, rollout/run.py): a finished sample's pages come back at once and waiting
samples take them, and a pool that runs dry sends its newest sample back to start over. In structured mode a
block's paths are rows whose page tables list the prefix's pages, decoded in the same steps, and the summary's
table lists every path (rollout/structured.py): what a row sees is its page list. A decode step is one forward
over the rows in flight (rollout/decode.py) and one read of the sampled tokens. Every token is drawn from the
sample's own random stream (rollout/noise.py), so a sample depends on its prompt, its index and the seed, not on
the budget, the page size or its neighbours. The invariant: every sampled token's log-prob here equals the
trainer's forward over the final sequence (plus `build_structure` and the patch when structured).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from model.tags import TagIds

from .attention import KERNEL, PagedBatch, masks_for, paged_attention_mode, prefill_mask
from .cache import (DEFAULT_PAGE_SIZE, PagePool, PageTables, kv_budget_bytes, kv_bytes_per_token, pages_for,
                    pool_pages, sample_pages, table_bytes)
from .decode import Decoder
from .noise import stream_keys, uniforms
from .rows import Limits, Rollout
from .run import Run

GRAPH_MODES = ("auto", "on", "off", "buckets")  # rollout.cuda_graphs; "buckets": graph shapes run eagerly (tests)
SAMPLE_ELEMENTS = 1 << 24  # rows x vocabulary sampled at once (their float64 CDF is 128 MiB at most)


class SamplingAborted(RuntimeError):
    """`generate(..., should_stop=...)` returned True between two decode steps: the rollout was abandoned."""


def filter_logits(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """(R, V) logits with every entry outside the top-k, then outside the smallest head whose probability
    mass reaches top_p, set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_p, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest head whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """(R, V) logits -> (R, V) sampling probabilities after temperature, top-k and top-p."""
    return torch.softmax(filter_logits(logits / temperature, top_p, top_k), dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                uniform: torch.Tensor | None = None):
    """(R, V) logits -> tokens (R,) and their log-probs (R,) under logits / temperature, unfiltered (the
    trainer's rule: temperature 0 means the raw logits). Greedy when temperature is 0 or top_k is 1; else the
    token where the row's uniform (R,) in (0, 1) falls in the CDF of the filtered softmax (inverse CDF, in
    float64: the first token whose cumulative probability reaches u, never one of probability 0)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    scaled = logits / temperature if temperature > 0 else logits
    if temperature == 0 or top_k == 1:
        tok = logits.argmax(-1)
    else:
        cdf = torch.softmax(filter_logits(scaled, top_p, top_k).double(), dim=-1).cumsum_(-1)  # (R, V)
        target = (uniform.to(cdf.device) * cdf[:, -1])[:, None]  # (R, 1)
        tok = torch.searchsorted(cdf, target)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    return tok, torch.log_softmax(scaled, dim=-1).gather(-1, tok[:, None])[:, 0]


@contextmanager
def eval_mode(model):
    """Sample in eval mode whatever mode the caller left the model in; every module's mode is restored."""
    # transformers 5.17 drops the cache of a checkpointed layer in train mode even under no_grad (5.24: only with grad)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def decode_mode(cuda_graphs: str, device) -> str:
    """rollout.cuda_graphs on a device -> the Decoder's mode: "graphs" (auto on CUDA), "eager", or "buckets"."""
    auto = "graphs" if torch.device(device).type == "cuda" else "eager"
    return {"auto": auto, "on": "graphs", "off": "eager", "buckets": "buckets"}[cuda_graphs]


def describe(page_size: int, max_rows: int, cuda_graphs: str, device) -> str:
    """The sampler a stage runs, in one line of its opening summary."""
    steps = {"graphs": "replayed from CUDA graphs", "eager": "eager", "buckets": "eager, bucketed"}
    return (f"paged KV, pages of {page_size} tokens, at most {max_rows} rows a decode step; attention over pages: "
            f"{KERNEL}; decode steps {steps[decode_mode(cuda_graphs, device)]}")


@dataclass(frozen=True)
class PoolPlan:
    """The page pool of one generate call."""
    pages: int  # pages besides the scratch page
    rows: int  # rows a decode step may carry (the page-table buffer's lines)
    table_width: int  # table entries a row may use: one sample's pages at most
    bytes_per_token: int
    budget: int


class Sampler:
    """Owns the model's sampling forwards and, during a call, the page pool; `generate` samples P prompts x n,
    causal or structured."""

    def __init__(self, model, tags: TagIds | None = None, pad_id: int = 0, newline_id: int | None = None,
                 num_paths: int = 2, max_parallel_blocks: int = 4, max_path_tokens: int | None = None,
                 prefill_rows: int = 64, dtype: torch.dtype | None = None, kv_cache_gb: float | None = None,
                 kv_cache_fraction: float = 0.7, max_rows: int | None = 256, page_size: int = DEFAULT_PAGE_SIZE,
                 cuda_graphs: str = "auto"):
        if num_paths < 2:
            raise ValueError(f"num_paths must be >= 2, got {num_paths}")
        if (max_rows is not None and max_rows < num_paths) or page_size < 1:
            raise ValueError(f"need max_rows >= num_paths ({num_paths}) and page_size >= 1; got {max_rows}, {page_size}")
        if cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs must be one of {', '.join(GRAPH_MODES)}; got {cuda_graphs!r}")
        self.model, self.tags, self.pad_id, self.newline_id = model, tags, pad_id, newline_id
        self.num_paths, self.max_blocks, self.max_path_tokens = num_paths, max_parallel_blocks, max_path_tokens
        self.prefill_rows = prefill_rows
        self.dtype = dtype  # KV cache dtype = the compute dtype (bf16 under FSDP mixed precision); None: params
        # the budget: kv_cache_gb GiB, else a share of free CUDA memory, else a CPU default (cache.kv_budget_bytes)
        self.kv_cache_gb, self.kv_cache_fraction = kv_cache_gb, kv_cache_fraction
        self.max_rows, self.page_size, self.cuda_graphs = max_rows, page_size, cuda_graphs

    @classmethod
    def from_section(cls, model, tags, ro, *, pad_id: int, newline_id: int | None, dtype=None) -> "Sampler":
        """The sampler of a config's `rollout` section (curriculum/config.py RolloutConfig), read by name."""
        return cls(model, tags=tags, pad_id=pad_id, newline_id=newline_id, num_paths=ro.num_paths,
                   max_parallel_blocks=ro.max_parallel_blocks, max_path_tokens=ro.max_path_tokens,
                   prefill_rows=ro.prefill_rows, dtype=dtype, kv_cache_gb=ro.kv_cache_gb,
                   kv_cache_fraction=ro.kv_cache_fraction, max_rows=ro.max_rows, page_size=ro.page_size,
                   cuda_graphs=ro.cuda_graphs)

    def _forward(self, ids, pos, mask, paged: PagedBatch) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=masks_for(self.model, mask), use_cache=False,
                         logits_to_keep=1, paged=paged)
        return out.logits[:, -1]  # (rows, V)

    def decode_mode(self, dev) -> str:
        return decode_mode(self.cuda_graphs, dev)

    def pool_plan(self, prompts: list, n: int, max_new_tokens: int, structured: bool, dev) -> PoolPlan:
        """Pages the budget buys (never more than the call can use), rows in flight at most, and the table width."""
        cfg, ps = self.model.config, self.page_size
        per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                       torch.finfo(self.dtype or self.model.dtype).bits // 8)
        blocks = self.max_blocks if structured else 0
        width = sample_pages(max(map(len, prompts)), max_new_tokens, ps, blocks, self.num_paths)
        rows = len(prompts) * n * (self.num_paths if structured else 1)  # max_rows None: every row at once
        rows = min(rows, self.max_rows or rows)
        budget = kv_budget_bytes(self.kv_cache_gb, self.kv_cache_fraction, dev)
        own = sample_pages(0, max_new_tokens, ps, blocks, self.num_paths)  # a sample's pages besides its prompt's
        wanted = sum(pages_for(len(p), ps) + n * own for p in prompts)
        pages = min(pool_pages(budget, ps, per_token, table_bytes(rows, width)), wanted)
        return PoolPlan(pages, rows, width, per_token, budget)

    def prefill(self, groups: list, pool: PagePool, pages: PageTables) -> torch.Tensor:
        """Write every token of each group's prompt (left-padded into one forward) into the pages the group took;
        returns the (G, V) logits after each prompt's last token."""
        dev, ps = pool.fill.device, pages.page_size
        W = max(len(g.prompt) for g in groups)
        ids = torch.full((len(groups), W), self.pad_id, dtype=torch.long)
        slots = torch.full((len(groups), W), pool.scratch_slot, dtype=torch.long)  # padding writes the scratch page
        for i, g in enumerate(groups):
            L = len(g.prompt)
            ids[i, W - L:] = torch.tensor(g.prompt)
            slots[i, W - L:] = torch.tensor([pages.next_slot(g.pages[j // ps]) for j in range(L)])
        ids, slots = ids.to(dev), slots.to(dev)  # (G, W) each
        pmask = slots != pool.scratch_slot  # (G, W)
        pos = (pmask.long().cumsum(1) - 1).clamp(min=0)
        pool.mark_written(slots.view(-1))
        return self._forward(ids, pos, prefill_mask(pmask), PagedBatch(pool, slots.view(-1)))

    def draw(self, logits, keys, first, new: list, seed: int, temperature: float, top_p: float, top_k: int,
             first_index: int = 0):
        """Sample the decode rows' next tokens (logits (R, V), noise keys (3, R)) and the first tokens of new
        samples (first: (G, V) prefill logits; `new`: (its group's row in `first`, sample index) each); a
        sample's noise is keyed by first_index + its index. One device-to-host read; returns the tokens and
        log-probs as lists."""
        parts, key_parts = [], []
        if logits is not None:
            parts.append(logits)
            key_parts.append(keys)
        if new:
            dev = first.device
            parts.append(first[torch.tensor([g for g, _ in new], device=dev)])
            key_parts.append(torch.tensor([[s for _, s in new], [0] * len(new), [0] * len(new)], device=dev))
        rows, k = torch.cat(parts), torch.cat(key_parts, dim=1)  # (R, V), (3, R)
        u = uniforms(stream_keys(seed, k[0] + first_index, k[1], k[2]))  # (R,) one per row and step
        step = max(1, SAMPLE_ELEMENTS // rows.shape[-1])  # rows per sample_next call
        drawn = [sample_next(rows[i:i + step], temperature, top_p, top_k, u[i:i + step])
                 for i in range(0, len(rows), step)]
        tok, logp = torch.cat([t for t, _ in drawn]), torch.cat([lp for _, lp in drawn])
        host = torch.stack([tok.double(), logp.double()]).tolist()  # the step's one device-to-host read
        return [int(t) for t in host[0]], host[1]

    def generate(self, prompts: list, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_ids=(), structured: bool = False, seed: int = 0,
                 should_stop=None, first_index: int = 0) -> Rollout:
        """Sample n responses per prompt (token-id lists). See Rollout for what comes back. `should_stop`
        (a callable) is asked between decode steps; True abandons the call with SamplingAborted. `first_index`:
        the index of this call's first sample in a larger call, so a slice of a batch (prompts i.. with
        first_index i * n) draws exactly what the whole batch would have drawn for them (evaluation split
        over ranks)."""
        self._check(prompts, n, max_new_tokens, temperature, top_p, top_k, structured)
        dev = self.model.get_input_embeddings().weight.device
        lim = Limits(max_new_tokens, frozenset(int(s) for s in stop_ids), structured, self.tags, self.num_paths,
                     self.max_blocks, self.max_path_tokens, self.newline_id)
        plan = self.pool_plan(prompts, n, max_new_tokens, structured, dev)
        self._check_pool(plan, prompts, max_new_tokens, structured)
        cfg = self.model.config
        pool = PagePool(cfg.num_hidden_layers, plan.pages, self.page_size, cfg.num_key_value_heads, cfg.head_dim,
                        self.dtype or self.model.dtype, dev)
        pages = PageTables(plan.pages, self.page_size)
        decoder = Decoder(self._forward, pool, plan.rows, plan.table_width, self.decode_mode(dev), dev)
        run = Run(prompts, n, lim, pages, plan.rows)
        with torch.no_grad(), paged_attention_mode(self.model), eval_mode(self.model):
            while not run.done:
                if should_stop is not None and should_stop():
                    raise SamplingAborted("sampling abandoned (a stop was requested)")
                groups = run.schedule(self.prefill_rows)
                pool.clear(pages.touched)  # before a page's first write (the prompt's) and any read of it
                first = self.prefill(groups, pool, pages) if groups else None  # (G, V)
                fed = run.decode_rows()  # [(row, slot)], oldest sample first
                pool.clear(pages.touched)
                decoder.write_tables(run.table_writes)
                run.table_writes = []
                if not fed and not groups:
                    raise RuntimeError("the sampler made no progress (a bug: please report it)")
                logits = keys = None
                if fed:
                    columns = [[r.buf, r.tok, r.pos, slot, len(r.pages), r.sample.index, r.stream, r.counter]
                               for r, slot in fed]
                    logits, pack = decoder.step(columns, max(len(r.pages) for r, _ in fed))  # (R, V), (8, R)
                    keys = pack[5:8]
                new = [(i, s.index) for i, g in enumerate(groups) for s in g.samples]
                tokens, logps = self.draw(logits, keys, first, new, seed, temperature, top_p, top_k, first_index)
                R = len(fed)
                run.advance(fed, tokens[:R], logps[:R], groups, list(zip(tokens[R:], logps[R:])))
        return run.result(self.pad_id, dev, pool.nbytes + decoder.nbytes, plan.rows)

    def _check_pool(self, plan: PoolPlan, prompts: list, max_new_tokens: int, structured: bool) -> None:
        """The pool must hold one sample at its longest: then the oldest sample always finishes (run.py)."""
        blocks = self.max_blocks if structured else 0
        need = sample_pages(max(map(len, prompts)), max_new_tokens, self.page_size, blocks, self.num_paths)
        if plan.pages < need:
            page_mb = self.page_size * plan.bytes_per_token / 2**20
            paths = f", {blocks} blocks of {self.num_paths} paths" if structured else ""
            raise ValueError(f"the KV budget ({plan.budget / 2**30:.3g} GiB) buys {plan.pages} pages of "
                             f"{self.page_size} tokens ({page_mb:.3g} MiB each); one sample at its longest needs "
                             f"{need} (a prompt of {max(map(len, prompts))} tokens, {max_new_tokens} new tokens"
                             f"{paths}): raise rollout.kv_cache_gb, or lower rollout.max_new_tokens / "
                             "data.max_prompt_tokens")

    def _check(self, prompts, n, max_new_tokens, temperature, top_p, top_k, structured):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. the chat template's header)")
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        longest, limit = max(map(len, prompts)), self.model.config.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"max_position_embeddings {limit}; truncate prompts (curriculum.prompts) or sample less")
        if structured and self.tags is None:
            raise ValueError("structured sampling needs the tag ids: Sampler(model, tags=add_tag_tokens(tokenizer))")
