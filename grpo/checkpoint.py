"""Checkpoints: `<run_dir>/checkpoints/step-N/`, written atomically, verified, the latest intact one resumed.

A checkpoint holds `shards/` (model and optimizer, exact, one file per rank, reloadable on any number
of ranks: grpo/fsdp.py `save_sharded`), `model/` (the HF export, gathered on rank 0: a directory plain
transformers loads), `trainer.json` (loop state incl. the data position, scheduler, world size),
`rng-rank<r>.pt` (RNG states as tensors), `config.yaml` (the resolved config) and `manifest.json` (every
file's size and sha256, written last). Everything is written under `step-N.tmp` and renamed, so a
half-written checkpoint is never picked up; one whose files do not match the manifest is skipped, naming
the file, and the run falls back to the one before. Weights are checked finite before every save, and a
failed write (a full disk) leaves the previous checkpoints intact and no `.tmp` behind.

Trust: nothing here unpickles code (`trainer.json` is JSON, the RNG files load with weights_only=True),
but DCP's own `shards/.metadata` is a pickle, so a checkpoint is trusted input, like a model directory.
One process and FSDP take the same path; all ranks must see the same file system.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from model.load import save_model

from .fsdp import Dist, all_gather_objects, all_reduce, load_sharded, model_state_dict, save_sharded
from .runlog import truncate_metrics


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none can be resumed; the message names the path and why."""


def _dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


# --- writing --------------------------------------------------------------------------------------------

def save(run_dir, model, opt, sched, state, d: Dist, tokenizer=None, *, config: dict, keep: int,
         protect: int | None = None) -> str:
    """Write checkpoint step-<state.step> atomically (`config`: the resolved config, saved beside it), then
    keep the newest `keep` complete ones (all when 0) and step-<protect> (the best one, checkpoint.keep_best)
    and drop those of steps after this one (an abandoned attempt). A collective: every rank calls it.
    FloatingPointError when the weights are not finite (nothing is written); CheckpointError when a rank cannot
    write (the `.tmp` is removed, older checkpoints stay)."""
    final = os.path.join(_dir(run_dir), f"step-{state.step}")
    tmp = final + ".tmp"
    if not _finite(model, d):
        raise FloatingPointError(f"step {state.step}: the weights hold NaN or inf; checkpoint {final} is not "
                                 f"written and the earlier ones in {_dir(run_dir)} are kept")
    with _removed_on_failure(tmp, final, run_dir, d):
        _on_every_rank(lambda: _fresh_dir(tmp) if d.main else None, d)
        with_optim = save_sharded(model, opt, os.path.join(tmp, "shards"))  # the exact state to resume from
        full = model_state_dict(model)  # gathered on rank 0 for the HF export
        _on_every_rank(lambda: _write_bytes(os.path.join(tmp, f"rng-rank{d.rank}.pt"), _rng_state()), d)
        trainer = {"state": dict(vars(state)), "scheduler": sched.state_dict(), "world": d.world,
                   "optimizer_state": with_optim}
        _on_every_rank(lambda: _write_rank0_files(tmp, model, full, tokenizer, trainer, config) if d.main else None, d)
        write_manifest(tmp, d)
        _on_every_rank(lambda: _publish(tmp, final, run_dir, state.step, keep, protect) if d.main else None, d)
    return final


def export_fields(config: dict) -> dict:
    """save_model's metadata keywords from a config (as a dict): what a loader needs to prompt the export as
    it was trained and to run its variant. One source for checkpoints and final exports, and for reading a
    saved config.yaml back (curriculum.models); a key the config lacks is None."""
    data = config.get("data") or {}
    return dict(variant=config.get("variant"), template=data.get("template"), prompt_style=data.get("prompt_style"),
                instruction=data.get("instruction"))


def export_model(path: str, model, tokenizer, d: Dist, run_dir: str, *, config: dict) -> str:
    """`path` (a stage's final/): the model as an HF directory with its tokenizer and a manifest, written
    under `path.tmp` and renamed, with the metadata `export_fields(config)` names. A collective;
    CheckpointError as `save`."""
    tmp = path + ".tmp"
    full = model_state_dict(model)  # a collective under FSDP

    def write():
        _fresh_dir(tmp)
        save_model(tmp, model.config, full, tokenizer, **export_fields(config))
    with _removed_on_failure(tmp, path, run_dir, d):
        _on_every_rank(write if d.main else lambda: None, d)
        write_manifest(tmp, d)
        _on_every_rank(lambda: _publish(tmp, path) if d.main else None, d)
    return path


@contextmanager
def _removed_on_failure(tmp: str, final: str, run_dir: str, d: Dist):
    """A failed write of `final` (any rank) removes `tmp` and becomes one CheckpointError line (a full disk
    says so); an error that is not about writing propagates as it is."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _root_cause(e)
        if isinstance(cause, OSError) or disk_full(cause):
            raise CheckpointError(write_failure(final, cause, run_dir)) from None
        raise


def _fresh_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def _write_rank0_files(tmp, model, full, tokenizer, trainer: dict, config: dict) -> None:
    save_model(os.path.join(tmp, "model"), model.config, full, tokenizer, **export_fields(config))
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(trainer, f)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def _publish(tmp: str, final: str, run_dir: str | None = None, step: int = 0, keep: int = 0,
             protect: int | None = None) -> None:
    """Rename the written `tmp` to `final`; for a checkpoint (run_dir given), prune the others."""
    shutil.rmtree(final, ignore_errors=True)  # a step redone after resuming from an older checkpoint
    os.replace(tmp, final)
    if run_dir is not None:
        _prune(run_dir, step, keep, protect)


def export_best(checkpoint: str, path: str, run_dir: str, d: Dist) -> str:
    """`path` (a stage's best/): a copy of the HF export of `checkpoint` (its model/), with a manifest, written
    under `path.tmp` and renamed, so a crash leaves the previous best/ whole. A collective; CheckpointError as
    `save`."""
    tmp = path + ".tmp"
    with _removed_on_failure(tmp, path, run_dir, d):
        def copy():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(os.path.join(checkpoint, "model"), tmp)
        _on_every_rank(copy if d.main else lambda: None, d)
        write_manifest(tmp, d)
        _on_every_rank(lambda: _publish(tmp, path) if d.main else None, d)
    return path


def _write_bytes(path: str, obj) -> None:
    """torch.save through memory, so a failed write raises OSError (torch.save's own raises RuntimeError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


class _PeerFailed(OSError):
    """Another rank's part of a write failed; the message is its error."""


def _on_every_rank(fn, d: Dist) -> None:
    """Run this rank's part of a write, then learn whether any rank failed (a collective), so no rank waits
    forever for one that gave up: the failed rank re-raises its error, the others raise _PeerFailed."""
    error = None
    try:
        fn()
    except Exception as e:
        error = e
    errors = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", d)
    if error is not None:
        raise error
    failed = [e for e in errors if e is not None]
    if failed:
        raise _PeerFailed(failed[0])


def _root_cause(e: BaseException) -> BaseException:
    """The exception inside DCP's CheckpointException (rank -> (exception, traceback)), else `e`."""
    for exc, _ in getattr(e, "failures", {}).values():
        return exc
    return e


def disk_full(error: BaseException) -> bool:
    """ENOSPC, also when a library reports it as text (safetensors, another rank's error)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def write_failure(path: str, error: BaseException, run_dir: str) -> str:
    """One line for a failed write of `path`; a full disk says so, with the free space."""
    root = _dir(run_dir) if os.path.isdir(_dir(run_dir)) else run_dir
    kept = latest_name(run_dir)
    tail = (f"the latest checkpoint ({kept}) is intact" if kept else "no earlier checkpoint exists") + \
        " and the partial write was removed"
    if disk_full(error):
        free = shutil.disk_usage(root).free
        left = f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
        return (f"No space left on device while writing {path} ({left} free in {root}); {tail}. "
                "Free some space (or lower checkpoint.keep) and run again to resume")
    return f"could not write {path}: {error}; {tail}"


def latest_name(run_dir: str) -> str | None:
    """The newest step-N directory whose manifest matches its files by size (no hashing), or None."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if defect(path, checksums=False) is None:
            return path
    return None


def _finite(model, d: Dist) -> bool:
    """Every parameter finite, on every rank (under FSDP each rank checks its own shards)."""
    local = [getattr(p, "to_local", lambda: p)().detach() for p in model.parameters()]  # DTensor -> its shard
    bad = sum(int(not torch.isfinite(t).all()) for t in local)
    return all_reduce(torch.tensor(float(bad), device=d.device)).item() == 0


# --- the manifest: sizes and checksums ------------------------------------------------------------------

def _files(path: str) -> list[str]:
    out = []
    for root, _, files in os.walk(path):
        out += [os.path.relpath(os.path.join(root, f), path) for f in files]
    return sorted(f for f in out if f != "manifest.json")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(root: str, files: list[str], d: Dist) -> dict:
    """rel -> sha256 of `files`: each rank hashes every world-th file (threads; hashlib releases the GIL),
    then all ranks share the results (a collective)."""
    mine = files[d.rank::d.world]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(mine)))) as pool:
        digests = dict(zip(mine, pool.map(lambda rel: _sha256(os.path.join(root, rel)), mine)))
    out = {}
    for part in all_gather_objects(digests, d):
        out.update(part)
    return out


def write_manifest(path: str, d: Dist = Dist()) -> None:
    """manifest.json: the size and sha256 of every file under `path`; written last (by rank 0), it marks the
    directory complete. A collective when d.world > 1 (the ranks share the hashing)."""
    files = _files(path)
    digests = _digests(path, files, d)

    def write():
        entries = {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": digests[rel]} for rel in files}
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump({"files": entries}, f, indent=1)
    _on_every_rank(write if d.main else lambda: None, d)


def defect(path: str, checksums: bool = True, d: Dist = Dist()) -> str | None:
    """What is wrong with the checkpoint (or exported model) directory `path`, or None when it is intact:
    every file of its manifest present with its size and, with `checksums`, its sha256 (hashing is shared
    by the ranks: then a collective). A manifest of sizes only (written before checksums) is checked by size."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest):
        return "no manifest.json (the save did not finish)"
    try:
        with open(manifest) as f:
            data = json.load(f)
        entries = data["files"] if "files" in data else {rel: {"size": size} for rel, size in data.items()}
        sizes = {rel: int(e["size"]) for rel, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, size in sizes.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {size} (truncated or overwritten)"
    if checksums:
        listed = sorted(rel for rel, e in entries.items() if "sha256" in e)
        digests = _digests(path, listed, d)
        for rel in listed:
            if digests[rel] != entries[rel]["sha256"]:
                return f"{rel} does not match its sha256 in manifest.json (corrupted)"
    return None


# --- finding and loading --------------------------------------------------------------------------------

def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every step-N directory (complete or not), by step; `step-N.tmp` never counts."""
    root = _dir(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit():
            out.append((int(name[5:]), os.path.join(root, name)))
    return sorted(out)


def scan(run_dir: str, d: Dist = Dist()) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest intact checkpoint or None, [(path, why) of each newer one rejected]). A collective."""
    rejected = []
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = defect(path, d=d)
        if problem is None:
            return path, rejected
        rejected.append((path, problem))
    return None, rejected


def latest(run_dir: str) -> str | None:
    """The newest intact checkpoint (one process); rejected ones are skipped with a warning."""
    path, rejected = scan(run_dir)
    for bad, problem in rejected:
        warnings.warn(f"skipping checkpoint {bad}: {problem}")
    return path


def _prune(run_dir: str, step: int, keep: int, protect: int | None = None) -> None:
    """After saving `step`: drop checkpoints of later steps (an abandoned attempt, or rejected ones we fell
    back from), keep the newest `keep` complete ones (all when keep <= 0) and step-<protect> (the best), and
    drop leftover `.tmp` directories of interrupted saves (no other save is in flight)."""
    done = []
    for s, path in list_checkpoints(run_dir):
        if s > step:
            shutil.rmtree(path, ignore_errors=True)
        elif defect(path, checksums=False) is None:
            done.append(path)
    best = os.path.join(_dir(run_dir), f"step-{protect}")
    for path in done[:-keep] if keep > 0 else []:
        if path != best:
            shutil.rmtree(path, ignore_errors=True)
    root = _dir(run_dir)
    for name in os.listdir(root):
        if name.startswith("step-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def resume(run_dir, mode: str, model, opt, sched, state, feed, d: Dist, expect: dict | None = None) -> str | None:
    """Load a checkpoint into the live objects (model, optimizer, scheduler, loop state, feed position, this
    rank's RNG) and cut metrics.jsonl back to its step, so no step is logged twice. A collective.
    mode: "auto" = the newest intact checkpoint of run_dir (rejected newer ones are warned about; when every
    checkpoint is rejected, CheckpointError listing each and why), "never" = none (step 0; any checkpoint of a
    later step is removed at the first save), or a checkpoint directory.
    expect: dotted config key -> value the checkpoint's config.yaml must hold (CheckpointError naming those
    that differ). Returns the checkpoint's path, or None when the run starts at step 0."""
    path = None
    if mode == "auto":
        path, rejected = scan(run_dir, d)
        for bad, problem in rejected if d.main else []:
            warnings.warn(f"skipping checkpoint {bad}: {problem}")
        if path is None and rejected:
            listed = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in rejected)
            raise CheckpointError(f"no checkpoint in {_dir(run_dir)} can be resumed ({listed}). Point "
                                  "checkpoint.resume at a good step-N directory, or start over with "
                                  "checkpoint.resume: never")
    elif mode != "never":
        problem = defect(mode, d=d)
        if problem is not None:
            raise CheckpointError(f"checkpoint.resume={mode!r}: {problem}; give an intact step-N directory, "
                                  "auto or never")
        path = mode
    if path is not None:
        _check_expected(path, expect or {})
        _load(path, model, opt, sched, state, feed, d)
    if d.main:
        truncate_metrics(run_dir, state.step)
    return path


def _check_expected(path: str, expect: dict) -> None:
    with open(os.path.join(path, "config.yaml")) as f:
        saved = yaml.safe_load(f) or {}
    bad = []
    for key, value in expect.items():
        node = saved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            bad.append(f"{key}: checkpoint {node!r} vs run {value!r}")
    if bad:
        raise CheckpointError(f"checkpoint {path} was written by an incompatible config ({'; '.join(bad)}); "
                              "use another run_dir or checkpoint.resume: never")


def _load(path, model, opt, sched, state, feed, d: Dist) -> None:
    if not os.path.exists(os.path.join(path, "trainer.json")):
        raise CheckpointError(f"{path} was written by an earlier version (trainer.pt, pickled RNG states), which "
                              "this one does not load, as nothing in a checkpoint may run code; finish that run with "
                              "the earlier version, or start over (checkpoint.resume: never)")
    with open(os.path.join(path, "trainer.json")) as f:
        trainer = json.load(f)
    load_sharded(model, opt, os.path.join(path, "shards"), trainer["optimizer_state"])
    sched.load_state_dict(trainer["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # set even when no optimizer state was saved
        group["lr"] = lr
    state.__dict__.update(trainer["state"])
    if feed is not None and state.feed:
        feed.load_state_dict(state.feed)
    if trainer["world"] == d.world:
        _set_rng_state(_load_tensors(os.path.join(path, f"rng-rank{d.rank}.pt")))
    elif d.main:
        warnings.warn(f"{path} was written by {trainer['world']} ranks and is resumed on {d.world}: training "
                      "continues, but samples differ from those of an uninterrupted run")


def _load_tensors(path: str):
    """torch.load that runs no code: tensors and plain containers only."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds an object other than tensors and plain values{what}; refused, as "
                              "nothing in a checkpoint may run code") from None


@contextmanager
def rng_preserved():
    """Every RNG (Python, numpy, torch, CUDA) as it was before the block, whatever the block drew."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def _rng_state() -> dict:
    """Every RNG as tensors and plain values (numpy's key array as a tensor), so it loads with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
