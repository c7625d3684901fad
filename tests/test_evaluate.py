"""curriculum/evaluate.py and curriculum/report.py: the eval CLI on every benchmark file, mean@k / pass@k
aggregation and the parallel-thinking analysis on hand-written responses, resume after an interruption,
--across over a run's checkpoints, and --model resolution."""
import dataclasses
import json
import os
import types

import pytest
import torch
import yaml

from curriculum import report
from curriculum.data import Example
from curriculum.evaluate import (EvalError, cli, config_kwargs, eval_config, evaluate, explicit_prompt_keys,
                                 sample_and_score)
from curriculum.models import prompt_settings, resolve_model
from model import build_model, save_model
from model.tokenizer import BASIC_WORDS, build_word_tokenizer
from rewards import extract_answer, is_equivalent
from rollout import Sampler

from .conftest import QWEN_TINY, TINY, data_file

BENCH_FILES = {"aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "amc23": "amc23.jsonl",
               "math500": "math500_test.jsonl"}
FAST = ["--set", "rollout.max_new_tokens=8", "--set", "eval.samples=1", "--set", "reward.workers=0",
        "--set", "data.prompt_style=none"]
WORDS = tuple(BASIC_WORDS) + ("Final", "Answer", "again", "check")
QUESTIONS = [("0", "what is 1 add 2", "3"), ("1", "what is 2 add 2", "4"), ("2", "what is 3 add 4", "7"),
             ("3", "what is 5 add 1", "6"), ("4", "what is 9 add 0", "9")]


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wtok():
    return build_word_tokenizer(WORDS)


def word_model(tok, seed=0):
    cfg = dict(TINY, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return build_model(cfg, seed=seed).eval()


def save_checkpoint(step_dir, model, tok, variant):
    """A checkpoint as grpo/checkpoint.py lays it out: model/, config.yaml, manifest.json (written last)."""
    save_model(os.path.join(step_dir, "model"), model.config, model.state_dict(), tok)
    with open(os.path.join(step_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"kind": "grpo", "variant": variant}, f)
    sizes = {os.path.relpath(os.path.join(r, n), step_dir): os.path.getsize(os.path.join(r, n))
             for r, _, files in os.walk(step_dir) for n in files}
    with open(os.path.join(step_dir, "manifest.json"), "w") as f:
        json.dump(sizes, f)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, wtok):
    """runs/stage: checkpoints/step-1 (causal), checkpoints/step-2 (structured), final/, config.yaml."""
    run = tmp_path_factory.mktemp("runs") / "stage"
    for step, variant in ((1, "causal"), (2, "structured")):
        save_checkpoint(str(run / "checkpoints" / f"step-{step}"), word_model(wtok, step), wtok, variant)
    save_model(str(run / "final"), word_model(wtok, 3).config, word_model(wtok, 3).state_dict(), wtok)
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump({"kind": "grpo", "variant": "causal"}, f)
    return str(run)


@pytest.fixture(scope="module")
def word_data(tmp_path_factory):
    """A data dir with toy.jsonl: questions in the word tokenizer's vocabulary."""
    root = tmp_path_factory.mktemp("data")
    with open(root / "toy.jsonl", "w") as f:
        for i, q, a in QUESTIONS:
            f.write(json.dumps({"id": i, "question": q, "answer": a}) + "\n")
    return str(root)


def toy_args(word_data):
    return ["--set", f"eval.data_dir={word_data}", "--set", "eval.benchmarks={toy: {path: toy.jsonl}}",
            "--benchmarks", "toy"] + FAST


# --- the CLI on the paper's benchmarks ------------------------------------------------------------------

def test_default_config_is_the_papers_protocol():
    cfg = eval_config("eval.yaml")
    names = {"aime24": 16, "aime25": 16, "amc23": 16, "math500": 1}
    kw = config_kwargs(cfg, dict.fromkeys(names))
    assert kw["samples"] == names
    assert kw["temperature"] == dict.fromkeys(names, 1.0)
    assert kw["max_new_tokens"] >= 3000 and kw["top_p"] == 1.0 and kw["top_k"] == 0
    assert cfg.eval.benchmarks["math500"]["path"] == "math500_test.jsonl" and cfg.eval.data_dir == "data"


def test_cli_limit_3_on_every_benchmark(tmp_path, capsys, qwen_tok):
    """--limit 3 on AIME24/25, AMC23 and MATH-500 with a tiny Qwen3 over the real Qwen vocabulary."""
    data_dir = os.path.dirname(data_file(BENCH_FILES["aime24"]))
    for name in BENCH_FILES.values():
        data_file(name)
    tok = qwen_tok
    cfg = dict(QWEN_TINY, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(cfg, seed=0)
    save_model(str(tmp_path / "qwen-tiny"), model.config, model.state_dict(), tok)
    out = tmp_path / "out"
    rc = cli(["--model", str(tmp_path / "qwen-tiny"), "--limit", "3", "--out", str(out), "--set",
              f"eval.data_dir={data_dir}", "--set", "eval.samples=2", "--set", "rollout.max_new_tokens=8",
              "--set", "reward.workers=1"])
    assert rc == 0
    for name in ("results.json", "results.md", "samples.jsonl", "settings.json") + report.PLOTS:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(BENCH_FILES) + ["overall"]
    for name in BENCH_FILES:
        assert results[name]["n_problems"] == 3 and results[name]["samples"] == 2
        assert results[name]["n_responses"] == 6 and 0 < results[name]["mean_length"] <= 8
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 24
    row = json.loads(lines[0])
    for key in ("benchmark", "problem_id", "sample", "response", "answer", "correct", "num_blocks",
                "well_formed", "first_block_position", "length", "finish_reason"):
        assert key in row
    printed = capsys.readouterr().out
    assert "AIME24 mean@2 / pass@2" in printed and "MATH-500 mean@2" in printed and str(out) in printed


# --- aggregation and analysis, without a model ----------------------------------------------------------

def rec(benchmark, problem, sample, correct, response="Final Answer: 1", length=10, finish="stop"):
    return report.make_record(benchmark=benchmark, problem_index=problem, problem_id=str(problem), sample=sample,
                              response=response, gold="1", correct=correct, answer=extract_answer(response),
                              length=length, finish_reason=finish, temperature=1.0)


def test_mean_and_pass_at_k_and_the_avg_column():
    # a: problem 0 right 1 of 4, problem 1 never; b: one sample each, 3 of 4 right
    records = [rec("a", 0, s, s == 2) for s in range(4)] + [rec("a", 1, s, False) for s in range(4)]
    records += [rec("b", p, 0, p != 1, length=20, finish="length" if p == 0 else "stop") for p in range(4)]
    result = report.summarize(list(reversed(records)), order=["b", "a"])
    assert list(result) == ["b", "a", "overall"]
    a, b, overall = result["a"], result["b"], result["overall"]
    assert (a["n_problems"], a["samples"], a["n_responses"]) == (2, 4, 8)
    assert a["mean_at_k"] == pytest.approx(0.125) and a["pass_at_k"] == pytest.approx(0.5)
    assert b["mean_at_k"] == pytest.approx(0.75) and b["pass_at_k"] == pytest.approx(0.75) and b["samples"] == 1
    assert overall["mean_at_k"] == pytest.approx((0.125 + 0.75) / 2)  # the paper's Avg: benchmarks weigh the same
    assert overall["accuracy"] == pytest.approx(4 / 12)  # pooled over responses
    assert overall["n_problems"] == 6 and overall["mean_length"] == pytest.approx((8 * 10 + 4 * 20) / 12)
    assert b["clipped_ratio"] == pytest.approx(0.25)
    assert report.summarize(records) == report.summarize(list(reversed(records)))
    table = report.results_table([("m", result)]).splitlines()
    assert table[0] == "| model | b mean@1 | a mean@4 / pass@4 | Avg. | parallel ratio |"
    assert table[2] == "| m | 75.0 | 12.5 / 50.0 | 43.8 | 0.0 |"


EARLY = ("<Parallel>\n<Path> 1 add 2 is 3 </Path>\n<Path> 2 add 1 is 3 </Path>\n</Parallel>\n"
         "<Summary> both 3 </Summary>\nso the answer is 3 and we check it again and again\nFinal Answer: 3")
LATE = ("first we add the numbers then we check the sum and the difference of the numbers and then we add "
        "it again and check the product of the numbers again\n<Parallel>\n"
        "<Path> 5 </Path>\n<Path> 6 </Path>\n</Parallel>\n<Summary> 5 </Summary>\nFinal Answer: 5")
PLAIN = "1 add 2 is 3\nFinal Answer: 3"
BROKEN = "we add\n<Parallel>\n<Path> 1 add 2 is 3 </Path>\nFinal Answer: 3"  # block never closed


def test_parallel_analysis_on_hand_written_responses():
    texts = [EARLY, LATE, PLAIN, BROKEN]
    records = [rec("a", i, 0, is_equivalent(extract_answer(t), "3"), response=t) for i, t in enumerate(texts)]
    assert [r["correct"] for r in records] == [True, False, True, True]
    fig = report.summarize(records)["a"]
    assert fig["parallel_ratio"] == 0.5 and fig["parallel_ratio_well_formed"] == 0.5
    assert fig["accuracy_with_block"] == 0.5 and fig["accuracy_without_block"] == 1.0
    assert (fig["n_with_block"], fig["n_without_block"]) == (2, 2)
    assert fig["blocks_per_response"] == 0.5 and fig["paths_per_block"] == pytest.approx(5 / 3)
    assert fig["format_validity"] == 0.75 and fig["block_validity"] == pytest.approx(2 / 3)
    assert fig["path_agreement"] == 0.5  # EARLY's paths both reach 3, LATE's reach 5 and 6
    positions = [t.index("<Parallel>") / len(t) for t in (EARLY, LATE, BROKEN)]
    assert fig["first_block_position"] == pytest.approx(sum(positions) / 3)
    assert fig["first_block_histogram"] == report.histogram(positions) and sum(fig["first_block_histogram"]) == 3
    assert fig["first_block_histogram"][0] == 1 and positions[1] > 0.5  # EARLY explores, LATE verifies
    assert report.histogram([0.0, 0.05, 0.5, 1.0]) == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]


class ScriptedSampler:
    """Stands in for rollout.Sampler: every response is the next of `texts` (word-tokenized)."""
    texts: list = []

    def __init__(self, model, tags=None, pad_id=0, **kw):
        self.pad_id = pad_id

    def generate(self, prompts, n=1, **kw):
        tok = self.tok
        rows = [tok.encode(self.texts[i % len(self.texts)], add_special_tokens=False) + [tok.eos_token_id]
                for i in range(len(prompts) * n)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return types.SimpleNamespace(response_ids=ids, response_mask=mask, finish_reason=("stop",) * len(rows))


def test_evaluate_scores_scripted_responses(monkeypatch, tmp_path, wtok):
    """The whole path (prompts, decoding, the scoring pool, records, files) on known responses."""
    ScriptedSampler.tok, ScriptedSampler.texts = wtok, [EARLY, LATE, PLAIN, BROKEN]
    monkeypatch.setattr("curriculum.evaluate.Sampler", ScriptedSampler)
    bench = {"toy": [Example("0", "what is 1 add 2", "3"), Example("1", "what is 2 add 1", "3")]}
    result = evaluate(torch.nn.Linear(2, 2), wtok, None, bench, samples=2, workers=1, out_dir=str(tmp_path),
                      progress=False)
    toy = result["toy"]
    assert toy["mean_at_k"] == 0.75 and toy["pass_at_k"] == 1.0 and toy["parallel_ratio"] == 0.5
    assert toy["accuracy_with_block"] == 0.5 and toy["path_agreement"] == 0.5
    rows = report.read_records(str(tmp_path / "samples.jsonl"))
    assert [r["response"] for r in rows] == [EARLY, LATE, PLAIN, BROKEN]
    assert [r["answer"] for r in rows] == ["3", "5", "3", "3"] and rows[1]["problem_index"] == 0
    assert "| toy |" in (tmp_path / "results.md").read_text()


# --- resuming -------------------------------------------------------------------------------------------

SAMPLER_GENERATE = Sampler.generate


class Interrupted(Exception):
    pass


def count_prompts(monkeypatch, fail_after=None):
    """Wrap Sampler.generate: record the prompts of each call; raise on call number `fail_after` + 1."""
    calls, original = [], SAMPLER_GENERATE

    def generate(self, prompts, *a, **kw):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted("simulated kill")
        calls.append(len(prompts))
        return original(self, prompts, *a, **kw)

    monkeypatch.setattr(Sampler, "generate", generate)
    return calls


def test_resume_after_interruption_redoes_nothing(monkeypatch, tmp_path, wtok):
    model = word_model(wtok)
    bench = {"x": [Example(i, q, a) for i, q, a in QUESTIONS], "y": [Example(i, q, a) for i, q, a in QUESTIONS[:2]]}
    kw = dict(samples=2, max_new_tokens=6, prompt_style="none", batch_prompts=2, workers=0, progress=False)
    full = evaluate(model, wtok, None, bench, out_dir=str(tmp_path / "full"), **kw)
    calls = count_prompts(monkeypatch, fail_after=1)
    with pytest.raises(Interrupted):  # resumed below under another KV budget: the samples do not change
        evaluate(model, wtok, None, bench, out_dir=str(tmp_path / "cut"), **kw, kv_cache_gb=5e-5)  # a few pages
    assert calls == [2] and len(report.read_records(str(tmp_path / "cut" / "samples.jsonl"))) == 4
    calls = count_prompts(monkeypatch)
    resumed = evaluate(model, wtok, None, bench, out_dir=str(tmp_path / "cut"), **kw)
    assert calls == [2, 1, 2]  # x: problems 2-3 and 4 (0-1 were done), y: 0-1
    assert resumed == full
    key = lambda r: (r["benchmark"], r["problem_index"], r["sample"])  # noqa: E731
    assert sorted(report.read_records(str(tmp_path / "cut" / "samples.jsonl")), key=key) == \
        sorted(report.read_records(str(tmp_path / "full" / "samples.jsonl")), key=key)
    # a torn file: problem 0 whole, problem 1 with one of its two samples and half a line
    path = tmp_path / "cut" / "samples.jsonl"
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["benchmark"] == "x"]
    by_problem = sorted(lines, key=lambda s: (json.loads(s)["problem_index"], json.loads(s)["sample"]))
    path.write_text("\n".join(by_problem[:3]) + "\n" + by_problem[3][:25])
    calls = count_prompts(monkeypatch)
    again = evaluate(model, wtok, None, bench, out_dir=str(tmp_path / "cut"), **kw)
    assert calls == [1, 2, 1, 2]  # x: 1 (its batch-mate 0 is done), 2-3, 4; y: 0-1 again
    assert again["x"]["n_responses"] == 10 and len(report.read_records(str(path))) == 14
    calls = count_prompts(monkeypatch)
    assert evaluate(model, wtok, None, bench, out_dir=str(tmp_path / "cut"), **kw) == again and calls == []


def test_resume_redoes_problems_whose_text_changed_under_the_same_id(monkeypatch, tmp_path, wtok):
    model = word_model(wtok)
    bench = {"x": [Example(i, q, a) for i, q, a in QUESTIONS[:3]]}
    kw = dict(samples=1, max_new_tokens=4, prompt_style="none", batch_prompts=1, workers=0, progress=False,
              out_dir=str(tmp_path))
    evaluate(model, wtok, None, bench, **kw)
    (i0, q0, a0), (i1, q1, a1) = QUESTIONS[:2]
    edited = {"x": [Example(i0, q1, a0), Example(i1, q1, a1 + "0"), bench["x"][2]]}  # ids kept, texts changed
    calls = count_prompts(monkeypatch)
    evaluate(model, wtok, None, edited, **kw)
    assert calls == [1, 1]  # problems 0 (new question) and 1 (new answer); 2 is unchanged
    records = sorted(report.read_records(str(tmp_path / "samples.jsonl")), key=lambda r: r["problem_index"])
    assert [r["problem_hash"] for r in records] == [report.problem_hash(ex) for ex in edited["x"]]
    assert records[1]["gold"] == a1 + "0"


def test_resume_refuses_other_settings(tmp_path, wtok):
    model = word_model(wtok)
    bench = {"x": [Example(i, q, a) for i, q, a in QUESTIONS[:2]]}
    kw = dict(samples=1, max_new_tokens=4, prompt_style="none", workers=0, progress=False, out_dir=str(tmp_path))
    evaluate(model, wtok, None, bench, **kw)
    with pytest.raises(EvalError, match="max_new_tokens: 4 -> 5"):
        evaluate(model, wtok, None, bench, **{**kw, "max_new_tokens": 5})
    with pytest.raises(EvalError, match="weights"):
        evaluate(word_model(wtok, seed=1), wtok, None, bench, **kw)
    out = evaluate(model, wtok, None, bench, **{**kw, "max_new_tokens": 5, "restart_if_changed": True})
    assert out["x"]["n_responses"] == 2 and len(report.read_records(str(tmp_path / "samples.jsonl"))) == 2


def test_structured_evaluation_patches_and_restores(wtok):
    from model import add_tag_tokens, structured_tags
    model, tags = word_model(wtok), add_tag_tokens(wtok)
    bench = {"x": [Example(i, q, a) for i, q, a in QUESTIONS[:2]]}
    records = sample_and_score(model, wtok, tags, bench, samples=2, max_new_tokens=6, structured=True,
                               prompt_style="none", workers=0, progress=False)
    assert len(records) == 4 and structured_tags(model) is None and not model.training


# --- --across and --model resolution ---------------------------------------------------------------------

def test_across_a_run(fake_run, word_data, tmp_path, capsys):
    out = tmp_path / "across"
    assert cli(["--across", fake_run, "--out", str(out)] + toy_args(word_data)) == 0
    across = json.loads((out / "across.json").read_text())["checkpoints"]
    assert [e["name"] for e in across] == ["step-1", "step-2", "final"]
    assert [e["step"] for e in across] == [1, 2, None]
    assert [e["variant"] for e in across] == ["causal", "structured", "causal"]
    assert all(e["results"]["toy"]["n_problems"] == len(QUESTIONS) for e in across)
    for name in ("across.png", "across.md", "step-1/results.json", "step-2/samples.jsonl", "final/results.md"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "Strategy evolution" in printed and "| step-2 |" in printed


def test_model_resolution(fake_run, tmp_path):
    ckpts = os.path.join(fake_run, "checkpoints")
    final = resolve_model(fake_run)
    assert (final.path, final.name, final.variant) == (os.path.join(fake_run, "final"), "final", "causal")
    assert final.label == "stage/final"
    step2 = resolve_model(os.path.join(ckpts, "step-2"))
    assert (step2.path, step2.variant, step2.step, step2.label) == (
        os.path.join(ckpts, "step-2", "model"), "structured", 2, "stage/step-2")
    assert resolve_model(os.path.join(ckpts, "step-2", "model")) == step2
    assert resolve_model(os.path.join(ckpts, "step-2"), variant="causal").variant == "causal"
    hf = resolve_model(os.path.join(ckpts, "step-1", "model"))
    assert hf.variant == "causal" and hf.name == "step-1"
    # a run without final/: its latest complete checkpoint
    bare = tmp_path / "pipeline" / "stage1"
    os.makedirs(bare / "checkpoints")
    for step in (1, 2):
        os.symlink(os.path.join(ckpts, f"step-{step}"), bare / "checkpoints" / f"step-{step}")
    assert resolve_model(str(bare)).path == os.path.join(str(bare), "checkpoints", "step-2", "model")
    with pytest.raises(EvalError, match=r"pass one of them: \['stage1'\]"):
        resolve_model(str(tmp_path / "pipeline"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(EvalError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path / "empty"))


def test_cli_errors_name_the_problem(tmp_path, word_data, capsys):
    os.makedirs(tmp_path / "empty")
    assert cli(["--model", str(tmp_path / "empty")] + toy_args(word_data)) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert cli(["--model", str(tmp_path), "--set", "eval.benchmarks={toy: {path: toy.jsonl, sample: 2}}"]) == 2
    assert "eval.benchmarks.toy.sample" in capsys.readouterr().err
    assert cli(["--model", str(tmp_path), "--set", f"eval.data_dir={tmp_path}"]) == 2
    assert "aime24.jsonl: no such data file" in capsys.readouterr().err


# --- the prompt a model was trained with (issue 18) -------------------------------------------------------

def test_saved_template_and_prompt_style_win_unless_the_config_names_them(wtok, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-1"
    save_checkpoint(str(step), word_model(wtok), wtok, "causal")
    (step / "config.yaml").write_text(yaml.safe_dump({"variant": "structured",
                                                      "data": {"template": "chat", "prompt_style": "plain"}}))
    ref = resolve_model(str(step))
    assert (ref.variant, ref.template, ref.prompt_style) == ("structured", "chat", "plain")
    assert explicit_prompt_keys("eval.yaml") == set()  # eval.yaml leaves both to the model
    cfg = eval_config("eval.yaml")
    assert (cfg.data.template, cfg.data.prompt_style) == ("raw", "parallel")  # the defaults
    assert prompt_settings(ref, cfg) == {"template": "chat", "prompt_style": "plain", "instruction": None}
    chosen = ["data.template=raw"]
    assert explicit_prompt_keys("eval.yaml", chosen) == {"template"}
    assert prompt_settings(ref, eval_config("eval.yaml", chosen), {"template"}) == {
        "template": "raw", "prompt_style": "plain", "instruction": None}
    # a model saved without either: the config's values
    unsaved = dataclasses.replace(ref, template=None, prompt_style=None)
    assert prompt_settings(unsaved, cfg) == {"template": "raw", "prompt_style": "parallel", "instruction": None}


def test_an_export_copied_away_from_its_run_reads_its_config_json(wtok, tmp_path):
    model = word_model(wtok)
    save_model(str(tmp_path / "export"), model.config, model.state_dict(), wtok, variant="structured",
               template="chat", prompt_style="plain", instruction="Solve: {question}")
    ref = resolve_model(str(tmp_path / "export"))
    assert (ref.variant, ref.template, ref.prompt_style) == ("structured", "chat", "plain")
    assert ref.instruction == "Solve: {question}"  # the instruction travels with the export too


def test_cli_prompts_a_chat_trained_model_with_the_chat_template(wtok, word_data, tmp_path, capsys):
    model = word_model(wtok)
    save_model(str(tmp_path / "final"), model.config, model.state_dict(), wtok)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"variant": "causal", "data": {"template": "chat"}}))
    assert cli(["--model", str(tmp_path / "final"), "--out", str(tmp_path / "a")] + toy_args(word_data)) == 0
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["template"] == "chat"
    assert "data.template=chat, as the model was trained" in capsys.readouterr().out
    args = toy_args(word_data) + ["--set", "data.template=raw"]  # the command line still wins
    assert cli(["--model", str(tmp_path / "final"), "--out", str(tmp_path / "b")] + args) == 0
    assert json.loads((tmp_path / "b" / "settings.json").read_text())["template"] == "raw"
