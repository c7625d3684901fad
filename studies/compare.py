"""`run.py compare`: run a study's bases once, then every arm over every seed, each run a `run.py`
subprocess (a crash is reported with its log and the others go on), then write its table and curves.

A run whose run_dir holds a finished stage of the same config is not launched again; any other run is
launched and run.py resumes it from its latest checkpoint (or refuses a run_dir of another config).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from curriculum.config import Config, load_config
from curriculum.preflight import config_diff
from curriculum.schema import ConfigError, to_dict

from .report import write_report
from .study import Run, load_study, plan_runs, study_path, write_config

RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py")


def run_args(run: Run, config_path: str) -> list[str]:
    """run.py's arguments for one run (printed in its log, so it can be rerun by hand)."""
    args = ["--config", config_path, "--set", f"run_dir={run.run_dir}"]
    for item in run.sets:
        args += ["--set", item]
    return args


def finished(run: Run, args: list[str]) -> bool:
    """The run_dir holds a finished stage (summary.json) whose saved config is the one this run would use."""
    saved_path = os.path.join(run.run_dir, "config.yaml")
    if not (os.path.exists(os.path.join(run.run_dir, "summary.json")) and os.path.exists(saved_path)):
        return False
    import yaml
    with open(saved_path) as f:
        saved = yaml.safe_load(f) or {}
    now = to_dict(load_config(args[1], [a for a in args[2:] if a != "--set"]))
    changed, longer = config_diff(saved, now, to_dict(Config()))
    return not changed and not longer


def launch(run: Run, args: list[str]) -> tuple[int, float]:
    """Run run.py in a subprocess, its output to <run_dir>.log; (exit code, seconds)."""
    os.makedirs(os.path.dirname(run.run_dir) or ".", exist_ok=True)
    start = time.monotonic()
    with open(run.run_dir + ".log", "a") as log:
        log.write(f"$ {sys.executable} {RUN_PY} {' '.join(args)}\n")
        log.flush()
        code = subprocess.run([sys.executable, RUN_PY, *args], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    return code, time.monotonic() - start


class Progress:
    """One line per run as it starts and as it ends, numbered over the whole study."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def say(self, line: str) -> None:
        print(f"[{self.done}/{self.total}] {line}", flush=True)


def run_all(runs: list[Run], config_dir: str, jobs: int, progress: Progress, launcher=launch,
            failed_bases: frozenset = frozenset()) -> dict:
    """Run each of `runs` (at most `jobs` at a time); {run_dir: "done" | "skipped" | "failed: ..."}."""
    paths = {r.arm or r.label: write_config(r, config_dir) for r in runs}

    def one(run: Run) -> str:
        if run.needs in failed_bases:
            progress.done += 1
            progress.say(f"{run.label}: not run, its base {run.needs} failed")
            return "failed: base failed"
        args = run_args(run, paths[run.arm or run.label])
        if finished(run, args):
            progress.done += 1
            progress.say(f"{run.label}: finished earlier, not rerun ({run.run_dir})")
            return "skipped"
        progress.say(f"{run.label}: running ({run.run_dir}.log)")
        code, seconds = launcher(run, args)
        progress.done += 1
        if code == 0:
            progress.say(f"{run.label}: done in {seconds:.0f} s")
            return "done"
        progress.say(f"{run.label}: FAILED (exit {code}) after {seconds:.0f} s; log: {run.run_dir}.log")
        return f"failed: exit {code}, log {run.run_dir}.log"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip((r.run_dir for r in runs), pool.map(one, runs)))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run.py compare", description="Run a study (configs/studies/*.yaml): its "
                                 "shared bases once, every arm over every seed, then its table and curves.")
    ap.add_argument("--config", required=True, help="the study file: a path, or a name in configs/studies/")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the study's `seeds`)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (set OMP_NUM_THREADS so that jobs x "
                    "threads fits the cores)")
    ap.add_argument("--quick", action="store_true", help="apply each config's `quick:` block: a smoke run of the "
                    "whole study under <run_dir>/quick (the demo's: seconds a run); its figures mean nothing")
    ap.add_argument("--report-only", action="store_true", help="launch nothing: the table and curves of the "
                    "runs found")
    return ap.parse_args(argv)


def cli(argv, launcher=launch) -> int:
    args = parse_args(argv)
    try:
        if args.jobs < 1:
            raise ConfigError("--jobs must be >= 1")
        study = load_study(study_path(args.config), args.seeds)
        bases, runs = plan_runs(study, args.quick)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.join(study.run_dir, study.name)
    status = {}
    if not args.report_only:
        progress = Progress(len(bases) + len(runs))
        config_dir = os.path.join(out_dir, "configs")
        status = run_all(bases, config_dir, args.jobs, progress, launcher)
        failed = frozenset(d for d, s in status.items() if s.startswith("failed"))
        status.update(run_all(runs, config_dir, args.jobs, progress, launcher, failed))
    paths = write_report(study, runs, out_dir, status)
    for p in paths:
        print(f"wrote {p}")
    bad = [d for d, s in status.items() if s.startswith("failed")]
    if bad:
        print(f"{len(bad)} run(s) failed: " + ", ".join(f"{d} ({status[d]})" for d in bad), file=sys.stderr)
    return 1 if bad else 0
