"""rewards/parallel.py: each well-formedness rule, each stats field, ids, path agreement, real data."""
import json
import re

import pytest

from rewards import ParallelStats, parallel_stats, parallel_stats_ids, path_agreement
from rewards.parallel import path_answers

from .conftest import data_file

P, P_, A, A_, S, S_ = "<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>"
GOOD = f"Think.\n{P}{A} 2+2=4 {A_}\n{A} 4 {A_}{P_}\n{S} both 4 {S_}\nFinal Answer: 4"


def test_no_tags_is_well_formed_with_no_blocks():
    stats = parallel_stats("Just 2 + 2 = 4.\nFinal Answer: 4")
    assert stats == ParallelStats(num_blocks=0, paths_per_block=[], well_formed=True,
                                  first_block_position=None, num_summaries=0,
                                  has_summary_after_each_block=True, reasons=())


def test_one_good_block_every_field():
    stats = parallel_stats(GOOD)
    assert stats.num_blocks == 1 and stats.paths_per_block == [2]
    assert stats.well_formed and stats.reasons == ()
    assert stats.first_block_position == 7 / len(GOOD)  # "Think.\n" is 7 characters
    assert stats.num_summaries == 1 and stats.has_summary_after_each_block


def test_two_blocks_three_paths_and_position_zero():
    text = f"{P}{A}a{A_}{A}b{A_}{A}c{A_}{P_}{S}s{S_} mid {P}{A}d{A_}{A}e{A_}{P_}\n \n{S}t{S_}"
    stats = parallel_stats(text)
    assert (stats.num_blocks, stats.paths_per_block, stats.num_summaries) == (2, [3, 2], 2)
    assert stats.well_formed and stats.first_block_position == 0.0


# One case per rule: the text, the reason it must give, num_blocks, paths_per_block.
MALFORMED = [
    (f"{P}{A}a{A_}{A}b{A_}", "unclosed <Parallel>", 0, [2]),
    (f"{P}{A}a{A_}{A}b", "unclosed <Path> and <Parallel>", 0, [2]),
    (f"{P}{A}a{A_}{P}{A}b{A_}{A}c{A_}{P_}{P_}{S}s{S_}", "nested <Parallel>", 1, [3]),
    (f"{P}{A}a{A_}{P_}{S}s{S_}", "block with fewer than 2 paths", 0, [1]),
    (f"{P}{P_}{S}s{S_}", "block with fewer than 2 paths", 0, [0]),
    (f"{P}{A}a{A}b{A_}{A_}{P_}{S}s{S_}", "nested <Path>", 0, [1]),
    (f"{P}{A}a{A_}{A}b{P_}{S}s{S_}", "<Path> not closed before </Parallel>", 1, [2]),
    (f"{A}a{A_} {P}{A}a{A_}{A}b{A_}{P_}{S}s{S_}", "<Path> outside a <Parallel> block", 1, [2]),
    (f"x{A_}", "</Path> without <Path>", 0, []),
    (f"x{P_}", "</Parallel> without <Parallel>", 0, []),
    (f"{P}{A}a{A_}{A}b{A_}{P_} so {S}s{S_}", "text between </Parallel> and <Summary>", 1, [2]),
    (f"{P}{A}a{A_}{A}b{A_}{P_} Final Answer: 3", "missing <Summary> after </Parallel>", 1, [2]),
    (f"{P}{A}a{A_}{A}b{A_}{P_}", "missing <Summary> after </Parallel>", 1, [2]),
    (f"{P}{A}a{A_}{A}b{A_}{P_}{S}s", "unclosed <Summary>", 1, [2]),
    (f"{P}{A}a{A_}{A}b{A_}{P_}{S}s{S_}{S}t{S_}", "<Summary> without a block before it", 1, [2]),
    (f"{P}{A}a{S}s{S_}{A_}{A}b{A_}{P_}{S}s{S_}", "<Summary> inside a <Parallel> block", 1, [2]),
    (f"{S}a{S}b{S_}", "nested <Summary>", 0, []),
    (f"x{S_}", "</Summary> without <Summary>", 0, []),
    (f"{P}{A}a{A_}{A}b{A_}{P_}{S}{P}{S_}", "<Parallel> inside <Summary>", 1, [2, 0]),
]


@pytest.mark.parametrize("text, reason, num_blocks, paths", MALFORMED)
def test_each_rule_breaks_well_formedness(text, reason, num_blocks, paths):
    stats = parallel_stats(text)
    assert not stats.well_formed and reason in stats.reasons, stats.reasons
    assert stats.num_blocks == num_blocks and stats.paths_per_block == paths


def test_summary_counts():
    missing = parallel_stats(f"{P}{A}a{A_}{A}b{A_}{P_}{S}s{S_}{P}{A}c{A_}{A}d{A_}{P_}x")
    assert missing.num_summaries == 1 and not missing.has_summary_after_each_block
    assert "number of summaries differs from number of blocks" in missing.reasons
    late = parallel_stats(f"{P}{A}a{A_}{A}b{A_}{P_}x{S}s{S_}")
    assert late.num_summaries == 1 and late.has_summary_after_each_block is True  # there, not "right after"
    assert late.reasons == ("text between </Parallel> and <Summary>",)


def test_tags_are_case_sensitive_text():
    assert parallel_stats("<parallel><path>a</path></parallel>").num_blocks == 0


# ---------------------------------------------------------------- on token ids

TAG_IDS = (101, 102, 103, 104, 105, 106)
SPACE, WORD = 1, 2


def to_ids(text: str) -> list[int]:
    """One id per character (whitespace -> SPACE, else WORD), one id per tag."""
    ids = []
    for piece in re.split(r"(</?(?:Parallel|Path|Summary)>)", text):
        if piece in (P, P_, A, A_, S, S_):
            ids.append(TAG_IDS[(P, P_, A, A_, S, S_).index(piece)])
        else:
            ids.extend(SPACE if char.isspace() else WORD for char in piece)
    return ids


@pytest.mark.parametrize("text", [GOOD, "no tags"] + [case[0] for case in MALFORMED])
def test_ids_agree_with_text(text):
    on_text, on_ids = parallel_stats(text), parallel_stats_ids(to_ids(text), TAG_IDS, {SPACE})
    for field in ("num_blocks", "paths_per_block", "well_formed", "num_summaries",
                  "has_summary_after_each_block", "reasons"):
        assert getattr(on_ids, field) == getattr(on_text, field), field


def test_ids_position_and_whitespace_ids():
    ids = [WORD, WORD, SPACE, 101, 103, WORD, 104, 103, WORD, 104, 102, SPACE, 105, WORD, 106]
    stats = parallel_stats_ids(ids, TAG_IDS, {SPACE})
    assert stats.well_formed and stats.num_blocks == 1 and stats.first_block_position == 3 / 15
    # Without SPACE among the whitespace ids the newline before <Summary> is text.
    assert parallel_stats_ids(ids, TAG_IDS).reasons == ("text between </Parallel> and <Summary>",)
    with pytest.raises(ValueError, match="6 ids"):
        parallel_stats_ids(ids, TAG_IDS[:5])


# ---------------------------------------------------------------- path answers and agreement

def test_path_answers_and_agreement():
    text = (f"{P}{A} 10 + 9 = 19 {A_}{A} so 1,9 no: 19.0 pets {A_}{P_}{S}19{S_}"
            f"{P}{A} 3 * 4 = 12 {A_}{A} 2 * 6 = 13 {A_}{P_}{S}?{S_}"
            f"{P}{A} no number {A_}{A} none {A_}{P_}{S}?{S_}"
            f"{P}{A} 1,200 {A_}{A} 1200 {A_}{A} 1200. {A_}{P_}{S}ok{S_}")
    assert path_answers(text) == [["19", "19"], ["12", "13"], [None, None], ["1200", "1200", "1200"]]
    assert path_agreement(text) == (2, 4)
    assert path_agreement("no blocks") == (0, 0)
    assert path_agreement(f"{P}{A} 5 {A_}{P_}{S}s{S_}") == (0, 0)  # one path: nothing to agree on


# ---------------------------------------------------------------- the Parallel-GSM8K sample

def test_parallel_gsm8k_acceptance():
    with open(data_file("parallel_gsm8k.jsonl")) as lines:
        rows = [json.loads(line) for line in lines]
    stats = {row["id"]: parallel_stats(row["solution"]) for row in rows}
    failures = {row_id: s.reasons for row_id, s in stats.items() if not s.well_formed}
    with_block = sum(s.well_formed and s.num_blocks >= 1 for s in stats.values())
    agreeing, blocks = map(sum, zip(*(path_agreement(row["solution"]) for row in rows)))
    print(f"\nParallel-GSM8K: {len(rows) - len(failures)}/{len(rows)} well formed, "
          f"{with_block} with >= 1 valid block, paths agree in {agreeing}/{blocks} blocks")
    for row_id, reasons in failures.items():
        print(f"  row {row_id}: {'; '.join(reasons)}")
    assert len(rows) == 341
    assert len(rows) - len(failures) == 339 and with_block == 336
    assert failures == {"178": ("text between </Parallel> and <Summary>",),
                        "475": ("unclosed <Summary>", "number of summaries differs from number of blocks")}
    assert (agreeing, blocks) == (369, 439)
