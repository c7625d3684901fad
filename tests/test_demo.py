"""The CPU demo (configs/demo.yaml): `python run.py --quick` runs all three stages through the real stage
code and writes the table, summary.json and the plots. The full run (15 minutes) is marked slow."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("accuracy", "accuracy_easy", "accuracy_hard", "parallel_ratio", "format_validity", "path_agreement",
        "mean_length", "seconds")
PLOTS = ("reward_accuracy.png", "parallel_ratio.png", "response_length.png", "first_parallel_position.png")


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
        assert all(key in summary[stage] for key in KEYS), summary[stage]
    for name in PLOTS:
        assert (tmp_path / "demo" / name).stat().st_size > 1000
    assert "| stage2 |" in r.stdout and f"run directory: {tmp_path / 'demo'}" in r.stdout
    os.rename(tmp_path / "demo", tmp_path / "first")  # same seed, same table
    _, again = run_demo(tmp_path, "--quick", "--set", f"variant={variant}")
    for stage in ("stage0", "stage1", "stage2"):
        assert {k: again[stage][k] for k in KEYS[:-1]} == {k: summary[stage][k] for k in KEYS[:-1]}


@pytest.mark.slow
def test_full_demo_learns_and_reproduces(tmp_path):
    """The figures the README reports: format and parallel ratio after the cold start, format kept after RL,
    and the same table from a second run with the same seed."""
    _, first = run_demo(tmp_path, timeout=1800)
    assert first["stage0"]["format_validity"] >= 0.85 and first["stage0"]["parallel_ratio"] >= 0.85
    assert first["stage2"]["format_validity"] >= 0.8
    assert first["stage0"]["accuracy_easy"] >= 0.6
    os.rename(tmp_path / "demo", tmp_path / "first")
    _, second = run_demo(tmp_path, timeout=1800)
    for stage in ("stage0", "stage1", "stage2"):
        assert {k: second[stage][k] for k in KEYS[:-1]} == {k: first[stage][k] for k in KEYS[:-1]}
