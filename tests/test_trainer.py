"""grpo/trainer.py: the loop learns a toy reward (causal and structured), a step's split does not change
its gradients, non-finite updates are skipped then fatal, the reference model runs only when needed."""
import copy
import json
import os
from dataclasses import dataclass, replace

import pytest
import torch

from curriculum.config import build_config
from grpo.batching import make_batch, pack_rows
from grpo.fsdp import Dist
from grpo.trainer import accumulate_gradients, batch_logprobs, train_grpo
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
    assert max(r["sampling/sampling_logp_difference/max"] for r in rows) < 1e-4  # on-policy all along
    for key in ("accuracy", "reward_std", "parallel_ratio", "completions/mean_length", "completions/clipped_ratio",
                "completions/min_length", "completions/max_length", "frac_reward_zero_std", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "entropy", "grad_norm", "learning_rate", "time/sample", "time/reward",
                "time/update", "tokens_per_s", "approx_kl", "loss", "policy_loss", "reward/timeouts", "reward/errors"):
        assert key in rows[-1], key
    assert "reward_timeouts" not in rows[-1]
    for before, r in zip([{"num_tokens": 0}] + rows, rows):  # num_tokens: prompt + completion tokens so far (TRL's)
        assert r["no_update"] == 0 and r["num_tokens"] > before["num_tokens"] + r["loss_tokens"] > before["num_tokens"]
        assert r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"]
        if r["completions/clipped_ratio"] < 1:  # some responses ended with a stop token
            assert 0 < r["completions/mean_terminated_length"] <= r["completions/max_length"]
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


def rollout_batch(tok, model, structured=False, tags=None, seed=3):
    sampler = Sampler(model, tags=tags, pad_id=tok.pad_token_id)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ["hello world", "how many apples are left now"]]
    r = sampler.generate(prompts, n=4, max_new_tokens=24, stop_ids=[tok.eos_token_id], seed=seed, structured=structured)
    lengths = r.response_mask.sum(1)
    assert lengths.max() > lengths.min()  # mixed lengths
    adv = torch.linspace(-1.5, 1.5, 8)
    return make_batch(r, adv)


OBJECTIVES = {  # grpo overrides: each policy loss and sampler correction, clips that act on these ratios
    "ppo_clip": {"clip_low": 0.03, "clip_high": 0.03},
    "gspo+mis": {"policy_loss": "gspo", "clip_low": 0.002, "clip_high": 0.002, "sampler_correction": "mis",
                 "mis_low": 0.85, "mis_high": 1.15},
    "cispo+tis": {"policy_loss": "cispo", "clip_low": 0.02, "clip_high": 0.02, "sampler_correction": "tis",
                  "tis_cap": 1.02},
}


def off_policy(batch):
    """Old and sampler log-probs that wiggle around the sampler's (= the model's) along the row: ratios on both
    sides of 1, for the clips and for the corrections."""
    cols = torch.arange(batch.input_ids.shape[1])[None].float()  # (1, T)
    rows = torch.arange(batch.input_ids.shape[0])[:, None].float()  # (N, 1): some rows' sampler off by more
    return replace(batch, old_logp=batch.sampler_logp + 0.05 * torch.sin(0.7 * cols),
                   sampler_logp=batch.sampler_logp + 0.03 * torch.cos(1.1 * cols) + 0.004 * (rows - 3.5))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_into_micro_batches_gives_the_same_gradients(tok, agg_mode, objective, pack):
    model = eos_leaning(tok)
    batch = off_policy(rollout_batch(tok, model))
    grads = []
    for budget in (100_000, 40):  # one micro-batch vs several
        cfg = toy_config(grpo={"micro_batch_tokens": budget, "agg_mode": agg_mode, "pack": pack,
                               **OBJECTIVES[objective]})
        m = copy.deepcopy(model).train()
        metrics = accumulate_gradients(m, batch, cfg, Dist())
        grads.append(([p.grad.clone() for p in m.parameters()], metrics))
    (g1, m1), (g4, m4) = grads
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(g1, g4))
    assert max(a.abs().max() for a in g1) > 1e-4  # a real gradient
    acted = [k for k in m1 if k.startswith(("clip_ratio/", "sampling/tis", "sampling/mis"))]
    assert any(0 < m1[k] < 1 for k in acted), {k: m1[k] for k in acted}  # the clips and corrections act
    for k in ("policy_loss", "entropy", "approx_kl", *acted):
        assert abs(m1[k] - m4[k]) < 1e-5, k


def soup_batch(tok, tags):
    """Rows of every structure a packed row must keep as its own (tests/test_packing.py soup), of mixed lengths,
    one with its loss masked off (filter_zero_std) and one with forced tokens left out of the loss."""
    from .test_packing import soup

    prompts, responses = soup(tags)
    prompts.append(tok.encode("how many apples are left now", add_special_tokens=False))
    responses.append(list(range(5, 40)))  # a long plain row
    masks = [[1] * len(r) for r in responses]
    masks[1] = [0, 0] + [1] * (len(responses[1]) - 2)  # forced <Parallel> <Path>: context, not actions
    masks[3] = [0] * len(responses[3])
    adv = torch.tensor([1.5, -0.5, 0.8, 2.0, -1.2, 0.3])  # float32, as the trainer's (token_logprobs' too)
    batch = pack_rows(prompts, responses, tok.pad_token_id, loss_masks=masks, advantages=adv)
    gen = torch.Generator().manual_seed(0)
    sampler = -5.0 + 0.1 * torch.randn(batch.input_ids.shape, generator=gen)
    return replace(batch, sampler_logp=sampler * batch.loss_mask, old_logp=sampler * batch.loss_mask)


@pytest.mark.parametrize("variant", ["causal", "structured"])
def test_packed_update_equals_padded_in_float64(tok, tags, variant):
    """Old/ref log-probs and the update's gradients are the padded path's, packed in several micro-batches,
    with tag soup, an open block, tags quoted in the prompt and a row without loss tokens; and the update's
    forwards hold only real tokens and the packing's few padding tokens."""
    model = tiny(tok).double()
    if variant == "structured":
        apply_structured_attention(model, tags)
    batch = soup_batch(tok, tags)
    out, grads, metrics, widths = {}, {}, {}, {}
    for pack, budget in ((False, 100_000), (True, 40)):
        cfg = toy_config(variant=variant, grpo={"pack": pack, "micro_batch_tokens": budget, "kl_coef": 0.1,
                                                "agg_mode": "seq-mean-token-mean"})
        out[pack] = batch_logprobs(model, batch, cfg, Dist())
        m = copy.deepcopy(model).train()
        ran = []
        m.model.embed_tokens.register_forward_pre_hook(lambda _, args: ran.append(args[0].shape))
        metrics[pack] = accumulate_gradients(m, replace(batch, ref_logp=out[pack] - 0.1), cfg, Dist())
        grads[pack], widths[pack] = [p.grad for p in m.parameters()], ran
    trained = batch.loss_mask.bool()
    assert (out[True] - out[False])[trained].abs().max() < 1e-6
    scored = batch.attention_mask.bool() & (torch.arange(batch.input_ids.shape[1]) >= batch.response_start)
    scored[3] = False  # packed: the responses of the rows with a loss token are scored, nothing else
    assert (out[True][~scored] == 0).all() and (out[True][scored] < 0).all()
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert max(g.abs().max() for g in grads[True]) > 1e-3  # a real gradient
    for k in ("policy_loss", "kl", "entropy", "sampling/sampling_logp_difference/mean"):
        assert abs(metrics[True][k] - metrics[False][k]) < 1e-6, k
    live = batch.prompt_len + batch.response_len
    live = int(live.sum() - live[3])  # row 3 has no loss token: never run
    assert len(widths[True]) > 1 and sum(s.numel() for s in widths[True]) < 1.25 * live
    assert sum(s.numel() for s in widths[False]) > 2 * live  # padded: 5 rows as wide as the longest


def test_structured_batch_trains_with_the_structure(tok, tags):
    model = apply_structured_attention(tiny(tok), tags)
    batch = rollout_batch(tok, model, structured=True, tags=tags, seed=1)  # a seed with mixed lengths
    cfg = toy_config(variant="structured")
    m = accumulate_gradients(model.train(), batch, cfg, Dist())
    assert m["sampling/sampling_logp_difference/max"] < 1e-4


def test_non_finite_updates_are_skipped_then_stop_the_run(tok, tags, tmp_path, caplog):
    """Each skipped update is said on the console; the stop names the last checkpoint (only finite weights are
    ever saved) and how to resume from it."""
    cfg = toy_config(grpo={"steps": 5, "max_bad_steps": 3}, checkpoint={"every": 1})
    model = tiny(tok)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="3 updates in a row") as err:
        train_grpo(cfg, model, tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=NanReward())
    last = str(tmp_path / "checkpoints" / "step-2")
    assert f"The last checkpoint, {last}, holds finite weights" in str(err.value)
    assert f"--set checkpoint.resume={last}" in str(err.value)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 3 and "3 in a row, the run stops at grpo.max_bad_steps=3" in skipped[-1]
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


class ConstantReward:
    """Every response scores 0: every group has zero reward spread."""

    def __call__(self, response, gold, step):
        return 0.0, {"accuracy": 0.0}


def test_a_step_with_every_group_filtered_updates_nothing(tok, tags, tmp_path):
    """filter_zero_std drops every group: the step logs loss_tokens 0 and no_update 1, leaves out what only an
    update measures, and the weights stay put (AdamW's weight decay would still move them)."""
    cfg = toy_config(grpo={"steps": 2, "filter_zero_std": True}, optim={"lr": 1e-2, "weight_decay": 0.1})
    model = tiny(tok)
    before = [p.detach().clone() for p in model.parameters()]
    train_grpo(cfg, model, tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=ConstantReward())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["loss_tokens"], r["no_update"], r["frac_reward_zero_std"]) for r in rows] == [(0, 1, 1)] * 2
    assert 0 < rows[0]["num_tokens"] < rows[1]["num_tokens"]  # the samples were still seen
    for key in ("loss", "policy_loss", "entropy", "grad_norm", "learning_rate", "skipped_update",
                "clip_ratio/low_mean", "approx_kl", "sampling/sampling_logp_difference/max"):
        assert key not in rows[0], key


def test_reward_functions_by_name_log_their_own_metrics_and_count_failures(tok, tags, tmp_path, caplog):
    """reward.funcs beside the built-in reward: rewards/<name>/mean|std per function (the built-in's too), the
    reward their weighted sum, and a raising function counted in reward/errors (every score it owed), named once
    in the log, never scored -1."""
    cfg = toy_config(grpo={"steps": 2}, rollout={"max_new_tokens": 4},
                     reward={"funcs": ["tests.reward_fns:echo_step", "tests.reward_fns:raises"], "weights": [2.0, 1.0]})
    with caplog.at_level("WARNING", logger="grpo.trainer"):
        train_grpo(cfg, tiny(tok), tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=WordReward())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    n = 4 * 8  # prompts x group size
    for step, r in enumerate(rows):
        assert (r["rewards/echo_step/mean"], r["rewards/echo_step/std"]) == (step, 0.0)
        assert r["rewards/raises/mean"] is None and r["rewards/raises/std"] is None
        assert r["reward"] == pytest.approx(r["rewards/reward_fn/mean"] + 2.0 * step)  # raises: left out
        assert (r["reward/errors"], r["reward/timeouts"]) == (n, 0)
    named = [rec.getMessage() for rec in caplog.records if "reward raises failed" in rec.getMessage()]
    assert len(named) == 1 and "RuntimeError: boom" in named[0]


@pytest.mark.filterwarnings("ignore:No artists with labels")  # 4-token responses: the <Parallel> panel is empty
def test_overlong_penalty_is_a_logged_part_of_the_reward(tok, tags, tmp_path):
    """reward.overlong_buffer over the whole 4-token limit: each response loses length/4, so the part's mean is
    -mean_length/4 (rewards/overlong/mean), and the step's reward is the built-in's plus it."""
    cfg = toy_config(grpo={"steps": 2}, rollout={"max_new_tokens": 4}, reward={"overlong_buffer": {"len": 4}})
    train_grpo(cfg, tiny(tok), tok, tags, toy_feed(tok), str(tmp_path), Dist(), reward_fn=WordReward())
    for r in (json.loads(line) for line in open(tmp_path / "metrics.jsonl")):
        assert r["rewards/overlong/mean"] == pytest.approx(-r["completions/mean_length"] / 4)
        assert r["reward"] == pytest.approx(r["rewards/reward_fn/mean"] + r["rewards/overlong/mean"])
        assert r["rewards/overlong/mean"] < 0


@pytest.mark.filterwarnings("ignore:No artists with labels")  # 4-token responses: the <Parallel> panel is empty
def test_lr_schedule_counts_updates(tok, tags, tmp_path):
    """6 steps of 1, 2 and 4 updates each, linear with 2 warm-up steps and a 0.2 floor: the schedule spans the whole
    run in updates whatever the split; each step logs the lr of its last update."""
    lrs = {}
    for mini_batch in (4, 2, 1):  # 1, 2 and 4 updates per step
        cfg = toy_config(rollout={"group_size": 2, "max_new_tokens": 4},
                         grpo={"steps": 6, "prompts_per_step": 4, "mini_batch_prompts": mini_batch},
                         optim={"lr": 1e-3, "warmup_steps": 2, "schedule": "linear", "min_lr_ratio": 0.2})
        out = tmp_path / str(mini_batch)
        train_grpo(cfg, tiny(tok), tok, tags, toy_feed(tok), str(out), Dist(), reward_fn=WordReward())
        lrs[4 // mini_batch] = [json.loads(line)["learning_rate"] for line in open(out / "metrics.jsonl")]
    # k updates a step, W = 2k warming up, T = 6k in all; step s ends with update u = (s+1)k - 1:
    # warm-up (u+1)/W = (s+1)/2; then 0.2 + 0.8 * (1 - (u - W)/(T - W)), e.g. k = 2, s = 2: u = 5, 1 - 1/8 -> 0.9
    expected = {1: [5e-4, 1e-3, 1e-3, 8e-4, 6e-4, 4e-4],  # the first update after warm-up at the full rate
                2: [5e-4, 1e-3, 9e-4, 7e-4, 5e-4, 3e-4],
                4: [5e-4, 1e-3, 8.5e-4, 6.5e-4, 4.5e-4, 2.5e-4]}  # the last update above the floor 2e-4
    for k, got in lrs.items():
        assert got == pytest.approx(expected[k], rel=1e-9), k


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_rows_without_loss_tokens_do_not_dilute_the_gradient(tok, agg_mode, pack):
    """3 rows + 3 rows whose loss mask was zeroed (filter_zero_std, mask_truncated) give the gradient of the
    3 rows alone: only rows with a loss token count as sequences, over the whole update."""
    model = eos_leaning(tok)
    batch = rollout_batch(tok, model)
    batch = replace(batch, old_logp=batch.sampler_logp - 0.05 * torch.arange(batch.input_ids.shape[1])[None] / 10)
    six = batch.select(range(6))
    six = replace(six, loss_mask=six.loss_mask * torch.tensor([1, 1, 1, 0, 0, 0])[:, None])
    cfg = toy_config(grpo={"agg_mode": agg_mode, "pack": pack})
    grads, rows_run = [], []
    for part in (batch.select(range(3)), six):
        m = copy.deepcopy(model).train()
        m.model.embed_tokens.register_forward_pre_hook(lambda _, args: rows_run.append(args[0].shape))
        accumulate_gradients(m, part, cfg, Dist())
        grads.append([p.grad for p in m.parameters()])
    # fp32 rounding of other padding widths: ~4e-7 here; diluting by 3/6 would halve the seq-mean gradients
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads))
    assert max(g.abs().max() for g in grads[0]) > 1e-4  # a real gradient
    assert rows_run[0] == rows_run[1]  # the three masked rows are never run
    assert rows_run[0][0] == 3 or pack


@pytest.mark.parametrize("pack", [False, True])
def test_row_logprobs_do_not_depend_on_left_padding(tok, pack):
    """The causal trainer forward counts positions from each row's first token, as the sampler does: a row's
    log-probs are the same alone and beside a 1000-token prompt (RoPE of shifted positions drifts in fp32:
    7e-5 here without position ids)."""
    model = tiny(tok)
    with torch.no_grad():  # sharp attention, so that position errors show in the log-probs
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(6.0)
            layer.self_attn.k_norm.weight.mul_(6.0)
    gen = torch.Generator().manual_seed(0)
    prompt, response, long_prompt = (torch.randint(5, 60, (n,), generator=gen).tolist() for n in (6, 30, 1000))
    cfg = toy_config(grpo={"micro_batch_tokens": 100_000, "pack": pack})  # one micro-batch
    alone = batch_logprobs(model, pack_rows([prompt], [response], tok.pad_token_id), cfg, Dist())
    beside = batch_logprobs(model, pack_rows([prompt, long_prompt], [response, response[:3]], tok.pad_token_id),
                            cfg, Dist())
    assert beside.shape[1] == 1000 + 30  # 994 columns of left padding before the short row
    torch.testing.assert_close(beside[0, 1000 - 6 + 1:], alone[0, 1:], atol=2e-6, rtol=0)
