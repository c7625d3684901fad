"""The CPU demo (configs/demo.yaml): `python run.py --quick` runs all three stages through the real stage
code and writes the table, summary.json and the plots. The full run (10 minutes, twice) is marked slow."""
import json
import os
import subprocess
import sys

import pytest

from curriculum.config import load_config, pipeline_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("accuracy", "accuracy_easy", "accuracy_hard", "parallel_ratio", "format_validity", "path_agreement",
           "mean_length")
SECONDS = ("seconds_train", "seconds_sample", "seconds_eval", "seconds")  # the time breakdown, then the total
PLOTS = ("reward_accuracy.png", "parallel_ratio.png", "response_length.png", "first_parallel_position.png")


def test_demo_config_as_documented():
    """configs/demo.yaml's sizes, which the README's table and timings are for: held-out sets of 200 easy and
    200 hard problems (other seeds than training), SFT on easy problems only, the last RL stage on the mix."""
    stages = {s.name: s for s in pipeline_stages(load_config("demo.yaml"))}
    assert list(stages) == ["stage0", "stage1", "stage2"] and {s.variant for s in stages.values()} == {"causal"}
    bench = stages["stage0"].eval.benchmarks
    assert {n: (b["synthetic"]["difficulty"], b["synthetic"]["n"], b["samples"]) for n, b in bench.items()} == {
        "easy": ("easy", 200, 4), "hard": ("hard", 200, 4)}
    data = {name: s.data.synthetic for name, s in stages.items()}
    assert [d["difficulty"] for d in data.values()] == ["easy", "easy", "mixed_hard"]
    assert data["stage0"]["solution"] == "parallel" and all(d["n"] == 6000 for d in data.values())
    seeds = [d["seed"] for d in data.values()] + [b["synthetic"]["seed"] for b in bench.values()]
    assert len(set(seeds)) == len(seeds)
    s0, s1, s2 = stages.values()
    assert (s0.sft.steps, s0.sft.batch_size, s1.grpo.steps, s2.grpo.steps) == (2000, 8, 30, 50)
    assert s1.rollout.group_size == 8 and (s1.grpo.prompts_per_step, s2.grpo.prompts_per_step) == (16, 32)
    quick = {s.name: s for s in pipeline_stages(load_config("demo.yaml", quick=True))}
    assert quick["stage0"].sft.steps == 8 and quick["stage2"].grpo.steps == 2 and quick["stage2"].eval.limit == 16
    assert [b["samples"] for b in quick["stage2"].eval.benchmarks.values()] == [1, 1]
    short = {s.name: s for s in pipeline_stages(load_config("demo.yaml", short=True))}
    assert (short["stage0"].sft.steps, short["stage1"].grpo.steps, short["stage2"].grpo.steps) == (400, 10, 10)


def run_demo(tmp_path, *extra, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--set", f"run_dir={tmp_path / 'demo'}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((tmp_path / "demo" / "summary.json").read_text())


@pytest.mark.parametrize("variant", ["causal", "structured"])
def test_quick_demo_writes_the_table_and_plots_and_reproduces(tmp_path, variant):
    r, summary = run_demo(tmp_path, "--quick", "--set", f"variant={variant}")
    assert summary["variant"] == variant and summary["seed"] == 0
    for stage in ("stage0", "stage1", "stage2"):
        assert all(key in summary[stage] for key in FIGURES + SECONDS), summary[stage]
        s = summary[stage]
        # every phase took time, and the phases fit in the stage's wall clock (setup and export are the rest)
        assert all(s[k] > 0 for k in SECONDS) and sum(s[k] for k in SECONDS[:-1]) <= s["seconds"]
    for name in PLOTS:
        assert (tmp_path / "demo" / name).stat().st_size > 1000
    assert "| stage2 |" in r.stdout and f"run directory: {tmp_path / 'demo'}" in r.stdout
    assert "| train s | sample s | eval s | time s |" in r.stdout
    note = "--quick: a smoke run at toy size; it checks that every stage runs, its figures mean nothing"
    assert r.stdout.startswith(note) and r.stdout.split("\n").count(note) == 2  # before the run and under the table
    os.rename(tmp_path / "demo", tmp_path / "first")  # same seed, same table
    _, again = run_demo(tmp_path, "--quick", "--set", f"variant={variant}")
    for stage in ("stage0", "stage1", "stage2"):
        assert {k: again[stage][k] for k in FIGURES} == {k: summary[stage][k] for k in FIGURES}


@pytest.mark.slow
def test_full_demo_learns_and_reproduces(tmp_path):
    """What the README's demo section claims, from the committed config (one thread here): the cold start
    teaches the format (>= 95% of held-out responses well formed and opening a block), RL on the mix gains
    >= 10 points of hard accuracy over the cold start and costs at most 5 points of easy accuracy, the format
    holds; a second run with the same seed gives the same table."""
    _, first = run_demo(tmp_path, timeout=1800)
    s0, s2 = first["stage0"], first["stage2"]
    assert s0["format_validity"] >= 0.95 and s0["parallel_ratio"] >= 0.95
    assert s2["accuracy_hard"] >= s0["accuracy_hard"] + 0.10
    assert s2["accuracy_easy"] >= s0["accuracy_easy"] - 0.05
    assert s2["format_validity"] >= 0.9 and s0["accuracy_easy"] >= 0.6
    os.rename(tmp_path / "demo", tmp_path / "first")
    _, second = run_demo(tmp_path, timeout=1800)
    for stage in ("stage0", "stage1", "stage2"):
        assert {k: second[stage][k] for k in FIGURES} == {k: first[stage][k] for k in FIGURES}
