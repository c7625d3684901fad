"""rollout/run.py + rows.py + cache.py: continuous batching under a KV budget. The pool never holds more rows
than the budget, waiting samples refill freed rows at once and in order, groups stay whole, and a sample is
the same whatever the budget (float64, token for token). On-policy under refill, tag soup included:
tests/test_sampler.py test_tag_soup_stays_on_policy[pool-of-5]."""
import pytest
import torch

from model import apply_structured_attention
from rollout import Sampler, kv_bytes_per_token

from .test_sampler import assert_on_policy, prompts_of, soup_model

PROMPTS = ("hello world 1 2 3", "solve 4 + 5", "7", "how many apples are left", "tom has 12 apples",
           "he buys 5", "gives away 3", "1 2")


def spread_model(tok, tags, structured=False, dtype=torch.float32):
    """Tags and EOS frequent enough that lengths spread and blocks open; optionally patched, in `dtype`."""
    m = soup_model(tok, tags, tag_bias=1.0).to(dtype)
    return apply_structured_attention(m, tags) if structured else m


def sampler(m, tok, tags, **kw):
    return Sampler(m, tags=tags, pad_id=tok.pad_token_id, newline_id=tok.convert_tokens_to_ids("\n"),
                   max_path_tokens=10, **kw)


def row_bytes(m, width):
    c = m.config
    return width * (kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 4) + 1)


def test_budget_holds_with_many_more_samples_than_rows(tok, tags):
    m = spread_model(tok, tags)
    prompts = prompts_of(tok, *PROMPTS)
    M = 40
    width = max(map(len, prompts)) - 1 + M
    budget = 8.5 * row_bytes(m, width)  # room for 8 rows, not 9
    s = sampler(m, tok, tags, kv_cache_gb=budget / 2**30)
    r = s.generate(prompts, n=8, max_new_tokens=M, stop_ids=[tok.eos_token_id], seed=0)  # 64 samples = 8x the rows
    assert r.stats["pool_rows"] == 8 and r.stats["peak_rows"] == 8
    assert r.stats["kv_bytes"] <= budget
    assert r.response_ids.shape[0] == 64 and all(reason in ("stop", "length") for reason in r.finish_reason)
    assert_on_policy(m, r)


def test_refill_in_sample_order_keeps_the_pool_full(tok, tags):
    m = spread_model(tok, tags)
    batch_rows = []
    m.model.register_forward_pre_hook(lambda mod, a, kw: batch_rows.append(kw["input_ids"].shape), with_kwargs=True)
    prompts = prompts_of(tok, *PROMPTS)
    r = sampler(m, tok, tags, max_rows=6).generate(prompts, n=4, max_new_tokens=30, stop_ids=[tok.eos_token_id], seed=1)
    first = r.stats["first_step"]
    assert list(first) == sorted(first) and first[0] == 0  # samples start in their order
    decode = [b for b, t in batch_rows if t == 1]  # one-token steps (prefills have several tokens)
    assert len(decode) == r.stats["steps"]
    # until the last sample has started, every step computes all 6 rows: a freed row is refilled at once
    assert all(b == 6 for b in decode[: first[-1]])
    assert max(decode) == 6
    # every row-step writes a response token, except for a seed row waiting for rows for its copies: at
    # most one group is partly admitted at a time, so at most one idle row per step
    idle = sum(decode) - int(r.response_mask.sum())
    assert 0 < idle <= len(decode)


def test_groups_stay_whole_and_group_contiguous(tok, tags):
    m = spread_model(tok, tags)
    prompts = prompts_of(tok, *PROMPTS[:5])
    r = sampler(m, tok, tags, max_rows=3).generate(prompts, n=4, max_new_tokens=20, stop_ids=[tok.eos_token_id])
    for i, p in enumerate(prompts):
        for j in range(4):
            row = r.prompt_ids[i * 4 + j][r.prompt_mask[i * 4 + j].bool()]
            assert row.tolist() == p


@pytest.mark.parametrize("structured", [False, True])
def test_samples_do_not_depend_on_the_budget(tok, tags, structured):
    """float64: a pool of 8 rows (many waves, blocks waiting for rows) and one with every row give the same
    tokens; log-probs agree to rounding."""
    m = spread_model(tok, tags, structured, torch.float64)
    prompts = prompts_of(tok, *PROMPTS)
    kw = dict(n=6, max_new_tokens=40, stop_ids=[tok.eos_token_id], structured=structured, seed=3)
    full = sampler(m, tok, tags).generate(prompts, **kw)
    assert full.stats["pool_rows"] == 48 * (2 if structured else 1)
    tiny = sampler(m, tok, tags, max_rows=5).generate(prompts, **kw)
    assert torch.equal(tiny.response_ids, full.response_ids)
    small = sampler(m, tok, tags, max_rows=8).generate(prompts, **kw)
    assert small.stats["pool_rows"] == 8
    assert torch.equal(small.response_ids, full.response_ids)
    assert torch.equal(small.response_mask, full.response_mask) and small.finish_reason == full.finish_reason
    assert torch.equal(small.position_ids, full.position_ids) and torch.equal(small.forced_mask, full.forced_mask)
    assert (small.logprobs - full.logprobs).abs().max() < 1e-6  # float32 record of float64 log-probs
    if structured:
        assert full.stats["blocks"] >= 5 and small.stats["blocks"] == full.stats["blocks"]
        assert small.stats["stalled_blocks"] > 0 and full.stats["stalled_blocks"] == 0


def test_a_budget_too_small_is_an_error_before_sampling(tok, tags):
    m = spread_model(tok, tags, structured=True)
    calls = []
    m.model.register_forward_pre_hook(lambda *a: calls.append(1))
    prompts = prompts_of(tok, "hello world")
    with pytest.raises(ValueError, match="rollout.kv_cache_gb"):
        sampler(m, tok, tags, max_rows=1).generate(prompts, n=2, max_new_tokens=8)  # a seed and a sample
    with pytest.raises(ValueError, match="paths of a block"):
        sampler(m, tok, tags, max_rows=2).generate(prompts, n=2, max_new_tokens=8, structured=True)
    with pytest.raises(ValueError, match=r"holds 0 cache rows"):
        sampler(m, tok, tags, kv_cache_gb=1e-9).generate(prompts, n=1, max_new_tokens=8)
    assert not calls  # refused before any forward
    r = sampler(m, tok, tags, max_rows=3).generate(prompts, n=2, max_new_tokens=8, structured=True)  # just enough
    assert r.stats["pool_rows"] == 3


def test_blocks_opened_at_the_length_limit(tok, tags):
    """Short limits put <Parallel> (and its forced <Path>) on the last tokens of a response: the row ends
    there and never branches, in a full pool and in one that makes blocks wait."""
    m = spread_model(tok, tags, structured=True)
    with torch.no_grad():
        m.lm_head.bias[tags.parallel_open] = 3.0
    prompts = prompts_of(tok, *PROMPTS[:4])
    for rows in (None, 4):
        for M in range(2, 9):
            r = sampler(m, tok, tags, max_rows=rows).generate(prompts, n=3, max_new_tokens=M,
                                                             stop_ids=[tok.eos_token_id], structured=True, seed=M)
            assert int(r.response_mask.sum(1).max()) <= M
            assert_on_policy(m, r, tags)


def test_should_stop_abandons_the_call_between_steps(tok, tags):
    """A stop request (Ctrl-C under torchrun) abandons the rollout between two decode steps; the model is left
    as it was (training mode, attention implementation) and the sampler samples again afterwards."""
    from rollout import SamplingAborted
    m = spread_model(tok, tags).train()
    asked = []
    s = sampler(m, tok, tags)
    with pytest.raises(SamplingAborted):
        s.generate(prompts_of(tok, *PROMPTS[:2]), n=2, max_new_tokens=30, should_stop=lambda: len(asked) > 3 or
                   asked.append(1))
    assert len(asked) == 4 and m.training and m.config._attn_implementation == "sdpa"
    assert s.generate(prompts_of(tok, "7"), n=2, max_new_tokens=4).response_ids.shape[0] == 2


def test_slot_use_is_the_share_of_row_slots_holding_tokens(tok, tags):
    """stats["slot_use"]: the slots the rows in use held, over every decode step, / their width; for one prompt
    of length L decoded for M steps by n rows: the mean of (L - 1 + t + 1) / (L - 1 + M) over t < M."""
    m = spread_model(tok, tags)
    prompt = prompts_of(tok, "hello world 1 2 3")
    L, M = len(prompt[0]), 12
    r = sampler(m, tok, tags).generate(prompt, n=3, max_new_tokens=M, seed=0)  # no stop id: every row runs M steps
    want = sum((L + t) / (L - 1 + M) for t in range(M)) / M
    assert r.stats["slot_use"] == pytest.approx(want)
