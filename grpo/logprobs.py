"""Per-token log-probs and entropy without ever holding (B, T, V) logits (DESIGN.md grpo/logprobs.py): for one
call the model's lm_head becomes `_LogProbHead`, run inside the model's own forward (where FSDP2 has gathered
the tied head weight), whose backward recomputes each chunk's logits instead of storing them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = (h @ W^T) / temperature written into the float32 buffer `out` (n, V).

    The matmul runs in the weight's dtype like the stock lm_head (and the sampler), and the logits chunk
    is then upcast to float32: no float32 copy of the (V, hidden) weight is ever made.
    """
    if weight.dtype == out.dtype:
        torch.matmul(h, weight.t(), out=out)  # reuses one buffer for every chunk (no fresh pages on CPU)
    else:
        out.copy_(h @ weight.t())
    if temperature != 1.0:
        out.div_(temperature)
    return out


class _ChunkedLogProbs(torch.autograd.Function):
    """hidden (M, hidden), weight (V, hidden), targets (M,) -> logp (M,), entropy (M,) or (0,),
    for M = B*(T-1) flattened scored tokens, in chunks of C = chunk_size tokens (n in the last one).

    Forward keeps only the per-token logsumexp and entropy; backward recomputes each chunk's logits and
    forms d loss / d logits = p * (-g_logp - g_ent * (log p + entropy)) + g_logp * onehot(target),
    so at most two float32 (chunk, V) buffers exist at any time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        h_all = hidden.to(weight.dtype)
        logp = hidden.new_empty(n_tok, dtype=torch.float32)  # (M,)
        lse = torch.empty_like(logp)  # (M,)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        zbuf = logp.new_empty(min(chunk_size, n_tok), vocab)  # (C, V)
        pbuf = torch.empty_like(zbuf)  # (C, V)
        for a in range(0, n_tok, chunk_size):
            b = min(a + chunk_size, n_tok)
            z = _chunk_logits(h_all[a:b], weight, zbuf[: b - a], temperature)  # (n, V)
            logq = torch.log_softmax(z, dim=-1, out=pbuf[: b - a])  # (n, V), the same kernel as the naive path
            logp[a:b] = logq.gather(1, targets[a:b, None]).squeeze(-1)
            lse[a:b] = z.gather(1, targets[a:b, None]).squeeze(-1) - logp[a:b]  # kept for the backward
            if with_entropy:  # entropy = -sum p log p; the logits buffer is free now and takes p
                entropy[a:b] = -torch.exp(logq, out=z).mul_(logq).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        n_tok, vocab = hidden.shape[0], weight.shape[0]
        h_all = hidden.to(weight.dtype)
        grad_hidden = torch.zeros_like(h_all) if ctx.needs_input_grad[0] else None  # (M, hidden)
        # accumulate the head's gradient in float32 whatever the weight dtype: many chunks add into it
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None  # (V, hidden)
        zbuf = lse.new_empty(min(chunk_size, n_tok), vocab)  # (C, V)
        pbuf = torch.empty_like(zbuf)  # (C, V)
        for a in range(0, n_tok, chunk_size):
            b = min(a + chunk_size, n_tok)
            gl = grad_logp[a:b, None]  # (n, 1)
            logq = _chunk_logits(h_all[a:b], weight, zbuf[: b - a], temperature).sub_(lse[a:b, None])  # log p
            p = torch.exp(logq, out=pbuf[: b - a])  # (n, V)
            if ctx.with_entropy:  # d entropy / dz = -p (log p + entropy); the buffer of log p becomes the coefficient
                coef = logq.add_(entropy[a:b, None]).mul_(-grad_entropy[a:b, None]).sub_(gl)
                grad_z = p.mul_(coef)
            else:
                grad_z = p.mul_(-gl)
            grad_z.scatter_add_(1, targets[a:b, None], gl)  # d logp / dz = onehot(target) - p
            if temperature != 1.0:
                grad_z.div_(temperature)
            g = grad_z.to(weight.dtype)  # (n, V); a no-op for float32 weights
            if grad_hidden is not None:
                torch.matmul(g, weight, out=grad_hidden[a:b])
            if grad_weight is not None:
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h_all[a:b])
                else:
                    grad_weight.add_(g.t() @ h_all[a:b])
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


class _LogProbHead(nn.Module):
    """Stands in for `model.lm_head` during one call: hidden (B, T, hidden) -> logp (B, T) or (B, T, 2)
    [logp, entropy], aligned with the input ids (column 0 is 0: the first token has no prediction)."""

    def __init__(self, head: nn.Linear, input_ids: torch.Tensor, temperature: float, chunk_size: int,
                 with_entropy: bool, scored: torch.Tensor | None = None):
        super().__init__()
        self.head = head  # the original Linear stays a child so FSDP's parameter bookkeeping is untouched
        self.input_ids, self.temperature = input_ids, temperature
        self.chunk_size, self.with_entropy, self.scored = chunk_size, with_entropy, scored

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, T, width = hidden.shape
        if self.scored is not None:  # only the tokens asked for: (1, M) or (1, M, 2)
            h = hidden.reshape(-1, width)[self.scored - 1]  # (M, hidden): the token before predicts it
            logp, entropy = _ChunkedLogProbs.apply(h, self.head.weight, self.input_ids.reshape(-1)[self.scored],
                                                   self.temperature, self.chunk_size, self.with_entropy)
            return (torch.stack([logp, entropy], dim=-1) if self.with_entropy else logp)[None]
        h = hidden[:, :-1].reshape(-1, width)  # (B*(T-1), hidden): position t-1 predicts token t
        targets = self.input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
        logp, entropy = _ChunkedLogProbs.apply(h, self.head.weight, targets, self.temperature,
                                               self.chunk_size, self.with_entropy)
        logp = F.pad(logp.view(B, T - 1), (1, 0))  # (B, T)
        if not self.with_entropy:
            return logp
        return torch.stack([logp, F.pad(entropy.view(B, T - 1), (1, 0))], dim=-1)  # (B, T, 2)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                   scored: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(input_ids[:, t] | input_ids[:, :t]) under logits / temperature, for a Qwen3ForCausalLM.

    input_ids: (B, T) long; attention_mask: (B, T) or None (padding on either side). Returns logp (B, T)
    float32 with logp[:, 0] = 0, or (logp, entropy) when with_entropy, entropy[:, t] being that of the
    distribution that token t was drawn from. chunk_size: tokens (over all rows) per float32 logits
    chunk, the memory bound of the head. model_kwargs go to the model call (position_ids, a 4D mask,
    response_start for a model patched by model.patch.apply_structured_attention). `scored` (M,): flat indices
    into input_ids (B*T) of the only tokens to score, none the first of its row (packed rows: grpo/packing.py);
    then logp (and entropy) are (M,), and the head runs on those M tokens alone.
    Padded positions hold values of no meaning: mask them out downstream. temperature 0 (greedy sampling)
    scores under the raw logits, the sampler's rule (rollout.sample_next), so both always agree.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    temperature = temperature or 1.0
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}")
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise ValueError("token_logprobs supports Qwen3's bias-free lm_head only")
    model.lm_head = _LogProbHead(head, input_ids, float(temperature), int(chunk_size), with_entropy, scored)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs).logits
    finally:
        model.lm_head = head
    if scored is not None:
        out = out[0]  # (M,) or (M, 2)
    return (out[..., 0], out[..., 1]) if with_entropy else out
