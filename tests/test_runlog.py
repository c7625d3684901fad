"""grpo/runlog.py: one owner per run directory (an OS lock naming its pid and host, dropped when the owner
dies, a stale one taken over), a second run refused before any work, in one process and under torchrun;
metrics.jsonl past a torn line."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from grpo.runlog import RunDirBusy, RunLock, read_metrics

from .dist_worker import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = "import sys; from grpo.runlog import RunLock\nwith RunLock(sys.argv[1]):\n print('held', flush=True)\n " \
       "sys.stdin.read()"


def holder(run_dir):
    """A process that owns `run_dir` until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_is_refused_naming_pid_and_host(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"{tmp_path} is in use by pid {proc.pid} on host "
                                             rf"{socket.gethostname()} \(lock file {tmp_path}/.lock\)"):
            RunLock(str(tmp_path)).acquire()
    finally:
        proc.stdin.close()
        proc.wait()
    with RunLock(str(tmp_path)) as lock:  # released cleanly: nothing to take over
        assert lock.took_over is None


def test_the_lock_of_a_dead_owner_is_taken_over(tmp_path):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, the file still names the owner
    proc.wait()
    with RunLock(str(tmp_path)) as lock:
        assert lock.took_over == f"pid {proc.pid} on host {socket.gethostname()}"
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"


def quick_demo(run_dir) -> list:
    return [sys.executable, os.path.join(ROOT, "run.py"), "--config", "demo", "--quick", "--set", f"run_dir={run_dir}"]


def test_run_py_refuses_a_run_directory_in_use(tmp_path):
    """Two runs on one run_dir used to both exit 0 with interleaved metrics and each other's checkpoints."""
    proc = holder(tmp_path / "stage1")  # a stage run of the pipeline's directory
    try:
        r = subprocess.run(quick_demo(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        proc.stdin.close()
        proc.wait()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {tmp_path}/stage1 is in use by pid {proc.pid} on host "
                                                 f"{socket.gethostname()} (lock file {tmp_path}/stage1/.lock); wait "
                                                 "for that run to end, or give this one another run_dir")
    assert not os.path.exists(tmp_path / "stage0" / "metrics.jsonl")  # refused before any work


@pytest.mark.slow
def test_every_rank_exits_when_torchrun_is_refused(tmp_path):
    proc = holder(tmp_path)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port())] + quick_demo(tmp_path)[1:]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        proc.stdin.close()
        proc.wait()
    assert r.returncode != 0 and r.stderr.count(f"is in use by pid {proc.pid}") == 1  # rank 0 speaks, once
    assert "exitcode  : 2" in r.stderr and "Traceback (most recent call last)" not in r.stderr.split("error:")[0]


def test_metrics_with_a_torn_last_line_read_and_a_damaged_middle_line_named(tmp_path):
    rows = [json.dumps({"step": s}) for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
    (tmp_path / "metrics.jsonl").write_text(rows[0] + "\n{oops\n" + rows[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(str(tmp_path))
