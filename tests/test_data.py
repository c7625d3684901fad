"""curriculum/data.py: loading (JSONL, parquet, field mapping, errors), splitting, PromptStream."""
import json

import pytest

from curriculum.data import DataError, Example, PromptStream, load_examples, split_examples, write_jsonl

from .conftest import data_file

ROWS = [
    {"id": "a", "question": "1+1?", "answer": "2", "solution": "1+1=2", "level": 1},
    {"id": "b", "question": "2+3?", "answer": 5},
    {"question": "7-4?", "answer": 3.0},
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_jsonl_round_trip(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    exs = load_examples(path)
    assert [e.id for e in exs] == ["a", "b", "2"]  # id falls back to the row number
    assert [e.answer for e in exs] == ["2", "5", "3"]  # numbers become strings, 3.0 -> "3"
    assert exs[0].solution == "1+1=2" and exs[1].solution is None
    assert exs[0].meta == {"level": 1} and exs[1].meta == {}
    write_jsonl(exs, str(tmp_path / "again.jsonl"))
    assert load_examples(str(tmp_path / "again.jsonl")) == exs


def test_parquet_round_trip_and_mapping(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist([
        {"problem": "What is 6*7?", "reward_model": {"ground_truth": "42"}, "extra": "x"},
        {"problem": "What is 2*2?", "reward_model": {"ground_truth": "4"}, "extra": "y"},
    ])
    path = str(tmp_path / "d.parquet")
    pq.write_table(table, path)
    exs = load_examples(path, fields={"question": "problem", "answer": "reward_model.ground_truth"})
    assert [(e.id, e.question, e.answer) for e in exs] == [("0", "What is 6*7?", "42"), ("1", "What is 2*2?", "4")]
    assert exs[0].meta["extra"] == "x"
    assert len(load_examples(path, fields={"question": "problem", "answer": "reward_model.ground_truth"},
                             limit=1)) == 1


def test_parquet_bad_row_names_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "1"}, {"question": "", "answer": "2"}]), path)
    with pytest.raises(DataError, match=r"d\.parquet:row 1: empty field 'question'"):
        load_examples(path)


def test_field_mapping_jsonl(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"uid": 7, "problem": "p?", "ground_truth": "9"})])
    (ex,) = load_examples(path, fields={"id": "uid", "question": "problem", "answer": "ground_truth"})
    assert ex == Example(id="7", question="p?", answer="9")
    with pytest.raises(ValueError, match="unknown name"):
        load_examples(path, fields={"problem": "question"})


def test_malformed_json_names_file_and_line(tmp_path):
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), '{"question": "x", "answer": ']
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert f"{path}:4:" in str(err.value)


@pytest.mark.parametrize("row, match", [
    ({"question": "q?"}, r":2: missing field 'answer'"),
    ({"question": "q?", "answer": None}, r":2: field 'answer' \(column 'answer'\) is null"),
    ({"question": "q?", "answer": float("nan")}, r":2: field 'answer' \(column 'answer'\) is nan"),
    ({"question": "q?", "answer": 2.5}, r":2: field 'answer' .* is the float 2.5; write it as a string \(.2\.5.\)"),
    ({"question": "q?", "answer": 1e400}, r":2: field 'answer' .* is inf"),
    ({"answer": "1"}, r":2: missing field 'question'"),
    ({"question": "  ", "answer": "1"}, r":2: empty field 'question'"),
    ({"question": ["q"], "answer": "1"}, r":2: field 'question' .* must be a string"),
    ({"question": "q", "answer": True}, r":2: field 'answer' .* must be a string"),
    ([1, 2], r":2: expected a JSON object"),
])
def test_bad_rows_name_line_and_field(tmp_path, row, match):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), json.dumps(row)])
    with pytest.raises(DataError, match=match):
        load_examples(path)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"question": "caf\xe9?", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        load_examples(str(path))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"\.csv"):
        load_examples(str(tmp_path / "d.csv"))


def test_limit_stops_before_bad_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS] + ["not json"])
    assert [e.id for e in load_examples(path, limit=2)] == ["a", "b"]


def test_repair_latex_escapes(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"question": "$\x0crac{1}{2}$ in \triangle ABC\tok",
                                                          "answer": "1"})])
    assert load_examples(path)[0].question == "$\x0crac{1}{2}$ in \triangle ABC\tok"  # verbatim by default
    assert load_examples(path, repair_latex_escapes=True)[0].question == "$\\frac{1}{2}$ in \\triangle ABC\tok"


def test_split_is_deterministic_and_partitions():
    exs = [Example(str(i), f"q{i}", "1") for i in range(50)]
    train, val = split_examples(exs, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(e.id for e in train + val) == sorted(e.id for e in exs)
    assert split_examples(exs, 0.2, seed=3) == (train, val)
    assert split_examples(exs, 10, seed=4)[1] != val
    assert [e.id for e in train] == sorted((e.id for e in train), key=int)  # input order kept
    with pytest.raises(ValueError, match="val_size"):
        split_examples(exs, 51, seed=0)


def test_prompt_stream_epochs_are_permutations():
    exs = [Example(str(i), f"q{i}", "1") for i in range(7)]
    stream = PromptStream(exs, seed=5)
    first, second = stream.next_batch(7), stream.next_batch(7)
    assert sorted(e.id for e in first) == sorted(e.id for e in second) == sorted(e.id for e in exs)
    assert first != second  # epoch 1 reshuffled with seed + 1
    assert [e.id for e in PromptStream(exs, seed=5).next_batch(14)] == [e.id for e in first + second]
    assert stream.state_dict() == {"epoch": 1, "position": 7, "seed": 5, "num_examples": 7}


@pytest.mark.parametrize("consumed", [3, 7, 10, 15])  # mid-epoch, at an epoch end, across epochs
def test_prompt_stream_resumes_exactly(consumed):
    exs = [Example(str(i), f"q{i}", "1") for i in range(7)]
    reference = PromptStream(exs, seed=1)
    expected = [e.id for e in reference.next_batch(consumed + 12)][consumed:]
    original = PromptStream(exs, seed=1)
    original.next_batch(consumed)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    resumed = PromptStream(exs, seed=1)
    resumed.load_state_dict(state)
    got = [e.id for n in (5, 4, 3) for e in resumed.next_batch(n)]
    assert got == expected
    with pytest.raises(ValueError, match="seed"):
        PromptStream(exs, seed=2).load_state_dict(state)


def test_real_gsm8k_test():
    exs = load_examples(data_file("gsm8k_test.jsonl"))
    assert len(exs) == 1319
    assert exs[0].id == "test-0" and exs[0].solution and all(e.answer.lstrip("-").isdigit() for e in exs)


def test_real_dapo_with_repair():
    path = data_file("dapo_math_17k.jsonl")
    raw = load_examples(path)
    assert len(raw) == 17243 and sum("\x0crac" in e.question for e in raw) > 600
    repaired = load_examples(path, repair_latex_escapes=True)
    assert sum("\x0crac" in e.question for e in repaired) == 0
    assert [e.answer for e in repaired] == [e.answer for e in raw]
