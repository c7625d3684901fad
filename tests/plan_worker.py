"""A rank for tests/test_stages.py's planning race, run under torchrun in a subprocess:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/plan_worker.py CONFIG

Runs the config's pipeline with two hooks that open the window a slow rank met beside a busy process: rank 1
plans only once the first stage's config.yaml exists (or after WAIT seconds), and rank 0 writes that file in
two halves, the second once rank 1 has planned (or after WAIT seconds). Every rank must still follow one plan: the run
ends with exit code 0, where ranks that planned apart waited forever in different collectives.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curriculum import stages  # noqa: E402
from curriculum.config import load_config, pipeline_stages, save_config  # noqa: E402
from grpo.fsdp import close_distributed, init_distributed, leave_process  # noqa: E402

WAIT = 10.0  # seconds either hook waits for the other rank's event before going on


def wait_for(path: str) -> None:
    end = time.monotonic() + WAIT
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.05)


def main(config: str) -> None:
    cfg = load_config(config)
    first = pipeline_stages(cfg)[0].run_dir
    written, planned = os.path.join(first, "config.yaml"), os.path.join(cfg.run_dir, "rank1-planned")
    d = init_distributed("cpu")
    plan_stage = stages.plan_stage

    def slow_plan(stage, dist, **kw):  # rank 1: plans once rank 0 has begun writing, if it can
        if stage.run_dir == first:
            wait_for(written)
        plan = plan_stage(stage, dist, **kw)
        open(planned, "w").close()
        return plan

    def torn_save(stage_cfg, path):  # rank 0: half the file, then the whole once rank 1 has planned
        save_config(stage_cfg, path + ".full")
        with open(path + ".full") as f:
            text = f.read()
        os.remove(path + ".full")
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        wait_for(planned)
        with open(path, "w") as f:
            f.write(text)

    if d.rank == 1:
        stages.plan_stage = slow_plan
    else:
        stages.save_config = torn_save
    try:
        stages.run_pipeline(cfg, d)
    finally:
        close_distributed()
    leave_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
