"""curriculum/data.py, curriculum/hfdata.py, curriculum/prompts.py and their preflight checks: the paper's datasets
in their published form load with a config line (GSM8K's "#### 72" via data.answer_pattern, DAPO's verl parquet
via dotted fields and data.question_pattern), `datasets` directories and TRL's conversational prompts run end to
end through a GRPO step, and every new input is refused before any work with one line naming it."""
import json
import sys

import pytest

from curriculum.config import ConfigError, build_config
from curriculum.data import DataError, Patterns, load_examples
from curriculum.preflight import preflight
from curriculum.prompts import encode_prompt, example_prompt
from curriculum.stages import run_stage
from grpo.fsdp import Dist

from .conftest import data_file
from .test_stages import tiny_grpo

GSM8K = r"####\s*(.+)"
# DAPO-Math-17k's published prompt (verl form): the problem wrapped in DAPO's own instruction
DAPO_WRAPPER = ("Solve the following math problem step by step. The last line of your response should be of the form "
                "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\nRemember to "
                "put your answer on its own line after \"Answer:\".")
DAPO_FIELDS = {"question": "prompt.0.content", "answer": "reward_model.ground_truth", "id": "extra_info.index",
               "prompt": None}
DAPO_QUESTION = r"(?s)answer to the problem\.\n\n(.*)\n\nRemember to put your answer"
CHAT = [{"role": "system", "content": "solve the problem"}, {"role": "user", "content": "what is 2 add 3"}]


def first_rows(name: str, n: int | None = None) -> list[dict]:
    with open(data_file(name), encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n) if n else iter(int, 1))]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_gsm8k_published_form_loads_with_the_answer_pattern(tmp_path):
    """GSM8K as OpenAI publishes it: question + answer ending in "#### 72" (with thousands commas kept)."""
    rows = first_rows("gsm8k_train.jsonl")  # all 7,473 (79 answers with a thousands comma)
    published = write_jsonl(tmp_path / "train.jsonl", [{"question": r["question"], "answer": r["solution_raw"]}
                                                       for r in rows])
    exs = load_examples(published, patterns=Patterns(answer=GSM8K))
    assert [e.question for e in exs] == [r["question"] for r in rows]
    assert [e.answer.replace(",", "") for e in exs] == [r["answer"] for r in rows]  # the file strips the commas
    assert any("," in e.answer for e in exs) and exs[0].answer == "72"
    cfg = build_config({"model": {"build": {}}, "data": {"train": published, "answer_pattern": GSM8K}})
    preflight(cfg)  # the config line is all it takes


def test_dapo_verl_form_loads_with_dotted_fields_and_the_question_pattern(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = first_rows("dapo_math_17k.jsonl", 20)
    table = pa.Table.from_pylist([{"data_source": "math_dapo", "ability": "MATH",
                                   "prompt": [{"content": DAPO_WRAPPER.format(r["question"]), "role": "user"}],
                                   "reward_model": {"ground_truth": r["answer"], "style": "rule-lighteval/MATH_v2"},
                                   "extra_info": {"index": r["id"]}} for r in rows])
    path = str(tmp_path / "dapo.parquet")
    pq.write_table(table, path)
    exs = load_examples(path, DAPO_FIELDS, patterns=Patterns(question=DAPO_QUESTION))
    assert [(e.id, e.question, e.answer) for e in exs] == [(r["id"], r["question"], r["answer"]) for r in rows]
    assert not exs[0].conversational and exs[0].meta["data_source"] == "math_dapo"
    assert example_prompt(exs[0], "none") == rows[0]["question"]  # our instruction, not DAPO's, goes around it


def test_a_pattern_that_does_not_match_names_the_row(tmp_path):
    rows = [{"question": "q", "answer": "x #### 1"}, {"question": "q", "answer": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:2: data\.answer_pattern '####\\\\s\*\(\.\+\)' does not match field "
                                        r"'answer' \(column 'answer'\): '2'"):
        load_examples(path, patterns=Patterns(answer=GSM8K))


def test_conversational_rows_are_the_prompt_as_written(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT, "answer": "5", "level": 2}])
    (ex,) = load_examples(path)
    assert ex.conversational and ex.prompt == CHAT and ex.question == "what is 2 add 3" and ex.meta == {"level": 2}
    assert example_prompt(ex, "parallel", "ignored {question}") == CHAT  # style and instruction do not apply
    ids, _ = encode_prompt(tok, ex.prompt, "chat")
    assert tok.decode(ids) == ("<|im_start|>system\nsolve the problem<|im_end|>\n"
                               "<|im_start|>user\nwhat is 2 add 3<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="needs template='chat'"):
        encode_prompt(tok, ex.prompt, "raw")
    (plain,) = load_examples(path, {"question": "prompt.1.content", "prompt": None})  # the question, our prompt
    assert not plain.conversational and example_prompt(plain, "none") == "what is 2 add 3"


@pytest.mark.parametrize("prompt, problem", [([], "is an empty list"),
                                             ([{"role": "user"}], "message 0 is {'role': 'user'}"),
                                             (["hi"], "message 0 is hi")])
def test_a_malformed_conversation_names_the_line(tmp_path, prompt, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT, "answer": "5"}, {"prompt": prompt, "answer": "5"}])
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: field 'prompt' \(column 'prompt'\) {problem}"):
        load_examples(path)


def save_dataset(rows, path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(path))
    return path


def test_datasets_directories_and_csv_load_offline(tmp_path):
    rows = [{"question": f"{i} plus 1", "answer": str(i + 1), "level": i} for i in range(5)]
    root = save_dataset(rows, tmp_path / "ds")
    exs = load_examples(str(root / "train"), limit=3)
    assert [(e.id, e.question, e.answer, e.meta) for e in exs] == [(str(i), f"{i} plus 1", str(i + 1), {"level": i})
                                                                   for i in range(3)]
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\] \(a DatasetDict\); point at one"):
        load_examples(str(root))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_examples(str(tmp_path / "plain"))
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nhow many,3\n")
    assert [(e.question, e.answer) for e in load_examples(str(csv))] == [("how many", "3")]


def test_without_the_datasets_package_a_directory_says_what_to_install(tmp_path, monkeypatch):
    root = save_dataset([{"question": "q", "answer": "1"}], tmp_path / "ds")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(ImportError, match=r"needs the `datasets` package: pip install 'parallel-r1\[data\]'"):
        load_examples(str(root / "train"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    assert load_examples(path)[0].answer == "1"  # JSONL never needs it


def bad_config(tmp_path, data: dict, rows=None):
    train = write_jsonl(tmp_path / "t.jsonl", rows or [{"question": "q", "answer": "#### 1"}])
    return build_config({"kind": "grpo", "model": {"tokenizer": "words", "build": {}},
                         "data": {"train": train, **data}})


@pytest.mark.parametrize("data, rows, message", [
    ({"answer_pattern": "####"}, None, r"data\.answer_pattern '####' has no group; put the part to keep in"),
    ({"question_pattern": "(unclosed"}, None, r"data\.question_pattern '\(unclosed' is not a valid regular"),
    ({"answer_pattern": "Answer: (.+)"}, None, r"data\.train: .*t\.jsonl:1: data\.answer_pattern 'Answer: \(\.\+\)' "
                                               "does not match"),
    ({"instruction": "Solve it."}, None, r"data\.instruction must hold '\{question\}' exactly once"),
    ({"template": "raw"}, [{"prompt": CHAT, "answer": "5"}], r"data\.train holds conversational rows .* set "
                                                             "data.template: chat"),
    ({"template": "chat", "instruction": "{question}!"}, [{"prompt": CHAT, "answer": "5"}],
     r"data\.instruction would not apply to them"),
    ({"train": "missing/dir"}, None, r"data\.train: missing/dir: no such data file"),
])
def test_preflight_refuses_every_new_input_naming_it(tmp_path, data, rows, message):
    with pytest.raises(ConfigError, match=message):
        preflight(bad_config(tmp_path, data, rows))


def test_a_conversational_datasets_directory_runs_a_grpo_step_end_to_end(tmp_path):
    """TRL's conversational form in a save_to_disk directory: rendered with the (word) tokenizer's chat template,
    the reward function gets TRL's shapes and the data's extra column `level`."""
    root = save_dataset([{"prompt": CHAT, "answer": "5", "level": 2}] * 4, tmp_path / "ds")
    cfg = tiny_grpo(tmp_path, data={"synthetic": None, "train": str(root / "train"), "template": "chat"},
                    reward={"funcs": ["tests.reward_fns:chat_and_column"]}, grpo={"steps": 1})
    preflight(cfg)
    run_stage(cfg, Dist())
    (row,) = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert (row["rewards/chat_and_column/mean"], row["reward/errors"]) == (2.0, 0)  # -100 had the shapes been wrong
    assert row["reward"] == pytest.approx(row["rewards/accuracy/mean"] + 2.0)
