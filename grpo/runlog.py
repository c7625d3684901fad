"""The run directory's own files: metrics.jsonl (one JSON object per step) and the PNG plots drawn from it
(curriculum/summary.py draws the pipeline's with the same panel code), and the lock that makes one process
the owner of a run directory."""
from __future__ import annotations

import fcntl
import fnmatch
import json
import math
import os
import socket


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


# The y-axis label of each metric the figures draw; a panel's label joins those of its metrics.
UNITS = {"reward": "reward", "accuracy": "share correct", "parallel_ratio": "share of responses",
         "well_formed": "share of responses", "format_validity": "share of responses",
         "completions/mean_length": "tokens", "first_block_position": "position in the response (0-1)",
         "loss": "loss (nats per token)", "eval_loss": "loss (nats per token)"}
COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # tab10 without grey (stage boundaries are grey)
FEW_POINTS = 30  # a series with fewer points gets markers: one point alone (an eval_loss) draws no line


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed, none opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_panel(ax, series: dict, title: str, first_colour: int = 0) -> int:
    """Draw `series` (metric -> segments, each a list of (step, value); a pipeline breaks a metric where a
    stage ends) on `ax`: a colour per metric from COLOURS[first_colour:], markers on sparse series,
    whole-number step ticks, the y label from UNITS, a legend. Returns the number of colours used."""
    from matplotlib.ticker import MaxNLocator

    for i, (key, segments) in enumerate(series.items()):
        colour = COLOURS[(first_colour + i) % len(COLOURS)]
        for j, points in enumerate(segments):  # markers where a segment (a stage's part) has few points
            ax.plot(*zip(*points), color=colour, marker="o" if len(points) < FEW_POINTS else None, ms=3.5, lw=1.2,
                    label=None if j else key)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(" / ".join(dict.fromkeys(UNITS.get(k, k) for k in series)), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps; one alone still gets its tick
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return len(series)


def metrics_figure(rows: list[dict], panels: dict):
    """A figure with a panel per entry of `panels` (title -> metric keys; a key with `*` stands for every logged
    key it matches, as fnmatch: "eval/*/mean_at_k") that has a value to draw, step on the x axis; None when no
    panel has one. A metric never logged (no block sampled yet) is left out of its panel."""
    panels = {title: expand_keys(keys, rows) for title, keys in panels.items()}
    series = {title: {k: [pts] for k in keys if (pts := [(r["step"], r[k]) for r in rows if r.get(k) is not None])}
              for title, keys in panels.items()}
    series = {title: s for title, s in series.items() if s}
    if not series:
        return None
    fig, axes = pyplot().subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    colour = 0
    for ax, (title, s) in zip(axes[0], series.items()):
        colour += draw_panel(ax, s, title, colour)
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)  # every panel spans the stage: an eval point sits in time
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def expand_keys(keys: list[str], rows: list[dict]) -> list[str]:
    """`keys` with each pattern holding `*` replaced by the logged keys it matches (sorted)."""
    logged = sorted({k for r in rows for k in r})
    return [m for k in keys for m in (fnmatch.filter(logged, k) if "*" in k else [k])]


def save_figure(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_metrics(run_dir: str, panels: dict, name: str = "metrics.jsonl", out: str = "training.png") -> str | None:
    """<run_dir>/training.png from metrics.jsonl: metrics_figure's panels. Returns its path, None when nothing
    was logged to draw."""
    fig = metrics_figure(read_metrics(run_dir, name), panels)
    return save_figure(fig, os.path.join(run_dir, out)) if fig is not None else None


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock; the message names its pid and host."""


class RunLock:
    """An exclusive OS lock (fcntl.flock) on `<run_dir>/.lock`, a file holding the owner's "pid host". The
    kernel drops the lock when its process dies, so a crash never leaves the directory locked: a lock file
    still naming a dead process is taken over (`took_over` names it). A second live owner gets RunDirBusy.
    Use `with RunLock(run_dir):` (or acquire / release). The lock is not inherited by exec'd children."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd: int | None = None
        self.took_over: str | None = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _owner(fd) or "another process"
            os.close(fd)
            raise RunDirBusy(f"{os.path.dirname(self.path)} is in use by {holder} (lock file {self.path}); wait "
                             "for that run to end, or give this one another run_dir") from None
        self.took_over = _owner(fd)  # left behind by a process that died without releasing it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: nobody to take over from
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _owner(fd: int) -> str | None:
    """ "pid N on host H" from a lock file, or None when it is empty."""
    parts = os.pread(fd, 200, 0).decode(errors="replace").split()
    return f"pid {parts[0]} on host {parts[1] if len(parts) > 1 else '?'}" if parts else None
