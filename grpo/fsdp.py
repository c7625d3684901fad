"""Data parallelism, applied from outside the model: the only file that imports FSDP.

`parallelize` is torchtitan's recipe for our one model. Order matters: activation checkpointing
first (it wraps each decoder layer's forward), then `fully_shard` on each decoder layer, then on the
root, so each layer is one all-gather unit and the root holds embeddings, final norm and head.
GPU: bf16 parameters for compute, fp32 gradient reductions, fp32 sharded master weights; CPU: fp32.
One code path for gloo (CPU) and NCCL (GPU): the backend follows the device. One process: the model
is returned untouched (apart from activation checkpointing).

Sampling under FSDP (`gathered_for_sampling`): the full parameters are gathered ONCE per rollout on
each rank and kept until sampling ends, so every decode step runs locally with no collective. Ranks
may then stop after different numbers of steps (their responses differ) without deadlocking, and
decoding does not pay a per-layer all-gather per token. Cost: one full copy of the model per rank
for the duration of sampling (8 GB for Qwen3-4B in bf16).

Gradients are reduce-scattered in fp32 and averaged over ranks (FSDP's default); the trainer's loss is
already a mean over the whole step on all ranks, so it scales its loss by the world size.
Checkpoints (`save_sharded` / `load_sharded`, used by grpo/checkpoint.py) go through
torch.distributed.checkpoint in one process and under FSDP alike, so a run resumes on any world size.
Every function here that talks to other ranks is a collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


_RESHARD_LAYER, _RESHARD_ROOT = True, False  # parallelize's choice, restored after sampling


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when torchrun set RANK (nccl on CUDA, gloo on CPU); else one process."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:
        dev = torch.device("cuda" if cuda else "cpu") if device == "auto" else torch.device(device)
        return Dist(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_process(code: int) -> None:
    """End a process that torchrun started, after `close_distributed`, without interpreter finalization.

    Even after `destroy_process_group`, gloo's worker threads can still be releasing tensors while Python
    finalizes, and the thread that finds the interpreter gone calls std::terminate ("terminate called without
    an active exception", SIGABRT; pytorch/pytorch#190489). A run whose every rank finished and wrote its
    files then ended with exit code -6 now and then (seen in CI). Here the exit handlers run (reward workers,
    trackers), logging and both streams are flushed, and the process ends without finalizing."""
    import atexit
    import logging
    import sys

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parallelize(model, d: Dist, *, compute_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                trainable: bool = True, shard: bool | None = None):
    """Activation checkpointing, then FSDP2 per decoder layer, then the root. A frozen reference model
    (trainable=False) is sharded the same way and never gets gradients or optimizer state. `shard`: None
    shards when there are several ranks; True shards a one-rank group too (fp32 master weights, `compute_dtype`
    compute: benchmarks/gpu_check.py runs that on one GPU)."""
    if activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
    if not (d.world > 1 if shard is None else shard):
        return model
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=_RESHARD_LAYER)
    # the policy's root (embeddings, final norm, head) stays gathered from forward to backward: it is
    # needed first in backward anyway. A frozen model has no backward to reshard it: reshard at once.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=_RESHARD_ROOT if trainable else True)
    return model


def _fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_for_sampling(model):
    """Keep the full parameters gathered on every rank while sampling (see the module docstring): one
    all-gather per FSDP unit on entry; inside, forwards find their unit already unsharded and run no
    collective. On exit every unit is resharded and gets back parallelize's reshard_after_forward."""
    mods = _fsdp_modules(model)
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(_RESHARD_ROOT if m is model else _RESHARD_LAYER, recurse=False)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) over ranks, in place; a no-op in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] when d.world == 1, so rank 0 alone may
    call it with Dist() under a process group."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_gather_lists(items: list, d: Dist) -> list:
    """Every rank's list joined, rank 0's items first (a collective; `items` itself when d.world == 1)."""
    return [x for part in all_gather_objects(items, d) for x in part]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards and ranks), and the gradients clipped to max_norm when
    max_norm > 0. Under FSDP the gradients are DTensor shards: their norm is a partial sum per rank,
    made whole with full_tensor() (a collective: every rank calls this), then used to scale the shards."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def model_state_dict(model) -> dict:
    """The full (unsharded) state dict on rank 0, on CPU, for the HF export; {} on other ranks. Under
    FSDP this gathers every parameter: a collective that every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _fsdp_modules(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def _single_process_dcp():
    """Yields DCP's no_dist flag; in one process also silences DCP's warning that it assumes one process."""
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield no_dist


def save_sharded(model, opt, path: str) -> bool:
    """Model and optimizer as each rank holds them (DTensor shards under FSDP, whole tensors in one
    process) into `path` with torch.distributed.checkpoint: exact bytes, one file per rank, optimizer
    state keyed by parameter name, so `load_sharded` works under any sharding. A collective.
    Returns whether optimizer state was saved: before its first step AdamW has none, and asking DCP for
    it would create it (a zero-lr step that would change the bias correction of the first real update)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model)}
    with_optim = bool(opt.state)  # the same on every rank: all ranks take (or skip) the same updates
    if with_optim:
        sd["optim"] = get_optimizer_state_dict(model, opt)
    with _single_process_dcp() as no_dist:
        dcp.save(sd, checkpoint_id=path, no_dist=no_dist)
    return with_optim


def load_sharded(model, opt, path: str, with_optim: bool = True) -> None:
    """Load what `save_sharded` wrote, in place, resharding to this run's world size. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    sd = {"model": get_model_state_dict(model)}  # the live tensors (or shards) to load into
    if with_optim:  # on a fresh optimizer this first creates AdamW's state (a zero-lr step, weights
        sd["optim"] = get_optimizer_state_dict(model, opt)  # unchanged); the load overwrites it, step included
    with _single_process_dcp() as no_dist:
        dcp.load(sd, checkpoint_id=path, no_dist=no_dist)
    set_model_state_dict(model, sd["model"])
    if with_optim:
        set_optimizer_state_dict(model, opt, sd["optim"])
