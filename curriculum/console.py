"""What a run says on the console: Python logging, set up once by run.py (rank 0 at INFO, the other ranks at
WARNING) and written through tqdm so that a message never tears a progress bar; and the opening summary
each stage logs before it trains."""
from __future__ import annotations

import logging
import sys

import torch
from tqdm import tqdm

from model.load import resolve_attention
from rollout import describe

from .config import Config

PACKAGES = ("model", "rollout", "grpo", "rewards", "curriculum")  # our loggers: logging.getLogger(__name__)


class TqdmHandler(logging.Handler):
    """Writes each record with tqdm.write (the bars are cleared, the line written, the bars drawn again) to
    the stderr of the moment, so a redirected or captured stderr gets it too."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: a failed emit is reported, never raised
            self.handleError(record)


def setup_logging(rank: int = 0) -> None:
    """One handler on the root logger (it replaces one set up before): our packages at INFO on rank 0 and at
    WARNING on the other ranks, whose lines start with "[rank N]"; other libraries at WARNING; Python
    warnings through the same handler. Messages are written as they are, without a level or a logger name."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, TqdmHandler)]:
        root.removeHandler(old)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)


def count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def stage_opening(cfg: Config, device: torch.device, world: int, model, compute_dtype: torch.dtype,
                  init_dir: str | None, rows: tuple[int, int], cut: int, memory: str | None) -> str:
    """The lines a stage logs before it trains: where it writes, the model and its size, the data, the device,
    attention kernel and dtypes, the sampler (rollout.describe), and the memory plan's headline (`memory`, curriculum.memory.plan_headline).
    `rows`: (train, val) examples; `cut`: prompts longer than data.max_prompt_tokens."""
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)  # an FSDP-sharded parameter reports its full size
    source = init_dir or cfg.model.path or "model.build (random init)"
    data = cfg.data.train or f"the synthetic task ({(cfg.data.synthetic or {}).get('difficulty')})"
    attn = resolve_attention(cfg.model.attn_implementation, device, cfg.variant == "structured")
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "-"
    return "\n".join([
        f"{cfg.name} ({cfg.kind}, {cfg.variant}): run dir {cfg.run_dir}",
        f"  model: {source}, {count(numel)} parameters",
        f"  data: {rows[0]} train / {rows[1]} val rows from {data}; prompts cut to data.max_prompt_tokens="
        f"{cfg.data.max_prompt_tokens}: {cut}",
        f"  device: {device}, world size {world}; attention: {attn}; dtype: {dtype} parameters, "
        f"{str(compute_dtype).removeprefix('torch.')} compute",
        f"  sampling: {describe(cfg.rollout.page_size, cfg.rollout.max_rows, cfg.rollout.cuda_graphs, device)}",
        f"  memory per rank: {memory or 'not planned (run.py plans it)'}"])
