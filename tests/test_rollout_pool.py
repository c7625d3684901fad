"""rollout/run.py + cache.py + decode.py: continuous batching over a paged KV cache under a budget. The pool never
holds more bytes than the budget, a group's prompt is stored once, freed rows are refilled at once and in order,
groups stay whole, a pool that runs dry preempts and never deadlocks, every page comes back exactly once, a decode
step reads the device once, and a sample is the same whatever the budget, the page size or the decode mode
(float64, token for token). On-policy under preemption, tag soup included: test_tag_soup_under_a_dry_pool."""
import pytest
import torch

from model import apply_structured_attention
from rollout import Sampler, kv_bytes_per_token, pages_for, sample_pages
from rollout import cache as cache_mod

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


def page_budget_gb(m, pages: int, page_size: int = 16, rows: int = 0, width: int = 0, dtype_bytes: int = 4) -> float:
    """kv_cache_gb that buys `pages` pages (plus the scratch page) and the page tables of `rows` x `width`."""
    c = m.config
    per_page = page_size * kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype_bytes) + 4
    return ((pages + 1) * per_page + cache_mod.table_bytes(rows, width) + per_page // 2) / 2**30


def test_budget_holds_and_a_dry_pool_preempts_without_deadlock(tok, tags):
    """64 samples of up to 40 tokens in a pool of pages for ~4 samples at their longest: the pool runs dry
    mid-sample again and again, the newest sample goes back and starts over; everything finishes, on policy, and
    no more bytes than the budget are ever allocated."""
    m = spread_model(tok, tags)
    prompts = prompts_of(tok, *PROMPTS)
    M, rows = 40, 16
    width = sample_pages(max(map(len, prompts)), M, 16)
    budget = page_budget_gb(m, 4 * width, rows=rows, width=width)
    r = sampler(m, tok, tags, kv_cache_gb=budget, max_rows=rows).generate(
        prompts, n=8, max_new_tokens=M, stop_ids=[tok.eos_token_id], seed=0)
    assert r.stats["kv_bytes"] <= budget * 2**30
    assert r.stats["pages"] == 4 * width and r.stats["peak_pages"] <= r.stats["pages"]
    assert r.stats["preempted"] > 0 and r.stats["recomputed_tokens"] > 0
    assert r.response_ids.shape[0] == 64 and all(reason in ("stop", "length") for reason in r.finish_reason)
    assert_on_policy(m, r)


def test_a_group_prompt_is_stored_once(tok, tags):
    """A 40-token prompt and 8 samples: its pages are held once by the group, not per sample (page size 8: 5
    pages), so the pool's peak is the prompt's pages plus each sample's own."""
    m = spread_model(tok, tags)
    prompt = [5 + i % 30 for i in range(40)]
    r = sampler(m, tok, tags, page_size=8).generate([prompt], n=8, max_new_tokens=7, seed=0)  # no stop: 7 tokens
    # each sample feeds 6 tokens (its first came from the prefill): one page of 8 each
    assert r.stats["peak_pages"] == pages_for(40, 8) + 8 * 1


class CheckedPages(cache_mod.PageTables):
    """PageTables that fail on a page freed twice or released while no table lists it; `last` is the latest."""
    last = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        CheckedPages.last = self

    def release(self, pages):
        assert all(self.refs[p] > 0 for p in pages), "a page released that no table lists"
        super().release(pages)
        assert len(set(self.free)) == len(self.free), "a page freed twice"


@pytest.mark.parametrize("structured", [False, True])
def test_every_page_comes_back_exactly_once(tok, tags, structured, monkeypatch):
    """Shared prompt pages, shared block prefixes, paths joined into summaries, preemptions: at the end every page
    is free, once, and listed by no table."""
    import rollout.sampler as sampler_mod
    monkeypatch.setattr(sampler_mod, "PageTables", CheckedPages)
    m = spread_model(tok, tags, structured)
    prompts = prompts_of(tok, *PROMPTS)
    width = sample_pages(max(map(len, prompts)), 30, 4, 4 if structured else 0)
    r = sampler(m, tok, tags, page_size=4, kv_cache_gb=page_budget_gb(m, 3 * width, 4, rows=12, width=width),
                max_rows=12).generate(prompts, n=4, max_new_tokens=30, stop_ids=[tok.eos_token_id],
                                      structured=structured, seed=2)
    pages = CheckedPages.last
    assert r.stats["preempted"] > 0 and (r.stats["blocks"] > 0 or not structured)
    assert sorted(pages.free) == list(range(pages.total)) and not any(pages.refs) and pages.tokens == 0


def test_refill_in_sample_order_keeps_the_rows_full(tok, tags):
    m = spread_model(tok, tags)
    batch_rows = []
    m.model.register_forward_pre_hook(lambda mod, a, kw: batch_rows.append(kw["input_ids"].shape), with_kwargs=True)
    prompts = prompts_of(tok, *PROMPTS)
    r = sampler(m, tok, tags, max_rows=6).generate(prompts, n=4, max_new_tokens=30, stop_ids=[tok.eos_token_id], seed=1)
    first = r.stats["first_step"]
    assert list(first) == sorted(first) and first[0] == 0  # samples start in their order
    decode = [b for b, t in batch_rows if t == 1]  # one-token steps (prefills have several tokens)
    assert len(decode) == r.stats["steps"]
    # until the last sample has started, every step carries all 6 rows: a freed row is refilled at once
    assert all(b == 6 for b in decode[: first[-1]]) and max(decode) == 6
    # no row is ever fed for nothing: one row-step per response token after each sample's first
    assert sum(decode) == int(r.response_mask.sum()) - 32


def test_groups_stay_whole_and_group_contiguous(tok, tags):
    m = spread_model(tok, tags)
    prompts = prompts_of(tok, *PROMPTS[:5])
    r = sampler(m, tok, tags, max_rows=3).generate(prompts, n=4, max_new_tokens=20, stop_ids=[tok.eos_token_id])
    for i, p in enumerate(prompts):
        for j in range(4):
            row = r.prompt_ids[i * 4 + j][r.prompt_mask[i * 4 + j].bool()]
            assert row.tolist() == p


def same_samples(a, b):
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.finish_reason == b.finish_reason
    assert torch.equal(a.position_ids, b.position_ids) and torch.equal(a.forced_mask, b.forced_mask)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-6  # float32 record of float64 log-probs


@pytest.mark.parametrize("structured", [False, True])
def test_samples_do_not_depend_on_budget_page_size_or_decode_mode(tok, tags, structured, monkeypatch):
    """float64: every row at once in a roomy pool, a dry pool that preempts, a row cap that makes blocks wait for
    rows, pages of 1, 3 and 16 tokens, graph-shaped (bucketed, padded) decode steps, attention gathered one row at
    a time: the same tokens."""
    m = spread_model(tok, tags, structured, torch.float64)
    prompts = prompts_of(tok, *PROMPTS)
    kw = dict(n=6, max_new_tokens=40, stop_ids=[tok.eos_token_id], structured=structured, seed=3)
    full = sampler(m, tok, tags, max_rows=None, page_size=1).generate(prompts, **kw)
    assert full.stats["max_rows"] == 48 * (2 if structured else 1) and full.stats["preempted"] == 0
    if structured:
        assert full.stats["blocks"] >= 5
    width = sample_pages(max(map(len, prompts)), 40, 16, 4 if structured else 0)
    dry = sampler(m, tok, tags, max_rows=8, kv_cache_gb=page_budget_gb(m, 2 * width, rows=8, width=width,
                                                                        dtype_bytes=8))
    r = dry.generate(prompts, **kw)
    assert r.stats["preempted"] > 0
    same_samples(r, full)
    same_samples(sampler(m, tok, tags, max_rows=5, cuda_graphs="buckets", page_size=3).generate(prompts, **kw), full)
    import rollout.attention
    monkeypatch.setattr(rollout.attention, "ATTENTION_CHUNK_BYTES", 1)  # one row per gather
    same_samples(sampler(m, tok, tags).generate(prompts, **kw), full)


@pytest.mark.parametrize("structured", [False, True])
def test_pool_memory_is_cleared_as_pages_are_first_used(tok, tags, structured, monkeypatch):
    """The pool is allocated uninitialised: memory full of NaN (the worst it can hold) changes no token and no
    log-prob, in a roomy pool and in a dry one that reuses preempted pages; only the pages ever handed out are
    cleared, not the whole budget."""
    m = spread_model(tok, tags, structured, torch.float64)
    prompts = prompts_of(tok, *PROMPTS)
    kw = dict(n=6, max_new_tokens=40, stop_ids=[tok.eos_token_id], structured=structured, seed=3)
    reference = sampler(m, tok, tags).generate(prompts, **kw)
    pools = []

    def nan_pool(shape, dtype, device):
        pools.append(torch.full(shape, float("nan"), dtype=dtype, device=device))
        return pools[-1]

    monkeypatch.setattr(cache_mod, "uninitialized", nan_pool)
    roomy = sampler(m, tok, tags).generate(prompts, **kw)
    same_samples(roomy, reference)
    assert torch.equal(roomy.logprobs, reference.logprobs)
    nan_pages = pools[0].isnan().flatten(1).all(1)  # layer 0's K: pages never handed out stay as allocated
    cleared = int((~nan_pages).sum()) - 1  # the scratch page is cleared at once
    assert roomy.stats["peak_pages"] <= cleared < roomy.stats["pages"], (cleared, roomy.stats["pages"])
    width = sample_pages(max(map(len, prompts)), 40, 16, 4 if structured else 0)
    dry = sampler(m, tok, tags, max_rows=8, kv_cache_gb=page_budget_gb(m, 2 * width, rows=8, width=width,
                                                                        dtype_bytes=8)).generate(prompts, **kw)
    assert dry.stats["preempted"] > 0
    same_samples(dry, reference)
    assert torch.equal(dry.logprobs, reference.logprobs)


def test_tag_soup_under_a_dry_pool(tok, tags):
    """Structured tag soup (blocks open and cut, paths forced closed, malformed tags) in a pool so small that it
    preempts: the sampler's log-probs and positions still equal the trainer's forward over the final sequences."""
    m = spread_model(tok, tags, structured=True)
    prompts = prompts_of(tok, *PROMPTS[:4])
    width = sample_pages(max(map(len, prompts)), 36, 8, 4)
    s = sampler(m, tok, tags, page_size=8, max_rows=8, kv_cache_gb=page_budget_gb(m, 2 * width, 8, 8, width))
    preempted = blocks = 0
    for seed in range(4):
        r = s.generate(prompts, n=4, max_new_tokens=36, stop_ids=[tok.eos_token_id], structured=True, seed=seed)
        assert_on_policy(m, r, tags)
        preempted, blocks = preempted + r.stats["preempted"], blocks + r.stats["blocks"]
    assert preempted > 0 and blocks > 0


def test_a_budget_too_small_is_an_error_before_sampling(tok, tags):
    m = spread_model(tok, tags, structured=True)
    calls = []
    m.model.register_forward_pre_hook(lambda *a: calls.append(1))
    prompts = prompts_of(tok, "hello world")
    with pytest.raises(ValueError, match=r"buys 0 pages of 16 tokens.*raise rollout.kv_cache_gb"):
        sampler(m, tok, tags, kv_cache_gb=1e-9).generate(prompts, n=1, max_new_tokens=8)
    need = sample_pages(len(prompts[0]), 40, 16, 4)
    with pytest.raises(ValueError, match=rf"needs {need} \(.*4 blocks of 2 paths\)"):
        sampler(m, tok, tags, kv_cache_gb=page_budget_gb(m, need - 1, rows=4, width=need)).generate(
            prompts, n=2, max_new_tokens=40, structured=True)
    with pytest.raises(ValueError, match="max_rows >= num_paths"):
        sampler(m, tok, tags, max_rows=1)
    assert not calls  # refused before any forward
    r = sampler(m, tok, tags, kv_cache_gb=page_budget_gb(m, need, rows=4, width=need)).generate(
        prompts, n=2, max_new_tokens=40, structured=True)  # just enough
    assert r.stats["pages"] == need


def test_blocks_opened_at_the_length_limit(tok, tags):
    """Short limits put <Parallel> (and its forced <Path>) on the last tokens of a response: the row ends
    there and never branches, with rows to spare and with blocks waiting for rows."""
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


def test_slot_use_is_the_share_of_page_slots_holding_tokens(tok, tags):
    """stats["slot_use"]: tokens held / slots of the pages in use, summed over decode steps. One prompt of L tokens
    (its pages shared) and n samples decoding M - 1 steps (their first token comes from the prefill), pages of 4:
    at step t the pool holds L + n (t + 1) tokens in ceil(L / 4) + n ceil((t + 1) / 4) pages."""
    m = spread_model(tok, tags)
    prompt = prompts_of(tok, "hello world 1 2 3")
    L, M, n = len(prompt[0]), 12, 3
    r = sampler(m, tok, tags, page_size=4).generate(prompt, n=n, max_new_tokens=M, seed=0)  # no stop id: M tokens
    tokens = sum(L + n * (t + 1) for t in range(M - 1))
    slots = sum(4 * (pages_for(L, 4) + n * pages_for(t + 1, 4)) for t in range(M - 1))
    assert r.stats["steps"] == M - 1 and r.stats["slot_use"] == pytest.approx(tokens / slots)


def test_a_decode_step_reads_the_device_once(tok, tags, monkeypatch):
    """Host decisions never wait on the device: one read per step (the sampled tokens and log-probs), nothing
    else: no .item(), no int(tensor), no nonzero/masked_select (data-dependent shapes), no .tolist()/.cpu() besides.
    Counted at the dispatcher (reads of a tensor's value) and at the Python methods that copy to the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import rollout.run as run_mod

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "equal", "item"}
    reads = []

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__.split(".")[0].lstrip("_") in {s.lstrip("_") for s in syncing}:
                reads.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for name in ("tolist", "cpu", "numpy", "item"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _m=method, _n=name, **kw:
                            (reads.append(_n), _m(self, *a, **kw))[1])
    steps = []
    advance = run_mod.Run.advance
    monkeypatch.setattr(run_mod.Run, "advance", lambda self, *a: (steps.append(1), advance(self, *a))[1])
    m = spread_model(tok, tags, structured=True)
    s = sampler(m, tok, tags, max_rows=6)
    prompts = prompts_of(tok, *PROMPTS[:4])
    with CountReads():
        r = s.generate(prompts, n=3, max_new_tokens=24, stop_ids=[tok.eos_token_id], structured=True, seed=0)
    monkeypatch.undo()
    assert r.stats["steps"] > 20 and r.stats["blocks"] > 0
    assert reads.count("tolist") == len(steps) and len(reads) == len(steps), [x for x in reads if x != "tolist"]
