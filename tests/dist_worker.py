"""A training process for tests/test_fsdp.py and tests/test_checkpoint.py, run in a subprocess:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/dist_worker.py SPEC.json
    python tests/dist_worker.py SPEC.json        # one process, no process group

SPEC.json holds {"scenarios": [...]}, run in order in this one process (a torchrun launch costs seconds).
A scenario with a "batch" runs `accumulate_gradients` on that fixed batch and writes the gradients; any
other trains the toy task of tests/test_trainer.py with `train_grpo` and writes what the test
compares under its "out" directory: `weights.pt` (the final full state dict, rank 0), `logits.pt` (the
live model's logits on a probe batch, rank 0), `rank<r>.json` (per-rank facts) and the run's own
metrics.jsonl and checkpoints. A run stopped by SIGTERM makes the process exit with 143.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import grpo.loop  # noqa: E402
from grpo.fsdp import close_distributed, init_distributed, leave_process, model_state_dict, parallelize  # noqa: E402
from grpo.loop import StopRequested  # noqa: E402
from grpo.trainer import train_grpo  # noqa: E402
from model import add_tag_tokens, apply_structured_attention, build_model  # noqa: E402
from model.tokenizer import build_word_tokenizer  # noqa: E402
from rollout import Rollout, Sampler  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tests.test_rounds import FlatOrLive  # noqa: E402
from tests.test_trainer import Item, ListFeed, WordReward, eos_leaning, tiny, toy_config, toy_feed  # noqa: E402

PROBE = [[5, 9, 14, 3, 27, 8], [40, 41, 42, 43, 44, 45]]  # token ids the exported model is checked on


def tag_leaning(tok, tags):
    """An untied tiny model whose <Parallel>, </Path> and EOS rows point along the mean final hidden
    state: structured sampling then opens blocks in a good share of the responses."""
    model = build_model(dict(TINY, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False), seed=0)
    with torch.no_grad():
        h = model.model(input_ids=torch.arange(5, 60)[None], use_cache=False).last_hidden_state[0]  # (T, H)
        direction = h.mean(0) / h.mean(0).norm() / h.norm(dim=-1).mean()
        for token, scale in ((tags.parallel_open, 18.0), (tags.path_close, 14.4), (tok.eos_token_id, 10.8)):
            model.lm_head.weight[token] = scale * direction
    return model


def build(kind: str, tok, tags):
    """tiny: tied embeddings; eos: untied, responses of mixed lengths; tags: untied, structured, with blocks."""
    if kind == "tiny":
        return tiny(tok)
    if kind == "eos":
        return eos_leaning(tok)
    if kind == "tags":
        return apply_structured_attention(tag_leaning(tok, tags), tags)
    raise ValueError(f"unknown model kind {kind!r}")


def feed(tok, texts=None, answers=None):
    """The toy feed of tests/test_trainer.py, or one over `texts` (gold answers `answers`, default "0" each)."""
    if texts is None:
        return toy_feed(tok)
    answers = answers or ["0"] * len(texts)
    return ListFeed([Item(tok.encode(t, add_special_tokens=False), a) for t, a in zip(texts, answers)])


def take_rows(r: Rollout, rows: list) -> Rollout:
    """The rollout restricted to `rows` (group-contiguous rows of whole prompts)."""
    idx = torch.as_tensor(rows)
    fields = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in r.__dict__.items()}
    fields["finish_reason"] = tuple(r.finish_reason[i] for i in rows)
    return Rollout(**fields)


class RecordingSampler(Sampler):
    """The real sampler; keeps every rollout it returns in `log` (a list shared by the test)."""

    log: list = []

    def generate(self, prompts, n=1, **kw):
        r = super().generate(prompts, n=n, **kw)
        self.log.append(r)
        return r


class HoldingSampler(RecordingSampler):
    """RecordingSampler that, in its call number `at` (set per scenario), writes `<out>/sampling-rank<r>`
    (holding its pid) before the first decode step, then holds every decode step until the stop flag it
    polls is up: a rollout is in progress when the test sends its signal, whatever the machine's speed."""

    at, out = -1, ""

    def generate(self, prompts, n=1, should_stop=None, **kw):
        if len(self.log) != self.at or should_stop is None:
            return super().generate(prompts, n=n, should_stop=should_stop, **kw)

        def hold(*args):
            end = time.monotonic() + 120  # the test fails on its own timeout long before
            while not should_stop() and time.monotonic() < end:
                time.sleep(0.01)

        handle = self.model.model.register_forward_pre_hook(hold)
        with open(os.path.join(self.out, f"sampling-rank{int(os.environ.get('RANK', 0))}"), "w") as f:
            f.write(str(os.getpid()))
        try:
            return super().generate(prompts, n=n, should_stop=should_stop, **kw)
        finally:
            handle.remove()


class ReplaySampler:
    """Stands in for `Sampler` on rank r of w: call k returns, of the k-th rollout recorded by one process
    over all P prompts, the rows of prompts r, r+w, ... -- exactly the prompts `train_grpo` hands rank r
    (feed.next_batch(P)[rank::world]), which it checks."""

    def __init__(self, rollouts: list, rank: int, world: int):
        self.rollouts, self.rank, self.world, self.calls = rollouts, rank, world, 0

    def __call__(self, model, **kw):  # replaces the class in grpo.loop: "constructing" gives self
        return self

    def from_section(self, model, *a, **kw):
        return self

    def generate(self, prompts, n=1, **kw):
        full = self.rollouts[self.calls]
        self.calls += 1
        keep = list(range(full.prompt_ids.shape[0] // n))[self.rank::self.world]
        part = take_rows(full, [i * n + j for i in keep for j in range(n)])
        recorded = [ids[m.bool()].tolist() for ids, m in zip(part.prompt_ids[::n], part.prompt_mask[::n])]
        assert recorded == [list(p) for p in prompts], "replay out of step with the feed"
        return part


class BlockingReward(WordReward):
    """WordReward that, on its first call at step `at`, writes `<out>/at-step-rank<r>` (holding its pid)
    and then hangs until the test kills the process ("hang"), or waits for the file `<out>/go` ("wait")."""

    def __init__(self, at: int, mode: str, out: str, rank: int):
        super().__init__()
        self.at, self.mode, self.out, self.rank, self.done = at, mode, out, rank, False

    def __call__(self, response, gold, step):
        if step == self.at and not self.done:
            self.done = True
            with open(os.path.join(self.out, f"at-step-rank{self.rank}"), "w") as f:
                f.write(str(os.getpid()))
            while self.mode == "hang" or not os.path.exists(os.path.join(self.out, "go")):
                time.sleep(0.02)
        return super().__call__(response, gold, step)


def grads_scenario(spec: dict, d, tok, tags) -> None:
    """accumulate_gradients over this rank's rows of a fixed batch (spec["batch"]: a TrainBatch with its
    old_logp, group-contiguous, group_size G), optionally with activation checkpointing; writes the full gradients
    and the metrics (rank 0) and this rank's micro-batches: their number, and packed (grpo.pack) the real tokens
    and weight of each as they ran."""
    import grpo.packing
    import grpo.trainer
    from grpo.batching import micro_batches
    from grpo.trainer import accumulate_gradients

    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    cfg = toy_config(**spec.get("config", {}))
    batch, G = torch.load(spec["batch"], weights_only=False), cfg.rollout.group_size
    rows = [i * G + j for i in range(len(batch.advantages) // G)[d.rank::d.world] for j in range(G)]
    model = parallelize(build(spec.get("model", "tiny"), tok, tags), d,
                        activation_checkpointing=spec.get("activation_checkpointing", False)).train()
    sub = batch.select(rows)
    ran = []  # [real tokens, weight] of each packed micro-batch, as it ran
    pack, micro = grpo.packing.pack, grpo.trainer.packed_micro_batches

    def recording_pack(*args, **kwargs):
        pk = pack(*args, **kwargs)
        ran.append([pk.real_tokens])
        return pk

    def recording_micro(*args, **kwargs):
        for item in micro(*args, **kwargs):
            ran[-1].append(item[-1])
            yield item

    grpo.packing.pack, grpo.trainer.packed_micro_batches = recording_pack, recording_micro
    try:
        metrics = accumulate_gradients(model, sub, cfg, d)
    finally:
        grpo.packing.pack, grpo.trainer.packed_micro_batches = pack, micro
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # a collective
             for n, p in model.named_parameters()}
    if d.main:
        torch.save({"grads": grads, "metrics": metrics}, os.path.join(out, "grads.pt"))
    with open(os.path.join(out, f"rank{d.rank}.json"), "w") as f:
        n = len(ran) if cfg.grpo.pack else len(micro_batches(sub.prompt_len, sub.response_len,
                                                                cfg.grpo.micro_batch_tokens))
        json.dump({"micro_batches": n, "packed": ran, "activation_checkpointing": model.is_gradient_checkpointing}, f)


def run_scenario(spec: dict, d, tok, tags) -> int:
    """Train as `spec` says (keys: out, config, model, texts, answers, reward, ref, replay | record | hold, block);
    returns the exit code."""
    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    cfg = toy_config(**spec.get("config", {}))
    model = parallelize(build(spec.get("model", "tiny"), tok, tags), d)
    ref = None
    if spec.get("ref"):
        ref = parallelize(tiny(tok, seed=1), d, trainable=False)
    RecordingSampler.log.clear()
    if "replay" in spec:
        grpo.loop.Sampler = ReplaySampler(torch.load(spec["replay"], weights_only=False), d.rank, d.world)
    elif "hold" in spec:
        HoldingSampler.at, HoldingSampler.out = spec["hold"], out
        grpo.loop.Sampler = HoldingSampler
    else:
        grpo.loop.Sampler = RecordingSampler
    block = spec.get("block")
    reward = BlockingReward(block["at"], block["mode"], out, d.rank) if block else WordReward()
    if spec.get("reward") == "flat_or_live":
        reward = FlatOrLive()
    prompts = feed(tok, spec.get("texts"), spec.get("answers"))
    facts, code = {}, 0
    try:
        train_grpo(cfg, model, tok, tags, prompts, out, d, ref_model=ref, reward_fn=reward)
        facts["feed"] = prompts.state_dict()
    except ValueError as e:
        facts["error"] = str(e)
        facts["files_after_error"] = sorted(f for f in os.listdir(out) if not f.startswith("rank"))
    except StopRequested as e:
        facts["stopped"] = str(e)
        code = 143
    finally:
        grpo.loop.Sampler = Sampler
    if "error" not in facts:
        full = model_state_dict(model)  # collectives: every rank takes part
        facts["sharded"] = all(hasattr(p, "placements") for p in model.parameters())  # DTensors: FSDP
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(PROBE), use_cache=False).logits
        if d.main:
            torch.save(full, os.path.join(out, "weights.pt"))
            torch.save(logits, os.path.join(out, "logits.pt"))
        facts["decode_steps"] = [r.stats["steps"] for r in RecordingSampler.log]
        facts["blocks"] = [r.stats["blocks"] for r in RecordingSampler.log]
        if "record" in spec:
            torch.save(RecordingSampler.log, spec["record"])
    if ref is not None:
        facts["ref_sharded"] = all(hasattr(p, "placements") for p in ref.parameters())
        facts["ref_grads"] = sum(p.grad is not None for p in ref.parameters())
        facts["ref_requires_grad"] = sum(p.requires_grad for p in ref.parameters())
    path = os.path.join(out, f"rank{d.rank}.json")
    if os.path.exists(path):  # a resumed run adds to the facts of the interrupted one
        with open(path) as f:
            facts = {**json.load(f), **facts}
    with open(path, "w") as f:
        json.dump(facts, f)
    return code


# --- the test side: launching this file -----------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(scenarios: list, workdir: str, nproc: int = 2):
    """Start this worker on `nproc` ranks (torchrun) or in one plain process (nproc=0) on `scenarios`;
    output goes to <workdir>/log.txt. Returns the Popen."""
    import subprocess

    os.makedirs(workdir, exist_ok=True)
    spec = os.path.join(workdir, f"spec-{time.monotonic_ns()}.json")
    with open(spec, "w") as f:
        json.dump({"scenarios": scenarios}, f)
    cmd = [sys.executable, os.path.abspath(__file__), spec]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    with open(os.path.join(workdir, "log.txt"), "a") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc, workdir: str, timeout: float = 120) -> int:
    """Wait for a started worker; a deadlock or hang fails after `timeout` s (the workers are stopped)."""
    import signal
    import subprocess

    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers, then SIGKILLs them
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"worker still running after {timeout} s (deadlock?):\n{log_tail(workdir)}")


def log_tail(workdir: str, chars: int = 4000) -> str:
    with open(os.path.join(workdir, "log.txt")) as f:
        return f.read()[-chars:]


def run(scenarios: list, workdir: str, nproc: int = 2, timeout: float = 120, expect: int = 0) -> None:
    """start + finish; fails with the log when the exit code is not `expect`."""
    code = finish(start(scenarios, workdir, nproc), workdir, timeout)
    assert code == expect, f"worker exited with {code}, expected {expect}:\n{log_tail(workdir)}"


def main(spec_file: str) -> int:
    with open(spec_file) as f:
        scenarios = json.load(f)["scenarios"]
    d = init_distributed("cpu")
    tok = build_word_tokenizer()
    tags = add_tag_tokens(tok)
    code = 0
    try:
        for spec in scenarios:
            if "batch" in spec:
                grads_scenario(spec, d, tok, tags)
            else:
                code = run_scenario(spec, d, tok, tags) or code
    finally:
        close_distributed()
    leave_process(code)  # as run.py: no interpreter finalization, where gloo's threads can abort


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
