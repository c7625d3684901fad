"""The GRPO objective as pure functions of tensors (DESIGN.md grpo/loss.py): per-token KL penalty, the policy
losses (PPO clip, GSPO, CISPO), the sampler-mismatch weights (TIS, MIS), the three aggregation modes, and
`grpo_objective` that combines them with metrics. Every per-token input is (B, T) with a loss mask; values at
masked positions are never read.
"""
from __future__ import annotations

import math

import torch

KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")
CORRECTIONS = ("none", "tis", "mis")
# What each objective uses where grpo_objective (and the config) leave clip_low, clip_high or agg_mode unset:
# its paper's setting. GSPO's ratio is a geometric mean over the sequence, so it clips at ~1e-4, not 0.2 (Zheng
# et al. 2025, as verl's and TRL's GSPO examples), and its objective is a mean over sequences. CISPO sets no lower
# bound on its weight (MiniMax-M1: "a large eps_low") and caps it at 1 + 4 = 5, ScaleRL's eps_max (TRL
# recommends epsilon_high=5.0 for its cispo, Tinker caps at 4.0; verl's example at 1.2).
OBJECTIVE_DEFAULTS = {
    "ppo_clip": {"clip_low": 0.2, "clip_high": 0.2, "agg_mode": "token-mean"},
    "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "agg_mode": "seq-mean-token-mean"},
    "cispo": {"clip_low": None, "clip_high": 4.0, "agg_mode": "token-mean"},
}


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


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log s_i = mean over row i's loss tokens of (logp - old_logp): the log of GSPO's sequence importance ratio,
    the geometric mean of the row's token ratios. (B, T) each -> (B, 1); 0 for a row without loss tokens."""
    mask = loss_mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))  # (B, T)
    return log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
              clip_low: float = 3e-4, clip_high: float = 4e-4) -> torch.Tensor:
    """Per-token GSPO loss (Zheng et al. 2025, its GSPO-token form): -min(s*A, clip(s, 1-clip_low, 1+clip_high)*A)
    with s_t = sg(s_i) * exp(logp_t - sg(logp_t)) on every token t of row i, where
    s_i = exp(mean over row i's loss tokens of (logp - old_logp)) is the sequence's importance ratio.

    In value s_t is s_i, clipped per sequence; its gradient flows per token (d s_t / d logp_t = s_i), so a row's
    token mean (agg seq-mean-token-mean, GSPO's default) has the value and gradient of the sequence-level
    objective min(s_i*A, clip(s_i)*A). logp, old_logp, loss_mask: (B, T), the whole of each row (rows are never
    split across micro-batches); advantages: (B,) or (B, T). Returns (B, T)."""
    adv = _per_token(advantages)  # (B, T) or (B, 1)
    log_s = sequence_log_ratio(logp, old_logp, loss_mask).detach()  # (B, 1): log s_i
    seq_ratio = torch.exp(log_s + logp - logp.detach())  # (B, T): s_i in value, gradient per token
    seq_clipped = seq_ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T): clipped per sequence
    return -torch.minimum(seq_ratio * adv, seq_clipped * adv)


def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float | None = None,
               clip_high: float = 4.0) -> torch.Tensor:
    """Per-token CISPO loss (MiniMax-M1, 2025): -sg(clip(rho, 1-clip_low, 1+clip_high)) * A * logp,
    rho = exp(logp - old_logp). The importance weight is clipped and detached, so every token keeps its
    gradient (-w*A); clip_low None = no lower bound (the paper's setting). logp, old_logp: (B, T);
    advantages: (B,) or (B, T). Returns (B, T)."""
    adv = _per_token(advantages)  # (B, T) or (B, 1)
    ratio = torch.exp(logp.detach() - old_logp)  # (B, T)
    weight = ratio.clamp(min=None if clip_low is None else 1.0 - clip_low, max=1.0 + clip_high)  # (B, T), no grad
    return -weight * adv * logp


def sampler_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor | None, loss_mask: torch.Tensor,
                    correction: str = "none", tis_cap: float = 2.0, mis_low: float = 0.5,
                    mis_high: float = 2.0) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Weights (B, T) on the per-token policy loss that correct for the sampler's log-probs differing from the
    trainer's (bf16 decode kernels vs the training forward), and 0/1 flags (B, T) of the tokens they touched.

    old_logp: the trainer's log-probs before the step's updates (the current ones, detached, when on-policy);
    sampler_logp: the sampler's, of the same tokens; both (B, T), read only under loss_mask (B, T).
    tis: truncated importance sampling per token, w = min(exp(old - sampler), tis_cap) (TRL's token_truncate,
      verl's rollout_is: token); flags: the capped tokens.
    mis: masked importance sampling per sequence, w = 0 on every token of a row whose ratio
      exp(sum over its loss tokens of (old - sampler)) -- the product of its token ratios, as TRL's sequence_mask
      and verl's Seq-MIS (seq_sum_k1) -- leaves [mis_low, mis_high], else 1; flags: the masked rows' tokens.
    none: (None, {}), sampler_logp not read. The weights carry no gradient."""
    if correction == "none":
        return None, {}
    if sampler_logp is None:
        raise ValueError(f"sampler correction {correction!r} needs sampler_logp (the sampler's log-probs)")
    mask = loss_mask.bool()
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_ratio = torch.where(mask, old_logp - sampler_logp, zero).detach()  # (B, T)
    if correction == "tis":
        log_cap = math.log(tis_cap)
        capped = log_ratio > log_cap  # (B, T)
        return torch.exp(log_ratio.clamp(max=log_cap)), {"sampling/tis_capped_ratio": capped}
    if correction == "mis":
        seq_log_ratio = log_ratio.sum(-1, keepdim=True)  # (B, 1): log of the sequence's ratio
        out = (seq_log_ratio < math.log(mis_low)) | (seq_log_ratio > math.log(mis_high))  # (B, 1)
        return (~out).to(old_logp.dtype).expand_as(old_logp), {"sampling/mis_masked_ratio": out.expand_as(mask)}
    raise ValueError(f"unknown sampler correction {correction!r}; valid: {', '.join(CORRECTIONS)}")


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


def clip_flags(loss_fn, logp: torch.Tensor, advantages: torch.Tensor, ratio: torch.Tensor,
               dual: bool = False) -> dict[str, torch.Tensor]:
    """Where a policy loss clipped, read off the loss itself: `loss_fn(logp)` is its per-token loss (B, T) and
    `ratio` (B, T) the importance ratio it weighs each token with (per token; per sequence for GSPO). A token
    with a nonzero advantage is clipped where the loss's gradient w.r.t. its log-prob is not the unclipped
    importance-weighted one, -ratio*A: 0 where PPO's clip (or dual clip) holds it, -clip(rho)*A in CISPO.
    Whatever rule made it so, an edit of the rule moves these flags with it. Split as TRL names them, by the
    side of 1 the ratio is on: high (ratio > 1), low (ratio < 1), dual (ratio > 1 and A < 0 under PPO's dual
    clip, `dual`, reported apart from high). logp: (B, T) finite; advantages: (B,) or (B, T). Returns 0/1
    float tensors (B, T)."""
    adv = _per_token(advantages).detach().to(logp.dtype)  # float64 side tensors compare in the log-probs' dtype
    ratio = ratio.detach().to(logp.dtype)
    with torch.enable_grad():
        x = logp.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x).sum(), x)
    unclipped = torch.isclose(grad, -ratio * adv, rtol=1e-5, atol=0.0)  # (B, T)
    clipped = ~unclipped & (adv != 0)  # (B, T)
    above = ratio > 1
    by_dual = clipped & above & (adv < 0) if dual else torch.zeros_like(clipped)
    flags = {"clip_ratio/low_mean": clipped & ~above, "clip_ratio/high_mean": clipped & above & ~by_dual}
    flags["clip_ratio/region_mean"] = flags["clip_ratio/low_mean"] | flags["clip_ratio/high_mean"]
    if dual:
        flags["clip_ratio/dual_mean"] = by_dual
    return {k: v.to(logp.dtype).expand_as(logp) for k, v in flags.items()}


def objective_loss(policy: str, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
                   clip_low: float | None, clip_high: float, clip_c: float | None = None):
    """The per-token loss of objective `policy` (POLICY_LOSSES) as a function of logp (B, T) -> (B, T), and the
    importance ratio it weighs each token with, as a function of logp (for `clip_flags`)."""
    if policy == "ppo_clip":
        return (lambda lp: policy_loss(lp, old_logp, advantages, clip_low, clip_high, clip_c),
                lambda lp: torch.exp(lp - old_logp))
    if clip_c is not None:
        raise ValueError(f"clip_c (the dual clip) belongs to policy loss ppo_clip, not {policy}")
    if policy == "gspo":
        return (lambda lp: gspo_loss(lp, old_logp, advantages, loss_mask, clip_low, clip_high),
                lambda lp: torch.exp(sequence_log_ratio(lp, old_logp, loss_mask)).expand_as(lp))
    if policy == "cispo":
        return (lambda lp: cispo_loss(lp, old_logp, advantages, clip_low, clip_high),
                lambda lp: torch.exp(lp - old_logp))
    raise ValueError(f"unknown policy loss {policy!r}; valid: {', '.join(POLICY_LOSSES)}")


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
                   *, ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                   policy: str = "ppo_clip", clip_low: float | None = None, clip_high: float | None = None,
                   clip_c: float | None = None, kl_coef: float = 0.0, kl_kind: str = "k3", entropy_coef: float = 0.0,
                   agg_mode: str | None = None, num_tokens: Count = None, num_seqs: Count = None,
                   norm_len: int | None = None, sampler_logp: torch.Tensor | None = None, correction: str = "none",
                   tis_cap: float = 2.0, mis_low: float = 0.5,
                   mis_high: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = agg(w * policy loss) + kl_coef * agg(kl_penalty to ref) - entropy_coef * agg(entropy).

    logp, old_logp, loss_mask: (B, T); advantages: (B,) or (B, T); ref_logp, entropy, sampler_logp: (B, T) or None
    (ref_logp is only read when kl_coef != 0 or to log "kl"). `policy` picks the policy loss (ppo_clip,
    gspo, cispo); clip_low, clip_high and agg_mode left None take that objective's OBJECTIVE_DEFAULTS. w are the
    `sampler_weights` of `correction` (1 for none), from old_logp and sampler_logp. Returns the scalar loss
    and detached scalar metrics aggregated exactly like the loss, so that summing a metric over the
    micro-batches and ranks of a step gives the step's value. Metric names follow TRL's GRPOTrainer where it
    has one: "loss" (the returned total), "clip_ratio/low_mean", "clip_ratio/high_mean",
    "clip_ratio/region_mean" (see `clip_flags`: read off the policy loss; shares of sequences for gspo),
    "kl" (k-kind KL to the reference), "entropy"; ours: "policy_loss" (its term alone),
    "clip_ratio/dual_mean", "approx_kl" (k3 estimate of KL(old || current) on the old policy's samples:
    rho - 1 - log rho), "sampling/tis_capped_ratio" (share of loss tokens whose weight hit tis_cap),
    "sampling/mis_masked_ratio" (share of sequences masked).
    """
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp (the reference model's per-token log-probs)")
    if policy not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {policy!r}; valid: {', '.join(POLICY_LOSSES)}")
    given = {"clip_low": clip_low, "clip_high": clip_high, "agg_mode": agg_mode}
    clip_low, clip_high, agg_mode = (OBJECTIVE_DEFAULTS[policy][k] if v is None else v for k, v in given.items())
    mask = loss_mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # zero masked positions *before* exp/products so garbage there gives neither nan values nor nan grads
    logp, old_logp = torch.where(mask, logp, zero), torch.where(mask, old_logp, zero)  # (B, T)
    adv = _per_token(advantages)
    adv = torch.where(mask, adv, zero) if adv.shape == mask.shape else adv  # (B, T) or (B, 1)
    agg = dict(mode=agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)
    per_token_fn, ratio_fn = objective_loss(policy, old_logp, adv, mask, clip_low, clip_high, clip_c)

    per_token = per_token_fn(logp)  # (B, T)
    weights, touched = sampler_weights(old_logp, sampler_logp, mask, correction, tis_cap, mis_low, mis_high)
    loss = aggregate(per_token if weights is None else per_token * weights, mask, **agg)
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
    clipped = clip_flags(per_token_fn, logp, adv, ratio_fn(logp.detach()), dual=clip_c is not None)
    per_seq = {**agg, "mode": "seq-mean-token-mean"}  # GSPO clips, MIS masks whole sequences: shares of sequences
    metrics.update(_shares(clipped, mask, per_seq if policy == "gspo" else agg, logp.dtype))
    per_token_share = {**agg, "mode": "token-mean"}
    metrics.update(_shares(touched, mask, per_seq if correction == "mis" else per_token_share, logp.dtype))
    with torch.no_grad():
        log_ratio = logp - old_logp  # (B, T), 0 at masked positions
        metrics["approx_kl"] = aggregate(kl_penalty(zero.expand_as(log_ratio), log_ratio, "k3"), mask, **agg)
    return loss, metrics


def _shares(flags: dict, mask: torch.Tensor, agg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each 0/1 flag tensor (B, T) aggregated under `agg` (aggregate's keywords, with the step's counts, so the
    results of micro-batches add up): with token-mean a share of the step's loss tokens, with
    seq-mean-token-mean of a flag constant over each row a share of its sequences."""
    return {k: aggregate(v.to(dtype), mask, **agg) for k, v in flags.items()}
