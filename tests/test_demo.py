"""The CPU demo (configs/demo.yaml): `python run.py --quick` runs all three stages through the real stage
code and writes the table, summary.json and the plots. The full run (10 minutes, twice) is marked slow, and so
are the quick demo on two nodes (torchrun --nnodes 2 on one machine) and Ctrl-C under torchrun."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from curriculum.config import load_config, pipeline_stages

from .dist_worker import free_port

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


# --- under torchrun: two nodes, and Ctrl-C ----------------------------------------------------------------

def launch(args: list, log, env_threads: str = "1") -> subprocess.Popen:
    """`python -m torch.distributed.run ARGS` in its own process group (a terminal's foreground job), output to
    the open file `log`."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS=env_threads))


def wait_all(procs: list, timeout: float) -> list:
    """Exit codes of `procs`; a launch still running after `timeout` s (a hang) is killed and fails the test."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun still running after {timeout} s")


@pytest.mark.slow
def test_quick_demo_runs_on_two_nodes(tmp_path):
    """torchrun --nnodes 2 on one machine (the README's multi-node command): two launchers of one rank each meet
    at a c10d rendezvous on localhost, as two GPU nodes meet at the first one's address, share the run directory
    and run the quick demo to the end; the table is that of two ranks under one launcher, said once."""
    port = free_port()
    nodes = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
             f"localhost:{port}", "--rdzv_id", "two-nodes"]
    demo = [os.path.join(ROOT, "run.py"), "--quick", "--set"]
    logs = [open(tmp_path / f"node{k}.txt", "w") for k in range(2)]
    with logs[0], logs[1]:
        codes = wait_all([launch(nodes + demo + [f"run_dir={tmp_path / 'nodes'}"], log) for log in logs], 600)
    out = [(tmp_path / f"node{k}.txt").read_text() for k in range(2)]
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert sum("| stage2 |" in text for text in out) == 1  # the node that got rank 0 speaks
    with open(tmp_path / "one.txt", "w") as log:
        one = [f"--nproc_per_node", "2", "--master_port", str(free_port())]
        assert wait_all([launch(one + demo + [f"run_dir={tmp_path / 'one'}"], log)], 600) == [0]
    two_nodes, one_node = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("nodes", "one"))
    for stage in ("stage0", "stage1", "stage2"):
        assert {k: two_nodes[stage][k] for k in FIGURES} == {k: one_node[stage][k] for k in FIGURES}


@pytest.mark.slow
def test_ctrl_c_under_torchrun_keeps_the_step_and_torchrun_exits_1(tmp_path):
    """What a torchrun user sees after Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it)
    in a GRPO stage: one line from rank 0 naming the checkpoint kept; then torchrun's own report of the signal,
    a traceback ending in SignalException, and exit code 1 (torchrun re-raises any signal it is sent, whatever
    its workers return; each rank exited 130). The same command resumes there and runs to the end."""
    run_dir = tmp_path / "demo"
    demo = [os.path.join(ROOT, "run.py"), "--quick", "--set", f"run_dir={run_dir}", "--set", "grpo.steps=6"]
    metrics = run_dir / "stage1" / "metrics.jsonl"
    with open(tmp_path / "cut.txt", "w") as log:
        proc = launch(["--nproc_per_node", "2", "--master_port", str(free_port())] + demo, log)
        while not (metrics.exists() and metrics.stat().st_size):  # stage 1 finished a step: 5 steps to go
            assert proc.poll() is None, (tmp_path / "cut.txt").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        code = wait_all([proc], 300)[0]
    out = (tmp_path / "cut.txt").read_text()
    assert code == 1, out[-3000:]
    assert "Received 2 death signal, shutting down workers" in out and "SignalException" in out
    stops = [line for line in out.splitlines() if line.startswith("stopped ")]
    assert len(stops) == 1 and f"{run_dir / 'stage1' / 'checkpoints'}" in stops[0], stops
    # "stopped while sampling step N + 1, which was dropped; checkpoint of step N in ..." or, when the signal came
    # during scoring or the update, "stopped at step N; checkpoint saved in ...": step N is kept either way
    found = re.search(r"checkpoint of step (\d+)|stopped at step (\d+)", stops[0])
    step = int(found.group(1) or found.group(2))
    kept = sorted(os.listdir(run_dir / "stage1" / "checkpoints"))
    assert kept == [f"step-{step}"] and 1 <= step < 6
    with open(tmp_path / "again.txt", "w") as log:
        codes = wait_all([launch(["--nproc_per_node", "2", "--master_port", str(free_port())] + demo, log)], 600)
    again = (tmp_path / "again.txt").read_text()
    assert codes == [0], again[-3000:]
    assert f"stage1: resumed from {run_dir / 'stage1' / 'checkpoints' / kept[0]}" in again
    assert "| stage2 |" in again
