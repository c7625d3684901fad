"""Held-out evaluation during training (eval.every), the best checkpoint (checkpoint.keep_best) and rollout dumps
(report.rollouts_every): grpo/loop.py, grpo/dumps.py, curriculum/evaluate.py (StepEvaluation, heldout_result)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from curriculum import evaluate
from curriculum.config import ConfigError, build_config, deep_merge
from curriculum.preflight import check_eval_keys
from curriculum.stages import run_pipeline
from grpo.dumps import dump_path, read_dump
from grpo.fsdp import Dist
from grpo.loop import TrainState, evaluation_due, record_best
from model import load_model

from .conftest import TINY
from .test_stages import ROOT, free_port

EASY = {"easy": {"synthetic": {"difficulty": "easy", "n": 4, "seed": 1001}, "samples": 2}}
FIELDS = ("step", "rank", "round", "group", "sample", "prompt", "response", "gold", "reward", "reward_parts",
          "reward_funcs", "advantage", "finish_reason", "num_blocks", "paths_per_block", "well_formed",
          "first_block_position", "prompt_length", "response_length", "sampler_logp_mean")


def stage(tmp_path, name="run", **over) -> dict:
    base = {"kind": "grpo", "name": "g", "run_dir": str(tmp_path / name), "seed": 1,
            "model": {"tokenizer": "words", "build": dict(TINY, max_position_embeddings=256)},
            "data": {"prompt_style": "demo", "template": "raw", "max_prompt_tokens": 64,
                     "synthetic": {"difficulty": "easy", "n": 8, "seed": 2}},
            "rollout": {"group_size": 2, "max_new_tokens": 8}, "reward": {"workers": 0},
            "grpo": {"steps": 3, "prompts_per_step": 2, "mini_batch_prompts": 2},
            "optim": {"lr": 1e-2}, "checkpoint": {"every": 0, "keep": 1},
            "eval": {"every": 1, "benchmarks": EASY}}
    return deep_merge(base, over)


def rows(run_dir) -> list:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture()
def counted(monkeypatch):
    """Counts the held-out evaluations run (curriculum.evaluate.heldout_result, which StepEvaluation calls)."""
    calls = []
    real = evaluate.heldout_result

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(evaluate, "heldout_result", counting)
    import curriculum.stages
    monkeypatch.setattr(curriculum.stages, "heldout_result", counting)
    return calls


def test_evaluation_due_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 8) if evaluation_due(s, 3, s == 7)] == [3, 6, 7]
    assert not any(evaluation_due(s, 0, s == 7) for s in range(1, 8))


def test_record_best_keeps_the_best_step_by_direction():
    for mode, values, step, value in (("max", [0.2, 0.9, 0.5, 0.9], 2, 0.9), ("min", [0.2, 0.9, 0.1, None], 3, 0.1)):
        state = TrainState()
        news = []
        for s, v in enumerate(values, start=1):
            state.step = s
            news.append(record_best(state, {"eval/a/m": v}, "eval/a/m", mode))
        assert state.best == {"metric": "eval/a/m", "step": step, "value": value}
        assert news.count(True) == 2  # the first value, then each strict improvement
    state = TrainState(step=5, best={"metric": "eval/b/m", "step": 1, "value": 9.0})  # another metric's record
    assert record_best(state, {"eval/a/m": 0.1}, "eval/a/m") and state.best["step"] == 5


def test_eval_every_logs_each_set_at_the_right_steps_once_and_not_again_after_a_resume(tmp_path, counted):
    cfg = build_config(stage(tmp_path, grpo={"steps": 4}, eval={"every": 2}))
    summary = run_pipeline(cfg, Dist())["g"]
    logged = rows(cfg.run_dir)
    evaluated = [r["step"] for r in logged if "eval/easy/mean_at_k" in r]
    assert evaluated == [1, 3]  # after 2 and 4 updates; the last is the end-of-stage evaluation
    assert len(counted) == 2  # ... which is not run a second time
    for r in logged:
        if r["step"] in evaluated:
            assert {f"eval/{s}/{m}" for s in ("easy", "overall") for m in ("mean_at_k", "format_validity",
                    "parallel_ratio", "first_block_position", "mean_length")} | {"eval/easy/pass_at_k"} <= set(r)
            assert r["time/eval"] > 0
    assert summary["mean_length"] == logged[-1]["eval/overall/mean_length"]
    assert summary["seconds_eval"] >= logged[1]["time/eval"]
    # extended from its last checkpoint: steps 4-5 evaluated once each, the earlier evaluations never again
    counted.clear()
    run_pipeline(build_config(stage(tmp_path, grpo={"steps": 6}, eval={"every": 2})), Dist())
    logged = rows(cfg.run_dir)
    assert [r["step"] for r in logged] == list(range(6))
    assert [r["step"] for r in logged if "eval/easy/mean_at_k" in r] == [1, 3, 5] and len(counted) == 1


def test_evaluations_leave_the_training_unchanged(tmp_path):
    """The evaluation draws nothing from the training's RNG: weights and metrics equal a run without it."""
    with_eval = build_config(stage(tmp_path, "a"))
    without = build_config(stage(tmp_path, "b", eval={"every": 0}))
    run_pipeline(with_eval, Dist())
    run_pipeline(without, Dist())
    wa, wb = (load_model(os.path.join(c.run_dir, "final")).state_dict() for c in (with_eval, without))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = rows(with_eval.run_dir), rows(without.run_dir)
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]


def test_keep_best_keeps_the_best_step_beside_the_last_and_exports_it(tmp_path, monkeypatch):
    values = iter([0.3, 0.8, 0.5, 0.6, 0.7, 0.9])  # one per evaluation: the best is step 2, later step 6
    monkeypatch.setattr(evaluate, "step_figures", lambda result: {"eval/easy/mean_at_k": next(values)})
    keep = {"every": 0, "keep": 1, "keep_best": "eval/easy/mean_at_k"}
    cfg = build_config(stage(tmp_path, grpo={"steps": 4}, checkpoint=keep))
    summary = run_pipeline(cfg, Dist())["g"]
    ckpts = os.path.join(cfg.run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["step-2", "step-4"]  # keep 1 (the last) beside the best
    assert summary["best"]["step"] == 2 and summary["best"]["value"] == 0.8
    best, saved = (load_model(p).state_dict() for p in (os.path.join(cfg.run_dir, "best"),
                                                        os.path.join(ckpts, "step-2", "model")))
    assert all(torch.equal(best[k], saved[k]) for k in best)
    assert os.path.exists(os.path.join(cfg.run_dir, "best", "manifest.json"))
    # resumed and extended: the record comes back from the checkpoint; 0.7 does not beat it, 0.9 does
    summary = run_pipeline(build_config(stage(tmp_path, grpo={"steps": 6}, checkpoint=keep)), Dist())["g"]
    assert summary["best"]["step"] == 6 and summary["best"]["value"] == 0.9
    assert sorted(os.listdir(ckpts)) == ["step-6"]


def test_keep_best_and_eval_every_are_checked_at_load(tmp_path):
    good = build_config(stage(tmp_path, checkpoint={"keep_best": "eval/easy/pass_at_k"}))
    check_eval_keys(good)
    for over, words in ((dict(checkpoint={"keep_best": "eval/hard/mean_at_k"}), "eval/<set>/<metric>"),
                        (dict(checkpoint={"keep_best": "eval/overall/pass_at_k"}), "no pass_at_k"),
                        (dict(checkpoint={"keep_best": "reward"}), "eval/<set>/<metric>"),
                        (dict(checkpoint={"keep_best": "eval/easy/mean_at_k"}, eval={"every": 0}), "eval.every > 0"),
                        (dict(checkpoint={"keep_best": "eval/easy/mean_at_k"}, eval={"benchmarks": {}}),
                         "one of ['overall']")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_eval_keys(build_config(stage(tmp_path, **over)))


def test_a_rollout_dump_holds_every_sample_of_the_step_with_every_field(tmp_path):
    cfg = build_config(stage(tmp_path, eval={"every": 0}, report={"rollouts_every": 2},
                            grpo={"steps": 3, "prompts_per_step": 2, "mini_batch_prompts": 2}))
    run_pipeline(cfg, Dist())
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "rollouts"))) == ["step-0.jsonl.gz", "step-2.jsonl.gz"]
    logged = rows(cfg.run_dir)
    for step in (0, 2):
        records = read_dump(dump_path(cfg.run_dir, step))
        assert len(records) == 2 * 2  # prompts_per_step x group_size
        assert all(set(FIELDS) <= set(r) and r["step"] == step for r in records)
        mean = sum(r["reward"] for r in records) / len(records)
        assert mean == pytest.approx(logged[step]["reward"])
        assert sum(r["response_length"] for r in records) / len(records) == \
            pytest.approx(logged[step]["completions/mean_length"])
        assert all(r["advantage"] is not None and "accuracy" in r["reward_parts"] for r in records)


def config_file(tmp_path, name, **over) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(stage(tmp_path, name, **over)))
    return str(path)


@pytest.mark.slow
def test_two_ranks_give_the_figures_of_one_and_dump_every_rank(tmp_path):
    """lr 0: both runs evaluate the same weights at every step, so the figures must match exactly; the dump
    holds the samples of both ranks."""
    over = dict(optim={"lr": 0.0}, report={"rollouts_every": 1}, grpo={"steps": 2},
                eval={"benchmarks": {"easy": {"samples": 3, "synthetic": {"n": 5}}}, "batch_prompts": 4})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = config_file(tmp_path, "one", **over), config_file(tmp_path, "two", **over)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--config", one], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "run.py"), "--config", two], capture_output=True,
                       text=True, timeout=400, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = [[{k: v for k, v in row.items() if k.startswith("eval/")} for row in rows(tmp_path / n)]
               for n in ("one", "two")]
    assert figures[0] == figures[1] and all(f for f in figures[0])
    records = read_dump(dump_path(str(tmp_path / "two"), 1))
    assert len(records) == 2 * 2 and {r["rank"] for r in records} == {0, 1}
    assert all(set(FIELDS) <= set(r) for r in records)
    summaries = [json.load(open(tmp_path / n / "summary.json")) for n in ("one", "two")]
    assert summaries[0]["accuracy_easy"] == summaries[1]["accuracy_easy"]


def test_an_sft_stage_evaluates_every_n_steps_too(tmp_path, counted):
    over = {"kind": "sft", "data": {"synthetic": {"difficulty": "easy", "n": 16, "seed": 1, "solution": "parallel"},
                                    "val_size": 2},
            "sft": {"steps": 3, "batch_size": 2, "eval_samples": 1, "max_total_tokens": 160}, "eval": {"every": 2}}
    cfg = build_config(stage(tmp_path, **over))
    summary = run_pipeline(cfg, Dist())["g"]
    logged = rows(cfg.run_dir)
    assert [r["step"] for r in logged if "eval/easy/mean_at_k" in r] == [1, 2] and len(counted) == 2
    assert summary["format_validity"] == logged[-1]["eval/overall/format_validity"]
