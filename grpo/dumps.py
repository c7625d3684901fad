"""Rollout dumps (report.rollouts_every): every sample of a GRPO step, from every rank, as one gzipped JSON line
each in <run_dir>/rollouts/step-<N>.jsonl.gz (verl's rollout_data_dir), plus a few rows for the trackers'
completions table (TRL's log_completions). Rank 0 writes, under a temporary name renamed into place, so a step
redone after a resume replaces its file whole and never appends twice.
"""
from __future__ import annotations

import gzip
import json
import os

import torch

from rewards import parallel_stats

TABLE_ROWS = 8  # samples of a dumped step shown in the trackers' table
TABLE_COLUMNS = ("step", "prompt", "response", "gold", "reward", "advantage", "finish_reason")


def sample_records(step: int, rounds: list, slots: list, advantages: torch.Tensor, G: int, tokenizer,
                   rank: int = 0) -> list[dict]:
    """One record per sample this rank drew in step `step` (every round; grpo.rounds.Round), group-contiguous.
    `slots`: (round, group) of each trained group, in training order; `advantages`: (N,) of the trained rows,
    so a sample of a group left out of training (a refill round's extra) has advantage None."""
    trained = {}  # (round, row in it) -> advantage of each trained row
    for k, (r, i) in enumerate(slots):
        for j in range(G):
            trained[(r, i * G + j)] = float(advantages[k * G + j])
    out = []
    for r, rnd in enumerate(rounds):
        ro = rnd.rollout
        prompt_len = ro.prompt_mask.sum(1).tolist()  # (N,)
        resp_mask = ro.response_mask.cpu()
        resp_len = resp_mask.sum(1).tolist()
        sampled = resp_mask * (1 - ro.forced_mask.cpu())  # (N, M) tokens the policy drew (forced tags excluded)
        logp_mean = ((ro.logprobs.cpu() * sampled).sum(1) / sampled.sum(1).clamp(min=1)).tolist()
        for row, text in enumerate(rnd.texts):
            item = rnd.items[row // G]
            stats = parallel_stats(text)
            ids = ro.prompt_ids[row][ro.prompt_mask[row].bool()].tolist()
            out.append({
                "step": step, "rank": rank, "round": r, "group": row // G, "sample": row % G,
                "prompt": tokenizer.decode(ids), "response": text, "gold": item.answer,
                "reward": float(rnd.rewards[row]), "reward_parts": rnd.scores.components[row],
                "reward_funcs": {name: scores[row] for name, scores in rnd.scores.per_func.items()},
                "advantage": trained.get((r, row)), "finish_reason": ro.finish_reason[row],
                "num_blocks": stats.num_blocks, "paths_per_block": list(stats.paths_per_block),
                "well_formed": stats.well_formed, "first_block_position": stats.first_block_position,
                "prompt_length": int(prompt_len[row]), "response_length": int(resp_len[row]),
                "sampler_logp_mean": logp_mean[row]})
    return out


def dump_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "rollouts", f"step-{step}.jsonl.gz")


def write_dump(run_dir: str, step: int, records: list[dict]) -> str:
    """Write a step's records to rollouts/step-<step>.jsonl.gz atomically (tmp + rename)."""
    path = dump_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def read_dump(path: str) -> list[dict]:
    """The records of a rollout dump (write_dump), in the order written."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def table_rows(records: list[dict], n: int = TABLE_ROWS) -> list[list]:
    """The first sample of each of the first `n` groups (of rank 0's first round), TABLE_COLUMNS each."""
    firsts = [r for r in records if r["sample"] == 0 and r["round"] == 0 and r["rank"] == 0][:n]
    return [[r[c] for c in TABLE_COLUMNS] for r in firsts or records[:n]]
