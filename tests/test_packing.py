"""grpo/packing.py: the plan spreads rows over ranks and micro-batches by hand-checked rules, rows pack first-fit,
a packed micro-batch holds each row's own positions and a block-diagonal mask (structured: each row's own path
mask) for every attention implementation, and its log-probs are those of each row run alone."""
import pytest
import torch
import torch.nn.functional as F

from grpo.batching import pack_rows
from grpo.packing import dense_width, pack, pack_bins, plan_micro_batches, response_view, rows_of
from model import apply_structured_attention, build_model, build_structure_batch

from .conftest import TINY


def test_plan_spreads_tokens_over_ranks_longest_first():
    # longest first: 10 -> slot 0 rank 0; 8 -> slot 0 rank 1; 7 does not fit rank 1 (15 > 12): slot 1 rank 0;
    # 5 -> slot 0's lightest rank 1 would reach 13: slot 1 rank 1; 3 -> slot 0 rank 1 (11); 2 -> slot 0 rank 0 (12)
    assert plan_micro_batches([10, 3, 7, 5, 2, 8], world=2, budget=12) == [[[0, 4], [5, 1]], [[2], [3]]]
    assert plan_micro_batches([10, 3, 7, 5, 2, 8], world=1, budget=100) == [[[0, 5, 2, 3, 1, 4]]]
    assert plan_micro_batches([20, 1], world=1, budget=5) == [[[0]], [[1]]]  # a row over the budget runs alone
    assert plan_micro_batches([4], world=2, budget=10) == [[[0], []]]  # rank 1 runs a stand-in at weight 0
    assert plan_micro_batches([], world=2, budget=10) == []


def test_plan_balances_each_slot():
    gen = torch.Generator().manual_seed(0)
    lengths = (torch.rand(64, generator=gen) ** 3 * 300).long().add(5).tolist()  # a long tail, as RL lengths
    slots = plan_micro_batches(lengths, world=4, budget=1024)
    assert sorted(i for slot in slots for rows in slot for i in rows) == list(range(64))  # each row once
    for slot in slots:
        loads = [sum(lengths[i] for i in rows) for rows in slot]
        assert max(loads) <= 1024 or max(len(rows) for rows in slot) == 1
        assert max(loads) - min(loads) <= max(lengths[i] for rows in slot for i in rows)
    assert len(slots) <= -(-sum(lengths) // (4 * 1024)) + 1  # hardly more slots than the tokens need


def test_pack_bins_first_fit_longest_first():
    assert pack_bins([5, 3, 4, 2], width=5) == [[0], [2], [1, 3]]
    assert pack_bins([5, 3, 4, 2], width=None) == [[0, 1, 2, 3]]


def test_dense_width_takes_the_tightest_of_a_few_widths():
    # widths 40..50: three packed rows at every one (two 30s need 60), so 40 itself: 120 tokens
    assert dense_width([40, 30, 30]) == 40
    # widths 64, 66, .., 80: [64], [40, 16], [40] = 3 x 64 = 192 tokens up to 78; at 80 the two 40s share a row:
    # [64, 16], [40, 40] = 2 x 80 = 160, the fewest
    assert dense_width([64, 40, 40, 16]) == 80
    assert dense_width([7]) == 7


def rows_batch(pad_id=0):
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25, 26], [31]]
    responses = [[14, 15], [27, 28, 29], [32, 33, 34]]  # rows of 5, 9 and 4 tokens
    return pack_rows(prompts, responses, pad_id, advantages=torch.tensor([1.0, -1.0, 0.5]))


def test_dense_layout_packs_rows_as_wide_as_the_longest():
    """sdpa: longest first into rows of 9 tokens: [row 1], [row 0, row 2]; positions restart at each row; the mask
    is block-diagonal causal; the scored tokens are the responses, row by row."""
    rows = rows_of(rows_batch(pad_id=7), torch.arange(3))
    pk = pack(rows, [0, 1, 2], "sdpa", pad_id=7)
    assert pk.input_ids.tolist() == [[21, 22, 23, 24, 25, 26, 27, 28, 29], [11, 12, 13, 14, 15, 31, 32, 33, 34]]
    assert pk.position_ids.tolist() == [list(range(9)), [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    expected = torch.zeros(2, 9, 9, dtype=torch.bool)
    expected[0] = torch.ones(9, 9, dtype=torch.bool).tril()
    expected[1, :5, :5] = torch.ones(5, 5, dtype=torch.bool).tril()
    expected[1, 5:, 5:] = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(pk.attention_mask[:, 0], expected)
    assert pk.scored.tolist() == [12, 13, 6, 7, 8, 15, 16, 17] and pk.real_tokens == 18
    assert pk.response_index.tolist() == [0, 1, 3, 4, 5, 6, 7, 8]  # (B, R) = (3, 3)
    view = response_view(rows, [0, 1, 2], "cpu")
    assert view.input_ids.tolist() == [[14, 15, 0], [27, 28, 29], [32, 33, 34]]
    assert view.advantages.tolist() == [1.0, -1.0, 0.5] and view.loss_mask.sum(1).tolist() == [2, 3, 3]


def test_dense_layout_pads_what_does_not_fit_and_padding_sees_itself():
    rows = rows_of(pack_rows([[1, 2], [3, 4], [5]], [[6, 7, 8], [9, 10, 11], [12, 13]], 0), torch.arange(3))
    pk = pack(rows, [0, 1, 2], "sdpa", pad_id=99)  # 5, 5, 3 tokens: [row 0], [row 1], [row 2 + 2 padding]
    assert pk.input_ids.tolist() == [[1, 2, 6, 7, 8], [3, 4, 9, 10, 11], [5, 12, 13, 99, 99]]
    mask = pk.attention_mask[2, 0]
    assert mask[3].tolist() == [False, False, False, True, False] and not mask[:3, 3:].any()


def test_varlen_layout_is_one_row_without_padding():
    rows = rows_of(rows_batch(), torch.arange(3))
    pk = pack(rows, [1, 0, 2], "flash_attention_2")
    assert pk.input_ids.tolist() == [[21, 22, 23, 24, 25, 26, 27, 28, 29, 11, 12, 13, 14, 15, 31, 32, 33, 34]]
    assert pk.position_ids.tolist() == [list(range(9)) + [0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert pk.attention_mask is None and pk.scored.tolist() == [6, 7, 8, 12, 13, 15, 16, 17]
    assert pk.model_kwargs["cu_seq_lens_q"].tolist() == [0, 9, 14, 18] and pk.model_kwargs["max_length_q"] == 9
    assert pk.model_kwargs["cu_seq_lens_q"].dtype == torch.int32
    with pytest.raises(ValueError, match="flex_attention"):
        pack(rows, [0], "flash_attention_2", tags=object())


def soup(tags):
    """Prompts and responses of every structure a packed row must keep as its own: a closed block, tags quoted in
    the prompt (plain text there), tag soup (</Path> first, nested <Parallel>), a block without a path, and a
    block left open by the length limit."""
    P, A, A_, P_ = tags.parallel_open, tags.path_open, tags.path_close, tags.parallel_close
    prompts = [[20, 21], [P, A, 22, A_, 23], [24], [25, 26, 27], [28]]
    responses = [[30, P, A, 31, 32, A_, A, 33, A_, P_, 34], [P, A, 35, A_, A, 36, 37, A_, P_],
                 [A_, 38, P, A, P, 39, A_, 40], [P, 41, P_, 42], [43, P, A, 44, 45, A_, A, 46, 47, 48]]
    return prompts, responses


def test_structured_rows_keep_their_own_structure(tags):
    """Each packed row's positions and mask are those of build_structure_batch on that row alone."""
    prompts, responses = soup(tags)
    rows = rows_of(pack_rows(prompts, responses, 0), torch.arange(5))
    for attn in ("sdpa", "flex_attention"):
        pk = pack(rows, [0, 1, 2, 3, 4], attn, tags=tags)
        dense = pk.attention_mask[:, 0] if attn == "sdpa" else flex_dense(pk)
        seen = 0
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            alone = build_structure_batch(ids, tags, response_start=len(p))
            k, c = locate(pk.input_ids, ids[0])
            assert k >= 0, "row not found whole in one packed row"
            n = ids.shape[1]
            assert pk.position_ids[k, c:c + n].tolist() == alone.position_ids[0].tolist()
            assert torch.equal(dense[k, c:c + n, c:c + n], alone.dense_mask()[0, 0])
            assert not dense[k, c:c + n, :c].any() and not dense[k, c + n:, c:c + n].any()  # sees only itself
            seen += 1
        assert seen == 5


def locate(packed: torch.Tensor, ids: torch.Tensor) -> tuple[int, int]:
    """(packed row, column) where `ids` sits in `packed` (the rows of soup() are all distinct)."""
    n = len(ids)
    for k, row in enumerate(packed):
        for c in range(row.shape[0] - n + 1):
            if torch.equal(row[c:c + n], ids):
                return k, c
    return -1, -1


def flex_dense(pk) -> torch.Tensor:
    """The BlockMask's mask_mod evaluated densely (B', W, W)."""
    from torch.nn.attention.flex_attention import create_mask
    B, W = pk.input_ids.shape
    return create_mask(pk.attention_mask.mask_mod, B, None, W, W, device="cpu")[:, 0]


def alone_logprobs(model, prompts, responses, structured: bool) -> list:
    """Each response's token log-probs (float64) with its row run alone, unpadded, through the model."""
    alone = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            kw = {"response_start": len(p)} if structured else {}
            logq = F.log_softmax(model(input_ids=ids, use_cache=False, **kw).logits.double(), -1)
            alone.append(logq[0, len(p) - 1:-1].gather(-1, ids[0, len(p):, None])[:, 0])
    return alone


def test_varlen_kernel_gets_each_sequence_bounds(tok, tags, monkeypatch):
    """flash_attention_2 (causal): one packed row, no mask, and the sequence bounds reach the attention kernel as
    flash-attn's varlen arguments. Stood in for here (no flash-attn on CPU) by a kernel that attends causally
    within each bound it is given: the log-probs are each row's alone only if the bounds are right."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from grpo.packing import packed_logprobs

    calls = []

    def varlen(module, q, k, v, attention_mask, scaling=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
               max_length_q=None, max_length_k=None, **kwargs):  # q (1, H, S, D), k and v (1, H_kv, S, D)
        assert attention_mask is None and q.shape[0] == 1 and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
        calls.append((cu_seq_lens_q.tolist(), max_length_q, max_length_k))
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                        scale=scaling)
                         for a, b in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist())], 2)
        return out.transpose(1, 2), None  # (1, S, H, D)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", varlen)
    prompts, responses = soup(tags)
    rows = rows_of(pack_rows(prompts, responses, 0), torch.arange(5))
    model = build_model(dict(TINY, vocab_size=len(tok)), seed=0).double()
    alone = alone_logprobs(model, prompts, responses, False)
    model.config._attn_implementation = "flash_attention_2"
    pk = pack(rows, [4, 0, 1, 2, 3], "flash_attention_2")
    with torch.no_grad():
        logp, _ = packed_logprobs(model, pk, (5, 11), temperature=1.0, chunk_size=64, with_entropy=False)
    assert calls[0] == ([0, 11, 24, 38, 47, 54], 14, 14) and len(calls) == TINY["num_hidden_layers"]
    for b, i in enumerate([4, 0, 1, 2, 3]):
        torch.testing.assert_close(logp[b, :len(responses[i])].double(), alone[i], atol=1e-6, rtol=0)


def test_packed_logprobs_equal_each_row_run_alone(tok, tags):
    """float64: the log-prob of every response token of a packed micro-batch equals that of its row run alone
    through the stock (causal) or patched (structured) model, whatever the layout."""
    from grpo.packing import packed_logprobs

    prompts, responses = soup(tags)
    rows = rows_of(pack_rows(prompts, responses, 0), torch.arange(5))
    runs = {}
    for structured in (False, True):
        model = build_model(dict(TINY, vocab_size=len(tok)), seed=0).double()
        if structured:
            apply_structured_attention(model, tags)
        runs[structured] = alone = alone_logprobs(model, prompts, responses, structured)
        for attn in ("sdpa", "eager"):
            model.config._attn_implementation = attn
            pk = pack(rows, [3, 0, 4, 1, 2], attn, tags=tags if structured else None, dtype=torch.float64)
            with torch.no_grad():
                logp, _ = packed_logprobs(model, pk, (5, 11), temperature=1.0, chunk_size=7, with_entropy=False)
            for b, i in enumerate([3, 0, 4, 1, 2]):
                torch.testing.assert_close(logp[b, :len(responses[i])].double(), alone[i], atol=1e-6, rtol=0)
    # the structure shows where a row has a second path (rows 0, 1 and the open block of row 4); the malformed
    # rows (2: </Path> first; 3: a block closed without a path) are causal text from their bad tag on
    assert all((runs[True][i] - runs[False][i]).abs().max() > 1e-3 for i in (0, 1, 4))
    assert all((runs[True][i] - runs[False][i]).abs().max() < 1e-12 for i in (2, 3))
