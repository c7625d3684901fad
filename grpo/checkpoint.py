"""Checkpoints: `<run_dir>/checkpoints/step-N/`, written atomically, the latest complete one resumed.

A checkpoint holds `model/` (an HF directory plain transformers loads: config.json + safetensors +
tokenizer), `trainer.pt` (optimizer, scheduler, loop state incl. the data position), `rng-rank<r>.pt`,
`config.yaml` (the resolved config) and `manifest.json` (every file's size, written last). Under FSDP the
model and optimizer are also saved sharded with torch.distributed.checkpoint in `shards/` and the HF
export is gathered on rank 0. Everything is written under `step-N.tmp` and renamed, so a half-written
checkpoint is never picked up; a complete-looking one with a missing or truncated file is skipped with a
warning.
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

from .fsdp import Dist, barrier, broadcast_object, model_state_dict

# keys of the resolved config that a resumed run must share with its checkpoint
COMPATIBLE_KEYS = ("variant", "model.build", "rollout.group_size", "grpo.prompts_per_step",
                   "grpo.mini_batch_prompts", "sft.batch_size")


def _dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


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
    """Write checkpoint step-<state.step> atomically; keep the last `cfg.checkpoint.keep`."""
    final = os.path.join(_dir(run_dir), f"step-{state.step}")
    tmp = final + ".tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if _fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "shards"))
    full = model_state_dict(model)  # a collective under FSDP: every rank takes part
    torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    barrier()
    if d.main:
        save_model(os.path.join(tmp, "model"), model.config, full, tokenizer)
        trainer = {"state": state.__dict__, "scheduler": sched.state_dict(), "world": d.world}
        if not _fsdp(model):
            trainer["optimizer"] = opt.state_dict()
        torch.save(trainer, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        _write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(run_dir, keep if keep is not None else cfg.checkpoint.keep)
    barrier()
    return final


def _write_manifest(path: str) -> None:
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
    """(step, path) of every step-N directory (complete or not), by step."""
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
        warnings.warn(f"skipping checkpoint {path}: {problem}")
    return None


def _prune(run_dir: str, keep: int) -> None:
    done = [p for _, p in list_checkpoints(run_dir) if is_complete(p) is None]
    for path in done[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def check_compatible(path: str, cfg) -> None:
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
    """Load the checkpoint cfg.checkpoint.resume points at (auto = latest complete) into the live objects."""
    mode = cfg.checkpoint.resume
    path = None
    if mode == "auto":
        path = broadcast_object(latest(run_dir) if d.main else None)
    elif mode != "never":
        path = mode
        if is_complete(path) is not None:
            raise FileNotFoundError(f"checkpoint.resume={path!r}: {is_complete(path)}")
    if path is None:
        return None
    check_compatible(path, cfg)
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    if _fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=os.path.join(path, "shards"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        load_weights(model, os.path.join(path, "model"))
        opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    state.__dict__.update(trainer["state"])
    if feed is not None and state.feed:
        feed.load_state_dict(state.feed)
    rng = os.path.join(path, f"rng-rank{d.rank}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
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
