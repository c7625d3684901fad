"""rollout/sampler.py: greedy equals generate, the on-policy guarantee (sampler log-probs equal the
trainer's forward), structured rules, and the plain sampling options."""
import pytest
import torch

from model import apply_structured_attention, build_model, build_structure_batch
from rollout import Sampler

from .conftest import TINY


def soup_model(tok, tags, tag_bias=2.0, seed=0):
    """A tiny Qwen3 whose head (with a bias) makes the six tags and EOS frequent."""
    cfg = dict(TINY, vocab_size=len(tok), tie_word_embeddings=False, initializer_range=0.1)
    m = build_model(cfg, seed=seed).eval()
    head = torch.nn.Linear(m.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[list(tags.as_tuple()) + [tok.eos_token_id]] = tag_bias
    m.lm_head = head
    return m


def prompts_of(tok, *texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def trainer_logprobs(model, rollout, structured):
    """Log-prob of every response token under a fresh full forward over the final sequences."""
    ids, mask, start = rollout.sequences()
    kw = {"response_start": start} if structured else {}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (N, L-1)
    return lp[:, start - 1:]  # (N, M) aligned with the response


def assert_on_policy(model, r, tags=None):
    structured = tags is not None
    lp = trainer_logprobs(model, r, structured)
    sampled = r.response_mask.bool() & ~r.forced_mask.bool()
    assert sampled.any()
    assert (lp - r.logprobs)[sampled].abs().max() < 1e-4
    if structured:
        ids, mask, start = r.sequences()
        s = build_structure_batch(ids, tags, mask, response_start=start)
        assert torch.equal(s.position_ids[:, start:] * r.response_mask, r.position_ids)


@pytest.fixture()
def varied_model(tiny_config):
    """Random init with larger weights, so greedy outputs vary instead of repeating one token."""
    return build_model(dict(tiny_config, initializer_range=0.3), seed=3).eval()


def test_greedy_equals_generate(varied_model, tok):
    prompts = prompts_of(tok, "hello world 1 2 3", "solve 4 + 5", "7")
    s = Sampler(varied_model, pad_id=tok.pad_token_id)
    r = s.generate(prompts, n=1, max_new_tokens=24, temperature=0, stop_ids=[tok.eos_token_id])
    for i, p in enumerate(prompts):
        ref = varied_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)[0, len(p):]
        got = r.response_ids[i][r.response_mask[i].bool()]
        assert got.tolist() == ref[: len(got)].tolist()
        assert len(set(got.tolist())) > 3  # a real sequence, not one repeated token


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 20), (0.7, 1.0, 1)])
def test_causal_logprobs_equal_trainer_forward(tok, tags, temperature, top_p, top_k):
    m = soup_model(tok, tags, tag_bias=0.0)
    s = Sampler(m, pad_id=tok.pad_token_id)
    prompts = prompts_of(tok, "hello world", "how many apples are left", "1")
    r = s.generate(prompts, n=4, max_new_tokens=40, temperature=temperature, top_p=top_p, top_k=top_k,
                   stop_ids=[tok.eos_token_id], seed=1)
    lp = trainer_logprobs(m, r, False)
    # the sampler reports log-probs of the full tempered distribution (what the trainer computes)
    ids, mask, start = r.sequences()
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits.float() / temperature
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0][:, start - 1:]
    sampled = r.response_mask.bool()
    assert (ref - r.logprobs)[sampled].abs().max() < 1e-4
    if temperature == 1.0:
        assert (lp - r.logprobs)[sampled].abs().max() < 1e-4


@pytest.mark.parametrize("max_rows", [None, 5], ids=["all-rows", "pool-of-5"])
@pytest.mark.parametrize("structured", [False, True])
def test_tag_soup_stays_on_policy(tok, tags, structured, max_rows):
    """Tags and EOS are frequent; whatever the model writes, sampler and trainer agree, with every row at once
    and under a pool of 5 rows that refills (and makes blocks wait for rows)."""
    m = soup_model(tok, tags)
    if structured:
        apply_structured_attention(m, tags)
    s = Sampler(m, tags=tags, pad_id=tok.pad_token_id, newline_id=tok.convert_tokens_to_ids("\n"),
                max_path_tokens=10, max_parallel_blocks=1, max_rows=max_rows)
    prompts = prompts_of(tok, "hello world 1 2 3", "solve 4 + 5", "7")
    seen = {"stop": 0, "length": 0, "block_limit": 0, "blocks": 0}
    for seed in range(12):
        r = s.generate(prompts, n=4, max_new_tokens=36, stop_ids=[tok.eos_token_id], structured=structured, seed=seed)
        assert r.stats["peak_rows"] <= (max_rows or 24)
        assert_on_policy(m, r, tags if structured else None)
        for reason in r.finish_reason:
            seen[reason] += 1
        seen["blocks"] += r.stats["blocks"]
    assert seen["stop"] and seen["length"]
    if structured:
        assert seen["blocks"] >= 10 and seen["block_limit"] > 0


def structured_sampler(tok, tags, **kw):
    m = apply_structured_attention(soup_model(tok, tags), tags)
    return m, Sampler(m, tags=tags, pad_id=tok.pad_token_id, newline_id=tok.convert_tokens_to_ids("\n"), **kw)


def blocks_of(r, i, tags):
    """Response ids of sample i and the indices of its blocks' <Parallel> (a <Parallel> written after a
    malformed tag is plain text: no forced <Path> follows it)."""
    ids = r.response_ids[i][r.response_mask[i].bool()].tolist()
    forced = r.forced_mask[i].tolist()
    starts = [k for k, t in enumerate(ids) if t == tags.parallel_open and (k + 1 == len(ids) or forced[k + 1])]
    return ids, starts


def test_structured_rules_forced_tokens_positions_and_limits(tok, tags):
    nl = tok.convert_tokens_to_ids("\n")
    m, s = structured_sampler(tok, tags, max_path_tokens=6, max_parallel_blocks=2)
    checked = limit_hits = cutoffs = 0
    for seed in range(20):
        r = s.generate(prompts_of(tok, "hello world", "solve 4 + 5"), n=4, max_new_tokens=40 if seed % 2 else 12,
                       stop_ids=[tok.eos_token_id], structured=True, seed=seed)
        for i in range(r.response_ids.shape[0]):
            ids, starts = blocks_of(r, i, tags)
            forced = r.forced_mask[i][: len(ids)].tolist()
            pos = r.position_ids[i][: len(ids)].tolist()
            assert len([b for b in starts if b + 1 < len(ids)]) <= 2  # max_parallel_blocks
            for b in starts:
                if b + 1 == len(ids):  # the response ended on <Parallel>: a third block, or the length limit
                    assert r.finish_reason[i] in ("block_limit", "length")
                    continue
                assert ids[b + 1] == tags.path_open and forced[b + 1]
                # every path starts at the position right after <Parallel>
                path_starts = [k for k in range(b + 1, len(ids)) if ids[k] == tags.path_open and forced[k]]
                if tags.parallel_close in ids[b:]:
                    close = ids.index(tags.parallel_close, b)
                    path_starts = [k for k in path_starts if k < close]
                    assert len(path_starts) == 2 and forced[close]
                    assert ids[close + 1: close + 3] == [nl, tags.summary_open] or close + 3 > len(ids)
                    ends = [k - 1 for k in path_starts[1:]] + [close - 1]
                    assert all(ids[e] == tags.path_close for e in ends)
                    assert pos[close] == 1 + max(pos[e] for e in ends)
                    for a, e in zip(path_starts, ends):
                        assert e - a + 1 <= 6  # the path length limit, tags included
                        if e - a + 1 == 6 and forced[e]:
                            limit_hits += 1
                    checked += 1
                else:
                    cutoffs += 1
                    assert r.finish_reason[i] == "length"
                assert all(pos[k] == pos[b] + 1 for k in path_starts)
    assert checked >= 5 and limit_hits > 0 and cutoffs > 0


def test_paths_never_see_each_other(tok, tags):
    """Change path 1's tokens in a sampled block: path 2's trainer log-probs do not move."""
    m, s = structured_sampler(tok, tags, max_path_tokens=8)
    for seed in range(30):
        r = s.generate(prompts_of(tok, "hello world"), n=4, max_new_tokens=40, stop_ids=[tok.eos_token_id],
                       structured=True, seed=seed)
        for i in range(4):
            ids, starts = blocks_of(r, i, tags)
            if not starts or tags.parallel_close not in ids[starts[0]:]:
                continue
            b = starts[0]
            second = ids.index(tags.path_open, ids.index(tags.path_close, b))
            inner = [k for k in range(b + 2, second - 1) if ids[k] not in tags.as_tuple()]
            if not inner or second + 2 >= len(ids):
                continue
            before = trainer_logprobs(m, r, True)[i]
            ids_t = r.response_ids.clone()
            ids_t[i, inner] = (ids_t[i, inner] + 1) % 40 + 50  # other plain words
            changed = type(r)(**{**r.__dict__, "response_ids": ids_t})
            after = trainer_logprobs(m, changed, True)[i]
            close = ids.index(tags.parallel_close, b)
            assert (after[second + 1: close] - before[second + 1: close]).abs().max() < 1e-5
            assert (after[close + 1:] - before[close + 1:]).abs().max() > 1e-4  # the close does see path 1
            return
    pytest.fail("no block with a non-empty first path was sampled")


def test_options_and_determinism(varied_model, tok):
    s = Sampler(varied_model, pad_id=tok.pad_token_id)
    prompts = prompts_of(tok, "hello", "7")
    a = s.generate(prompts, n=3, max_new_tokens=16, seed=5)
    b = s.generate(prompts, n=3, max_new_tokens=16, seed=5)
    c = s.generate(prompts, n=3, max_new_tokens=16, seed=6)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    greedy = s.generate(prompts, n=2, max_new_tokens=16, temperature=0)
    top1 = s.generate(prompts, n=2, max_new_tokens=16, top_k=1, seed=9)
    assert torch.equal(greedy.response_ids, top1.response_ids)
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1])  # greedy samples of one prompt agree
    full = s.generate(prompts, n=2, max_new_tokens=16, top_p=1.0, seed=4)
    plain = s.generate(prompts, n=2, max_new_tokens=16, seed=4)
    assert torch.equal(full.response_ids, plain.response_ids)
    one = s.generate([[5]], n=1, max_new_tokens=5, seed=0)  # a one-token prompt, n = 1
    assert one.response_ids.shape == (1, 5) and one.finish_reason == ("length",)


def test_stop_tokens_end_responses_and_are_in_the_mask(varied_model, tok):
    s = Sampler(varied_model, pad_id=tok.pad_token_id)
    free = s.generate(prompts_of(tok, "hello world"), n=4, max_new_tokens=20, seed=2)
    stop = int(free.response_ids[0, 3])  # a token the model does write
    r = s.generate(prompts_of(tok, "hello world"), n=4, max_new_tokens=20, seed=2, stop_ids=[stop])
    assert torch.equal(r.response_ids[0, :4], free.response_ids[0, :4])
    L = int(r.response_mask[0].sum())
    assert L <= 4 and int(r.response_ids[0, L - 1]) == stop and r.finish_reason[0] == "stop"
    for i in range(4):  # the mask runs through the stop token and no further, whatever the pad id
        L = int(r.response_mask[i].sum())
        assert r.response_mask[i, :L].all() and not r.response_mask[i, L:].any()


def test_errors(varied_model, tok, tags):
    s = Sampler(varied_model, pad_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        s.generate([[5] * 2040], max_new_tokens=20)
    with pytest.raises(ValueError, match="at least one token"):
        s.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="tag ids"):
        s.generate([[5]], max_new_tokens=4, structured=True)
    with pytest.raises(ValueError, match="top_p"):
        s.generate([[5]], max_new_tokens=4, top_p=0)


def test_prefill_once_per_prompt_and_finished_rows_cost_nothing(tok, tags):
    m = soup_model(tok, tags, tag_bias=-20.0)
    with torch.no_grad():
        m.lm_head.bias[tok.eos_token_id] = 1.0  # lengths spread widely
    rows_seen = []
    m.model.register_forward_pre_hook(lambda mod, a, kw: rows_seen.append(tuple(kw["input_ids"].shape)),
                                      with_kwargs=True)
    s = Sampler(m, pad_id=tok.pad_token_id)
    prompts = prompts_of(tok, "hello world", "solve 4 + 5 now")
    r = s.generate(prompts, n=8, max_new_tokens=60, stop_ids=[tok.eos_token_id], seed=0)
    # one prefill of the 2 whole prompts, not 16; its last logits give each sample its first token
    assert rows_seen[0] == (2, max(map(len, prompts)))
    assert all(t == 1 for _, t in rows_seen[1:]) and r.stats["prefills"] == 1
    decode_rows = sum(b for b, t in rows_seen[1:])
    lengths = r.response_mask.sum(1)
    assert lengths.max() - lengths.min() > 20
    assert decode_rows == int(lengths.sum()) - 16  # one row-step per response token after the first


def test_sampling_a_checkpointed_model_in_training_mode(tiny_model, tok):
    """transformers 5.17 drops the cache of a checkpointed layer in training mode even under no_grad: the
    sampler runs in eval mode and restores the model's own mode afterwards."""
    from grpo.logprobs import token_logprobs
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()
    r = Sampler(tiny_model, pad_id=tok.pad_token_id).generate(prompts_of(tok, "hello world"), n=2, max_new_tokens=6)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    ids, mask, start = r.sequences()
    with torch.no_grad():
        lp = token_logprobs(tiny_model.eval(), ids, mask)[:, start:]
    assert (lp - r.logprobs)[r.response_mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("temperature,top_k", [(0.7, 1), (0.0, 0), (1.3, 1)])
def test_greedy_choices_score_alike_in_sampler_and_trainer(tok, tags, temperature, top_k):
    """top_k=1 at any temperature and temperature 0 pick the argmax; the sampler's log-prob and the trainer's
    token_logprobs at the same rollout.temperature follow one rule (logits / T, raw logits at T = 0)."""
    from grpo.logprobs import token_logprobs
    m = build_model(dict(TINY, vocab_size=len(tok), initializer_range=0.1), seed=0).eval()  # Qwen3's bias-free head
    r = Sampler(m, pad_id=tok.pad_token_id).generate(prompts_of(tok, "hello world", "7"), n=2, max_new_tokens=12,
                                                    temperature=temperature, top_k=top_k, seed=0)
    ids, mask, start = r.sequences()
    with torch.no_grad():
        lp = token_logprobs(m, ids, mask, temperature=temperature)[:, start:]
    sampled = r.response_mask.bool()
    assert (lp - r.logprobs)[sampled].abs().max() < 1e-4
