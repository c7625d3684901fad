"""model/patch.py: the structured model's defining property, stock behaviour without tags, masks."""
import pytest
import torch

from model import apply_structured_attention, build_structure, build_structure_batch, remove_structured_attention
from model.patch import structured_attention_mask


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids).reshape(1, -1) if not torch.is_tensor(ids) or ids.dim() == 1
                     else ids, use_cache=False, **kw).logits


def test_path2_logits_equal_path2_run_alone(tiny_model, tags):
    prefix = [20, 21, 22, 23]
    path1 = [tags.path_open, 30, 31, 32, tags.path_close]
    path2 = [tags.path_open, 40, 41, tags.path_close]
    tail = [tags.parallel_close, 50, 51]
    full = prefix + [tags.parallel_open] + path1 + path2 + tail
    alone = prefix + [tags.parallel_open] + path2  # causal; path 2 starts right after <Parallel>, as it should
    ref = logits(tiny_model, alone)[0, -len(path2):]
    start = len(prefix) + 1 + len(path1)
    stock = logits(tiny_model, full)[0, start:start + len(path2)]
    assert (stock - ref).abs().max() > 1e-3  # without the patch path 2 sees path 1: the check can fail
    apply_structured_attention(tiny_model, tags)
    got = logits(tiny_model, full)[0, start:start + len(path2)]
    assert (got - ref).abs().max() < 1e-4
    # path 1 is ordinary causal text after the prefix
    ref1 = logits(remove_structured_attention(tiny_model), full)[0, : len(prefix) + 1 + len(path1)]
    got1 = logits(apply_structured_attention(tiny_model, tags), full)[0, : len(prefix) + 1 + len(path1)]
    assert (got1 - ref1).abs().max() < 1e-4


def test_tokens_after_the_block_match_a_hand_built_mask(tiny_model, tags):
    P, A, A_, P_ = tags.parallel_open, tags.path_open, tags.path_close, tags.parallel_close
    ids = [5, 6, P, A, 7, 8, A_, A, 9, A_, P_, 10, 11]
    # by hand: path 2 (7..9) does not see path 1 (3..6); positions restart at 3 for path 2;
    # </Parallel> continues at 1 + max(6, 5) = 7
    pos = [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 7, 8, 9]
    vis = torch.ones(13, 13, dtype=torch.bool).tril()
    vis[7:10, 3:7] = False
    with torch.no_grad():
        ref = tiny_model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                         attention_mask=vis[None, None], use_cache=False).logits
    got = logits(apply_structured_attention(tiny_model, tags), ids)
    assert (got - ref).abs().max() < 1e-4


def test_without_tags_the_patch_is_stock(tiny_model, tags):
    ids = torch.randint(5, 150, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    ref = logits(tiny_model, ids, attention_mask=mask)
    got = logits(apply_structured_attention(tiny_model, tags), ids, attention_mask=mask)
    real = mask.bool()
    assert (got - ref)[real].abs().max() < 1e-4
    assert torch.isfinite(got).all()
    back = logits(remove_structured_attention(tiny_model), ids, attention_mask=mask)
    assert torch.equal(back, ref)


def test_padded_batch_equals_single_rows(tiny_model, tags):
    P, A, A_, P_ = tags.parallel_open, tags.path_open, tags.path_close, tags.parallel_close
    rows = [[5, P, A, 7, A_, A, 8, 9, A_, P_, 4], [6, 6, P, A, 3, A_, A, 2, A_]]
    apply_structured_attention(tiny_model, tags)
    T = 12
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    ids[0, T - len(rows[0]):], mask[0, T - len(rows[0]):] = torch.tensor(rows[0]), 1  # left padded
    ids[1, : len(rows[1])], mask[1, : len(rows[1])] = torch.tensor(rows[1]), 1  # right padded
    got = logits(tiny_model, ids, attention_mask=mask)
    assert (got[0, T - len(rows[0]):] - logits(tiny_model, rows[0])[0]).abs().max() < 1e-4
    assert (got[1, : len(rows[1])] - logits(tiny_model, rows[1])[0]).abs().max() < 1e-4


def test_response_start_keeps_prompt_tags_as_text(tiny_model, tags):
    P, A, A_ = tags.parallel_open, tags.path_open, tags.path_close
    ids = torch.tensor([[P, A, 9, A_, 5, 6, 7]])
    stock = logits(tiny_model, ids)
    got = logits(apply_structured_attention(tiny_model, tags), ids, response_start=4)
    assert (got - stock).abs().max() < 1e-4


def test_eager_and_sdpa_agree(tiny_config, tags):
    from model import build_model
    P, A, A_, P_ = tags.parallel_open, tags.path_open, tags.path_close, tags.parallel_close
    ids = [5, P, A, 7, A_, A, 8, A_, P_, 4]
    out = []
    for impl in ("sdpa", "eager"):
        m = apply_structured_attention(build_model(tiny_config, seed=0, attn_implementation=impl), tags)
        out.append(logits(m, ids))
    assert (out[0] - out[1]).abs().max() < 1e-4


def test_gradients_flow_and_stay_finite_with_padding(tiny_model, tags):
    P, A, A_ = tags.parallel_open, tags.path_open, tags.path_close
    ids = torch.tensor([[0, 0, 5, P, A, 7, A_, A, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    apply_structured_attention(tiny_model, tags).train()
    out = tiny_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (out * mask[..., None]).sum().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_flex_mask_mod_equals_dense_mask(tags):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import create_mask
    P, A, A_, P_ = tags.parallel_open, tags.path_open, tags.path_close, tags.parallel_close
    ids = torch.tensor([[0, 5, P, A, 7, A_, A, 8, A_, P_, 4, 3], [5, P, A, 7, 7, A_, A, 8, A_, P_, 0, 0]])
    mask = (ids != 0).long()
    s = build_structure_batch(ids, tags, mask)
    block = structured_attention_mask(s, "flex_attention")
    dense = create_mask(block.mask_mod, 2, None, 12, 12, device="cpu")
    assert torch.equal(dense, structured_attention_mask(s, "sdpa"))


def test_flash_attention_is_refused(tags):
    s = build_structure_batch(torch.tensor([[1, 2]]), tags)
    with pytest.raises(ValueError, match="flex_attention"):
        structured_attention_mask(s, "flash_attention_2")


def test_single_and_batched_structure_agree_on_real_tags(tags):
    ids = [tags.parallel_open, tags.path_open, 4, tags.path_close, tags.path_open, tags.path_close]
    s = build_structure(ids, tags)
    assert s.position_ids.tolist() == [0, 1, 2, 3, 1, 2]
