"""grpo/checkpoint.py: a run killed with SIGKILL (or stopped by SIGTERM) and resumed ends BITWISE where an
uninterrupted run ends, in one process and on 2 gloo ranks; incomplete checkpoints are skipped, `.tmp`
directories never count, the last k are kept, the HF export loads in plain transformers with the
trainer's logits, and an incompatible config is refused naming the key.

Every run is a toy GRPO run of 4 steps (tests/dist_worker.py) in a fresh process; the comparison is
torch.equal on every tensor plus equal metrics, so model, AdamW state (step included), scheduler, data
position, sampler seed and RNG must all come back exactly.
"""
import errno
import json
import os
import random
import signal
import time
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from grpo import checkpoint as ckpt
from grpo.fsdp import Dist
from grpo.optim import build_optimizer
from grpo.loop import TrainState
from model.load import export_info

from .dist_worker import PROBE, finish, log_tail, run, start
from .test_trainer import tiny, toy_config

STEPS = 4
# 2 prompts a step from 6: steps 0-3 see prompts 0-1, 2-3, 4-5, 0-1, so the data position matters
TEXTS = ["hello world", "how many", "solve the problem", "tom has 3", "what is left", "add them up"]
VOLATILE = ("time/", "tokens_per_s")  # metrics that measure the machine, not the training


def spec(out, *, block=None, resume="never", every=2, hold=None) -> dict:
    s = {"out": str(out), "texts": TEXTS,
         "config": {"grpo": {"steps": STEPS, "prompts_per_step": 2, "mini_batch_prompts": 2},
                    "checkpoint": {"every": every, "resume": resume},
                    "optim": {"schedule": "cosine", "warmup_steps": 1}}}  # the lr changes every step
    if block:
        s["block"] = block
    if hold is not None:
        s["hold"] = hold
    return s


def read(path) -> str:
    with open(path) as f:
        return f.read()


def wait_for(path, proc, workdir, timeout=90.0) -> str:
    """Wait until the worker writes `path` (a marker holding its pid); fail if it exits or takes too long."""
    end = time.monotonic() + timeout
    while not os.path.exists(path) or not read(path):
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} before writing {path}:\n{log_tail(workdir)}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s:\n{log_tail(workdir)}")
        time.sleep(0.05)
    return read(path)


def interrupted_runs(root, nproc: int) -> dict:
    """In one process (or one torchrun launch): the straight run, a run that gets SIGTERM during step 1
    (on one rank only when there are two), and a run SIGKILLed during step 2, after its step-2 checkpoint
    is complete. Then, in a fresh process, both interrupted runs resume (checkpoint.resume=auto).
    Returns what the run directories held at the kill."""
    ranks = max(nproc, 1)
    proc = start([spec(root / "straight"),
                  spec(root / "term", block={"at": 1, "mode": "wait"}, every=0),
                  spec(root / "kill", block={"at": 2, "mode": "hang"})], str(root), nproc)
    pid = wait_for(root / "term" / f"at-step-rank{ranks - 1}", proc, str(root))
    os.kill(int(pid), signal.SIGTERM)  # the last rank only: the ranks must agree to stop together
    (root / "term" / "go").write_text("")
    pids = [wait_for(root / "kill" / f"at-step-rank{r}", proc, str(root)) for r in range(ranks)]
    at_kill = {name: {"checkpoints": sorted(os.listdir(root / name / "checkpoints")),
                      "steps": [r["step"] for r in metrics(root / name)]} for name in ("term", "kill")}
    for p in pids:
        os.kill(int(p), signal.SIGKILL)
    assert finish(proc, str(root), timeout=60) != 0
    run([spec(root / "kill", resume="auto"), spec(root / "term", resume="auto", every=0)], str(root), nproc)
    return at_kill


def metrics(out) -> list:
    return [json.loads(line) for line in read(out / "metrics.jsonl").splitlines()]


def assert_same_run(resumed, straight):
    a, b = torch.load(resumed / "weights.pt"), torch.load(straight / "weights.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    ra, rb = metrics(resumed), metrics(straight)
    assert [r["step"] for r in ra] == list(range(STEPS))  # continuous: each step once
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if not k.startswith(VOLATILE)} == \
               {k: v for k, v in y.items() if not k.startswith(VOLATILE)}


def assert_export_matches(run_dir):
    """checkpoints/step-4/model loads in plain transformers and gives the live model's logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"step-{STEPS}" / "model")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE)).logits
    assert torch.allclose(logits, torch.load(run_dir / "logits.pt"), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    return root, interrupted_runs(root, nproc=0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return root, interrupted_runs(root, nproc=2)


def stopped(run_dir, rank=0) -> str:
    return json.loads(read(run_dir / f"rank{rank}.json")).get("stopped", "")


def test_sigkill_then_resume_is_bitwise(one_process):
    root, at_kill = one_process
    assert at_kill["kill"] == {"checkpoints": ["step-2"], "steps": [0, 1]}  # killed inside step 2, no .tmp
    assert_same_run(root / "kill", root / "straight")


def test_sigterm_finishes_the_step_saves_stops_and_resumes(one_process):
    root, at_kill = one_process
    assert "stopped at step 2" in stopped(root / "term")  # StopRequested raised out of train_grpo
    assert at_kill["term"] == {"checkpoints": ["step-2"], "steps": [0, 1]}  # every=0: the stop's checkpoint
    assert_same_run(root / "term", root / "straight")


def test_export_loads_in_transformers(one_process):
    assert_export_matches(one_process[0] / "kill")


def test_two_ranks_sigkill_then_resume_is_bitwise(two_ranks):
    root, at_kill = two_ranks
    assert at_kill["kill"] == {"checkpoints": ["step-2"], "steps": [0, 1]}
    assert_same_run(root / "kill", root / "straight")
    assert_export_matches(root / "kill")  # gathered from 2 FSDP ranks


def test_two_ranks_stop_together_on_one_signal(two_ranks):
    root, at_kill = two_ranks
    assert all("stopped at step 2" in stopped(root / "term", rank) for rank in (0, 1))  # only rank 1 got it
    assert at_kill["term"] == {"checkpoints": ["step-2"], "steps": [0, 1]}
    assert_same_run(root / "term", root / "straight")


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks, tok):
    """DCP reshards on load: a 2-rank checkpoint continues in one process (with a warning that samples
    will differ from the 2-rank run's), model and optimizer state complete."""
    from safetensors.torch import load_file

    path = two_ranks[0] / "kill" / "checkpoints" / "step-2"
    model = tiny(tok, seed=7)
    opt, sched = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 0, 10)
    state = TrainState()
    with pytest.warns(UserWarning, match="written by 2 ranks and is resumed on 1"):
        ckpt.resume(str(path.parent.parent), str(path), model, opt, sched, state, None, Dist())
    exported = load_file(path / "model" / "model.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in exported.items())
    assert state.step == 2 and all(float(s["step"]) == 2 for s in opt.state.values())  # two AdamW updates
    assert len(opt.state) == len(list(model.parameters()))


# --- in-process: which checkpoint counts ----------------------------------------------------------------

def save_step(tok, run_dir, model, opt, sched, step, cfg=None, keep=0) -> str:
    cfg = cfg or toy_config()
    return ckpt.save(str(run_dir), model, opt, sched, TrainState(step=step, feed={"pos": step}), Dist(), tok,
                     config=asdict(cfg), keep=keep)


def saved_steps(tok, run_dir, steps, cfg=None, keep=0):
    model = tiny(tok)
    opt, sched = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 0, 10)
    for step in steps:
        with torch.no_grad():
            model.lm_head.weight[0, 0] = float(step)  # tells the checkpoints apart
        save_step(tok, run_dir, model, opt, sched, step, cfg, keep)
    return model, opt, sched


def resume_into(tok, run_dir, mode="auto", expect=None):
    model = tiny(tok, seed=7)
    opt, sched = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 0, 10)
    state = TrainState()
    path = ckpt.resume(str(run_dir), mode, model, opt, sched, state, None, Dist(), expect=expect)
    return path, state, model


def rewrite_manifest(path):
    """Make a tampered checkpoint look intact again (size and checksum of every file as it now is)."""
    os.remove(path / "manifest.json")
    ckpt.write_manifest(str(path))


def test_checkpoints_and_the_final_export_carry_the_same_metadata(tok, tmp_path):
    """What a loader needs to prompt and run a model (variant, template, prompt style, instruction) is written
    from one source, export_fields, into every checkpoint's model/ and into the stage's final export."""
    cfg = toy_config()
    cfg = replace(cfg, variant="structured", data=replace(cfg.data, template="chat", prompt_style="plain",
                                                          instruction="Solve: {question}"))
    model = tiny(tok)
    opt, sched = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 0, 10)
    step = save_step(tok, tmp_path, model, opt, sched, 1, cfg)
    final = ckpt.export_model(str(tmp_path / "final"), model, tok, Dist(), str(tmp_path), config=asdict(cfg))
    saved = export_info(os.path.join(step, "model"))
    assert saved == export_info(final)
    assert {k: saved[k] for k in ("variant", "template", "prompt_style", "instruction")} == {
        "variant": "structured", "template": "chat", "prompt_style": "plain", "instruction": "Solve: {question}"}


def test_incomplete_checkpoints_are_skipped(tok, tmp_path):
    saved_steps(tok, tmp_path, [1, 2, 3, 9])
    root = tmp_path / "checkpoints"
    weights = root / "step-3" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    os.remove(root / "step-2" / "trainer.json")  # missing
    os.rename(root / "step-9", root / "step-9.tmp")  # a save that did not get to its rename: never counts
    with pytest.warns(UserWarning) as caught:
        path, state, model = resume_into(tok, tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "step-3" in messages and "truncated" in messages and "step-2" in messages and "missing" in messages
    assert path.endswith("step-1") and state.step == 1 and state.feed == {"pos": 1}
    assert model.lm_head.weight[0, 0].item() == 1.0


def test_a_corrupted_file_of_the_right_size_names_itself_and_the_run_falls_back(tok, tmp_path):
    """Random bytes of the same size used to load, and crash later with "probability tensor contains inf/nan";
    the manifest's checksums catch them."""
    saved_steps(tok, tmp_path, [1, 2])
    weights = tmp_path / "checkpoints" / "step-2" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = os.urandom(64)  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-2: model/model\.safetensors does not match its sha256"):
        path, state, model = resume_into(tok, tmp_path)
    assert path.endswith("step-1") and state.step == 1 and model.lm_head.weight[0, 0].item() == 1.0


def test_every_checkpoint_rejected_stops_and_lists_each(tok, tmp_path):
    """It used to warn and restart from step 0 (exit 0, duplicated metrics rows)."""
    saved_steps(tok, tmp_path, [1, 2])
    os.remove(tmp_path / "checkpoints" / "step-1" / "manifest.json")
    os.remove(tmp_path / "checkpoints" / "step-2" / "rng-rank0.pt")
    with pytest.raises(ckpt.CheckpointError) as err, pytest.warns(UserWarning):
        resume_into(tok, tmp_path)
    message = str(err.value)
    assert "step-2: rng-rank0.pt is missing" in message and "step-1: no manifest.json" in message
    assert "checkpoint.resume: never" in message


class Planted:
    """Unpickling this runs code: what a hostile checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


@pytest.mark.parametrize("name", ["rng-rank0.pt", "trainer.pt"])
def test_resuming_runs_no_code_from_the_checkpoint(tok, tmp_path, name):
    """A planted pickle (rng-rank0.pt, or the trainer.pt the old format loaded with weights_only=False) is
    refused without running it; the checkpoint's own state is JSON and tensors only."""
    saved_steps(tok, tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-1"
    marker = tmp_path / "pwned"
    torch.save({"python": Planted(str(marker))}, step / name)
    rewrite_manifest(step)
    try:
        resume_into(tok, tmp_path)
    except ckpt.CheckpointError as e:
        assert name == "rng-rank0.pt" and "refused" in str(e)
    assert not marker.exists()
    assert json.loads((step / "trainer.json").read_text())["state"]["step"] == 1


def test_non_finite_weights_are_never_saved(tok, tmp_path):
    model, opt, sched = saved_steps(tok, tmp_path, [1])
    with torch.no_grad():
        model.lm_head.weight[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf; checkpoint .*step-2 is not written"):
        save_step(tok, tmp_path, model, opt, sched, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1"]


@pytest.mark.parametrize("writer", ["save_model", "save_sharded"])
def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tok, tmp_path, monkeypatch, writer):
    model, opt, sched = saved_steps(tok, tmp_path, [1])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, writer, full)
    with pytest.raises(ckpt.CheckpointError) as err:
        save_step(tok, tmp_path, model, opt, sched, 2)
    message = str(err.value)
    assert message.startswith("No space left on device while writing") and "step-2" in message
    assert "iB free in" in message and "step-1) is intact" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1"]  # no step-2.tmp left
    monkeypatch.undo()
    assert resume_into(tok, tmp_path)[0].endswith("step-1")


def test_keep_last_k(tok, tmp_path):
    (tmp_path / "checkpoints" / "step-7.tmp").mkdir(parents=True)  # left by a killed save
    saved_steps(tok, tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-4", "step-5"]
    assert ckpt.latest(str(tmp_path)).endswith("step-5")


def test_a_save_drops_the_checkpoints_of_an_abandoned_later_attempt(tok, tmp_path):
    """After falling back to step-1 (step-3 rejected), saving step-2 removes step-3: it belongs to a future
    this run no longer has, and `auto` must not pick it up again."""
    model, opt, sched = saved_steps(tok, tmp_path, [1, 3])
    save_step(tok, tmp_path, model, opt, sched, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1", "step-2"]


def test_incompatible_config_is_refused(tok, tmp_path):
    saved_steps(tok, tmp_path, [1])
    with pytest.raises(ckpt.CheckpointError, match=r"rollout\.group_size: checkpoint 8 vs run 4"):
        resume_into(tok, tmp_path, expect={"rollout.group_size": 4, "variant": "causal"})
    assert resume_into(tok, tmp_path, expect={"rollout.group_size": 8, "variant": "causal"})[0].endswith("step-1")


def test_rng_is_restored(tok, tmp_path):
    saved_steps(tok, tmp_path, [1])
    expected = (torch.rand(3), random.random(), np.random.rand())  # what an uninterrupted run would draw next
    resume_into(tok, tmp_path)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_metrics_resume_at_the_checkpoint_past_a_torn_line(tok, tmp_path):
    """A half-written last line used to block every resume with a bare JSONDecodeError; rows after the
    resumed step are dropped, so no step is logged twice."""
    saved_steps(tok, tmp_path, [2])
    rows = [json.dumps({"step": s, "reward": 0.5}) for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "rew')
    assert resume_into(tok, tmp_path)[1].step == 2
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1]


def test_a_restart_before_the_first_checkpoint_logs_no_step_twice(tok, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + json.dumps({"step": 1}) + "\n")
    path, state, _ = resume_into(tok, tmp_path)
    assert path is None and state.step == 0 and (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_saving_before_the_first_update_leaves_the_optimizer_alone(tok, tmp_path):
    """AdamW has no state before its first step; a checkpoint must not create one (that would change the
    first update), and resuming it gives a fresh optimizer at the saved learning rate."""
    model = tiny(tok)
    opt, sched = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 5, 10)  # warmup: lr 2e-4 at step 0
    sched.step()  # 4e-4: the lr after one (skipped) update
    save_step(tok, tmp_path, model, opt, sched, 1)
    assert not opt.state
    model = tiny(tok, seed=3)
    opt, sched = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 5, 10)
    ckpt.resume(str(tmp_path), "auto", model, opt, sched, TrainState(), None, Dist())
    assert not opt.state and opt.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert torch.equal(model.lm_head.weight, tiny(tok).lm_head.weight)


def test_resume_never_and_explicit_path(tok, tmp_path):
    saved_steps(tok, tmp_path, [1, 2])
    assert resume_into(tok, tmp_path, "never")[0] is None
    path = str(tmp_path / "checkpoints" / "step-1")
    assert resume_into(tok, tmp_path, path)[1].step == 1
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json"):
        resume_into(tok, tmp_path, str(tmp_path / "nowhere"))


def test_ctrl_c_under_torchrun_mid_rollout_saves_the_last_step_at_once(tmp_path):
    """Ctrl-C in the terminal: SIGINT to torchrun and its workers (one process group), then torchrun forwards it
    again and kills the workers 30 s later. A rollout in progress (held until the stop flag is up) is
    abandoned, every rank drops the step and the last finished step is saved: its checkpoint is there, the
    metrics hold exactly the finished steps, the run resumes from it and ends as an uninterrupted run."""
    proc = start([spec(tmp_path / "cut", hold=2, every=0)], str(tmp_path), nproc=2)
    for r in (0, 1):
        wait_for(tmp_path / "cut" / f"sampling-rank{r}", proc, str(tmp_path))
    os.killpg(proc.pid, signal.SIGINT)
    code = finish(proc, str(tmp_path), timeout=300)  # generous: only a hang may fail here, not a busy machine
    assert code != 0, code  # torchrun reports the interruption
    for rank in (0, 1):
        assert "stopped while sampling step 3, which was dropped; checkpoint of step 2" in stopped(tmp_path / "cut",
                                                                                                rank)
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step-2"]
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [0, 1]
    run([spec(tmp_path / "cut", resume="auto", every=0), spec(tmp_path / "straight", every=0)], str(tmp_path), 2,
        timeout=300)
    assert_same_run(tmp_path / "cut", tmp_path / "straight")
