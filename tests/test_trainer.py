"""grpo/trainer.py: the loop learns a toy reward (causal and structured), a step's split does not change
its gradients, non-finite updates are skipped then fatal, the reference model runs only when needed."""
import copy
import json
import os
from dataclasses import dataclass

import pytest
import torch

from curriculum.config import build_config
from grpo.batching import make_batch
from grpo.fsdp import Dist
from grpo.trainer import accumulate_gradients, train_grpo
from model import apply_structured_attention, build_model
from rollout import Sampler

from .conftest import TINY


@dataclass(frozen=True)
class Item:
    prompt_ids: list
    answer: str


class ListFeed:
    """The smallest prompt feed: cycles through items; resumable."""

    def __init__(self, items):
        self.items, self.pos = items, 0

    def next_batch(self, n):
        out = [self.items[(self.pos + i) % len(self.items)] for i in range(n)]
        self.pos += n
        return out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.pos = d["pos"]


class WordReward:
    """Toy reward: a third per occurrence of `word` in the response (at most 1)."""

    def __init__(self, word="hello"):
        self.word = word

    def __call__(self, response, gold, step):
        c = response.count(self.word)
        return min(c, 3) / 3, {"accuracy": float(c > 0)}


class NanReward:
    def __call__(self, response, gold, step):
        return float("nan"), {"accuracy": 0.0}


def toy_config(**over):
    base = {"name": "toy", "rollout": {"group_size": 8, "max_new_tokens": 16},
            "grpo": {"steps": 30, "prompts_per_step": 4, "mini_batch_prompts": 4, "micro_batch_tokens": 256},
            "optim": {"lr": 3e-3}, "reward": {"workers": 0}, "checkpoint": {"every": 0, "resume": "never"}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return build_config(base)


def toy_feed(tok):
    texts = ["hello world", "how many", "solve the problem", "tom has 3"]
    return ListFeed([Item(tok.encode(t, add_special_tokens=False), "0") for t in texts])


def tiny(tok, seed=0):
    return build_model(dict(TINY, vocab_size=len(tok), max_position_embeddings=512), seed=seed)


@pytest.mark.parametrize("variant", ["causal", "structured"])
def test_toy_reward_rises(tok, tags, tmp_path, variant):
    cfg = toy_config(variant=variant)
    model = tiny(tok)
    if variant == "structured":
        apply_structured_attention(model, tags)
    train_grpo(cfg, model, tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=WordReward())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 30 and [r["step"] for r in rows] == list(range(30))
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert max(r["sampler_logp_diff/max"] for r in rows) < 1e-4  # on-policy all along
    for key in ("accuracy", "reward_std", "parallel_ratio", "completions/mean_length", "completions/clipped_ratio",
                "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "grad_norm",
                "learning_rate", "time/sample", "time/reward", "time/update", "tokens_per_s", "approx_kl",
                "reward/timeouts", "reward/errors"):
        assert key in rows[-1], key
    assert "reward_timeouts" not in rows[-1]
    assert os.path.exists(tmp_path / "training.png")
    assert os.path.isdir(tmp_path / "checkpoints" / "step-30" / "model")  # the final checkpoint


def eos_leaning(tok):
    """An untied tiny model whose EOS row points along the mean final hidden state: responses end at
    different lengths."""
    model = build_model(dict(TINY, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False), seed=0)
    with torch.no_grad():
        h = model.model(input_ids=torch.arange(5, 60)[None], use_cache=False).last_hidden_state[0]  # (T, H)
        direction = h.mean(0) / h.mean(0).norm()
        model.lm_head.weight[tok.eos_token_id] = 12.0 * direction / h.norm(dim=-1).mean()
    return model


def rollout_batch(tok, model, structured=False, tags=None):
    sampler = Sampler(model, tags=tags, pad_id=tok.pad_token_id)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ["hello world", "how many apples are left now"]]
    r = sampler.generate(prompts, n=4, max_new_tokens=24, stop_ids=[tok.eos_token_id], seed=3, structured=structured)
    lengths = r.response_mask.sum(1)
    assert lengths.max() > lengths.min()  # mixed lengths
    adv = torch.linspace(-1.5, 1.5, 8)
    return make_batch(r, adv)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_into_micro_batches_gives_the_same_gradients(tok, agg_mode):
    model = eos_leaning(tok)
    batch = rollout_batch(tok, model)
    old = batch.sampler_logp - 0.05 * torch.arange(batch.input_ids.shape[1])[None] / 10  # off-policy: ratios != 1
    grads = []
    for budget in (100_000, 40):  # one micro-batch vs several
        cfg = toy_config(grpo={"micro_batch_tokens": budget, "agg_mode": agg_mode})
        m = copy.deepcopy(model).train()
        metrics = accumulate_gradients(m, batch, list(range(8)), old, None, cfg, Dist())
        grads.append(([p.grad.clone() for p in m.parameters()], metrics))
    (g1, m1), (g4, m4) = grads
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(g1, g4))
    assert max(a.abs().max() for a in g1) > 1e-4  # a real gradient
    for k in ("policy_loss", "clip_ratio/low_mean", "entropy", "approx_kl"):
        assert abs(m1[k] - m4[k]) < 1e-5, k


def test_structured_batch_trains_with_the_structure(tok, tags):
    model = apply_structured_attention(tiny(tok), tags)
    batch = rollout_batch(tok, model, structured=True, tags=tags)
    cfg = toy_config(variant="structured")
    m = accumulate_gradients(model.train(), batch, list(range(8)), None, None, cfg, Dist())
    assert m["sampler_logp_diff/max"] < 1e-4


def test_non_finite_updates_are_skipped_then_stop_the_run(tok, tags, tmp_path):
    cfg = toy_config(grpo={"steps": 5, "max_bad_steps": 3})
    model = tiny(tok)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="3 updates in a row"):
        train_grpo(cfg, model, tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=NanReward())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_update"] for r in rows] == [1.0, 1.0]  # the third one raised before logging


class ExplodingRef(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("the reference model must not run when kl_coef == 0")


def test_reference_model_only_when_kl_is_on(tok, tags, tmp_path):
    cfg = toy_config(grpo={"steps": 2})
    train_grpo(cfg, tiny(tok), tok, tags, toy_feed(tok), str(tmp_path / "a"), Dist(), ref_model=ExplodingRef(),
               reward_fn=WordReward())
    cfg = toy_config(grpo={"steps": 2, "kl_coef": 0.1, "mini_batch_prompts": 2, "ppo_epochs": 2})
    ref = tiny(tok, seed=1).requires_grad_(False)
    train_grpo(cfg, tiny(tok), tok, tags, toy_feed(tok), str(tmp_path / "b"), Dist(), ref_model=ref,
               reward_fn=WordReward())
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert all(r["kl"] > 0 for r in rows)  # a different reference: a real KL
    assert all(p.grad is None for p in ref.parameters())


def test_batch_size_must_split_over_updates(tok, tags, tmp_path):
    cfg = toy_config(grpo={"prompts_per_step": 4, "mini_batch_prompts": 3})
    with pytest.raises(ValueError, match="multiple"):
        train_grpo(cfg, tiny(tok), tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=WordReward())
