"""grpo/rounds.py: DAPO's dynamic sampling refills the step's empty slots round by round (the slot plan and the
draw sizes by hand; end to end with a tiny Qwen3: the step reaches prompts_per_step groups with signal, or stops
when the rounds run out, and a resumed run is bitwise the straight one); batching.cat_batches re-pads rows of
different layouts without changing their log-probs."""
import json
import zlib
from dataclasses import replace

import pytest
import torch

import grpo.trainer
from grpo.advantage import nonzero_std_groups
from grpo.batching import cat_batches, pack_rows
from grpo.fsdp import Dist
from grpo.rounds import Round, sample_groups
from grpo.trainer import batch_logprobs, train_grpo
from rewards import BatchScores

from .test_trainer import Item, ListFeed, tiny, toy_config


class FlatOrLive:
    """A prompt whose gold answer is "flat" scores 0 on every response (a group without signal); any other scores
    the parity of each response's CRC-32, so its samples differ."""

    def __call__(self, response, gold, step):
        score = 0.0 if gold == "flat" else float(zlib.crc32(response.encode()) % 2)
        return score, {"accuracy": score}


def feed_of(tok, golds):
    """A cycling feed of one prompt per gold answer."""
    return ListFeed([Item(tok.encode(f"question {i}", add_special_tokens=False), gold) for i, gold in enumerate(golds)])


def stub_round(pattern):
    """A Round whose groups have signal where `pattern` says so (G = 2), for the slot plan alone."""
    rewards = torch.tensor([v for has in pattern for v in ((0.0, 1.0) if has else (0.5, 0.5))])
    scores = BatchScores(rewards.tolist(), [{}] * len(rewards), 0.0, 0)
    return Round(list(pattern), None, [""] * len(rewards), scores, rewards, (0.0, 0.0))


def test_slot_plan_by_hand():
    """Round 0: groups 1 and 3 have no signal. Round 1 draws 2 missing / (2 kept of 4 drawn) = 4 prompts; its
    groups 1 and 2 fill slots 1 and 3 in order, its group 3 is surplus. Then every slot is full: no round 2."""
    patterns = [[True, False, True, False], [False, True, True, True], [True] * 4]
    draws, calls = [], []

    def draw(n):
        draws.append(n)
        return list(range(n))

    def run_round(items, k):
        calls.append((len(items), k))
        return stub_round(patterns[k])

    rounds, slots = sample_groups(list(range(4)), draw, run_round, 2, refill=True, max_rounds=5, d=Dist())
    assert slots == [(0, 0), (1, 1), (0, 2), (1, 2)]
    assert draws == [4] and calls == [(4, 0), (4, 1)] and len(rounds) == 2
    # without refill: one round, the empty slots stay (filter_zero_std masks them)
    rounds, slots = sample_groups(list(range(4)), draw, run_round, 2, refill=False, max_rounds=5, d=Dist())
    assert slots == [(0, i) for i in range(4)] and len(rounds) == 1


def test_draws_shrink_with_the_share_of_groups_with_signal():
    """1 slot missing after 3 of 4 groups had signal: the next round draws ceil(1 * 4 / 3) = 2 prompts, not 4;
    a round whose groups all lack signal keeps the missing count (and the next draw grows again)."""
    patterns = [[True, True, True, False], [False, False], [True, True, True, True]]
    draws = []

    def draw(n):
        draws.append(n)
        return list(range(n))

    rounds, slots = sample_groups(list(range(4)), draw, lambda items, k: stub_round(patterns[k][:len(items)]), 2,
                                  refill=True, max_rounds=3, d=Dist())
    # round 2: 1 missing, 6 drawn, 3 kept: ceil(1 * 6 / 3) = 2
    assert draws == [2, 2] and slots == [(0, 0), (0, 1), (0, 2), (2, 0)]


def refill_config(**grpo):
    return toy_config(rollout={"group_size": 4, "max_new_tokens": 8},
                      grpo={"steps": 1, "prompts_per_step": 4, "mini_batch_prompts": 4, "filter_zero_std": True,
                            **grpo})


def metrics(path) -> list:
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


@pytest.mark.parametrize("rounds,kept", [(4, 4), (3, 3), (1, 1)])
def test_refill_reaches_the_asked_groups_or_runs_out_of_rounds(tok, tags, tmp_path, monkeypatch, rounds, kept):
    """One prompt in four has signal: every round of 4 prompts adds one group, so 4 rounds fill the 4 slots and
    fewer rounds leave some empty; the trained batch holds the live prompt's groups, the feed moved by exactly
    the prompts drawn."""
    feed = feed_of(tok, ["flat", "flat", "flat", "live"])
    built = []

    def recording(*args, **kw):
        built.append(grpo.trainer_slot_batch(*args, **kw))
        return built[-1]

    monkeypatch.setattr(grpo, "trainer_slot_batch", grpo.trainer.slot_batch, raising=False)
    monkeypatch.setattr(grpo.trainer, "slot_batch", recording)
    state = train_grpo(refill_config(max_sampling_rounds=rounds), tiny(tok), tok, tags, feed, str(tmp_path), Dist(),
                       reward_fn=FlatOrLive())
    batch, rewards = built[0]
    live = feed.items[3].prompt_ids
    groups = [batch.input_ids[i * 4, batch.response_start - len(live):batch.response_start].tolist() == live
              for i in range(4)]  # the first row of each group holds the live prompt
    # round 0: slots 0-2 flat (empty), slot 3 live; each later round fills the next empty slot, in order
    assert groups == [i == 3 or i < kept - 1 for i in range(4)]
    assert nonzero_std_groups(rewards, 4).tolist() == groups
    m = metrics(tmp_path)[0]
    assert (m["dynamic_sampling/rounds"], m["dynamic_sampling/kept_groups"]) == (rounds, kept)
    assert m["dynamic_sampling/sampled_groups"] == 4 * rounds and state.feed == {"pos": 4 * rounds}
    assert m["frac_reward_zero_std"] == pytest.approx(3 / 4)  # over every group sampled, all rounds
    assert m["no_update"] == 0 and m["loss_tokens"] > 0


def test_refill_resumes_bitwise(tok, tags, tmp_path):
    """3 steps straight == 2 steps, then a fresh process's worth of objects resuming for the third: the feed's
    position (moved by 4 + 2 prompts a step: three of four have signal, the refill draws 2) comes back exactly."""
    golds = ["live", "flat", "live", "live", "flat"]

    def run(out, steps):
        cfg = refill_config(steps=steps, max_sampling_rounds=3)
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, every=1, resume="auto"),
                      optim=replace(cfg.optim, lr=1e-2))
        model = tiny(tok)
        state = train_grpo(cfg, model, tok, tags, feed_of(tok, golds), str(out), Dist(), reward_fn=FlatOrLive())
        return model, state

    straight, state = run(tmp_path / "straight", 3)
    run(tmp_path / "cut", 2)
    resumed, resumed_state = run(tmp_path / "cut", 3)
    assert state.feed == resumed_state.feed
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith(("time/", "tokens_per_s"))} == \
               {k: v for k, v in y.items() if not k.startswith(("time/", "tokens_per_s"))}
    assert sum(r["dynamic_sampling/rounds"] for r in a) > 3  # the refill ran
    assert all(r["dynamic_sampling/kept_groups"] == 4 for r in a)


def test_cat_batches_keeps_each_rows_log_probs(tok):
    """Rows of two batches with other prompt and response lengths, joined: each row's tokens and masks line up at
    the new response start and its log-probs are those of its own batch."""
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 60, (n,), generator=gen).tolist()

    a = pack_rows([ids(3), ids(7)], [ids(5), ids(2)], tok.pad_token_id, advantages=torch.tensor([1.0, 2.0]))
    b = pack_rows([ids(10)], [ids(9)], tok.pad_token_id, advantages=torch.tensor([3.0]))
    joined = cat_batches([a, b], tok.pad_token_id)
    assert joined.response_start == 10 and joined.input_ids.shape == (3, 19)
    assert joined.advantages.tolist() == [1.0, 2.0, 3.0] and joined.prompt_len.tolist() == [3, 7, 10]
    assert (joined.input_ids[:2, :3] == tok.pad_token_id).all() and (joined.attention_mask[:2, 15:] == 0).all()
    torch.testing.assert_close(joined.input_ids[:2, 3:15], a.input_ids)
    torch.testing.assert_close(joined.loss_mask[2], b.loss_mask[0])
    model, cfg = tiny(tok), toy_config(grpo={"micro_batch_tokens": 100_000})
    together = batch_logprobs(model, joined, cfg, Dist()) * joined.loss_mask  # (3, 19), response tokens only
    torch.testing.assert_close(together[:2, 3:15], batch_logprobs(model, a, cfg, Dist()) * a.loss_mask, atol=2e-6,
                               rtol=0)
    torch.testing.assert_close(together[2:], batch_logprobs(model, b, cfg, Dist()) * b.loss_mask, atol=2e-6, rtol=0)
    assert (together != 0).sum() == 5 + 2 + 9
