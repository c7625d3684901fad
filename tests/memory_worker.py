"""A rank for tests/test_memory.py's 2-rank check, run under torchrun in a subprocess:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/memory_worker.py OUT_DIR

FSDP2 (gloo, CPU) on test_memory's SMALL Qwen3 and one AdamW step; writes OUT_DIR/rank<r>.json with the bytes
this rank holds: parameter shards, gradient shards, AdamW states and the full parameters gathered for sampling.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from grpo.fsdp import close_distributed, gathered_for_sampling, init_distributed, leave_process, parallelize  # noqa: E402
from grpo.logprobs import token_logprobs  # noqa: E402
from grpo.optim import build_optimizer  # noqa: E402
from model import build_model  # noqa: E402
from tests.test_memory import SMALL, storage_bytes  # noqa: E402


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard -> this rank's part


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    model = parallelize(build_model(SMALL).train(), d)
    opt, _ = build_optimizer(model, 1e-3, 0.0, [0.9, 0.999], 0, 10)
    token_logprobs(model, torch.randint(0, SMALL["vocab_size"], (2, 64))).sum().backward()
    opt.step()
    params = list(model.parameters())
    figures = {"parameters": storage_bytes(local(p) for p in params),
               "gradients": storage_bytes(local(p.grad) for p in params),
               "optimizer": storage_bytes(local(t) for s in opt.state.values() for t in s.values())}
    opt.zero_grad(set_to_none=True)
    with torch.no_grad(), gathered_for_sampling(model):
        figures["gathered"] = storage_bytes(model.parameters())
    with open(os.path.join(out_dir, f"rank{d.rank}.json"), "w") as f:
        json.dump(figures, f)
    close_distributed()
    leave_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
