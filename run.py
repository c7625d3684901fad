"""Entry point. Parses the command line, validates the config, joins the process group, runs the stages.

    python run.py                                   # the CPU demo (configs/demo.yaml)
    python run.py --config configs/stage2.yaml --set grpo.clip_high=0.28
    torchrun --nproc_per_node 8 run.py --config configs/stage2.yaml
    python run.py eval --model runs/stage2/final --config configs/eval.yaml
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run.py", description="Parallel-R1 training: SFT and GRPO stages, pipelines, "
                                 "the CPU demo. `run.py eval --help` for evaluation.")
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML config (a bare name resolves into configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted for sections (repeatable): --set grpo.clip_high=0.28")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    ap.add_argument("--quick", action="store_true", help="apply the config's `quick:` block (a fast smoke run)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":
        from curriculum.evaluate import cli
        return cli(argv[1:])
    args = parse_args(argv)
    from curriculum.config import ConfigError, load_config, pipeline_stages, to_dict
    from curriculum.preflight import preflight
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    try:
        cfg = load_config(args.config, args.set, args.quick)
        stages = pipeline_stages(cfg)
        notes = preflight(cfg, world=int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if main_rank:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    for note in notes if main_rank else []:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        import yaml
        for stage in stages:
            print(f"# --- {stage.name} ({stage.kind}, {stage.variant}) -> {stage.run_dir}")
            print(yaml.safe_dump(to_dict(stage), sort_keys=False))
        return 0
    from curriculum.data import DataError
    from curriculum.summary import print_summary
    from curriculum.stages import run_pipeline
    from grpo.checkpoint import CheckpointError
    from grpo.fsdp import close_distributed, init_distributed
    from grpo.runlog import RunDirBusy
    from grpo.trainer import StopRequested
    d = init_distributed(cfg.model.device)
    try:
        summaries = run_pipeline(cfg, d)
        if d.main:
            print_summary(cfg, summaries)
    except StopRequested as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, RunDirBusy, CheckpointError) as e:  # found once work began: no traceback
        if d.main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged; the message names the checkpoint to go back to
        if d.main:
            print(f"stopped: {e}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
