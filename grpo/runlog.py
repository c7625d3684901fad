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


def _parsed_lines(path: str) -> list[tuple[str, dict]]:
    """(line, record) per line of a JSONL log. A last line cut short by a crash is dropped; a bad line
    anywhere else is damage we did not cause: ValueError naming file:line."""
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record; delete that line (or the file) and run "
                                 "again") from None
    return out


def read_metrics(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(run_dir, name)
    return [record for _, record in _parsed_lines(path)] if os.path.exists(path) else []


def truncate_metrics(run_dir: str, step: int, name: str = "metrics.jsonl") -> None:
    """Keep only the records of steps < `step` (a resumed run logs the later ones again; a torn last line
    goes too). Rewritten under a temporary name and renamed, so a crash here loses nothing."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return
    kept = [line for line, record in _parsed_lines(path) if record.get("step", -1) < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(line + "\n" for line in kept)
    os.replace(path + ".tmp", path)


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

