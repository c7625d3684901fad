"""Our batched sampler (DESIGN.md rollout/sampler.py): P prompts x n samples under a KV-cache budget.

Samples flow through a fixed pool of cache rows (continuous batching, rollout/run.py): each prompt is
prefilled once and copied to its samples as rows free up, finished rows leave the decode batch at once
and waiting samples take their rows. The pool never holds more rows than the budget
(`kv_cache_gb`, or a share of free CUDA memory; rollout/cache.py). Every token is drawn from the sample's
own random stream (rollout/noise.py), so a sample depends on its prompt, its index and the seed, not on
the budget. In structured mode a block's paths are separate rows decoded in the same steps
(rollout/structured.py). The invariant: every sampled token's log-prob here equals the trainer's forward
over the final sequence (plus `build_structure` and the patch when structured).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from model.tags import TagIds

from .cache import StaticKV, kv_budget_bytes, kv_bytes_per_token, min_pool_rows, pool_rows
from .noise import stream_keys, uniforms
from .rows import Limits, Rollout, RowBuffers, RowPool
from .run import Run


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
def sdpa_attention(model):
    """Decode with SDPA and dense masks whatever the model trains with (flash-attn and flex take no
    per-row masks over a static cache); restored afterwards."""
    old = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        model.config._attn_implementation = old


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


class Sampler:
    """Owns the model's sampling forwards and, during a call, the KV pool; `generate` samples P prompts x n,
    causal or structured."""

    def __init__(self, model, tags: TagIds | None = None, pad_id: int = 0, newline_id: int | None = None,
                 num_paths: int = 2, max_parallel_blocks: int = 4, max_path_tokens: int | None = None,
                 prefill_rows: int = 64, dtype: torch.dtype | None = None, kv_cache_gb: float | None = None,
                 kv_cache_fraction: float = 0.7, max_rows: int | None = None):
        if num_paths < 2:
            raise ValueError(f"num_paths must be >= 2, got {num_paths}")
        self.model, self.tags, self.pad_id, self.newline_id = model, tags, pad_id, newline_id
        self.num_paths, self.max_blocks, self.max_path_tokens = num_paths, max_parallel_blocks, max_path_tokens
        self.prefill_rows = prefill_rows
        self.dtype = dtype  # KV cache dtype = the compute dtype (bf16 under FSDP mixed precision); None: params
        # the budget: kv_cache_gb GiB, else a share of free CUDA memory, else a CPU default (cache.kv_budget_bytes);
        # max_rows caps the pool in rows as well (tests, benchmarks)
        self.kv_cache_gb, self.kv_cache_fraction, self.max_rows = kv_cache_gb, kv_cache_fraction, max_rows
        params = inspect.signature(type(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 vs 5.17

    @classmethod
    def from_section(cls, model, tags, ro, *, pad_id: int, newline_id: int | None, dtype=None) -> "Sampler":
        """The sampler of a config's `rollout` section (curriculum/config.py RolloutConfig), read by name."""
        return cls(model, tags=tags, pad_id=pad_id, newline_id=newline_id, num_paths=ro.num_paths,
                   max_parallel_blocks=ro.max_parallel_blocks, max_path_tokens=ro.max_path_tokens,
                   prefill_rows=ro.prefill_rows, dtype=dtype, kv_cache_gb=ro.kv_cache_gb,
                   kv_cache_fraction=ro.kv_cache_fraction)

    def _forward(self, ids, pos, mask, cache):
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1]  # (rows, V)

    def pool_size(self, width: int, wanted: int, dev) -> tuple[int, int]:
        """(rows, bytes per token) of the pool for rows of `width` slots: what the budget holds, at most `wanted`."""
        cfg = self.model.config
        dtype = self.dtype or self.model.dtype
        per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                       torch.finfo(dtype).bits // 8)
        rows = pool_rows(kv_budget_bytes(self.kv_cache_gb, self.kv_cache_fraction, dev), width, per_token)
        return min(rows, wanted, self.max_rows or wanted), per_token

    def prefill(self, prompts: list, seeds: list, pool: RowPool) -> None:
        """Write all but the last token of each new prompt (left-padded) into its seed row; the last token is
        the row's first decode input, so every response token comes from a decode step."""
        cache, buf = pool.cache, pool.buf
        dev = buf.tok.device
        heads = [prompts[p][:-1] for p, _ in seeds]
        W = max(map(len, heads))
        rows = torch.tensor([r.idx for _, r in seeds], device=dev)
        if W > 0:
            ids = torch.full((len(heads), W), self.pad_id, dtype=torch.long, device=dev)
            pmask = torch.zeros(len(heads), W, dtype=torch.bool, device=dev)
            for i, h in enumerate(heads):
                if h:
                    ids[i, W - len(h):], pmask[i, W - len(h):] = torch.tensor(h, device=dev), True
            pos = (pmask.long().cumsum(1) - 1).clamp(min=0)  # (P, W)
            causal = torch.ones(W, W, dtype=torch.bool, device=dev).tril()
            eye = torch.eye(W, dtype=torch.bool, device=dev)
            mask = (causal & pmask[:, None, :]) | (eye & ~pmask[:, :, None])  # (P, W, W); pads see themselves
            cache.prefill_rows = rows
            try:
                self._forward(ids, pos, mask[:, None], cache)
            finally:
                cache.prefill_rows = None
            cache.valid[rows, :W] = pmask
        buf.tok[rows] = torch.tensor([prompts[p][-1] for p, _ in seeds], device=dev)
        buf.pos[rows] = torch.tensor([len(prompts[p]) - 1 for p, _ in seeds], device=dev)
        buf.slot[rows] = W

    def decode_step(self, pool: RowPool) -> torch.Tensor:
        """Feed each row its current token at its own slot and position; (R, V) next-token logits."""
        cache, buf, R = pool.cache, pool.buf, len(pool.rows)
        live = torch.tensor([not r.idle for r in pool.rows], device=buf.tok.device)  # (R,)
        slot = buf.slot[:R]
        idx = torch.arange(R, device=slot.device)
        cache.valid[idx[live], slot[live]] = True
        cache.slot, cache.width = slot, int(slot.max()) + 1
        pool.slots_used += int(slot.sum()) + R  # what the rows hold after this step (a paged cache would hold only that)
        pool.row_steps += R
        logits = self._forward(buf.tok[:R, None], buf.pos[:R, None], cache.mask(), cache)
        buf.slot[:R] += live.long()  # an idle row wrote nowhere it will ever see
        return logits

    def generate(self, prompts: list, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_ids=(), structured: bool = False, seed: int = 0,
                 should_stop=None) -> Rollout:
        """Sample n responses per prompt (token-id lists). See Rollout for what comes back. `should_stop`
        (a callable) is asked between decode steps; True abandons the call with SamplingAborted."""
        self._check(prompts, n, max_new_tokens, temperature, top_p, top_k, structured)
        dev = self.model.get_input_embeddings().weight.device
        lim = Limits(max_new_tokens, frozenset(int(s) for s in stop_ids), structured, self.tags, self.num_paths,
                     self.max_blocks, self.max_path_tokens, self.newline_id)
        width = max(map(len, prompts)) - 1 + max_new_tokens  # prompt slots, then one slot per token fed
        N = len(prompts) * n
        rows, per_token = self.pool_size(width, N * (self.num_paths if structured else 1), dev)
        self._check_pool(rows, n, structured, width, per_token)
        cfg = self.model.config
        cache = StaticKV(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, width, cfg.head_dim,
                         self.dtype or self.model.dtype, dev)
        pool = RowPool(cache, RowBuffers(rows, max_new_tokens, dev))
        run = Run(pool, lim, len(prompts), n)
        with torch.no_grad(), sdpa_attention(self.model), eval_mode(self.model):
            while not run.done:
                if should_stop is not None and should_stop():
                    raise SamplingAborted("sampling abandoned (a stop was requested)")
                while new := run.admit(self.prefill_rows):
                    self.prefill(prompts, new, pool)
                run.spawn()
                logits = self.decode_step(pool)  # (R, V)
                R, buf = logits.shape[0], pool.buf
                u = uniforms(stream_keys(seed, buf.sample[:R], buf.stream[:R], buf.out_len[:R]))  # (R,) per sample
                tok, logp = sample_next(logits, temperature, top_p, top_k, u)
                run.advance(tok, logp)
        return run.result(prompts, self.pad_id, cache.nbytes)

    def _check_pool(self, rows: int, n: int, structured: bool, width: int, per_token: int) -> None:
        """The pool must hold a seed and a sample (plus a block's paths when structured) to make progress."""
        need = min_pool_rows(n, structured, self.num_paths)
        if rows < need:
            row_mb = width * (per_token + 1) / 2**20
            raise ValueError(f"the KV budget holds {rows} cache rows of {width} tokens ({row_mb:.3g} MiB each); "
                             f"sampling needs at least {need} (a prompt's seed row and a sample"
                             f"{', plus the paths of a block' if structured else ''}): raise rollout.kv_cache_gb, "
                             "or lower rollout.max_new_tokens / data.max_prompt_tokens")

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
