"""grpo/loss.py: KL kinds, clipped policy loss, aggregation, the combined objective and split invariance."""
import math

import pytest
import torch

from grpo.loss import aggregate, grpo_objective, kl_penalty, policy_loss

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


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_invariance(mode):
    """One call over 8 mixed-length rows == 4 micro-batches of 2 (each trimmed to its own length)."""
    gen = torch.Generator().manual_seed(3)
    B, T = 8, 12
    lengths = torch.tensor([12, 3, 7, 1, 9, 12, 5, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), right padding
    old = torch.randn(B, T, generator=gen) - 2
    logp = (old + 0.4 * torch.randn(B, T, generator=gen)).masked_fill(~mask, NAN)
    ref = old + 0.2 * torch.randn(B, T, generator=gen)
    entropy = torch.rand(B, T, generator=gen) * 3
    adv = torch.randn(B, generator=gen)
    kw = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.05, entropy_coef=0.01, agg_mode=mode,
              num_tokens=int(mask.sum()), num_seqs=B, norm_len=T)

    whole = logp.clone().requires_grad_(True)
    loss, metrics = grpo_objective(whole, old, adv, mask, ref_logp=ref, entropy=entropy, **kw)
    loss.backward()

    total, summed, grads = torch.zeros(()), {k: torch.zeros(()) for k in metrics}, torch.zeros(B, T)
    for rows in torch.arange(B).split(2):
        width = int(lengths[rows].max())  # each micro-batch padded only to its own longest row
        part = logp[rows, :width].clone().requires_grad_(True)
        part_loss, part_metrics = grpo_objective(part, old[rows, :width], adv[rows], mask[rows, :width],
                                                 ref_logp=ref[rows, :width], entropy=entropy[rows, :width], **kw)
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
