"""grpo/optim.py: the lr schedule's factors by hand and against transformers' schedules."""
import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from grpo.optim import build_optimizer, lr_factor


def test_linear_hand_values():
    # 2 warm-up updates of 6: (u+1)/2, then 1 - (u-2)/4: the first decaying update at the full rate, the last above 0
    got = [lr_factor(u, 2, 6, "linear") for u in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [lr_factor(u, 0, 4, "linear", min_ratio=0.2) for u in range(4)] == pytest.approx([1.0, 0.8, 0.6, 0.4])


def test_cosine_hand_values():
    # no warm-up, 4 updates: progress 0, 1/4, 1/2, 3/4 -> 0.5 (1 + cos(pi p)), floor 0.1 on top
    half = 0.5 * (1 + math.cos(math.pi / 4))  # 0.8535534
    assert [lr_factor(u, 0, 4, "cosine") for u in range(4)] == pytest.approx([1.0, half, 0.5, 1 - half])
    assert lr_factor(2, 0, 4, "cosine", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert [lr_factor(u, 3, 10, "constant") for u in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("schedule,theirs", [("linear", get_linear_schedule_with_warmup),
                                             ("cosine", get_cosine_schedule_with_warmup)])
def test_decay_counts_as_transformers(schedule, theirs):
    """After warm-up every factor is transformers' (min_ratio 0), so the last of 10 updates runs at 1/7 of the
    lr (linear), not at 0; during warm-up ours is one update ahead (transformers' first update runs at lr 0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = theirs(opt, num_warmup_steps=3, num_training_steps=10)
    reference = [sched.lr_lambdas[0](u) for u in range(10)]
    ours = [lr_factor(u, 3, 10, schedule) for u in range(10)]
    assert ours[3:] == pytest.approx(reference[3:], abs=1e-12)
    assert ours[:3] == pytest.approx(reference[1:4], abs=1e-12)
    assert ours[-1] > 0 and ours[3] == 1.0
    if schedule == "linear":
        assert ours[-1] == pytest.approx(1 / 7)


def test_build_optimizer_steps_the_schedule_per_update():
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, 1e-3, 0.0, [0.9, 0.999], warmup_updates=1, total_updates=3,
                                 schedule="linear")
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="valid: \\['constant', 'cosine', 'linear'\\]"):
        lr_factor(0, 0, 1, "step")
