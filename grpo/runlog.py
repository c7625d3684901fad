"""metrics.jsonl (one JSON object per step) and the PNG plots drawn from it."""
from __future__ import annotations

import json
import math
import os


def append_metrics(run_dir: str, record: dict, name: str = "metrics.jsonl") -> None:
    os.makedirs(run_dir, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(os.path.join(run_dir, name), "a") as f:
        f.write(json.dumps(clean) + "\n")


def read_metrics(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, step: int, name: str = "metrics.jsonl") -> None:
    """Drop records of steps >= `step` (a resumed run rewrites them)."""
    rows = [r for r in read_metrics(run_dir, name) if r.get("step", -1) < step]
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def plot_metrics(run_dir: str, panels: dict, name: str = "metrics.jsonl", out: str = "training.png") -> str | None:
    """One figure with a panel per entry of `panels` (title -> metric keys), step on the x axis."""
    rows = read_metrics(run_dir, name)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(run_dir, out)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
