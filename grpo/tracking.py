"""Experiment trackers beside metrics.jsonl (`report.to`): TensorBoard, Weights & Biases, Trackio. Each gets the
records metrics.jsonl gets, under the same names, from rank 0 only. Each package is an optional extra
(`pip install 'parallel-r1[wandb]'`), imported only when asked for; preflight refuses a missing one by name.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import sys

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "trackio")  # report.to names; each is also the extra that installs it


def tracker_names(to: str | list) -> list[str]:
    """report.to as a list of tracker names (one name may be given as a string); ValueError naming an unknown
    name, or a tracker whose package is missing and the extra that installs it."""
    names = [to] if isinstance(to, str) else list(to)
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"{name!r} is not a tracker; choose from {list(TRACKERS)}")
        if importlib.util.find_spec(name) is None:  # torch.utils.tensorboard needs the tensorboard package
            raise ValueError(install_hint(name))
    return list(dict.fromkeys(names))


def install_hint(name: str) -> str:
    return f"{name} is not installed; pip install 'parallel-r1[{name}]' (or pip install {name})"


def _import(name: str):
    try:
        return importlib.import_module("torch.utils.tensorboard" if name == "tensorboard" else name)
    except ImportError as e:
        raise ImportError(install_hint(name)) from e


def scalars(record: dict) -> dict:
    """The numbers of a metrics record, without "step" and without values not logged (None, nan, inf)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and math.isfinite(v)}


class TensorBoardWriter:
    """Event files in <run_dir>/tensorboard. A resumed stage purges the events at and after its first step."""

    def __init__(self, run_dir: str, project: str, config: dict, start_step: int):
        path = os.path.join(run_dir, "tensorboard")
        self.writer = _import("tensorboard").SummaryWriter(path, purge_step=start_step or None)
        log.info(f"tensorboard: event files in {path}")

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        """A markdown table in the TEXT tab (TensorBoard has no table type)."""
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbWriter:
    """A W&B run under <run_dir>/wandb, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it)."""

    def __init__(self, run_dir: str, project: str, config: dict, start_step: int):
        self.wandb = wandb = _import("wandb")
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, name=run_dir, dir=run_dir, config=config, mode=mode)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=list(columns), data=[[str(v) for v in r] for r in rows])},
                     step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioWriter:
    """A Trackio run in its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio; `trackio show`)."""

    def __init__(self, run_dir: str, project: str, config: dict, start_step: int):
        self.trackio = _import("trackio")
        with contextlib.redirect_stdout(sys.stderr):  # it prints where its store is: keep stdout for results
            self.run = self.trackio.init(project=project, name=run_dir, config=config)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        """A trackio.Table where this trackio has one; an older one has no table type: skipped."""
        table = getattr(self.trackio, "Table", None)
        if table is not None:
            self.run.log({name: table(columns=list(columns), data=[[str(v) for v in r] for r in rows])}, step=step)

    def close(self, failed: bool) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()  # the module's finish also forgets the run (else it finishes it again at exit)


WRITERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter, "trackio": TrackioWriter}


class Trackers:
    """The trackers of one stage. `with Trackers(...) as trackers:` opens them (rank 0 only: `enabled` False
    opens none) and closes them at the end or on an error; `trackers.log(record)` beside append_metrics.
    A wandb or Trackio run is named after the stage's run directory (as TRL names one after its output_dir);
    `start_step`: the first step this attempt logs (a resumed stage logs again from there)."""

    def __init__(self, to: str | list, run_dir: str, *, project: str, config: dict, start_step: int = 0,
                 enabled: bool = True):
        self.args = (run_dir, project, config, start_step)
        self.names = tracker_names(to) if enabled else []
        self.writers: list = []

    def __enter__(self) -> "Trackers":
        try:
            for name in self.names:
                self.writers.append(WRITERS[name](*self.args))
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def log(self, record: dict) -> None:
        values = scalars(record)
        for writer in self.writers:
            writer.log(values, record["step"])

    def log_table(self, name: str, columns: list, rows: list, step: int) -> None:
        """A small table (rollout samples) to every tracker, each in its own table form; a tracker that fails
        at it is warned about, not raised (the dump on disk holds every sample anyway)."""
        for writer in self.writers:
            try:
                writer.log_table(name, columns, rows, step)
            except Exception as e:  # noqa: BLE001 - a table is a courtesy; the run goes on
                log.warning(f"{type(writer).__name__} could not log the {name} table: {e}")

    def close(self, failed: bool = False) -> None:
        """Close every writer; one that fails to close is reported, not raised (the run's own error, if any,
        is the one to see)."""
        for writer in self.writers:
            try:
                writer.close(failed)
            except Exception as e:  # noqa: BLE001 - a tracker's own trouble must not hide the run's outcome
                log.warning(f"{type(writer).__name__} did not close cleanly: {e}")
        self.writers = []

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)
