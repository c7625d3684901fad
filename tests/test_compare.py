"""studies/: `run.py compare` runs a study's bases and arms x seeds, resumes, reports crashes, and writes
its table from the runs' files; the committed study configs are pinned."""
import glob
import json
import math
import os

import pytest
import yaml

from curriculum.config import CONFIG_DIR, load_config, save_config
from studies.compare import cli
from studies.report import read_run, run_value
from studies.study import load_study, plan_runs, resolve_stage
from curriculum.schema import ConfigError

STUDIES = sorted(glob.glob(os.path.join(CONFIG_DIR, "studies", "*.yaml")))


def write_study(tmp_path, seeds=(0, 1, 2), **extra):
    study = {"name": "toy", "run_dir": str(tmp_path / "runs"), "config": "demo", "stage": "stage2",
             "set": ["grpo.steps=3"], "seeds": list(seeds), "bases": {"cold": {"stage": "stage0"}},
             "arms": [{"name": "a", "set": ["reward.mode=accuracy"]}, {"name": "b", "set": ["grpo.clip_high=0.28"]}],
             "metrics": ["summary/accuracy_hard", "accuracy"], "last_steps": 2, **extra}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


class FakeRun:
    """A launcher that does what run.py leaves behind (config.yaml, metrics.jsonl, summary.json), with figures
    set by the test per (run_dir, metric); `crash` run dirs exit 1 half way (metrics, no summary)."""

    def __init__(self, figures=None, crash=()):
        self.figures, self.crash, self.launched = figures or {}, set(crash), []

    def __call__(self, run, args):
        self.launched.append(run.run_dir)
        sets = [a for a in args[2:] if a != "--set"]
        os.makedirs(run.run_dir, exist_ok=True)
        save_config(load_config(args[1], sets), os.path.join(run.run_dir, "config.yaml"))
        name = os.path.basename(os.path.dirname(run.run_dir)) + "/" + os.path.basename(run.run_dir)
        with open(os.path.join(run.run_dir, "metrics.jsonl"), "w") as f:
            for step, acc in enumerate(self.figures.get((name, "accuracy"), [0.0, 0.0, 0.0])):
                f.write(json.dumps({"step": step, "accuracy": acc}) + "\n")
        if name in self.crash:
            return 1, 0.1
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump({"accuracy_hard": self.figures.get((name, "hard"), 0.0)}, f)
        return 0, 0.1


def test_compare_table_hand_values(tmp_path, capsys):
    figures = {}
    for seed, (ha, hb) in enumerate([(0.1, 0.2), (0.2, 0.4), (0.3, 0.3)]):
        figures[(f"a/seed-{seed}", "hard")], figures[(f"b/seed-{seed}", "hard")] = ha, hb
        figures[(f"a/seed-{seed}", "accuracy")] = [0.0, 0.5, 0.5 + seed * 0.1]  # last 2 steps: 0.5 + 0.05 seed
    launcher = FakeRun(figures)
    assert cli(["--config", write_study(tmp_path), "--jobs", "2"], launcher=launcher) == 0
    assert len(launcher.launched) == 1 + 6  # the base once, then 2 arms x 3 seeds
    out = capsys.readouterr().out
    assert "[7/7]" in out and "a seed 2: done" in out
    report = json.loads((tmp_path / "runs" / "toy" / "compare.json").read_text())
    hard = report["metrics"]["summary/accuracy_hard"]
    assert hard["arms"]["a"]["mean"] == pytest.approx(0.2)
    # a: 0.1, 0.2, 0.3 -> s = 0.1, half width t_{0.975,2} * 0.1 / sqrt(3)
    assert hard["arms"]["a"]["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    # b - a by seed: 0.1, 0.2, 0.0 -> mean 0.1, s = 0.1
    assert hard["differences"]["b"]["mean"] == pytest.approx(0.1)
    assert hard["differences"]["b"]["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    assert report["metrics"]["accuracy"]["arms"]["a"]["mean"] == pytest.approx(0.55)  # 0.5, 0.55, 0.6
    md = (tmp_path / "runs" / "toy" / "compare.md").read_text()
    assert "| summary/accuracy_hard | 0.200 ± 0.248 | 0.300 ± 0.248 | +0.100 ± 0.248 |" in md
    assert "means little" not in md and report["few_seeds"] is False
    assert (tmp_path / "runs" / "toy" / "curves.png").stat().st_size > 1000


def test_compare_resumes_only_what_is_not_finished(tmp_path, capsys):
    path = write_study(tmp_path)
    first = FakeRun(crash={"b/seed-1"})
    assert cli(["--config", path], launcher=first) == 1  # one crash: the others still ran
    assert len(first.launched) == 7
    captured = capsys.readouterr()
    assert "b seed 1: FAILED (exit 1)" in captured.out and "seed-1.log" in captured.out
    assert "1 run(s) failed" in captured.err
    again = FakeRun()
    assert cli(["--config", path], launcher=again) == 0
    assert again.launched == [str(tmp_path / "runs" / "b" / "seed-1")]  # only the unfinished run
    assert "finished earlier, not rerun" in capsys.readouterr().out
    # a finished run whose config changed is launched again (run.py then refuses or resumes it, and says so)
    changed = write_study(tmp_path, set=["grpo.steps=4"])
    relaunch = FakeRun()
    assert cli(["--config", changed, "--seeds", "0"], launcher=relaunch) == 0
    assert sorted(relaunch.launched) == [str(tmp_path / "runs" / arm / "seed-0") for arm in ("a", "b")]


def test_compare_with_few_seeds_says_the_interval_means_little(tmp_path):
    assert cli(["--config", write_study(tmp_path), "--seeds", "0", "1"], launcher=FakeRun()) == 0
    md = (tmp_path / "runs" / "toy" / "compare.md").read_text()
    assert "With 2 seed(s) the interval means little" in md
    assert cli(["--config", write_study(tmp_path), "--seeds", "0", "--report-only"], launcher=FakeRun()) == 0
    assert "0.000 (1 seed)" in (tmp_path / "runs" / "toy" / "compare.md").read_text()


def test_a_base_that_fails_stops_its_arms(tmp_path, capsys):
    launcher = FakeRun(crash={"runs/cold"})
    assert cli(["--config", write_study(tmp_path)], launcher=launcher) == 1
    assert launcher.launched == [str(tmp_path / "runs" / "cold")]
    assert "not run, its base" in capsys.readouterr().out


@pytest.mark.parametrize("bad,match", [({"arms": [{"name": "a"}]}, "two or more arms"),
                                       ({"seeds": []}, "seeds"),
                                       ({"arms": [{"name": "a", "base": "x"}, {"name": "b"}]}, "base 'x'"),
                                       ({"arms": [{"name": "a", "sett": []}, {"name": "b"}]}, "sett"),
                                       ({"stage": "stage9"}, "no stage 'stage9'")])
def test_a_bad_study_is_refused_before_any_run(tmp_path, capsys, bad, match):
    launcher = FakeRun()
    assert cli(["--config", write_study(tmp_path, **bad)], launcher=launcher) == 2
    assert match in capsys.readouterr().err and launcher.launched == []


def test_an_unfinished_run_has_no_table_figure(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "accuracy": 0.5}\n{"step": 1, "accura')  # torn line
    records, summary = read_run(str(run_dir))
    assert len(records) == 1 and summary is None
    assert run_value(records, summary, "accuracy", 5) is None
    assert run_value(records, {"x": 1}, "accuracy", 5) == 0.5


@pytest.mark.parametrize("path", STUDIES, ids=[os.path.basename(p) for p in STUDIES])
def test_committed_studies_are_pinned(path):
    study = load_study(path)
    bases, runs = plan_runs(study)
    assert len(study.seeds) >= 3 and len(study.arms) >= 2 and bases
    assert all(run.needs and run.config["kind"] == "grpo" for run in runs)
    demo_cold_start = resolve_stage("demo", "stage0", [])
    for base in bases:  # the demo's cold start, its variant and its length (600 of 2000 steps, for time) set
        assert {k for k in base.config if base.config[k] != demo_cold_start[k]} <= {"variant", "sft", "data"}
        solution = "mixed" if study.name == "reward-mixed" else "parallel"
        assert base.config["data"] == {**demo_cold_start["data"], "synthetic": {
            **demo_cold_start["data"]["synthetic"], "solution": solution}}
        sft = base.config["sft"]
        assert {k for k in sft if sft[k] != demo_cold_start["sft"][k]} == {"steps", "eval_every"}
        assert (sft["steps"], sft["eval_every"]) == (600, 300)
    arms = {run.arm: run.config for run in runs}
    first, *others = arms.values()
    for config in others:  # arms differ only where the study says
        differ = {k for k in config if config[k] != first[k]}
        assert differ <= {"variant", "reward", "grpo"}, differ
    name = study.name
    if name in ("reward", "reward-mixed"):
        assert [c["reward"]["mode"] for c in arms.values()] == ["accuracy", "alternating"]
        assert {c["variant"] for c in arms.values()} == {"structured"}
    if name == "variant":
        assert [c["variant"] for c in arms.values()] == ["causal", "structured"]
        assert [r.needs for r in runs[::len(study.seeds)]] == [b.run_dir for b in bases]
    if name == "scaffold":
        assert [c["reward"]["scaffold_until"] for c in arms.values()] == [None, 9]
    if name.startswith("clip"):
        clips = [(c["grpo"]["clip_low"], c["grpo"]["clip_high"]) for c in arms.values()]
        assert clips == [(None, None), (1.0, 1e9)]
        assert all(c["grpo"]["mini_batch_prompts"] < c["grpo"]["prompts_per_step"] for c in arms.values())


def test_studies_are_found_by_name():
    assert load_study(os.path.join(CONFIG_DIR, "studies", "reward.yaml")).name == "reward"
    with pytest.raises(ConfigError, match="not found"):
        from studies.study import study_path
        study_path("no-such-study")


@pytest.mark.slow
def test_a_real_quick_study_runs_then_resumes_without_rerunning(tmp_path, capsys):
    """The demo's cold start and stage 2 at --quick size, two arms x one seed, as real run.py subprocesses;
    the second call launches nothing (98-282 s on a busy 2-core CPU)."""
    path = write_study(tmp_path, seeds=[0], set=[], metrics=["summary/accuracy_hard", "accuracy", "parallel_ratio"])
    assert cli(["--config", path, "--quick", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count(": done in") == 3
    report = json.loads((tmp_path / "runs" / "quick" / "toy" / "compare.json").read_text())
    assert set(report["metrics"]["accuracy"]["arms"]) == {"a", "b"}
    assert "seed" in (tmp_path / "runs" / "quick" / "a" / "seed-0.log").read_text()
    assert cli(["--config", path, "--quick"]) == 0
    assert capsys.readouterr().out.count("finished earlier, not rerun") == 3
