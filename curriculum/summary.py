"""The end of a run: the per-stage table (held-out accuracy, parallel figures, length, time) and the
plots that follow the whole pipeline step by step (reward and accuracy, parallel ratio, response
length, relative position of the first <Parallel>)."""
from __future__ import annotations

import os

from grpo.runlog import draw_panel, expand_keys, pyplot, read_metrics, save_figure

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
    format checks; the "time/sample" entries), seconds_eval (the held-out evaluations of eval.every; "time/eval")
    and seconds_train (every other "time/" entry: updates, scoring, old log-probs, validation loss)."""
    times = [(k, v) for row in read_metrics(run_dir) for k, v in row.items() if k.startswith("time/") and v is not None]
    sample = sum(v for k, v in times if k == "time/sample")
    evals = sum(v for k, v in times if k == "time/eval")
    return {"seconds_train": sum(v for _, v in times) - sample - evals, "seconds_sample": sample,
            "seconds_eval": evals}


# file -> (title, metric keys, y range or None)
FIGURES = {"reward_accuracy.png": ("reward and accuracy (training samples)", ["reward", "accuracy"], None),
           "parallel_ratio.png": ("parallel ratio / format validity", ["parallel_ratio", "well_formed",
                                                                       "format_validity"], None),
           "response_length.png": ("response length (tokens)", ["completions/mean_length"], None),
           "first_parallel_position.png": ("relative position of the first <Parallel>", ["first_block_position"],
                                           (-0.02, 1.02)),  # 0 = the response opens with it, 1 = at its end
           "heldout_accuracy.png": ("held-out mean@k during training (eval.every)", ["eval/*/mean_at_k"],
                                    (-0.02, 1.02)),
           "heldout_parallel.png": ("held-out parallel ratio during training (eval.every)",
                                    ["eval/*/parallel_ratio"], (-0.02, 1.02)),
           "sft_loss.png": ("SFT loss", ["loss", "eval_loss"], None)}


def pipeline_curves(cfg: Config) -> tuple[dict, list]:
    """metrics.jsonl of every stage laid end to end: (key -> {stage name: [(global step, value)]}, [(first
    global step, last global step, stage name)] of the stages that logged a step). "loss" is taken from SFT
    stages only: a GRPO stage's "loss" is its objective, on another scale."""
    curves, spans, offset = {}, [], 0
    for stage in pipeline_stages(cfg):
        rows = read_metrics(stage.run_dir)
        for r in rows:
            for k, v in r.items():
                if isinstance(v, (int, float)) and k != "step" and (k != "loss" or stage.kind == "sft"):
                    curves.setdefault(k, {}).setdefault(stage.name, []).append((offset + r["step"], v))
        if rows:
            spans.append((offset, offset + rows[-1]["step"], stage.name))
            offset += rows[-1]["step"] + 1
    return curves, spans


def plot_pipeline(cfg: Config) -> list[str]:
    """A PNG under the run directory per figure of FIGURES that has a value to draw, the steps of the stages
    that logged one on one axis, each stage named above its span. A figure with nothing to draw is not
    written (one left by an earlier run is removed)."""
    curves, spans = pipeline_curves(cfg)
    paths = []
    for name, (title, keys, ylim) in FIGURES.items():
        path = os.path.join(cfg.run_dir, name)
        drawn = {k: curves[k] for k in expand_keys(keys, [curves]) if k in curves}
        if not drawn:
            if os.path.exists(path):
                os.remove(path)
            continue
        fig, ax = pyplot().subplots(figsize=(6.4, 3.6))
        draw_panel(ax, {k: list(by_stage.values()) for k, by_stage in drawn.items()}, title)
        shown = [span for span in spans if any(span[2] in by_stage for by_stage in drawn.values())]
        width, last_x, level = max(shown[-1][1] - shown[0][0], 1), None, 0
        for first, last, stage in shown:
            if first > shown[0][0]:  # a dashed line where each later stage starts
                ax.axvline(first - 0.5, color="grey", lw=0.8, ls="--")
            x = (first + last) / 2  # a name too close to the one before it (a short stage) goes one line up
            level = 1 - level if last_x is not None and x - last_x < 0.1 * width else 0
            ax.text(x, 1.01 + 0.06 * level, stage, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7, color="grey")
            last_x = x
        ax.set_xlim(shown[0][0] - 0.5, shown[-1][1] + 0.5)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(title, fontsize=10, pad=22 if len(shown) > 1 else 14)
        ax.set_xlabel("step (all stages)")
        fig.tight_layout()
        paths.append(save_figure(fig, path))
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
