"""curriculum/console.py: run.py's logging (rank 0 at INFO, other ranks at WARNING with their rank named, one
handler however often it is set up, lines that do not tear a tqdm bar) and the opening summary of a stage."""
import logging

import pytest
import torch
from tqdm import tqdm

from curriculum.config import build_config
from curriculum.console import TqdmHandler, count, setup_logging, stage_opening
from model import build_model

from .conftest import TINY


@pytest.fixture
def console():
    """setup_logging's changes to the global logging state, undone afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("curriculum")
    saved = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    ours.setLevel(saved[2])
    logging.captureWarnings(False)


def test_rank_0_says_info_and_other_ranks_only_warnings_naming_their_rank(console, capsys):
    log = logging.getLogger("curriculum.stages")
    setup_logging(0)
    setup_logging(0)  # set up twice (run.py in-process, twice): still one handler
    log.info("stage g: resuming from step-2")
    logging.getLogger("transformers.x").info("another library's chatter")
    assert capsys.readouterr().err == "stage g: resuming from step-2\n"
    setup_logging(1)
    log.info("said on rank 0 only")
    log.warning("note: a warning")
    assert capsys.readouterr().err == "[rank 1] note: a warning\n"
    assert sum(isinstance(h, TqdmHandler) for h in logging.getLogger().handlers) == 1


def test_a_logged_line_does_not_tear_a_progress_bar(console, capsys):
    setup_logging(0)
    bar = tqdm(total=3, desc="stage1")  # tqdm's default stream: stderr
    bar.update(1)
    logging.getLogger("grpo.trainer").info("stage1: starting at step 0 of 3")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    # the bar is cleared before the line and drawn again after it: the line stands alone after a carriage return
    assert "\rstage1: starting at step 0 of 3\n" in err and "%|" in err.split("starting at step")[1]


def test_count():
    assert [count(n) for n in (999, 83_712, 4_022_468_096, 1_500_000)] == ["999", "83.71K", "4.02B", "1.50M"]


def test_the_opening_summary_names_what_a_stage_runs_on():
    cfg = build_config({"kind": "grpo", "name": "stage1", "run_dir": "runs/x/stage1", "variant": "structured",
                        "data": {"train": "data/gsm8k.jsonl", "max_prompt_tokens": 512},
                        "model": {"attn_implementation": "eager"}})
    model = build_model(dict(TINY, vocab_size=100))
    n = sum(p.numel() for p in model.parameters())
    text = stage_opening(cfg, torch.device("cpu"), 1, model, torch.float32, "runs/x/stage0/final", (90, 10), 3,
                         "peak 1.0 MiB while sampling")
    assert text == "\n".join([
        "stage1 (grpo, structured): run dir runs/x/stage1",
        f"  model: runs/x/stage0/final, {n / 1e3:.2f}K parameters",
        "  data: 90 train / 10 val rows from data/gsm8k.jsonl; prompts cut to data.max_prompt_tokens=512: 3",
        "  device: cpu, world size 1; attention: eager; dtype: float32 parameters, float32 compute",
        "  sampling: paged KV, pages of 16 tokens, at most 256 rows a decode step; attention over pages: portable "
        "(SDPA over each row's gathered pages); decode steps eager",
        "  memory per rank: peak 1.0 MiB while sampling"])
