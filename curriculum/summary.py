"""The end of a run: the per-stage table (held-out accuracy, parallel figures, length, time) and the
plots that follow the whole pipeline step by step (reward and accuracy, parallel ratio, response
length, relative position of the first <Parallel>)."""
from __future__ import annotations

import os

from grpo.runlog import read_metrics

from .config import Config, pipeline_stages

COLUMNS = (("accuracy", "acc"), ("accuracy_easy", "easy"), ("accuracy_hard", "hard"),
           ("parallel_ratio", "parallel"), ("format_validity", "format"), ("path_agreement", "agree"),
           ("mean_length", "length"), ("seconds_train", "train s"), ("seconds_sample", "sample s"),
           ("seconds_eval", "eval s"), ("seconds", "time s"))


def summary_table(summaries: dict) -> str:
    """A markdown table, one row per stage."""
    head = "| stage | " + " | ".join(title for _, title in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, s in summaries.items():
        if not isinstance(s, dict):
            continue
        cells = []
        for key, _ in COLUMNS:
            v = s.get(key)
            cells.append("-" if v is None else f"{v:.0f}" if key.startswith("seconds") or key == "mean_length"
                         else f"{v:.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def stage_seconds(run_dir: str) -> dict:
    """Where a stage's training time went, summed over the steps in its metrics.jsonl (every step of the
    stage, also those run before a resume): seconds_sample (sampling inside training: GRPO rollouts, the SFT
    format checks; the "time/sample" entries) and seconds_train (every other "time/" entry: updates, scoring,
    old log-probs, validation loss)."""
    times = [(k, v) for row in read_metrics(run_dir) for k, v in row.items() if k.startswith("time/") and v is not None]
    sample = sum(v for k, v in times if k == "time/sample")
    return {"seconds_train": sum(v for _, v in times) - sample, "seconds_sample": sample}


def pipeline_curves(cfg: Config) -> dict:
    """metrics.jsonl of every stage laid end to end: key -> [(global step, value)], plus stage boundaries.
    "loss" is taken from SFT stages only: a GRPO stage's "loss" is its objective, on another scale."""
    curves, offset, bounds = {}, 0, []
    for stage in pipeline_stages(cfg):
        rows = read_metrics(stage.run_dir)
        for r in rows:
            for k, v in r.items():
                if isinstance(v, (int, float)) and k != "step" and (k != "loss" or stage.kind == "sft"):
                    curves.setdefault(k, []).append((offset + r["step"], v))
        if rows:
            offset += rows[-1]["step"] + 1
            bounds.append((offset, stage.name))
    curves["_bounds"] = bounds
    return curves


def plot_pipeline(cfg: Config) -> list[str]:
    """PNGs under the run directory: one per figure, steps of all stages on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = pipeline_curves(cfg)
    figures = {"reward_accuracy.png": ("reward and accuracy (training samples)", ["reward", "accuracy"]),
               "parallel_ratio.png": ("parallel ratio / format validity", ["parallel_ratio", "well_formed",
                                                                           "format_validity"]),
               "response_length.png": ("response length (tokens)", ["completions/mean_length"]),
               "first_parallel_position.png": ("relative position of the first <Parallel>", ["first_block_position"]),
               "sft_loss.png": ("SFT loss", ["loss", "eval_loss"])}
    paths = []
    for name, (title, keys) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for key in keys:
            if curves.get(key):
                ax.plot(*zip(*curves[key]), label=key, lw=1.2, marker="." if len(curves[key]) < 30 else None)
        bounds = curves["_bounds"]
        for (x, _), (_, stage) in zip(bounds[:-1], bounds[1:]):  # a dashed line where each later stage starts
            ax.axvline(x - 0.5, color="grey", lw=0.8, ls="--")
            ax.text(x, ax.get_ylim()[1], f" {stage}", fontsize=7, va="top", ha="left", color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (all stages)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(cfg.run_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def print_summary(cfg: Config, summaries: dict, note: str | None = None) -> None:
    """The table (and `note` under it, e.g. that a smoke run's figures mean nothing), the plots, and where
    everything is."""
    table = summary_table(summaries) + (f"\n\n{note}" if note else "")
    paths = plot_pipeline(cfg) if cfg.kind == "pipeline" else []
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "summary.md"), "w") as f:
        f.write(f"variant: {cfg.variant}, seed: {cfg.seed}\n\n{table}\n")
    print(f"\n{table}\n")
    for p in paths:
        print(f"plot: {p}")
    print(f"run directory: {os.path.abspath(cfg.run_dir)}")
