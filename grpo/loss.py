"""The GRPO objective as pure functions of tensors (DESIGN.md grpo/loss.py): per-token KL penalty,
clipped policy loss, the three aggregation modes, and `grpo_objective` that combines them with metrics.
Every per-token input is (B, T) with a loss mask; values at masked positions are never read.
"""
from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled by the policy.

    logp, ref_logp: (B, T). k1 = logp - ref; k2 = 0.5 (logp - ref)^2;
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        # clamps keep one badly-off token from dominating (or overflowing) the whole penalty
        log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # (B, T)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; valid: {', '.join(KL_KINDS)}")


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1) so that one advantage per sequence broadcasts over its tokens; (B, T) unchanged."""
    return advantages[:, None] if advantages.dim() == 1 else advantages


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, clip_c: float | None = None) -> torch.Tensor:
    """Per-token PPO-clip loss -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A), rho = exp(logp - old_logp).

    logp, old_logp: (B, T) log-probs of the sampled tokens now and before the step's updates (grpo_objective
    passes 0 for both at masked positions); advantages: (B,) or (B, T). Returns (B, T).
    clip_c (> 1): dual clip (Ye et al. 2020); a negative-advantage token's loss is capped at -A*clip_c,
    so a token whose ratio exploded cannot push its probability down without bound.
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1 (the dual-clip bound on rho for A < 0), got {clip_c}")
    adv = _per_token(advantages)  # (B, T) or (B, 1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return loss


Count = int | torch.Tensor | None  # a step-wide count: a Python int or an all-reduced scalar tensor


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", num_tokens: Count = None,
              norm_len: int | None = None, num_seqs: Count = None) -> torch.Tensor:
    """Reduce per-token values (B, T) under mask (B, T) to a scalar.

    token-mean: sum / num_tokens (loss tokens of the whole optimizer step; None = mask.sum() here).
    seq-mean-token-mean: sum over rows of each row's token mean / num_seqs.
    seq-mean-token-sum-norm: sum / (num_seqs * norm_len) (Dr. GRPO; norm_len None = T here).
    num_seqs counts the rows with at least one loss token (of the whole step; None = those here), as verl's
    agg_loss does: a row whose mask was zeroed (filter_zero_std, mask_truncated) does not dilute the others.
    With the step's global counts passed in, summing the results of micro-batches (and ranks) gives
    the result of the whole batch in one call. Masked positions may hold inf or nan: they are never read.
    """
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))  # (B, T)

    def count(n):  # a step-wide count (int or all-reduced tensor) as a divisor that is never 0
        return torch.as_tensor(n, dtype=values.dtype, device=values.device).clamp(min=1)

    seqs = mask.any(dim=-1).sum() if num_seqs is None else num_seqs
    if mode == "token-mean":
        return masked.sum() / count(mask.sum() if num_tokens is None else num_tokens)
    if mode == "seq-mean-token-mean":
        row_mean = masked.sum(dim=-1) / count(mask.sum(dim=-1))  # (B,); a row without tokens adds 0
        return row_mean.sum() / count(seqs)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (count(seqs) * (mask.shape[-1] if norm_len is None else norm_len))
    raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")


def clip_flags(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2,
               clip_high: float = 0.2, clip_c: float | None = None) -> dict[str, torch.Tensor]:
    """Where `policy_loss` clipped, read off `policy_loss` itself: a token with a nonzero advantage is clipped
    when its loss does not move with its log-prob (zero gradient), whatever rule made it so; an edit of the
    rule moves these flags with it. Split as TRL names them: high (A > 0), low (A < 0 and rho < 1), dual
    (A < 0 and rho > 1, reported with clip_c). logp, old_logp: (B, T) finite; advantages: (B,) or (B, T).
    Returns 0/1 float tensors (B, T)."""
    adv = _per_token(advantages).detach()
    with torch.enable_grad():
        x = logp.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(policy_loss(x, old_logp.detach(), adv, clip_low, clip_high, clip_c).sum(), x)
    clipped = (grad == 0) & (adv != 0)  # (B, T)
    above = logp.detach() > old_logp.detach()  # rho > 1
    flags = {"clip_ratio/low_mean": clipped & (adv < 0) & ~above, "clip_ratio/high_mean": clipped & (adv > 0)}
    flags["clip_ratio/region_mean"] = flags["clip_ratio/low_mean"] | flags["clip_ratio/high_mean"]
    if clip_c is not None:
        flags["clip_ratio/dual_mean"] = clipped & (adv < 0) & above
    return {k: v.to(logp.dtype).expand_as(logp) for k, v in flags.items()}


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
                   *, ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                   clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = None,
                   kl_coef: float = 0.0, kl_kind: str = "k3", entropy_coef: float = 0.0,
                   agg_mode: str = "token-mean", num_tokens: Count = None, num_seqs: Count = None,
                   norm_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = agg(policy_loss) + kl_coef * agg(kl_penalty to ref) - entropy_coef * agg(entropy).

    logp, old_logp, loss_mask: (B, T); advantages: (B,) or (B, T); ref_logp, entropy: (B, T) or None
    (ref_logp is only read when kl_coef != 0 or to log "kl"). Returns the scalar loss and detached
    scalar metrics aggregated exactly like the loss, so that summing a metric over the micro-batches
    and ranks of a step gives the step's value. Metric names follow TRL's GRPOTrainer where it has one:
    "loss" (the returned total), "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"
    (see `clip_flags`: read off policy_loss), "kl" (k-kind KL to the reference), "entropy"; ours:
    "policy_loss" (its term alone), "clip_ratio/dual_mean", "approx_kl" (k3 estimate of KL(old || current)
    on the old policy's samples: rho - 1 - log rho).
    """
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp (the reference model's per-token log-probs)")
    mask = loss_mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # zero masked positions *before* exp/products so garbage there gives neither nan values nor nan grads
    logp, old_logp = torch.where(mask, logp, zero), torch.where(mask, old_logp, zero)  # (B, T)
    adv = _per_token(advantages)
    adv = torch.where(mask, adv, zero) if adv.shape == mask.shape else adv  # (B, T) or (B, 1)
    agg = dict(mode=agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)

    per_token = policy_loss(logp, old_logp, adv, clip_low, clip_high, clip_c)  # (B, T)
    loss = aggregate(per_token, mask, **agg)
    metrics = {"policy_loss": loss.detach()}
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(mask, ref_logp, zero), kl_kind)  # (B, T)
        kl_term = aggregate(kl, mask, **agg)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl_term
        metrics["kl"] = kl_term.detach()
    if entropy is not None:
        entropy_term = aggregate(entropy, mask, **agg)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * entropy_term
        metrics["entropy"] = entropy_term.detach()
    metrics["loss"] = loss.detach()
    for name, flags in clip_flags(logp, old_logp, adv, clip_low, clip_high, clip_c).items():
        metrics[name] = aggregate(flags, mask, **agg)
    with torch.no_grad():
        log_ratio = logp - old_logp  # (B, T), 0 at masked positions
        metrics["approx_kl"] = aggregate(kl_penalty(zero.expand_as(log_ratio), log_ratio, "k3"), mask, **agg)
    return loss, metrics
