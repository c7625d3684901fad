"""grpo/tracking.py: report.to writers beside metrics.jsonl. TensorBoard's event files and Trackio's local store
read back with the same names, steps and values (a resumed TensorBoard run hides the steps it logs again), W&B
offline without network; an unknown or missing tracker refused at config time naming the extra; the writers
closed at the end and on errors, on rank 0 only. Each real tracker's test skips when its extra is absent."""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import grpo.tracking as tracking
from curriculum.config import ConfigError, build_config
from curriculum.preflight import check_rules
from grpo.tracking import Trackers, scalars, tracker_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = [{"step": 0, "loss": 0.5, "completions/mean_length": 12.0, "first_block_position": None},
           {"step": 1, "loss": 0.25, "completions/mean_length": 14.0, "first_block_position": 0.5},
           {"step": 2, "loss": float("nan"), "completions/mean_length": 9.0, "num_tokens": 7}]
LOGGED = {"loss": [(0, 0.5), (1, 0.25)], "completions/mean_length": [(0, 12.0), (1, 14.0), (2, 9.0)],
          "first_block_position": [(1, 0.5)], "num_tokens": [(2, 7.0)]}  # None and nan are not logged


def needs(name):
    return pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"the [{name}] extra is not installed")


def test_scalars_leave_out_step_and_values_not_logged():
    assert scalars({"step": 3, "a": 1, "b": None, "c": float("inf"), "d": 2.5, "e": float("nan")}) == \
        {"a": 1.0, "d": 2.5}


def test_unknown_and_missing_trackers_are_refused_at_config_time(monkeypatch):
    def check(to):
        check_rules(build_config({"report": {"to": to}}), world=1)

    with pytest.raises(ConfigError, match=r"^report.to: 'tensorbord' is not a tracker; choose from \['tensorboard', "
                                          r"'wandb', 'trackio'\]$"):
        check(["tensorbord"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^report.to: wandb is not installed; pip install 'parallel-r1\[wandb\]' "
                                          r"\(or pip install wandb\)$"):
        check("wandb")  # one name alone, as TRL's report_to takes it
    check([])


def test_a_missing_tracker_stops_run_py_before_any_work(tmp_path, capsys):
    import run
    assert run.main(["--quick", "--set", f"run_dir={tmp_path}", "--set", "report.to=[nope]"]) == 2
    assert capsys.readouterr().err.strip() == ("config error: stage0: report.to: 'nope' is not a tracker; choose from "
                                               "['tensorboard', 'wandb', 'trackio']")
    assert not os.listdir(tmp_path)


class FakeWriter:
    """Records what a writer is asked to do."""
    calls: list = []

    def __init__(self, run_dir, project, config, start_step):
        self.calls.append(("open", run_dir, project, start_step))

    def log(self, values, step):
        self.calls.append(("log", step, values))

    def close(self, failed):
        self.calls.append(("close", failed))
        raise OSError("disk full")  # a tracker's own trouble is reported, never raised over the run's outcome


def test_trackers_log_the_records_and_close_at_the_end_and_on_errors(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(tracking.WRITERS, "tensorboard", FakeWriter)
    monkeypatch.setattr(tracking, "tracker_names", lambda to: ["tensorboard"])
    FakeWriter.calls = []
    with Trackers(["tensorboard"], str(tmp_path), project="p", config={}, start_step=4) as trackers:
        trackers.log({"step": 4, "loss": 1.0, "x": None})
    assert FakeWriter.calls == [("open", str(tmp_path), "p", 4), ("log", 4, {"loss": 1.0}), ("close", False)]
    assert "FakeWriter did not close cleanly: disk full" in caplog.text
    FakeWriter.calls = []
    with pytest.raises(KeyboardInterrupt):
        with Trackers(["tensorboard"], str(tmp_path), project="p", config={}):
            raise KeyboardInterrupt
    assert FakeWriter.calls[-1] == ("close", True)
    FakeWriter.calls = []
    with Trackers(["tensorboard"], str(tmp_path), project="p", config={}, enabled=False) as trackers:  # rank > 0
        trackers.log({"step": 0, "loss": 1.0})
    assert FakeWriter.calls == []


def log_records(run_dir, to, records, start_step=0):
    with Trackers(to, str(run_dir), project="parallel-r1-test", config={"seed": 0}, start_step=start_step) as t:
        for record in records:
            t.log(record)


def tensorboard_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@needs("tensorboard")
def test_tensorboard_event_files_read_back(tmp_path):
    log_records(tmp_path, ["tensorboard"], RECORDS)
    assert tensorboard_scalars(tmp_path) == LOGGED
    log_records(tmp_path, ["tensorboard"], [{"step": 1, "loss": 0.125}], start_step=1)  # resumed at step 1
    assert tensorboard_scalars(tmp_path) == {"loss": [(0, 0.5), (1, 0.125)], "completions/mean_length": [(0, 12.0)],
                                             "first_block_position": [], "num_tokens": []}  # later steps hidden


@needs("tensorboard")
def test_a_rollout_table_reaches_tensorboard_as_text_and_a_failing_writer_only_warns(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with Trackers(["tensorboard"], str(tmp_path), project="p", config={}) as t:
        t.log_table("rollouts", ["prompt", "response"], [["1 + 1 =", "Final Answer: 2 | ok\nend"]], 3)
        t.writers.append(FakeWriter(str(tmp_path), "p", {}, 0))  # no log_table: warned about, not raised
        t.log_table("rollouts", ["prompt"], [["x"]], 4)
        t.writers.pop()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text, later = events.Tensors("rollouts/text_summary")
    assert (text.step, later.step) == (3, 4)  # the tensorboard writer logged both, beside the failing one
    table = text.tensor_proto.string_val[0].decode()
    assert table.splitlines() == ["| prompt | response |", "|---|---|", "| 1 + 1 = | Final Answer: 2 \\| ok end |"]
    assert "FakeWriter could not log the rollouts table" in caplog.text


TRACKIO_READER = """
import json, sys
from grpo.tracking import Trackers
from trackio.sqlite_storage import SQLiteStorage
with Trackers(["trackio"], sys.argv[1], project="parallel-r1-test", config={"seed": 0}) as t:
    for record in json.loads(sys.argv[2]):
        t.log(record)
print(json.dumps(SQLiteStorage.get_logs("parallel-r1-test", sys.argv[1])))
"""


@needs("trackio")
def test_trackio_local_store_reads_back(tmp_path):
    """In a child process: Trackio reads TRACKIO_DIR (its store) once, when it is first imported."""
    records = json.dumps([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                          for r in RECORDS])
    r = subprocess.run([sys.executable, "-c", TRACKIO_READER, str(tmp_path / "run"), records], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env=dict(os.environ, TRACKIO_DIR=str(tmp_path / "store")))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Trackio" not in r.stdout.splitlines()[0]  # what it prints goes to stderr: stdout is for results
    rows = json.loads(r.stdout.splitlines()[-1])
    read = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                read.setdefault(key, []).append((row["step"], value))
    assert read == LOGGED
    assert glob.glob(str(tmp_path / "store" / "parallel-r1-test.db"))


@needs("wandb")
def test_wandb_runs_offline_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_records(tmp_path, ["wandb"], RECORDS)
    import wandb
    wandb.teardown()  # its service writes the run's file after finish() returns; it has closed it once it exits
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1  # offline: `wandb sync` uploads it later
    data = open(runs[0], "rb").read()
    assert all(key.encode() in data for key in LOGGED)  # its records hold the metric names as written


def test_tracker_names_keep_order_and_drop_repeats():
    present = [n for n in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(n)]
    assert tracker_names(present + present[:1]) == present
