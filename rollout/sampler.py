"""Our batched sampler (DESIGN.md rollout/sampler.py): P prompts x n samples with a static KV cache.

Each prompt is prefilled once and its cache rows copied to its n samples; rows that finish leave the
computed batch at once. In structured mode a block's paths are separate rows decoded in the same
steps (rollout/structured.py). The invariant: every sampled token's log-prob here equals the
trainer's forward over the final sequence (plus `build_structure` and the patch when structured).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from model.tags import TagIds

from .cache import StaticKV
from .rows import RowBuffers, RowSet, Row
from .run import Run


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
    stats: dict  # decode "steps"; joined "blocks", the "block_steps" they were open, their "path_tokens"

    def sequences(self):
        """(ids, attention_mask, response_start): prompt and response side by side, (N, Lp+M)."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask, self.prompt_ids.shape[1]


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """(R, V) logits -> (R, V) sampling probabilities after temperature, top-k and top-p."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest head whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next(logits, temperature, top_p, top_k, generator):
    """(R, V) logits -> tokens (R,) and their log-probs (R,) under logits/temperature (unfiltered)."""
    logits = logits.float()
    greedy = temperature == 0 or top_k == 1
    logp_all = torch.log_softmax(logits if greedy else logits / temperature, dim=-1)  # (R, V)
    if greedy:
        tok = logits.argmax(-1)
    else:
        tok = torch.multinomial(logits_to_probs(logits, temperature, top_p, top_k), 1, generator=generator)[:, 0]
    return tok, logp_all.gather(-1, tok[:, None])[:, 0]


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
    """Owns the KV cache of a model; `generate` samples P prompts x n, causal or structured."""

    def __init__(self, model, tags: TagIds | None = None, pad_id: int = 0, newline_id: int | None = None,
                 num_paths: int = 2, max_parallel_blocks: int = 4, max_path_tokens: int | None = None,
                 prefill_rows: int = 64, dtype: torch.dtype | None = None):
        if num_paths < 2:
            raise ValueError(f"num_paths must be >= 2, got {num_paths}")
        self.model, self.tags, self.pad_id, self.newline_id = model, tags, pad_id, newline_id
        self.num_paths, self.max_blocks, self.max_path_tokens = num_paths, max_parallel_blocks, max_path_tokens
        self.prefill_rows = prefill_rows
        self.dtype = dtype  # KV cache dtype = the compute dtype (bf16 under FSDP mixed precision); None: params
        params = inspect.signature(type(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 vs 5.17

    def _forward(self, ids, pos, mask, cache):
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1]  # (rows, V)

    def prefill(self, prompts: list, cache: StaticKV) -> torch.Tensor:
        """Run each prompt once (left-padded) into cache rows 0..P-1; (P, V) logits of the first token."""
        dev, P, Lp = cache.valid.device, len(prompts), cache.prompt_width
        ids = torch.full((P, Lp), self.pad_id, dtype=torch.long, device=dev)
        pmask = torch.zeros(P, Lp, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, Lp - len(p):], pmask[i, Lp - len(p):] = torch.tensor(p, device=dev), True
        pos = (pmask.long().cumsum(1) - 1).clamp(min=0)  # (P, Lp)
        causal = torch.ones(Lp, Lp, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(Lp, dtype=torch.bool, device=dev)
        mask = (causal & pmask[:, None, :]) | (eye & ~pmask[:, :, None])  # (P, Lp, Lp); pads see themselves
        out = []
        cache.width = Lp
        for a in range(0, P, self.prefill_rows):
            b = min(P, a + self.prefill_rows)
            cache.row0 = a
            out.append(self._forward(ids[a:b], pos[a:b], mask[a:b, None], cache))
        cache.row0 = 0
        cache.valid[:P, :Lp] = pmask
        return torch.cat(out), ids, pmask

    def decode_step(self, rows: RowSet) -> torch.Tensor:
        """Feed each row its current token at its own slot and position; (R, V) next-token logits."""
        cache, buf, R = rows.cache, rows.buf, len(rows.rows)
        live = torch.tensor([not r.waiting for r in rows.rows], device=buf.tok.device)  # (R,)
        slot = buf.slot[:R]
        idx = torch.arange(R, device=slot.device)
        cache.valid[idx[live], slot[live]] = True
        cache.slot, cache.width = slot, int(slot.max()) + 1
        logits = self._forward(buf.tok[:R, None], buf.pos[:R, None], cache.mask(), cache)
        buf.slot[:R] += live.long()  # a waiting path wrote nowhere it will ever see
        return logits

    def generate(self, prompts: list, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_ids=(), structured: bool = False, seed: int = 0) -> Rollout:
        """Sample n responses per prompt (token-id lists). See Rollout for what comes back."""
        self._check(prompts, n, max_new_tokens, temperature, top_p, top_k, structured)
        dev = self.model.get_input_embeddings().weight.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        N, M = len(prompts) * n, max_new_tokens
        cfg = self.model.config
        cache = StaticKV(cfg.num_hidden_layers, N * (2 if structured else 1), cfg.num_key_value_heads,
                         max(map(len, prompts)) + M, cfg.head_dim, self.dtype or self.model.dtype, dev)
        cache.prompt_width = max(map(len, prompts))
        run = Run(self, RowSet(cache, RowBuffers(cache.capacity, M, dev)), N, M, structured,
                     set(int(s) for s in stop_ids))
        with torch.no_grad(), sdpa_attention(self.model), eval_mode(self.model):
            logits, pids, pmask = self.prefill(prompts, cache)
            src = torch.arange(N, device=dev) // n  # sample s belongs to prompt s // n
            cache.copy_rows(torch.arange(N, device=dev), src)
            run.rows.rows = [Row(idx=s, sample=s) for s in range(N)]
            cache.active = N
            buf = run.rows.buf
            buf.slot[:N] = cache.prompt_width
            buf.pos[:N] = pmask.sum(1)[src] - 1  # the last prompt token's position
            logits = logits[src]
            while True:
                tok, logp = sample_next(logits, temperature, top_p, top_k, gen)
                run.advance(tok, logp)
                if not run.rows.rows:
                    break
                logits = self.decode_step(run.rows)
        return run.result(pids[src], pmask[src].long(), n, self.pad_id)

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
