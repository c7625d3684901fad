"""Checkpoints: `<run_dir>/checkpoints/step-N/`, written atomically, the latest complete one resumed.

A checkpoint holds `shards/` (model and optimizer, exact, one file per rank, reloadable on any number
of ranks: grpo/fsdp.py `save_sharded`), `model/` (the HF export, gathered on rank 0: a
directory plain transformers loads), `trainer.pt` (loop state incl. the data position, scheduler, world
size), `rng-rank<r>.pt`, `config.yaml` (the resolved config) and `manifest.json` (every file's size,
written last). One process and FSDP take the same path. Everything is written under `step-N.tmp` and
renamed, so a half-written checkpoint is never picked up; a complete-looking one with a missing or
truncated file is skipped with a warning. All ranks must see the same file system.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
import yaml

from model.load import save_model

from .fsdp import Dist, barrier, broadcast_object, load_sharded, model_state_dict, save_sharded

# keys of the resolved config that a resumed run must share with its checkpoint
COMPATIBLE_KEYS = ("variant", "model.build", "rollout.group_size", "grpo.prompts_per_step",
                   "grpo.mini_batch_prompts", "sft.batch_size")


def _dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir, cfg, model, opt, sched, state, d: Dist, tokenizer=None, keep: int | None = None) -> str:
    """Write checkpoint step-<state.step> atomically; keep the last `cfg.checkpoint.keep` complete ones.
    A collective: every rank calls it."""
    final = os.path.join(_dir(run_dir), f"step-{state.step}")
    tmp = final + ".tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    with_optim = save_sharded(model, opt, os.path.join(tmp, "shards"))  # the exact state to resume from
    full = model_state_dict(model)  # gathered on rank 0 for the HF export
    torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    barrier()  # every rank's files are on disk before rank 0 lists them in the manifest
    if d.main:
        save_model(os.path.join(tmp, "model"), model.config, full, tokenizer, variant=cfg.variant,
                   template=cfg.data.template, prompt_style=cfg.data.prompt_style)
        trainer = {"state": dict(vars(state)), "scheduler": sched.state_dict(), "world": d.world,
                   "optimizer_state": with_optim}
        torch.save(trainer, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a step redone after resuming from an older checkpoint
        os.replace(tmp, final)
        _prune(run_dir, keep if keep is not None else cfg.checkpoint.keep)
    barrier()
    return final


def write_manifest(path: str) -> None:
    """manifest.json: the size of every file under `path`; written last, it marks the directory complete."""
    sizes = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(sizes, f, indent=1)


def is_complete(path: str) -> str | None:
    """None if the checkpoint is whole, else why not."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest):
        return "no manifest.json"
    try:
        with open(manifest) as f:
            sizes = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, size in sizes.items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} is truncated ({os.path.getsize(full)} of {size} bytes)"
    return None


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


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint; incomplete ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = is_complete(path)
        if problem is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {path}: {problem}")
    return None


def _prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (all when keep <= 0); drop leftover `.tmp` directories
    of interrupted saves (called after a save, when no other save is in flight)."""
    done = [p for _, p in list_checkpoints(run_dir) if is_complete(p) is None]
    for path in done[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    root = _dir(run_dir)
    for name in os.listdir(root):
        if name.startswith("step-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def check_compatible(path: str, cfg) -> None:
    """ValueError naming every key of COMPATIBLE_KEYS on which the checkpoint's config and `cfg` differ."""
    with open(os.path.join(path, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    now = dataclasses.asdict(cfg)
    bad = []
    for key in COMPATIBLE_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            bad.append(f"{key}: checkpoint {a!r} vs run {b!r}")
    if bad:
        raise ValueError(f"checkpoint {path} was written by an incompatible config ({'; '.join(bad)}); "
                         "use another run_dir or checkpoint.resume: never")


def resume(run_dir, cfg, model, opt, sched, state, feed, d: Dist) -> str | None:
    """Load the checkpoint cfg.checkpoint.resume points at (auto = latest complete) into the live objects:
    model, optimizer, scheduler, loop state, feed position and this rank's RNG. A collective under FSDP.
    Returns its path, or None when there is nothing to resume."""
    mode = cfg.checkpoint.resume
    path = None
    if mode == "auto":
        path = broadcast_object(latest(run_dir) if d.main else None)  # every rank loads the same one
    elif mode != "never":
        path, problem = mode, is_complete(mode)
        if problem is not None:
            raise FileNotFoundError(f"checkpoint.resume={mode!r}: {problem}; give a complete step-N directory, "
                                    "auto or never")
    if path is None:
        return None
    check_compatible(path, cfg)
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    load_sharded(model, opt, os.path.join(path, "shards"), trainer["optimizer_state"])
    sched.load_state_dict(trainer["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # set even when no optimizer state was saved
        group["lr"] = lr
    state.__dict__.update(trainer["state"])
    if feed is not None and state.feed:
        feed.load_state_dict(state.feed)
    if trainer["world"] == d.world:
        _set_rng_state(torch.load(os.path.join(path, f"rng-rank{d.rank}.pt"), weights_only=False))
    elif d.main:
        warnings.warn(f"{path} was written by {trainer['world']} ranks and is resumed on {d.world}: training "
                      "continues, but samples differ from those of an uninterrupted run")
    return path


def load_weights(model, model_dir: str) -> None:
    """Copy an HF directory's weights into a live (unsharded) model, strictly."""
    from safetensors.torch import load_file

    from model.load import shard_files

    state = {}
    for f in shard_files(model_dir):
        state.update(load_file(f))
    if model.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    with torch.no_grad():
        model.load_state_dict({k: v.to(model.dtype) for k, v in state.items()}, strict=True)
