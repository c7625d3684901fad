"""A study's table (compare.md, compare.json) and curves (curves.png), from its runs' metrics.jsonl and
summary.json: per metric and arm, the mean over seeds with a Student t interval, and each arm's difference
from the first arm paired by seed."""
from __future__ import annotations

import json
import math
import os

from grpo.runlog import pyplot, read_metrics

from .stats import Interval, paired_difference, t_interval
from .study import Run, Study

FEW_SEEDS = 3  # below this the interval means little: say so


def read_run(run_dir: str) -> tuple[list[dict], dict | None]:
    """(metrics.jsonl records, summary.json or None) of a run; a missing file reads as empty, a torn last
    line (a run killed mid-write) is skipped (grpo.runlog.read_metrics)."""
    records = read_metrics(run_dir)
    summary = None
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    return records, summary


def series(records: list[dict], metric: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` over a run's records, the last record of a step winning (a resumed run
    logs again the steps after its checkpoint)."""
    by_step = {}
    for r in records:
        value = r.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[r["step"]] = float(value)
    return sorted(by_step.items())


def run_value(records: list[dict], summary: dict | None, metric: str, last_steps: int) -> float | None:
    """A run's figure for the table: summary/<key> from its summary.json (only once finished); an
    eval/... key's last logged value; any other key's mean over its last `last_steps` logged steps."""
    if metric.startswith("summary/"):
        value = (summary or {}).get(metric[len("summary/"):])
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if summary is None:
        return None  # an unfinished run's last steps are not its end
    points = [v for _, v in series(records, metric)]
    if not points:
        return None
    tail = points[-1:] if metric.startswith("eval/") else points[-last_steps:]
    return sum(tail) / len(tail)


def table(study: Study, runs: list[Run], data: dict) -> dict:
    """metric -> {arms: {arm: {seed: value}, intervals}, differences from the first arm}. `data`: run_dir ->
    read_run's (records, summary)."""
    arms = [a.name for a in study.arms]
    out = {}
    for metric in study.metrics:
        values = {arm: {} for arm in arms}
        for run in runs:
            value = run_value(*data[run.run_dir], metric, study.last_steps)
            if value is not None:
                values[run.arm][run.seed] = value
        entry = {"values": values, "arms": {}, "differences": {}}
        for arm in arms:
            if values[arm]:
                entry["arms"][arm] = _interval(t_interval(list(values[arm].values()), study.level))
            if arm != arms[0] and set(values[arm]) & set(values[arms[0]]):
                entry["differences"][arm] = _interval(paired_difference(values[arm], values[arms[0]], study.level))
        out[metric] = entry
    return out


def _interval(iv: Interval) -> dict:
    return {"mean": iv.mean, "half_width": None if math.isnan(iv.half_width) else iv.half_width, "n": iv.n}


def _cell(iv: dict | None, signed: bool = False) -> str:
    if iv is None:
        return "n/a"
    mean = f"{iv['mean']:+.3f}" if signed else f"{iv['mean']:.3f}"
    return f"{mean} ± {iv['half_width']:.3f}" if iv["half_width"] is not None else f"{mean} (1 seed)"


def markdown(study: Study, rows: dict, status: dict) -> str:
    arms = [a.name for a in study.arms]
    pct = f"{study.level * 100:g}%"
    lines = [f"# Study {study.name}", ""]
    if study.note:
        lines += [study.note.strip(), ""]
    lines += [f"Seeds {', '.join(map(str, study.seeds))}; each cell: mean over seeds ± the half width of its {pct} "
              f"Student t interval; `{arms[0]}` is the reference: the `- {arms[0]}` columns are the differences "
              f"paired by seed. Training metrics: the mean of the last {study.last_steps} logged steps; "
              "`eval/...`: the last evaluation; `summary/...`: the end-of-stage evaluation.", ""]
    if len(study.seeds) < FEW_SEEDS:
        lines += [f"**With {len(study.seeds)} seed(s) the interval means little**: a t interval over fewer than "
                  f"{FEW_SEEDS} seeds is very wide (or absent), and a difference of this size may be seed noise.", ""]
    head = ["metric"] + arms + [f"{a} - {arms[0]}" for a in arms[1:]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, e in rows.items():
        cells = [_cell(e["arms"].get(a)) for a in arms] + [_cell(e["differences"].get(a), True) for a in arms[1:]]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    missing = {m: [f"{a} seed {s}" for a in arms for s in study.seeds if s not in e["values"][a]]
               for m, e in rows.items()}
    gaps = sorted({x for xs in missing.values() for x in xs})
    if gaps:
        lines += ["", f"Missing (not finished or failed, left out of the figures): {', '.join(gaps)}."]
    failed = [f"{d} ({s})" for d, s in status.items() if s.startswith("failed")]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed) + "."]
    return "\n".join(lines) + "\n"


def smoothed(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Moving mean over the last `window` points (fewer at the start)."""
    out = []
    for i, (step, _) in enumerate(points):
        part = [v for _, v in points[max(0, i - window + 1):i + 1]]
        out.append((step, sum(part) / len(part)))
    return out


def plot_curves(study: Study, runs: list[Run], path: str, data: dict) -> bool:
    """curves.png: one panel per metrics.jsonl metric, each arm's mean over seeds (thick; at the steps every
    seed logged) and each seed (thin). False when no metric has a point. `data` as table's."""
    plt = pyplot()
    metrics = [m for m in study.metrics if not m.startswith("summary/")]
    curves = {m: {} for m in metrics}
    for run in runs:
        records = data[run.run_dir][0]
        for m in metrics:
            pts = smoothed(series(records, m), study.smooth)
            if pts:
                curves[m].setdefault(run.arm, {})[run.seed] = pts
    metrics = [m for m in metrics if curves[m]]
    if not metrics:
        return False
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, metrics):
        for i, arm in enumerate(a.name for a in study.arms):
            seeds = curves[m].get(arm, {})
            color = colors[i % len(colors)]
            for pts in seeds.values():
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=color, lw=0.6, alpha=0.35)
            common = sorted(set.intersection(*(set(dict(p)) for p in seeds.values()))) if seeds else []
            if common:
                mean = [sum(dict(p)[s] for p in seeds.values()) / len(seeds) for s in common]
                ax.plot(common, mean, color=color, lw=1.8, label=f"{arm} ({len(seeds)} seeds)")
        ax.set_title(m + (f" (moving mean of {study.smooth})" if study.smooth > 1 else ""), fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_report(study: Study, runs: list[Run], out_dir: str, status: dict) -> list[str]:
    """compare.md, compare.json and curves.png under `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    data = {run.run_dir: read_run(run.run_dir) for run in runs}  # each run's files, read once
    rows = table(study, runs, data)
    paths = [os.path.join(out_dir, "compare.md"), os.path.join(out_dir, "compare.json")]
    with open(paths[0], "w") as f:
        f.write(markdown(study, rows, status))
    with open(paths[1], "w") as f:
        json.dump({"study": study.name, "seeds": study.seeds, "level": study.level, "last_steps": study.last_steps,
                   "few_seeds": len(study.seeds) < FEW_SEEDS, "metrics": rows, "runs": status}, f, indent=1)
    curves = os.path.join(out_dir, "curves.png")
    if plot_curves(study, runs, curves, data):
        paths.append(curves)
    return paths
