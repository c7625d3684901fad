"""Entry point. Parses the command line, validates the config, joins the process group, runs the stages.

    python run.py                                   # the CPU demo (configs/demo.yaml)
    python run.py --config configs/stage2.yaml --set grpo.clip_high=0.28
    torchrun --nproc_per_node 8 run.py --config configs/stage2.yaml
    python run.py eval --model runs/stage2/final --config configs/eval.yaml
    python run.py compare --config configs/studies/reward.yaml --jobs 2    # arms x seeds, table and curves
"""
from __future__ import annotations

import argparse
import os
import sys


SIZE_NOTES = {None: None,  # said before the run and under its table
              "quick": "--quick: a smoke run at toy size; it checks that every stage runs, its figures mean nothing",
              "short": "--short: a shortened run; it shows the cold start learning the format, not what the full "
                       "run's RL stages do to accuracy"}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run.py", description="Parallel-R1 training: SFT and GRPO stages, pipelines, "
                                 "the CPU demo. `run.py eval --help` for evaluation, `run.py compare --help` for "
                                 "studies across seeds.")
    ap.add_argument("--config", help="YAML config: a path, or a name in the package's configs/ (stage2, "
                    "configs/stage2.yaml); default: the CPU demo, configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted for sections (repeatable): --set grpo.clip_high=0.28")
    ap.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the memory plan "
                    "per rank of each stage, then exit")
    ap.add_argument("--world-size", type=int, help="dry run: ranks to plan memory for (a real run: torchrun's)")
    ap.add_argument("--device-memory", metavar="SIZE", help="dry run: plan for GPUs of SIZE (80GB = 80e9 bytes, "
                    "80GiB, or bytes; an H100 has 79.2GiB); default: the CUDA device found, else CPU (no fit check)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="apply the config's `quick:` block: a smoke run (the "
                      "demo: about 15 s) that checks the stages run; its figures mean nothing")
    size.add_argument("--short", action="store_true", help="apply the config's `short:` block (the demo: 2-3 "
                      "minutes; the cold start learns the format, the accuracy figures are not the full run's)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":
        from curriculum.evaluate import cli
        return cli(argv[1:])
    if argv and argv[0] == "compare":
        from studies.compare import cli
        return cli(argv[1:])
    args = parse_args(argv)
    bad_world = args.world_size is not None and args.world_size < 1
    if bad_world or (not args.dry_run and (args.world_size or args.device_memory)):
        print("--world-size N (N >= 1) and --device-memory SIZE plan a dry run (--dry-run); a real run uses torchrun's "
              "world size and the CUDA device found", file=sys.stderr)
        return 2
    from curriculum.config import CONFIG_DIR, ConfigError, load_config, pipeline_stages, to_dict
    from curriculum.memory import first_problem, format_plan, parse_bytes, run_device_bytes, stage_plans
    from curriculum.preflight import preflight
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:  # every bad input, and a config that cannot fit in memory, stops here: before any work
        # the package's demo wherever the command runs (a relative default would follow the working directory)
        cfg = load_config(args.config or os.path.join(CONFIG_DIR, "demo.yaml"), args.set, args.quick, args.short)
        stages = pipeline_stages(cfg)
        notes = preflight(cfg, world=world)
        device = parse_bytes(args.device_memory) if args.device_memory else run_device_bytes(cfg.model.device)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if main_rank:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    plans = stage_plans(stages, world, device)
    for note in notes if main_rank else []:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        import yaml
        for stage, plan in plans:
            print(f"# --- {stage.name} ({stage.kind}, {stage.variant}) -> {stage.run_dir}")
            print(yaml.safe_dump(to_dict(stage), sort_keys=False))
            print(plan if isinstance(plan, str) else format_plan(plan), end="\n\n")
    problem = first_problem(plans)
    if problem and main_rank:
        print(f"memory: {problem}", file=sys.stderr)
    if problem or args.dry_run:
        return 2 if problem else 0
    return train(cfg, plans, SIZE_NOTES["quick" if args.quick else "short" if args.short else None])


def train(cfg, plans=(), note: str | None = None) -> int:
    """Run the validated config's stages (`plans`: stage_plans' (stage, plan) pairs, for each stage's opening
    summary); user-caused failures found once work began end in one line. `note` (what --quick or --short
    means) is printed before the run and under its table."""
    from curriculum.config import ConfigError
    from curriculum.console import setup_logging
    from curriculum.memory import plan_headline
    from curriculum.data import DataError
    from curriculum.summary import print_summary
    from curriculum.stages import run_pipeline
    from grpo.checkpoint import CheckpointError
    from grpo.fsdp import close_distributed, init_distributed, leave_process
    from grpo.loop import StopRequested
    from grpo.runlog import RunDirBusy
    d = init_distributed(cfg.model.device)
    setup_logging(d.rank)
    if note and d.main:
        print(note, flush=True)
    code = 0
    try:
        summaries = run_pipeline(cfg, d, {stage.name: plan_headline(plan) for stage, plan in plans})
        if d.main:
            print_summary(cfg, summaries, note)
    except StopRequested as e:  # every rank stops at the same step with the same line: rank 0 says it
        if d.main:
            print(f"\n{e}", file=sys.stderr)
        code = 130
    except (ConfigError, DataError, RunDirBusy, CheckpointError) as e:  # found once work began: no traceback
        if d.main:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except FloatingPointError as e:  # training diverged; the message names the checkpoint to go back to
        if d.main:
            print(f"stopped: {e}", file=sys.stderr)
        code = 1
    finally:
        close_distributed()
    if "RANK" in os.environ:  # a torchrun rank: every file is written; gloo's threads may abort finalization
        leave_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
