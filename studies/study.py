"""A study: arms (a config, or one pipeline stage of it, with --set overrides) run over several seeds, each
from a shared earlier stage run once (a base), read from configs/studies/<name>.yaml and checked key by key.

Run directories: a base in <run_dir>/<base name>, an arm's seed in <run_dir>/<arm name>/seed-<S>; two studies
with the same run_dir and an arm of the same name share its runs (run.py refuses a run_dir that holds a run
of another config, so a shared name with another config is reported, never reused).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from curriculum.config import PLAIN_NAME, load_config, pipeline_stages, read_yaml, resolve_config_path
from curriculum.schema import ConfigError, from_dict, matching, ranged, to_dict


@dataclass
class BaseSpec:
    """A shared earlier stage (e.g. the demo's cold start), run once; its final/ is the init_from of the arms
    that name it."""
    config: str | None = None  # default: the study's config
    stage: str | None = None  # a stage of a pipeline config (its resolved keys); None: the config itself
    set: list = field(default_factory=list)  # --set overrides, e.g. [variant=structured]


@dataclass
class ArmSpec:
    name: str = matching("arm", PLAIN_NAME, "a plain name (letters, digits, '.', '_', '-'): a directory")
    config: str | None = None  # default: the study's config
    stage: str | None = None  # default: the study's stage
    set: list = field(default_factory=list)  # after the study's `set`
    base: str | None = None  # a name in the study's bases; default: its only base (none when it has none)


@dataclass
class Study:
    name: str = matching("study", PLAIN_NAME, "a plain name")
    run_dir: str = "runs/studies"  # bases and arms' runs live under it (the report goes to <run_dir>/<name>)
    config: str = "demo"  # every arm's and base's config unless they name their own
    stage: str | None = None  # a stage of a pipeline config for every arm (None: the whole config)
    set: list = field(default_factory=list)  # --set overrides of every arm (not of the bases)
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # each arm runs once per seed (--set seed=S)
    bases: dict = field(default_factory=dict)  # name -> BaseSpec fields
    arms: list = field(default_factory=list)  # ArmSpec fields; the first arm is the reference of the differences
    # what the table and curves show: keys of metrics.jsonl (the mean of the last `last_steps` logged steps in
    # the table), eval/<set>/<metric> keys when the stage evaluated during training, or summary/<key> (the
    # stage's summary.json: its end-of-stage evaluation, e.g. summary/accuracy_hard)
    metrics: list = field(default_factory=lambda: ["accuracy", "parallel_ratio"])
    last_steps: int = ranged(10, ge=1)
    level: float = ranged(0.95, gt=0.0, lt=1.0)  # of the intervals
    smooth: int = ranged(1, ge=1)  # curves: moving mean over this many steps (1 = raw)
    note: str = ""  # what the study asks and what the paper found, printed above its table


@dataclass(frozen=True)
class Run:
    """One launch: its resolved config file, its --set overrides and its run directory."""
    label: str  # "base cold-causal", "S1 seed 2"
    arm: str | None  # None for a base
    seed: int | None
    config: dict  # the resolved single-stage config (what run.py gets with --config)
    sets: tuple  # run.py --set overrides on top of it
    run_dir: str
    needs: str | None = None  # the base run_dir whose final/ it starts from


def load_study(path: str, seeds: list | None = None) -> Study:
    """The study file, every key checked; `seeds` (the command line's) replace its seeds."""
    study = from_dict(Study, read_yaml(path))
    study.bases = {name: from_dict(BaseSpec, spec or {}, f"bases.{name}.") for name, spec in study.bases.items()}
    study.arms = [from_dict(ArmSpec, spec, f"arms[{i}].") for i, spec in enumerate(study.arms)]
    if seeds is not None:
        study.seeds = list(seeds)
    if len(study.arms) < 2:
        raise ConfigError(f"{path}: a study needs two or more arms (`arms:`), it has {len(study.arms)}")
    names = [a.name for a in study.arms]
    if len(set(names)) != len(names) or set(names) & set(study.bases):
        raise ConfigError(f"{path}: arm and base names must all differ (each is a directory): {names}, "
                          f"{list(study.bases)}")
    if not study.seeds or not all(isinstance(s, int) and s >= 0 for s in study.seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers >= 0, got {study.seeds!r}")
    for i, arm in enumerate(study.arms):
        if arm.base is None and len(study.bases) == 1:
            arm.base = next(iter(study.bases))
        if arm.base is None and study.bases:
            raise ConfigError(f"{path}: arms[{i}] ({arm.name}) must name its base, one of {list(study.bases)}")
        if arm.base is not None and arm.base not in study.bases:
            raise ConfigError(f"{path}: arms[{i}] ({arm.name}): base {arm.base!r} is not in bases "
                              f"({list(study.bases) or 'none'})")
    return study


def resolve_stage(config: str, stage: str | None, sets: list, quick: bool = False) -> dict:
    """The single-stage config that run.py runs: `config` with `sets` applied (after its `quick:` block with
    `quick`), and for a pipeline its stage named `stage` with the pipeline's shared keys merged in (what
    run.py would run as that stage)."""
    cfg = load_config(config, list(sets), quick=quick)
    stages = pipeline_stages(cfg)
    if stage is None:
        if len(stages) != 1:
            raise ConfigError(f"{config} is a pipeline of {len(stages)} stages: name one with `stage:` "
                              f"({', '.join(s.name for s in stages)})")
        return to_dict(stages[0])
    for s in stages:
        if s.name == stage:
            return to_dict(s)
    raise ConfigError(f"{config} has no stage {stage!r} (its stages: {', '.join(s.name for s in stages)})")


def plan_runs(study: Study, quick: bool = False) -> tuple[list[Run], list[Run]]:
    """(bases, arm runs) of the study, every config resolved and checked before anything runs; `quick`: each
    config's `quick:` block applied (a smoke run of the whole study; study.run_dir is then <run_dir>/quick)."""
    if quick:
        study.run_dir = os.path.join(study.run_dir, "quick")
    bases = {}
    for name, spec in study.bases.items():
        try:
            resolved = resolve_stage(spec.config or study.config, spec.stage, spec.set, quick)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"bases.{name}: {e}") from None
        bases[name] = Run(f"base {name}", None, None, resolved, (), os.path.join(study.run_dir, name))
    runs = []
    for arm in study.arms:
        try:
            resolved = resolve_stage(arm.config or study.config, arm.stage or study.stage, study.set + arm.set,
                                     quick)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"arm {arm.name}: {e}") from None
        base = bases[arm.base].run_dir if arm.base else None
        for seed in study.seeds:
            sets = (f"seed={seed}",) + ((f"init_from={os.path.join(base, 'final')}",) if base else ())
            runs.append(Run(f"{arm.name} seed {seed}", arm.name, seed, resolved, sets,
                            os.path.join(study.run_dir, arm.name, f"seed-{seed}"), base))
    return list(bases.values()), runs


def write_config(run: Run, config_dir: str) -> str:
    """The resolved config of a run, as a file run.py reads (one per base or arm, shared by its seeds)."""
    os.makedirs(config_dir, exist_ok=True)
    path = os.path.join(config_dir, (run.arm or run.label.split()[-1]) + ".yaml")
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(run.config, f, sort_keys=False)
    os.replace(path + ".tmp", path)
    return path


def study_path(path: str) -> str:
    """A study file: as a config path (configs/studies/reward.yaml, studies/reward), or a name in the package's
    configs/studies/ (reward)."""
    try:
        return resolve_config_path(path)
    except ConfigError:
        if os.path.isabs(path) or os.sep in path:
            raise
        return resolve_config_path(os.path.join("studies", path))
