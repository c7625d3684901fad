"""model/structure.py: position ids and visibility tables written out by hand."""
import time

import torch

from model.structure import build_structure, build_structure_batch
from model.tags import TagIds

TAGS = TagIds(100, 101, 102, 103, 104, 105)
P, P_, A, A_, S, S_ = 100, 101, 102, 103, 104, 105  # <Parallel> </Parallel> <Path> </Path> <Summary> </Summary>


def table(text: str) -> torch.Tensor:
    """Rows of 0/1 (spaces ignored) -> (T, T) bool."""
    rows = [r.replace(" ", "") for r in text.strip().splitlines()]
    return torch.tensor([[c == "1" for c in r] for r in rows])


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def check(ids, positions, visible, malformed=False, start=0):
    s = build_structure(ids, TAGS, start_position=start)
    assert s.position_ids.tolist() == positions
    assert torch.equal(s.visible, visible), f"\n{s.visible.int()}"
    assert s.malformed == malformed


def test_plain_text_is_causal():
    check([1, 2, 3, 4], [0, 1, 2, 3], causal(4))
    check([1, 2, 3], [7, 8, 9], causal(3), start=7)


def test_one_block_two_paths():
    #      0  1  2  3  4  5   6  7  8  9   10  11
    ids = [1, 2, P, A, 5, A_, A, 6, 7, A_, P_, 9]
    # paths start at 3 (right after <Parallel> at 2); the close continues at 1 + max(5, 6) = 7
    pos = [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    vis = table("""
        1 0 0 0 0 0 0 0 0 0 0 0
        1 1 0 0 0 0 0 0 0 0 0 0
        1 1 1 0 0 0 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0 0 0 0
        1 1 1 1 1 0 0 0 0 0 0 0
        1 1 1 1 1 1 0 0 0 0 0 0
        1 1 1 0 0 0 1 0 0 0 0 0
        1 1 1 0 0 0 1 1 0 0 0 0
        1 1 1 0 0 0 1 1 1 0 0 0
        1 1 1 0 0 0 1 1 1 1 0 0
        1 1 1 1 1 1 1 1 1 1 1 0
        1 1 1 1 1 1 1 1 1 1 1 1
    """)
    check(ids, pos, vis)


def test_newline_between_paths_belongs_to_next_path_and_three_paths():
    NL = 7
    #      0  1  2  3   4   5  6  7   8   9  10  11  12  13  14
    ids = [P, A, 5, A_, NL, A, 6, A_, NL, A, 8, 9, A_, P_, S]
    pos = [0, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7]
    vis = table("""
        1 0 0 0 0 0 0 0 0 0 0 0 0 0 0
        1 1 0 0 0 0 0 0 0 0 0 0 0 0 0
        1 1 1 0 0 0 0 0 0 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0 0 0 0 0 0 0
        1 0 0 0 1 0 0 0 0 0 0 0 0 0 0
        1 0 0 0 1 1 0 0 0 0 0 0 0 0 0
        1 0 0 0 1 1 1 0 0 0 0 0 0 0 0
        1 0 0 0 1 1 1 1 0 0 0 0 0 0 0
        1 0 0 0 0 0 0 0 1 0 0 0 0 0 0
        1 0 0 0 0 0 0 0 1 1 0 0 0 0 0
        1 0 0 0 0 0 0 0 1 1 1 0 0 0 0
        1 0 0 0 0 0 0 0 1 1 1 1 0 0 0
        1 0 0 0 0 0 0 0 1 1 1 1 1 0 0
        1 1 1 1 1 1 1 1 1 1 1 1 1 1 0
        1 1 1 1 1 1 1 1 1 1 1 1 1 1 1
    """)
    check(ids, pos, vis)


def test_two_blocks_and_tokens_before_the_close():
    #      0  1  2   3  4  5   6  7   8   9  10 11  12 13 14  15
    ids = [P, A, 5, A_, A, 6, A_, 9, P_, P, A, 3, A_, A, A_, P_]
    # token 7 sits after the last </Path>: it belongs to the close (sees both paths, position 4)
    pos = [0, 1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 8, 10]
    vis = causal(16)
    for i in (4, 5, 6):
        vis[i, 1:4] = False  # path 2 of block 1 does not see path 1
    for i in (13, 14):
        vis[i, 10:13] = False  # path 2 of block 2 does not see path 1
    check(ids, pos, vis)


def test_open_block_at_the_end_keeps_its_structure():
    ids = [1, P, A, 5, A_, A, 6]
    pos = [0, 1, 2, 3, 4, 2, 3]
    vis = causal(7)
    vis[5:, 2:5] = False
    check(ids, pos, vis)  # not malformed: a cut-off response


def test_malformed_cases_become_causal_from_the_bad_tag():
    # <Path> outside a block: plain causal from the start
    check([1, A, 2, A_], [0, 1, 2, 3], causal(4), malformed=True)
    # </Parallel> without <Parallel>
    check([1, P_, 2], [0, 1, 2], causal(3), malformed=True)
    # a closed block with no path: nothing was hidden, the close continues consecutively
    check([1, P, 5, P_, 6], [0, 1, 2, 3, 4], causal(5), malformed=True)
    # </Path> without <Path> inside a block
    check([P, A_, 5], [0, 1, 2], causal(3), malformed=True)
    # nesting: <Parallel> inside a path; earlier paths stay hidden, positions continue from the last token
    ids = [P, A, 5, A_, A, 6, P, 7]
    vis = causal(8)
    vis[4:6, 1:4] = False  # before the bad tag, path 2 did not see path 1
    check(ids, [0, 1, 2, 3, 1, 2, 3, 4], vis, malformed=True)
    # <Path> while a path is open
    ids = [P, A, 5, A, 6]
    check(ids, [0, 1, 2, 3, 4], causal(5), malformed=True)
    # two consecutive </Path>: the second is bad and continues after the first
    ids = [P, A, A_, A_, 9]
    check(ids, [0, 1, 2, 3, 4], causal(5), malformed=True)


def test_summary_tags_are_plain_text():
    check([S, 1, S_], [0, 1, 2], causal(3))


def test_padding_left_and_right_is_isolated():
    ids = torch.tensor([[0, 0, P, A, 5, A_, A, 6],
                        [P, A, 5, A_, A, 6, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 0, 0]])
    s = build_structure_batch(ids, TAGS, mask)
    assert s.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 1, 2], [0, 1, 2, 3, 1, 2, 0, 0]]
    dense = s.dense_mask()[:, 0]
    one = build_structure([P, A, 5, A_, A, 6], TAGS).visible
    assert torch.equal(dense[0, 2:, 2:], one) and torch.equal(dense[1, :6, :6], one)
    assert not dense[0, :2].any() and not dense[0, :, :2].any()  # padding sees and is seen by nothing
    assert not dense[1, 6:].any() and not dense[1, :, 6:].any()


def test_response_start_ignores_tags_in_the_prompt():
    ids = torch.tensor([[P, A, 1, A_, 2, P, A, 5, A_, A, 6]])
    s = build_structure_batch(ids, TAGS, response_start=5)
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7]]
    assert not bool(s.malformed[0])


def test_batch_equals_single_rows_and_is_fast():
    g = torch.Generator().manual_seed(0)
    vocab = torch.tensor([1, 2, 3, P, P_, A, A_, S, S_])
    weights = torch.tensor([30.0, 30, 30, 1, 1, 2, 2, 1, 1])
    ids = vocab[torch.multinomial(weights, 64 * 300, replacement=True, generator=g)].reshape(64, 300)
    s = build_structure_batch(ids, TAGS)
    dense = s.dense_mask()[:, 0]
    for b in range(0, 64, 7):
        one = build_structure(ids[b], TAGS)
        assert torch.equal(s.position_ids[b], one.position_ids)
        assert torch.equal(dense[b], one.visible)
        assert bool(s.malformed[b]) == one.malformed
    # 64 sequences of 4,096 tokens with a few blocks each
    row = torch.tensor(([1] * 200 + [P, A] + [2] * 300 + [A_, A] + [3] * 400 + [A_, P_]) * 3)
    big = torch.cat([row, torch.ones(4096 - len(row), dtype=torch.long)]).repeat(64, 1)
    t0 = time.perf_counter()
    build_structure_batch(big, TAGS)
    assert time.perf_counter() - t0 < 1.0
