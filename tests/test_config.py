"""curriculum/config.py and run.py's front door: every config validates, typos and wrong types and missing
files stop the run with one message naming the key, overrides go through the same checks."""
import glob
import os
import subprocess
import sys

import pytest

from curriculum.config import (CONFIG_DIR, ConfigError, build_config, load_config, parse_overrides, pipeline_stages,
                               read_yaml)
from curriculum.preflight import check_files, preflight

ROOT = os.path.dirname(CONFIG_DIR)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))), ids=os.path.basename)
def test_every_config_parses_and_validates(path, tmp_path):
    cfg = build_config(read_yaml(path))
    for stage in pipeline_stages(cfg) if cfg.kind != "pipeline" else []:
        assert stage.name
    if os.path.basename(path) == "pipeline.yaml":
        train = tmp_path / "train.jsonl"
        train.write_text('{"question": "1+1?", "answer": "2", "solution": "1+1=2"}\n')
        (tmp_path / "amc23.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text("{}")
        # the placeholders (model directory, data files) pointed at things that exist
        cfg = load_config(path, ["model.path=" + str(model), "data.train=" + str(train), f"eval.data_dir={tmp_path}"])
        assert preflight(cfg, world=8) == []
        names = [s.name for s in pipeline_stages(cfg)]
        assert names == ["stage0_sft", "stage1", "stage2"]
        stages = pipeline_stages(cfg)
        assert [s.kind for s in stages] == ["sft", "grpo", "grpo"]
        assert stages[2].grpo.clip_high == 0.28 and stages[2].reward.mode == "alternating"
        assert all(s.run_dir.startswith(cfg.run_dir) for s in stages)


def test_reference_hyper_parameters():
    s2 = build_config(read_yaml("stage2.yaml"))
    assert (s2.optim.lr, s2.grpo.prompts_per_step, s2.rollout.group_size, s2.grpo.mini_batch_prompts) == (1e-6, 256, 8, 128)
    assert (s2.rollout.temperature, s2.data.max_prompt_tokens, s2.rollout.max_new_tokens) == (1.0, 2000, 3000)
    assert (s2.grpo.kl_coef, s2.grpo.clip_low, s2.grpo.clip_high) == (0.0, 0.2, 0.28)
    assert s2.init_from == "stage1" and build_config(read_yaml("stage1.yaml")).init_from == "stage0_sft"


def test_typo_wrong_type_and_bad_choice_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo.clip_hihg' \(did you mean 'grpo.clip_high'\?\)"):
        build_config({"grpo": {"clip_hihg": 0.3}})
    with pytest.raises(ConfigError, match=r"rollout.group_size: expected int"):
        build_config({"rollout": {"group_size": "eight"}})
    with pytest.raises(ConfigError, match=r"variant: 'unseen' is not allowed; choose one of \['causal', 'structured'\]"):
        build_config({"variant": "unseen"})
    with pytest.raises(ConfigError, match="expected a section"):
        build_config({"grpo": 3})
    assert build_config({"optim": {"lr": "1e-6"}}).optim.lr == 1e-6  # YAML reads 1e-6 as a string
    assert build_config({"data": {"val_size": 0.1}}).data.val_size == 0.1


def test_overrides_are_typed_and_checked(tmp_path):
    assert parse_overrides(["grpo.clip_high=0.28", "variant=structured"]) == {
        "grpo": {"clip_high": 0.28}, "variant": "structured"}
    (tmp_path / "c.yaml").write_text("kind: grpo\nmodel: {build: {hidden_size: 8}}\ndata: {synthetic: {n: 1}}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["grpo.clip_high=0.28"])
    assert cfg.grpo.clip_high == 0.28
    with pytest.raises(ConfigError, match="unknown config key 'grpo.clip'"):
        load_config(str(tmp_path / "c.yaml"), ["grpo.clip=0.28"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["grpo.clip_high"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path: directory 'models/Qwen3-4B-Base' does not exist"):
        preflight(load_config("stage0_sft.yaml"))
    cfg = build_config({"model": {"build": {}}, "data": {"train": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(ConfigError, match=r"data.train: .*nope.jsonl: no such data file"):
        check_files(cfg)
    with pytest.raises(ConfigError, match="no model given"):
        check_files(build_config({"data": {"synthetic": {"n": 1}}}))


def test_pipeline_overrides_reach_every_stage(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "kind: pipeline\nrun_dir: R\nvariant: causal\nmodel: {build: {hidden_size: 8}}\n"
        "quick: {grpo: {steps: 2}}\nshort: {grpo: {steps: 20}, sft: {steps: 30}}\n"
        "stages:\n  - {name: a, kind: sft, data: {synthetic: {n: 1}}}\n"
        "  - {name: b, kind: grpo, init_from: a, variant: causal, grpo: {steps: 50}, data: {synthetic: {n: 1}}}\n")
    stages = pipeline_stages(load_config(str(tmp_path / "p.yaml"), ["variant=structured"], quick=True))
    assert [s.variant for s in stages] == ["structured", "structured"]  # --set wins over the stage's own key
    assert stages[1].grpo.steps == 2 and stages[1].run_dir == os.path.join("R", "b")
    assert stages[0].model.build == {"hidden_size": 8}  # shared keys reach the stages
    short = pipeline_stages(load_config(str(tmp_path / "p.yaml"), ["sft.steps=40"], short=True))
    assert (short[0].sft.steps, short[1].grpo.steps) == (40, 20)  # the short block, then --set
    assert pipeline_stages(load_config(str(tmp_path / "p.yaml")))[1].grpo.steps == 50
    with pytest.raises(ConfigError, match=r"--short: \S+c.yaml has no 'short:' block"):
        (tmp_path / "c.yaml").write_text("kind: grpo\nmodel: {build: {hidden_size: 8}}\ndata: {synthetic: {n: 1}}\n")
        load_config(str(tmp_path / "c.yaml"), short=True)
    (tmp_path / "bad.yaml").write_text("kind: pipeline\nstages: [{name: a, grpo: {clip_hihg: 1}}]\n")
    with pytest.raises(ConfigError, match=r"stages\[0\] \(a\): unknown config key 'grpo.clip_hihg'"):
        load_config(str(tmp_path / "bad.yaml"))


def run_py(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_run_py_stops_before_any_work_with_one_message():
    r = run_py("--config", "stage2.yaml", "--set", "grpo.clip_hihg=0.3")
    assert r.returncode == 2
    assert "unknown config key 'grpo.clip_hihg' (did you mean 'grpo.clip_high'?)" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_py("--config", "no_such_config.yaml")
    assert r.returncode == 2 and "no_such_config.yaml" in r.stderr


def test_run_py_dry_run_prints_the_resolved_config():
    r = run_py("--config", "demo", "--dry-run", "--set", "variant=structured")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("variant: structured") == 3 and "# --- stage2 (grpo, structured)" in r.stdout


# --- from any directory (issue 18) ------------------------------------------------------------------------

def console_script() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "parallel-r1")
    if not os.path.isfile(path):
        pytest.skip("the parallel-r1 console script is not installed in this environment")
    return path


@pytest.mark.parametrize("extra", [[], ["--quick"]], ids=["dry-run", "quick-dry-run"])
def test_console_script_and_run_py_work_from_another_directory(tmp_path, extra):
    """The default config is the package's demo wherever the command runs; relative paths inside it
    (run_dir) still mean the current directory."""
    for cmd in ([console_script()], [sys.executable, os.path.join(ROOT, "run.py")]):
        r = subprocess.run(cmd + extra + ["--dry-run"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        run_dir = "runs/demo-quick" if extra else "runs/demo"
        assert f"# --- stage2 (grpo, causal) -> {run_dir}/stage2" in r.stdout


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("stage2", "stage2.yaml", "configs/stage2.yaml", os.path.join(CONFIG_DIR, "stage2.yaml")):
        assert read_yaml(name)["name"] == "stage2", name
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "stage2.yaml").write_text("name: mine\n")
    assert read_yaml("configs/stage2.yaml")["name"] == "mine"  # a file in the current directory comes first
    with pytest.raises(ConfigError, match=r"not found \(looked for stage3.yaml, \S+/configs/stage3.yaml\)$"):
        read_yaml("stage3.yaml")


def test_a_pipelines_stage_files_are_read_next_to_it(tmp_path, monkeypatch):
    """A copy of the configs elsewhere uses its own stage files, not the package's of the same name."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pipeline.yaml").write_text("kind: pipeline\nrun_dir: r\nstages: [stage1.yaml]\n")
    (mine / "stage1.yaml").write_text("name: my_stage1\nkind: grpo\nmodel: {build: {hidden_size: 8}}\n"
                                      "data: {synthetic: {difficulty: easy, n: 4}}\n")
    monkeypatch.chdir(tmp_path)
    stages = pipeline_stages(load_config("mine/pipeline.yaml"))
    assert [s.name for s in stages] == ["my_stage1"] and stages[0].run_dir == os.path.join("r", "my_stage1")


@pytest.mark.slow
def test_a_regular_install_carries_the_configs(tmp_path):
    """`pip install .` (not editable): configs/ lands beside the packages and the demo runs from anywhere."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the package's files to build from")
    files = listed.stdout.split()
    src = tmp_path / "src"
    for f in files:
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        with open(os.path.join(ROOT, f), "rb") as a, open(src / f, "wb") as b:
            b.write(a.read())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")], cwd=src,
                   check=True, capture_output=True, timeout=300)
    wheel = glob.glob(str(tmp_path / "wheel" / "*.whl"))[0]
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), wheel], check=True,
                   capture_output=True, timeout=300)
    site = str(tmp_path / "site")
    code = (f"import sys, run, curriculum.config as c; assert c.CONFIG_DIR == {os.path.join(site, 'configs')!r}; "
            "sys.exit(run.main(['--quick', '--dry-run']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=site), timeout=120)
    assert r.returncode == 0 and "# --- stage2 (grpo, causal) -> runs/demo-quick/stage2" in r.stdout, r.stderr


# --- refused before any work: ranges, rules, files, data rows ------------------------------------------

def demo_with(*overrides, world=1):
    cfg = load_config("demo.yaml", list(overrides))
    return preflight(cfg, world)


@pytest.mark.parametrize("override, match", [
    ("rollout.group_size=1", r"rollout.group_size: 1 is out of range; it must be >= 2"),
    ("rollout.top_p=0", r"rollout.top_p: 0.0 is out of range; it must be > 0.0 and <= 1.0"),
    ("rollout.top_p=1.5", r"rollout.top_p: 1.5 is out of range"),
    ("rollout.temperature=-1", r"rollout.temperature: -1.0 is out of range; it must be >= 0.0"),
    ("rollout.max_new_tokens=0", r"rollout.max_new_tokens: 0 is out of range"),
    ("optim.lr=.nan", r"optim.lr: nan is not a finite number"),
    ("optim.lr=1e30", r"optim.lr: 1e\+30 is out of range; it must be >= 0.0 and <= 1.0"),
    ("optim.lr=-1e-6", r"optim.lr: -1e-06 is out of range"),
    ("reward.timeout=0", r"reward.timeout: 0.0 is out of range; it must be > 0.0"),
    ("reward.workers=-1", r"reward.workers: -1 is out of range"),
    ("grpo.clip_c=0.5", r"grpo.clip_c: 0.5 is out of range; it must be > 1.0"),
    ("grpo.policy_loss=dapo", r"grpo.policy_loss: 'dapo' is not allowed; choose one of \['ppo_clip', 'gspo', "
     r"'cispo'\]"),
    ("grpo.sampler_correction=icepop", r"grpo.sampler_correction: 'icepop' is not allowed"),
    ("grpo.tis_cap=0.5", r"grpo.tis_cap: 0.5 is out of range; it must be >= 1.0"),
    ("grpo.mis_low=1.0", r"grpo.mis_low: 1.0 is out of range; it must be > 0.0 and < 1.0"),
    ("grpo.mis_high=1.0", r"grpo.mis_high: 1.0 is out of range; it must be > 1.0"),
    ("grpo.max_sampling_rounds=0", r"grpo.max_sampling_rounds: 0 is out of range; it must be >= 1"),
    ("reward.overlong_buffer.len=0", r"reward.overlong_buffer.len: 0 is out of range; it must be >= 1"),
    ("reward.overlong_buffer.penalty=-1", r"reward.overlong_buffer.penalty: -1.0 is out of range; it must be >= 0.0"),
    ("checkpoint.keep=-1", r"checkpoint.keep: -1 is out of range"),
    ("model.device=gpu", r"model.device: 'gpu' is not allowed; it must be auto, cpu, cuda or cuda:N"),
    ("seed=-3", r"seed: -3 is out of range"),
    ("eval.benchmarks.easy.samples=0", r"eval.benchmarks.easy.samples: 0 is out of range"),
])
def test_value_ranges_are_refused_when_read(override, match):
    with pytest.raises(ConfigError, match=match):
        demo_with(override)


@pytest.mark.parametrize("overrides, world, match", [
    (["grpo.prompts_per_step=12", "grpo.mini_batch_prompts=8"], 1, r"stage1: grpo.prompts_per_step=12 must be a "
     r"multiple of grpo.mini_batch_prompts=8"),
    ([], 3, r"stage0: sft.batch_size=8 must be a multiple of the world size 3"),
    (["sft.batch_size=6"], 3, r"stage1: grpo.prompts_per_step=16 must be a multiple of the world size 3"),
    (["rollout.temperature=0"], 1, r"stage1: rollout.temperature: 0 \(greedy\)"),
    (["optim.betas=[0.9, 1.0]"], 1, r"optim.betas: \[0.9, 1.0\]; give two numbers in \[0, 1\)"),
    (["reward.accuracy_steps=11"], 1, r"reward.accuracy_steps=11 must be at most reward.window=10"),
    (["data.val_size=1.5"], 1, r"data.val_size: 1.5"),
    (["data.synthetic.difficulty=medium"], 1, r"data.synthetic.difficulty: 'medium'"),
    (["checkpoint.resume=sometimes"], 1, r"checkpoint.resume: 'sometimes' is not a directory; give auto, never"),
    (["grpo.policy_loss=gspo", "grpo.clip_c=3"], 1, r"grpo.clip_c \(the dual clip\) belongs to policy_loss ppo_clip, "
     r"not gspo"),
    (["grpo.sampler_correction=tis", "grpo.loss_on_forced=true"], 1, r"grpo.sampler_correction: tis weighs each loss "
     r"token by the sampler's log-prob of it, and forced tokens"),
    (["grpo.max_sampling_rounds=3", "grpo.filter_zero_std=false"], 1, r"grpo.max_sampling_rounds=3 refills the groups "
     r"that grpo.filter_zero_std drops"),
    (["reward.overlong_buffer={len: 500}"], 1, r"reward.overlong_buffer.len=500 must be at most "
     r"rollout.max_new_tokens=\d+"),
])
def test_rules_between_keys_are_refused_before_any_work(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        demo_with(*overrides, world=world)


def test_a_malformed_set_value_is_a_config_error():
    for item, match in [("grpo.steps=[1", r"--set 'grpo.steps=\[1': the value is not valid YAML"),
                        ("grpo..steps=1", "expected key=value with a dotted key"),
                        ("=1", "expected key=value with a dotted key")]:
        with pytest.raises(ConfigError, match=match):
            parse_overrides([item])
    with pytest.raises(ConfigError, match="grpo.steps was set to a value by an earlier --set"):
        parse_overrides(["grpo.steps=3", "grpo.steps.x=1"])


def test_yaml_no_and_off_for_a_string_key_hint_at_quoting():
    for data, key in [({"name": False}, "name"), ({"data": {"template": False}}, "data.template"),
                      ({"checkpoint": {"resume": False}}, "checkpoint.resume")]:
        with pytest.raises(ConfigError, match=f"{key}: .*quote the value") as err:
            build_config(data)
        assert "YAML reads unquoted no/off/false" in str(err.value)


def test_an_empty_mapping_from_the_command_line_empties_the_key():
    """--set eval.benchmarks={} switches the end-of-stage evaluation off; deep_merge used to merge the empty
    mapping into the file's benchmarks, changing nothing."""
    stages = pipeline_stages(load_config("demo.yaml", ["eval.benchmarks={}"]))
    assert [s.eval.benchmarks for s in stages] == [{}, {}, {}]
    assert load_config("demo.yaml", ["eval={}"]).eval.data_dir == "data"  # a whole section: nothing to change


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", ".hidden", ""])
def test_stage_names_are_plain_names(name):
    with pytest.raises(ConfigError, match="name: .* a plain name"):
        load_config("demo.yaml", [f"stages=[{{name: '{name}', kind: sft}}]"])


def test_two_stages_of_one_name_are_refused():
    with pytest.raises(ConfigError, match="a second stage named 'a'"):
        load_config("demo.yaml", ["stages=[{name: a}, {name: a}]"])


def test_init_from_not_there_yet_and_an_ignored_model_path_are_said_at_dry_run(tmp_path):
    with pytest.raises(ConfigError, match=r"init_from: 'stage1' means runs/stage1/final, which is not there yet"):
        preflight(load_config("stage2.yaml", [f"data.train={tmp_path}/t.jsonl"]))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "t.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    notes = preflight(load_config("stage2.yaml", [f"init_from={model}", f"model.path={ROOT}",
                                                  f"data.train={tmp_path}/t.jsonl", "eval.benchmarks={}"]))
    assert notes == [f"model.path ({ROOT}) is not used: init_from ({model}) gives the starting weights and the "
                     "tokenizer"]


def test_benchmark_files_of_the_end_of_stage_evaluation_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.benchmarks.amc23: data/amc23.jsonl: no such data file.*"
                                          r"--set eval.benchmarks=\{\} to skip"):
        demo_with("eval.benchmarks={amc23: {path: amc23.jsonl}}")


def test_data_rows_are_checked_when_the_config_is_read(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1", "solution": "s"}\n{"question": "q2", "answer": null}\n')
    with pytest.raises(ConfigError, match=rf"stage0: data.train: {bad}:2: field 'answer' \(column 'answer'\) is null"):
        demo_with(f"data.train={bad}", "data.synthetic=null")
    unsolved = tmp_path / "unsolved.jsonl"
    unsolved.write_text('{"question": "q", "answer": "1", "solution": "s"}\n{"question": "q2", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=rf"stage0: data.train: {unsolved}:2: no solution"):  # SFT needs one
        demo_with(f"data.train={unsolved}", "data.synthetic=null")
    with pytest.raises(ConfigError, match=r"fields maps 'id' to column 'uid', which none of the first 1 rows holds"):
        demo_with(f"data.train={unsolved}", "data.synthetic=null", "data.fields={id: uid}", "data.limit=1")


def test_run_py_dry_run_refuses_a_bad_value_in_one_line():
    r = run_py("--config", "demo", "--dry-run", "--set", "rollout.top_p=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "config error: rollout.top_p: 0.0 is out of range; it must be > 0.0 and <= 1.0"
