"""grpo/fsdp.py under 2 gloo ranks (torchrun in a subprocess, tests/dist_worker.py): FSDP2 training equals
one process over the same batch (causal with tied embeddings, structured, with a sharded reference
model), sampling does not deadlock when ranks decode different numbers of steps, and a world size that
does not divide the prompt batch is refused before any work.

How "the same batch" is built: each rank samples only its share of the prompts, with its own seed, so a
2-rank run never sees the rollout of a 1-process run by itself. Here the 1-process run (in this pytest
process) records every rollout its sampler returns; the 2-rank run replays them: at step k rank r gets,
of the k-th recorded rollout, the rows of prompts r, r+2, ... -- exactly the prompts train_grpo hands it
(the replay checks). Everything after sampling is the real trainer: rewards, advantages, old/ref
log-probs, micro-batches, token_logprobs, grpo_objective, clipping, AdamW under FSDP. The 2-rank runs
use a small micro-batch budget (several micro-batches per rank, not always as many on both ranks), the
1-process runs one micro-batch per update, so one comparison covers ranks and micro-batches together.
"""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from grpo.batching import make_batch
from grpo.fsdp import Dist
from grpo.trainer import accumulate_gradients
from rollout import Sampler

from .dist_worker import build, run, run_scenario
from .test_trainer import OBJECTIVES, off_policy, toy_config, toy_feed

STEPS = 2
ONE = {"micro_batch_tokens": 100_000}  # one micro-batch per update
SPLIT = {"micro_batch_tokens": 64}  # ~3 rows per micro-batch: several per rank
# AdamW's first updates divide each gradient element by its own magnitude, so rounding differences of
# near-zero elements (other reduction orders over ranks and micro-batches) become update differences of
# ~1% of lr; lr 3e-4 keeps them under the 1e-5 tolerance while every tensor still moves by >= 1e-4.
# Gradients themselves are compared directly, at 1e-6 (test_gradients_...).
LR = {"lr": 3e-4}
CASES = {  # name -> (model kind, config overrides, reference model)
    "causal": ("tiny", {"optim": {**LR, "grad_clip": 0.2}}, False),  # tied embeddings, gradients clipped
    "structured": ("tags", {"variant": "structured", "optim": LR, "rollout": {"max_new_tokens": 24}}, False),
    "kl": ("tiny", {"grpo": {"kl_coef": 0.1, "mini_batch_prompts": 2}, "optim": LR}, True),  # 2 updates a step
}
COMPARED = ("policy_loss", "entropy", "grad_norm", "approx_kl", "kl", "reward", "clip_ratio/region_mean")
GRAD_CASES = [("eos", "token-mean"), ("eos", "seq-mean-token-mean"), ("eos", "seq-mean-token-sum-norm"),
              ("tags", "token-mean"), ("eos", "activation-checkpointing"),  # token-mean, AC on 2 ranks
              ("eos", "gspo+mis"), ("eos", "cispo+tis"),  # the other policy losses and sampler corrections
              ("eos", "padded")]  # token-mean, grpo.pack false on both sides


def config(over: dict, grpo: dict) -> dict:
    return {**over, "grpo": {"steps": STEPS, **over.get("grpo", {}), **grpo},
            "checkpoint": {"every": 0, "resume": "never"}}


def metrics(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def facts(out, rank=0) -> dict:
    with open(os.path.join(out, f"rank{rank}.json")) as f:
        return json.load(f)


def fixed_batch(tok, tags, kind):
    """4 prompts x 4 samples of mixed lengths (with parallel blocks for "tags"), off-policy old log-probs."""
    model = build(kind, tok, tags)
    structured = kind == "tags"
    r = Sampler(model, tags=tags, pad_id=tok.pad_token_id).generate(
        [it.prompt_ids for it in toy_feed(tok).items], n=4, max_new_tokens=24, stop_ids=[tok.eos_token_id],
        seed=7, structured=structured)  # a seed whose lengths give the ranks unequal micro-batch counts
    assert r.stats["blocks"] > 0 or not structured
    batch = make_batch(r, torch.linspace(-1.5, 1.5, 16))
    old = batch.sampler_logp - 0.05 * torch.arange(batch.input_ids.shape[1])[None] / 10  # ratios != 1
    return model, replace(batch, old_logp=old)


@pytest.fixture(scope="module")
def runs(tok, tags, tmp_path_factory):
    """The 1-process references, here (the training runs record their rollouts), then ONE 2-rank launch
    running the replays, the gradient cases, the sampling run and the batch-size check."""
    root = tmp_path_factory.mktemp("fsdp")
    with one_thread():
        scenarios = references(root, tok, tags)
    # sampling: 2 prompts x 4 samples per rank of up to 64 tokens: the longest response differs per rank
    sampling = {"rollout": {"group_size": 4, "max_new_tokens": 64}}
    scenarios.append({"out": str(root / "sample"), "model": "eos", "config": config(sampling, SPLIT)})
    scenarios.append({"out": str(root / "sample_structured"), "model": "tags",
                      "config": config({**sampling, "variant": "structured"}, SPLIT)})
    scenarios.append({"out": str(root / "bad_world"), "config": config({}, {"prompts_per_step": 3,
                                                                           "mini_batch_prompts": 3})})
    # refill: rank 0's first share has signal, rank 1's has none; 2 updates a step
    scenarios.append({"out": str(root / "refill"), "texts": [f"question {i}" for i in range(6)],
                      "answers": ["live", "flat", "live", "flat", "flat", "live"], "reward": "flat_or_live",
                      "config": config({"rollout": {"group_size": 4, "max_new_tokens": 8}},
                                       {"filter_zero_std": True, "max_sampling_rounds": 4, "mini_batch_prompts": 2})})
    run(scenarios, str(root), nproc=2, timeout=150)
    return root


def references(root, tok, tags) -> list:
    """Run the 1-process references; returns the 2-rank scenarios that replay them."""
    scenarios = []
    for name, (kind, over, ref) in CASES.items():
        record = str(root / f"{name}.rollouts")
        run_scenario({"out": str(root / name / "one"), "model": kind, "ref": ref, "record": record,
                      "config": config(over, ONE)}, Dist(), tok, tags)
        scenarios.append({"out": str(root / name / "two"), "model": kind, "ref": ref, "replay": record,
                          "config": config(over, SPLIT)})
    for kind, case in GRAD_CASES:
        model, batch = fixed_batch(tok, tags, kind)
        if case in OBJECTIVES:
            batch = off_policy(batch)  # sampler log-probs apart from the old ones: the corrections act
        path = str(root / f"{kind}-{case}.batch")
        torch.save(batch, path)
        over = OBJECTIVES.get(case, {"agg_mode": "token-mean" if case in ("activation-checkpointing", "padded")
                                     else case})
        over = {**over, "pack": case != "padded"}
        cfg = {"variant": "structured" if kind == "tags" else "causal", "rollout": {"group_size": 4}}
        metrics_one = accumulate_gradients(model.train(), batch, toy_config(**cfg, grpo={**ONE, **over}), Dist())
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "metrics": metrics_one},
                   root / f"{kind}-{case}.one")
        scenarios.append({"out": str(root / f"{kind}-{case}"), "model": kind, "batch": path,
                          "activation_checkpointing": case == "activation-checkpointing",
                          "config": {**cfg, "grpo": {"micro_batch_tokens": 40, **over}}})
    return scenarios


@contextmanager
def one_thread():
    """One torch thread, like the workers: two threads on a busy 2-core machine spin-wait (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind,case", GRAD_CASES)
def test_gradients_split_over_ranks_and_micro_batches(runs, kind, case):
    """2 ranks x several micro-batches give the gradients of 1 x 1, for each aggregation mode, structured, with
    activation checkpointing, for the other policy losses and sampler corrections, and padded. Packed, the rows are spread over the ranks by tokens: both run the same
    number of micro-batches, their tokens in each differ by less than the longest row, and every row runs once;
    padded, each rank runs its own rows, and the one with fewer micro-batches repeats its last at weight 0."""
    one = torch.load(runs / f"{kind}-{case}.one")
    two = torch.load(runs / f"{kind}-{case}" / "grads.pt")
    assert one["grads"].keys() == two["grads"].keys()
    for k, g in one["grads"].items():
        assert torch.allclose(g, two["grads"][k], atol=1e-6, rtol=1e-5), (k, (g - two["grads"][k]).abs().max())
    assert max(g.abs().max() for g in one["grads"].values()) > 1e-4  # a real gradient
    assert one["metrics"].keys() == two["metrics"].keys()
    for k in ("policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "approx_kl",
              "sampling/sampling_logp_difference/mean", "sampling/tis_capped_ratio", "sampling/mis_masked_ratio"):
        if k in one["metrics"]:
            assert abs(one["metrics"][k] - two["metrics"][k]) < 1e-5, k
    if case in OBJECTIVES:  # the clips and the correction act on this batch
        assert 0 < one["metrics"]["clip_ratio/region_mean"] < 1
        assert 0 < one["metrics"].get("sampling/tis_capped_ratio", one["metrics"].get("sampling/mis_masked_ratio")) < 1
    assert facts(runs / f"{kind}-{case}")["activation_checkpointing"] == (case == "activation-checkpointing")
    counts = [facts(runs / f"{kind}-{case}", r)["micro_batches"] for r in (0, 1)]
    assert min(counts) >= 2
    if case == "padded":
        assert counts[0] != counts[1]  # the ranks pad with zero-weight repeats to the same count
        return
    batch = torch.load(runs / f"{kind}-{case}.batch", weights_only=False)
    lengths = batch.prompt_len + batch.response_len  # (N,) every row has loss tokens here
    ran = [facts(runs / f"{kind}-{case}", r)["packed"] for r in (0, 1)]
    assert counts[0] == counts[1] and all(len(rank) == counts[0] for rank in ran)
    for (t0, _), (t1, _) in zip(*ran):
        assert abs(t0 - t1) < int(lengths.max())
    assert sum(t * w for rank in ran for t, w in rank) == int(lengths.sum())  # each row once (stand-ins weigh 0)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(runs, case, tok, tags):
    one, two = runs / case / "one", runs / case / "two"
    a, b = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    start = build(CASES[case][0], tok, tags).state_dict()
    assert min((a[k] - start[k]).abs().max() for k in a) >= 1e-4  # every tensor was trained
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in mb] == list(range(STEPS))
    for ra, rb in zip(ma, mb):
        for k in COMPARED:
            if ra.get(k) is not None:
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
        if case != "kl":  # one update per step: the replayed samples are on-policy for the sharded model
            assert rb["sampling/sampling_logp_difference/max"] < 1e-4
    assert facts(two)["sharded"] and facts(two, 1)["sharded"]  # really FSDP: DTensor parameters
    # the live sharded model gives the logits of the 1-process one
    assert torch.allclose(torch.load(one / "logits.pt"), torch.load(two / "logits.pt"), atol=1e-4)


def test_structured_batches_hold_parallel_blocks(runs):
    """The structured comparison means something only if the replayed samples use the structure."""
    assert all(b > 0 for b in facts(runs / "structured" / "one")["blocks"])


def test_reference_model_is_sharded_and_frozen(runs):
    for rank in (0, 1):
        f = facts(runs / "kl" / "two", rank)
        assert f["ref_sharded"] and f["ref_grads"] == 0 and f["ref_requires_grad"] == 0
    assert all(r["kl"] > 0 for r in metrics(runs / "kl" / "two"))  # a different reference: a real KL term


def test_sampling_with_different_lengths_per_rank(runs):
    """Ranks decode different numbers of steps (no deadlock: parameters stay gathered while sampling),
    and the sampler's log-probs equal the FSDP trainer's."""
    steps0, steps1 = facts(runs / "sample", 0)["decode_steps"], facts(runs / "sample", 1)["decode_steps"]
    assert len(steps0) == len(steps1) == STEPS and steps0 != steps1
    rows = metrics(runs / "sample")
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert max(r["sampling/sampling_logp_difference/max"] for r in rows) < 1e-4


def test_structured_sampling_under_fsdp(runs):
    rows = metrics(runs / "sample_structured")
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert max(r["sampling/sampling_logp_difference/max"] for r in rows) < 1e-4
    assert sum(sum(facts(runs / "sample_structured", r)["blocks"]) for r in (0, 1)) > 0  # paths were sampled


def test_refill_under_two_ranks(runs):
    """DAPO's refill on 2 ranks: rank 1's first share has no signal, so the ranks sample more rounds together
    until each has its 2 groups with signal; their feeds end at the same position (what the checkpoint keeps)."""
    rows = metrics(runs / "refill")
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert all(r["dynamic_sampling/kept_groups"] == 4 for r in rows)
    assert rows[0]["dynamic_sampling/rounds"] >= 2 and rows[0]["frac_reward_zero_std"] > 0
    feeds = [facts(runs / "refill", r)["feed"] for r in (0, 1)]
    assert feeds[0] == feeds[1] and feeds[0]["pos"] == sum(r["dynamic_sampling/sampled_groups"] for r in rows)


def test_world_size_must_divide_the_prompt_batch(runs):
    for rank in (0, 1):
        f = facts(runs / "bad_world", rank)
        assert "world size 2" in f["error"] and "grpo.prompts_per_step=3" in f["error"]
        assert f["files_after_error"] == []  # refused before any work


def test_leave_process_runs_exit_handlers_then_skips_finalization(tmp_path):
    """A torchrun rank ends through leave_process: the exit handlers run (reward workers, trackers), logging and
    both streams are flushed, the code is the process's exit code, and nothing runs after: no interpreter
    finalization, where gloo's worker threads can abort a finished run (the same script ending with sys.exit
    shows that finalization would have run the object's __del__)."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, logging, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "from grpo.fsdp import leave_process\n"
        "class Finalized:\n"
        "    def __del__(self, write=sys.stdout.write): write(' finalized')\n"
        "keep = Finalized()  # a module global: deleted at interpreter finalization\n"
        "atexit.register(print, 'exit handler ran')\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
        "logging.info('logged')\n"
        "sys.stdout.write('stdout unflushed')\n"
        "sys.stderr.write('stderr unflushed')\n"
        "leave_process(3) if sys.argv[2] == 'leave' else sys.exit(3)\n"
        "print('after leave_process')\n")
    out = {}
    for how in ("leave", "exit"):
        log = tmp_path / f"{how}.txt"
        r = subprocess.run([sys.executable, str(script), str(log), how], capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and r.stderr == "stderr unflushed", r.stderr
        assert log.read_text() == "INFO:root:logged\n"
        out[how] = r.stdout
    assert out == {"leave": "stdout unflushedexit handler ran\n", "exit": "stdout unflushedexit handler ran\n finalized"}
