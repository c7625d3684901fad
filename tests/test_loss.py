"""grpo/loss.py: KL kinds, clipped policy loss, aggregation, the combined objective and split invariance."""
import math

import pytest
import torch

from grpo.loss import (OBJECTIVE_DEFAULTS, aggregate, cispo_loss, grpo_objective, gspo_loss, kl_penalty, policy_loss,
                       sampler_weights)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- kl_penalty

def test_kl_kinds_hand_values():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-2.0, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    # ref - logp = -1: e^-1 + 1 - 1 = 0.3678794; ref - logp = +1: e - 1 - 1 = 0.7182818
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.3678794, 0.7182818]))
    torch.testing.assert_close(kl_penalty(logp, ref), torch.tensor([0.3678794, 0.7182818]))  # k3 is the default


def test_k3_clamps():
    logp = torch.zeros(4)
    ref = torch.tensor([2.5, 3.0, 30.0, -30.0])
    # 2.5: e^2.5 - 3.5 = 8.682494 (inside); 3: e^3 - 4 = 16.09 -> 10; 30 -> 20 -> 4.9e8 -> 10;
    # -30 -> -20: e^-20 + 19 = 19.000000002 -> 10
    out = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(out, torch.tensor([8.682494, 10.0, 10.0, 10.0]))
    assert torch.isfinite(kl_penalty(torch.zeros(1), torch.tensor([1e4]), "k3")).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------- policy_loss

def reference_policy_loss(logp, old, adv, clip_low, clip_high, clip_c):
    out = []
    for lp, o, a in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist()):
        rho = math.exp(lp - o)
        loss = -min(rho * a, min(max(rho, 1 - clip_low), 1 + clip_high) * a)
        if clip_c is not None and a < 0:
            loss = min(loss, -a * clip_c)
        out.append(loss)
    return torch.tensor(out).view(logp.shape)


def test_policy_loss_hand_values():
    logp = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    # A=1 rho=1.5 -> -min(1.5, 1.2) = -1.2; A=-1 rho=0.5 -> -min(-0.5, -0.8) = 0.8;
    # A=-1 rho=5 -> 5 (unclipped: the PPO bound does not cap a growing ratio), dual clip 3 caps it at 3
    torch.testing.assert_close(policy_loss(logp, torch.zeros_like(logp), adv), torch.tensor([[-1.2, 0.8, 5.0, -2.0]]))
    torch.testing.assert_close(policy_loss(logp, torch.zeros_like(logp), adv, clip_c=3.0),
                               torch.tensor([[-1.2, 0.8, 3.0, -2.0]]))


@pytest.mark.parametrize("clip_low,clip_high,clip_c", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)])
def test_policy_loss_matches_loop(clip_low, clip_high, clip_c):
    gen = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 9, generator=gen, dtype=torch.float64) - 2
    old = logp + torch.randn(4, 9, generator=gen, dtype=torch.float64) * 0.8  # ratios from ~0.1 to ~10
    adv = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    expected = reference_policy_loss(logp, old, adv, clip_low, clip_high, clip_c).double()
    torch.testing.assert_close(policy_loss(logp, old, adv, clip_low, clip_high, clip_c), expected)
    row_adv = adv[:, 0]  # (B,) advantages broadcast over the tokens of their row
    torch.testing.assert_close(policy_loss(logp, old, row_adv, clip_low, clip_high, clip_c),
                               policy_loss(logp, old, row_adv[:, None].expand(4, 9), clip_low, clip_high, clip_c))


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), clip_c=1.0)


def test_on_policy_gradient_is_minus_advantage():
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(3, 6, generator=gen) - 1
    logp = old.clone().requires_grad_(True)  # on-policy: rho = 1 everywhere
    adv = torch.randn(3, 6, generator=gen)
    policy_loss(logp, old, adv, 0.2, 0.28, 3.0).sum().backward()
    torch.testing.assert_close(logp.grad, -adv)
    # through the objective: token-mean divides by the step's token count, masked tokens get 0
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    logp.grad = None
    loss, _ = grpo_objective(logp, old, adv, mask, num_tokens=40)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.where(mask, -adv / 40, torch.zeros(())))


# ---------------------------------------------------------------- gspo_loss, cispo_loss

def gspo_example():
    """Two rows: row 0 has token log-ratios 0.1, 0.3 (s = e^0.2 = 1.2214, A = 1), row 1 has -0.1, 0.1, 0.0 (s = 1,
    A = -2); one masked token each (garbage there)."""
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.5, -0.7, -0.2]])
    logp = old + torch.tensor([[0.1, 0.3, NAN, 0.0], [-0.1, 0.1, 0.0, INF]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, torch.tensor([1.0, -2.0]), mask


def test_gspo_hand_values():
    logp, old, adv, mask = gspo_example()
    per_token = gspo_loss(torch.where(mask, logp, 0.0), torch.where(mask, old, 0.0), adv, mask, 0.2, 0.2)
    # row 0: -min(1.2214 * 1, 1.2 * 1) = -1.2 on both tokens (clipped as a sequence); row 1: -min(-2, -2) = 2
    torch.testing.assert_close(per_token[mask], torch.tensor([-1.2, -1.2, 2.0, 2.0, 2.0]))
    x = logp.clone().requires_grad_(True)
    loss, m = grpo_objective(x, old, adv, mask, policy="gspo", clip_low=0.2, clip_high=0.2)
    loss.backward()
    # seq-mean-token-mean (GSPO's default): (-1.2 + 2) / 2 = 0.4; row 0 clipped: no gradient; row 1: -A * s = 2
    # per token, / 3 tokens / 2 rows
    assert loss.item() == pytest.approx(0.4, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]]))
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 2)  # one sequence of two, not 2 tokens of 5
    assert m["clip_ratio/low_mean"].item() == 0.0
    _, m = grpo_objective(logp, old, adv, mask, policy="gspo")  # the paper's 3e-4 / 4e-4
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 2)


def reference_gspo(logp, old, adv, mask, clip_low, clip_high):
    """The sequence-level GSPO objective as the paper writes it, row by row: J = mean_i -min(s_i A_i, clip(s_i) A_i),
    s_i = exp(mean_t (logp_t - old_t)), the gradient flowing through s_i itself."""
    rows = []
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        s = torch.exp((logp[i, :n] - old[i, :n]).mean())
        rows.append(-torch.minimum(s * adv[i], s.clamp(1 - clip_low, 1 + clip_high) * adv[i]))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("clip_low,clip_high", [(3e-4, 4e-4), (0.05, 0.1)])
def test_gspo_matches_the_sequence_level_objective(clip_low, clip_high):
    gen = torch.Generator().manual_seed(5)
    B, T = 6, 9
    lengths = torch.tensor([9, 4, 7, 1, 6, 9])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), right padding
    old = torch.randn(B, T, generator=gen, dtype=torch.float64) - 2
    logp = old + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # sequence ratios ~0.9..1.1
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    ours, theirs = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss, _ = grpo_objective(ours, old, adv, mask, policy="gspo", clip_low=clip_low, clip_high=clip_high)
    expected = reference_gspo(theirs, old, adv, mask, clip_low, clip_high)
    (loss + expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert (ours.grad != 0).any()


def test_cispo_hand_values():
    logp = torch.log(torch.tensor([[1.5, 0.5, 6.0]])).requires_grad_(True)  # old 0: rho = 1.5, 0.5, 6
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    # no lower bound, weights capped at 1 + 4 = 5: w = 1.5, 0.5, 5; loss -w A logp; gradient -w A
    loss = cispo_loss(logp, torch.zeros(1, 3), adv, None, 4.0)
    torch.testing.assert_close(loss, -torch.tensor([[1.5, -0.5, 5.0]]) * logp.detach())
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, 0.5, -5.0]]))
    logp.grad = None
    cispo_loss(logp, torch.zeros(1, 3), adv, 0.2, 4.0).sum().backward()  # a lower bound of 0.8 raises rho 0.5
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, 0.8, -5.0]]))
    # every token keeps its gradient; the clip metrics count the weights clipped (by the side of 1 they are on)
    _, m = grpo_objective(logp.detach(), torch.zeros(1, 3), adv, torch.ones(1, 3, dtype=torch.bool), policy="cispo",
                          clip_low=0.2)
    assert (m["clip_ratio/high_mean"].item(), m["clip_ratio/low_mean"].item()) == pytest.approx((1 / 3, 1 / 3))
    _, m = grpo_objective(logp.detach(), torch.zeros(1, 3), adv, torch.ones(1, 3, dtype=torch.bool), policy="cispo")
    assert m["clip_ratio/low_mean"].item() == 0.0 and m["clip_ratio/region_mean"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("clip_low,clip_high", [(None, 4.0), (0.2, 0.28)])
def test_cispo_matches_loop(clip_low, clip_high):
    gen = torch.Generator().manual_seed(6)
    old = torch.randn(4, 9, generator=gen, dtype=torch.float64) - 2
    logp = (old + torch.randn(4, 9, generator=gen, dtype=torch.float64)).requires_grad_(True)  # ratios ~0.1..10
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    loss = cispo_loss(logp, old, adv, clip_low, clip_high)
    loss.sum().backward()
    values, grads = [], []
    for lp, o, a in zip(logp.detach().flatten().tolist(), old.flatten().tolist(), adv.repeat_interleave(9).tolist()):
        w = min(math.exp(lp - o), 1 + clip_high)
        w = w if clip_low is None else max(w, 1 - clip_low)
        values.append(-w * a * lp)
        grads.append(-w * a)
    torch.testing.assert_close(loss, torch.tensor(values, dtype=torch.float64).view(4, 9))
    torch.testing.assert_close(logp.grad, torch.tensor(grads, dtype=torch.float64).view(4, 9))


def test_objective_defaults_and_refusals():
    assert OBJECTIVE_DEFAULTS["gspo"] == {"clip_low": 3e-4, "clip_high": 4e-4, "agg_mode": "seq-mean-token-mean"}
    logp, old, adv, mask = clip_example()
    with pytest.raises(ValueError, match="valid: ppo_clip, gspo, cispo"):
        grpo_objective(logp, old, adv, mask, policy="grpo")
    with pytest.raises(ValueError, match="clip_c .* belongs to policy loss ppo_clip, not cispo"):
        grpo_objective(logp, old, adv, mask, policy="cispo", clip_c=3.0)
    with pytest.raises(ValueError, match="needs sampler_logp"):
        grpo_objective(logp, old, adv, mask, correction="tis")
    with pytest.raises(ValueError, match="valid: none, tis, mis"):
        grpo_objective(logp, old, adv, mask, correction="seq", sampler_logp=old)


# ---------------------------------------------------------------- sampler_weights

def test_tis_hand_values():
    old = torch.zeros(1, 4)
    sampler = -torch.log(torch.tensor([[3.0, 1.5, 0.5, 7.0]]))  # old - sampler = ln 3, ln 1.5, -ln 2, ln 7
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    w, flags = sampler_weights(old, sampler, mask, "tis", tis_cap=2.0)
    torch.testing.assert_close(w[mask], torch.tensor([2.0, 1.5, 0.5]))  # min(ratio, 2)
    assert flags["sampling/tis_capped_ratio"][mask].tolist() == [True, False, False]
    assert sampler_weights(old, sampler, mask, "none") == (None, {})


def test_mis_hand_values():
    """Sequence ratios 1.5 * 1.2 = 1.8 (kept), 3 (above 2), 0.4 (below 0.5), 0.5 exactly (kept: the band is closed)."""
    old = torch.zeros(4, 2)
    ratios = torch.tensor([[1.5, 1.2], [3.0, 9.0], [0.8, 0.5], [0.5, 1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)  # row 1's 9 is masked: never read
    w, flags = sampler_weights(old, -torch.log(ratios), mask, "mis", mis_low=0.5, mis_high=2.0)
    assert w.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    assert flags["sampling/mis_masked_ratio"][:, 0].tolist() == [False, True, True, False]


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_correction_weighs_only_the_policy_term(correction):
    """The policy loss of each token times its weight, step-wide token count unchanged (a masked sequence counts
    like a sample with advantage 0, as TRL's sequence_mask); the KL term is not weighed; the metrics by hand."""
    logp = torch.full((3, 2), -1.0).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    sampler = torch.tensor([[-1.0 - math.log(3.0), -1.0], [-1.0, -1.0], [-1.0 + 0.7, -1.0 + 0.7]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    ref = torch.full((3, 2), -1.5)
    loss, m = grpo_objective(logp, logp.detach(), adv, mask, ref_logp=ref, kl_coef=0.1, sampler_logp=sampler,
                             correction=correction, tis_cap=2.0)
    loss.backward()
    # on-policy: per-token policy loss -A. tis weights: row 0: 2 (3 capped), 1; row 1: 1, 1; row 2: e^-0.7 twice;
    # mis: row 0's ratio 3 and row 2's e^-1.4 = 0.25 leave [0.5, 2]: only row 1 is kept
    w = {"tis": [[2.0, 1.0], [1.0, 1.0], [math.exp(-0.7)] * 2], "mis": [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]}
    weights = torch.tensor(w[correction])
    assert m["policy_loss"].item() == pytest.approx(float((-adv[:, None] * weights).sum() / 6), rel=1e-6)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx(m["policy_loss"].item() + 0.1 * k3, rel=1e-6)
    torch.testing.assert_close(logp.grad, -adv[:, None] * weights / 6 + 0.1 * (1 - math.exp(-0.5)) / 6)
    if correction == "tis":
        assert m["sampling/tis_capped_ratio"].item() == pytest.approx(1 / 6)  # a share of loss tokens
    else:
        assert m["sampling/mis_masked_ratio"].item() == pytest.approx(2 / 3)  # a share of sequences


# ---------------------------------------------------------------- aggregate

VALUES = torch.tensor([[1.0, 2.0, INF], [4.0, NAN, -INF]])  # garbage where the mask is 0
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregate_modes_hand_values():
    assert aggregate(VALUES, MASK).item() == pytest.approx(7 / 3)
    assert aggregate(VALUES, MASK, num_tokens=7).item() == pytest.approx(1.0)
    # row means 1.5 and 4
    assert aggregate(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(VALUES, MASK, "seq-mean-token-mean", num_seqs=5).item() == pytest.approx(1.1)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(7 / 8)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)  # norm_len = T
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", num_seqs=4, norm_len=2).item() == pytest.approx(7 / 8)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_ignores_garbage_and_empty_masks(mode):
    values = VALUES.clone().requires_grad_(True)
    out = aggregate(values, MASK, mode)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(values.grad).all()
    assert (values.grad[~MASK.bool()] == 0).all()
    empty = aggregate(VALUES, torch.zeros_like(MASK), mode)
    assert empty.item() == 0.0


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="valid: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(VALUES, MASK, "sum")


# ---------------------------------------------------------------- grpo_objective

def clip_example():
    """Seven tokens of one row; the last is masked out."""
    rho = torch.tensor([[1.5, 0.5, 0.5, 1.5, 5.0, 2.0, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    return torch.log(rho), torch.zeros(1, 7), adv, mask


def test_clip_fraction_metrics_hand_example():
    logp, old, adv, mask = clip_example()
    _, m = grpo_objective(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_c=3.0)
    # high: (A>0, rho 1.5); low: (A<0, rho 0.5); dual: (A<0, rho 5 > 3); the masked rho 3 is not counted
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 6)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 6)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 6)
    assert m["clip_ratio/dual_mean"].item() == pytest.approx(1 / 6)
    # k3 of KL(old || new): rho - 1 - log rho
    rho = [1.5, 0.5, 0.5, 1.5, 5.0, 2.0]
    assert m["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in rho) / 6, rel=1e-5)
    # per-token losses: -1.2, -0.5, 0.8, 1.5, 3 (dual), 0
    assert m["policy_loss"].item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5 + 3.0) / 6, rel=1e-6)
    assert "clip_ratio/dual_mean" not in grpo_objective(logp, old, adv, mask)[1]
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_kl_coef_zero_needs_no_ref_and_terms_add_up():
    logp, old, adv, mask = clip_example()
    logp = logp.requires_grad_(True)
    loss, m = grpo_objective(logp, old, adv, mask, kl_coef=0.0)
    assert "kl" not in m and "entropy" not in m
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_objective(logp, old, adv, mask, kl_coef=0.1)
    ref = logp.detach() - 0.3
    entropy = torch.full((1, 7), 2.0)
    total, m = grpo_objective(logp, old, adv, mask, ref_logp=ref, entropy=entropy, kl_coef=0.1, entropy_coef=0.01)
    k3 = math.exp(-0.3) + 0.3 - 1
    assert m["kl"].item() == pytest.approx(k3, rel=1e-5)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(loss.item() + 0.1 * k3 - 0.01 * 2.0, rel=1e-6)


def test_objective_garbage_at_masked_positions():
    logp, old, adv, mask = clip_example()
    logp = logp.clone()
    logp[0, 6] = NAN
    ref = torch.zeros(1, 7)
    ref[0, 6] = INF
    entropy = torch.ones(1, 7)
    entropy[0, 6] = NAN
    logp.requires_grad_(True)
    loss, m = grpo_objective(logp, old, adv, mask, ref_logp=ref, entropy=entropy, kl_coef=0.1, entropy_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 6] == 0


OBJECTIVES = {  # policy loss and sampler correction, with clips wide enough to clip some of the random ratios below
    "ppo_clip": dict(policy="ppo_clip", clip_low=0.2, clip_high=0.28, clip_c=3.0),
    "gspo+mis": dict(policy="gspo", clip_low=0.02, clip_high=0.03, correction="mis", mis_low=0.5, mis_high=2.0),
    "cispo+tis": dict(policy="cispo", clip_high=0.5, correction="tis", tis_cap=1.3),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_invariance(mode, objective):
    """One call over 8 mixed-length rows == 4 micro-batches of 2 (each trimmed to its own length), for each policy
    loss and sampler correction (GSPO's sequence ratio and MIS's sequence mask need whole rows, as the trainer's
    micro-batches hold them)."""
    gen = torch.Generator().manual_seed(3)
    B, T = 8, 12
    lengths = torch.tensor([12, 3, 7, 1, 9, 12, 5, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), right padding
    old = torch.randn(B, T, generator=gen) - 2
    logp = (old + 0.4 * torch.randn(B, T, generator=gen)).masked_fill(~mask, NAN)
    ref = old + 0.2 * torch.randn(B, T, generator=gen)
    sampler = old + 0.2 * torch.randn(B, T, generator=gen)
    entropy = torch.rand(B, T, generator=gen) * 3
    adv = torch.randn(B, generator=gen)
    kw = dict(kl_coef=0.05, entropy_coef=0.01, agg_mode=mode, num_tokens=int(mask.sum()), num_seqs=B, norm_len=T,
              **OBJECTIVES[objective])

    whole = logp.clone().requires_grad_(True)
    loss, metrics = grpo_objective(whole, old, adv, mask, ref_logp=ref, entropy=entropy, sampler_logp=sampler, **kw)
    loss.backward()
    touched = [k for k in metrics if k.startswith(("clip_ratio/", "sampling/"))]
    if objective != "ppo_clip":  # not for ppo_clip: the README's one-line edit drops its clip, and this still holds
        assert any(0 < metrics[k] < 1 for k in touched), {k: metrics[k] for k in touched}  # the clips and masks act

    total, summed, grads = torch.zeros(()), {k: torch.zeros(()) for k in metrics}, torch.zeros(B, T)
    for rows in torch.arange(B).split(2):
        width = int(lengths[rows].max())  # each micro-batch padded only to its own longest row
        part = logp[rows, :width].clone().requires_grad_(True)
        part_loss, part_metrics = grpo_objective(part, old[rows, :width], adv[rows], mask[rows, :width],
                                                 ref_logp=ref[rows, :width], entropy=entropy[rows, :width],
                                                 sampler_logp=sampler[rows, :width], **kw)
        part_loss.backward()
        total += part_loss.detach()
        grads[rows, :width] = part.grad
        for k, v in part_metrics.items():
            summed[k] += v
    torch.testing.assert_close(total, loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads, whole.grad, atol=1e-6, rtol=1e-6)
    for k in metrics:
        torch.testing.assert_close(summed[k], metrics[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_rows_without_loss_tokens_are_not_sequences(mode):
    """3 rows + 3 rows whose mask was zeroed (filtered groups, truncated responses) give the value and the
    gradient of the 3 rows alone: the seq-mean modes count only rows with a loss token."""
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(6, 5, generator=gen)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[3:] = False
    six = values.clone().requires_grad_(True)
    three = values[:3].clone().requires_grad_(True)
    a, b = aggregate(six, mask, mode, norm_len=5), aggregate(three, mask[:3], mode, norm_len=5)
    (a + b).backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(six.grad[:3], three.grad)
    # seq-mean-token-mean by hand: row means (v00+v01+v02)/3, mean(v1), mean(v2), over 3 rows
    if mode == "seq-mean-token-mean":
        hand = (values[0, :3].mean() + values[1].mean() + values[2].mean()) / 3
        torch.testing.assert_close(a.detach(), hand)


# ---------------------------------------------------------------- a one-line edit of policy_loss

def test_policy_loss_gets_the_real_log_probs(monkeypatch):
    """An edit of policy_loss that reads logp or old_logp by value sees the real log-probs (0 at masked
    positions, whatever garbage was there)."""
    import grpo.loss

    seen = {}

    def recording(logp, old_logp, advantages, *args, **kw):
        seen["logp"], seen["old_logp"] = logp.detach().clone(), old_logp.clone()
        return policy_loss(logp, old_logp, advantages, *args, **kw)

    monkeypatch.setattr(grpo.loss, "policy_loss", recording)
    logp, _, adv, mask = clip_example()
    logp[0, 6] = NAN  # garbage where the mask is 0
    old = torch.full((1, 7), -0.7)
    old[0, 6] = INF
    grpo_objective(logp, old, adv, mask)
    torch.testing.assert_close(seen["logp"], torch.where(mask, logp, torch.zeros(())))
    torch.testing.assert_close(seen["old_logp"], torch.tensor([[-0.7] * 6 + [0.0]]))


CLIP_LINE = "    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)\n"
NO_CLIP = "    clipped = ratio  # (B, T) no clip\n"


def edited_loss_module(line: str, replacement: str):
    """grpo/loss.py with one line replaced (the README's "Changing the objective" edit), as a fresh module."""
    import inspect
    import types

    import grpo.loss

    source = inspect.getsource(grpo.loss)
    assert source.count(line) == 1, "the README's one-line edit no longer matches grpo/loss.py: update both"
    module = types.ModuleType("edited_loss")
    exec(compile(source.replace(line, replacement), "grpo/loss.py (edited)", "exec"), module.__dict__)
    return module


def test_clip_metrics_follow_a_one_line_edit_that_drops_the_clip():
    """Clip fractions are read off policy_loss: with the clip removed they drop to 0 (the dual clip, a
    separate line, still acts) and the loss becomes the plain -rho*A."""
    logp, old, adv, mask = clip_example()
    _, before = grpo_objective(logp, old, adv, mask, clip_c=3.0)
    assert before["clip_ratio/high_mean"] > 0 and before["clip_ratio/low_mean"] > 0
    edited = edited_loss_module(CLIP_LINE, NO_CLIP)
    loss, m = edited.grpo_objective(logp, old, adv, mask, clip_c=3.0)
    assert m["clip_ratio/high_mean"] == 0 and m["clip_ratio/low_mean"] == 0 and m["clip_ratio/region_mean"] == 0
    assert m["clip_ratio/dual_mean"].item() == pytest.approx(1 / 6)  # rho 5 at A = -1: capped at 3
    # per-token losses -rho*A: -1.5, -0.5, 0.5, 1.5, 3 (dual), 0
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 0.5 + 1.5 + 3.0) / 6, rel=1e-6)
    assert m["policy_loss"].item() == pytest.approx(loss.item())


def test_the_no_clip_edit_as_config_keys_matches_the_edited_file():
    """configs/studies/clip.yaml runs the README's edit as grpo.clip_low=1.0, grpo.clip_high=1e9: the clamp to
    [0, 1e9] leaves every ratio as it is, so loss, gradient and clip metrics equal the edited file's."""
    logp, old, adv, mask = clip_example()
    edited = edited_loss_module(CLIP_LINE, NO_CLIP)
    lp_a, lp_b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss_a, m_a = grpo_objective(lp_a, old, adv, mask, clip_low=1.0, clip_high=1e9)
    loss_b, m_b = edited.grpo_objective(lp_b, old, adv, mask)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(torch.autograd.grad(loss_a, lp_a)[0], torch.autograd.grad(loss_b, lp_b)[0])
    assert {k: v.item() for k, v in m_a.items()} == {k: v.item() for k, v in m_b.items()}
    assert m_a["clip_ratio/region_mean"] == 0
