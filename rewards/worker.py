"""A child Python process that runs one picklable call at a time under a hard wall-clock limit.

Backs the time limit of `is_equivalent` and the reward pool (DESIGN.md "rewards/": a time limit
per call). signal.alarm only works in the main thread and cannot interrupt C code (sympy's big
integer powers), so a hung call is ended by killing its process, which works from any thread.
"""
import atexit
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection

# Far above any sane start: importing sympy takes ~0.3 s, but a loaded 2-core box can be slow.
START_TIMEOUT = 120.0

_SERVE_CODE = "import sys; from rewards.worker import serve; serve(*sys.argv[1:])"
_live_workers: "weakref.WeakSet[WorkerProcess]" = weakref.WeakSet()
_shelves: "weakref.WeakSet[WorkerShelf]" = weakref.WeakSet()
# True inside a worker process: the workers it starts (its checkers) join its process group, so killing
# the group leaves no orphan behind; a worker started from any other process leads a group of its own.
_in_worker = False


class WorkerTimeout(Exception):
    """The call ran past its time limit; its process was killed."""


class WorkerFailure(Exception):
    """The call raised in the child, or the child died or could not start."""


def _child_import_path() -> str:
    # The child must unpickle functions by reference (ours, or a test module's), so it gets the
    # parent's import path; '' means the parent's working directory.
    return os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)


class WorkerProcess:
    """One child process; `call(fn, args, timeout)` runs `fn(*args)` there.

    `preload` names modules the child imports before it reports ready, so their import time is
    not charged to the first call; `memory_limit` caps the child's address space in bytes (None:
    no cap); `warm` makes the child keep a started checker ready (WorkerShelf.keep_ready) before it
    reports ready and before each reply, so no call's time limit pays for starting one. On a timeout
    the child is killed with its whole process group; make a new WorkerProcess.
    """

    def __init__(self, preload: tuple[str, ...] = (), memory_limit: int | None = None, warm: bool = False):
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        env = dict(os.environ, PYTHONPATH=_child_import_path())
        argv = [sys.executable, "-c", _SERVE_CODE, str(child_read), str(child_write),
                str(memory_limit or 0), ",".join(preload), str(int(warm))]
        self.own_group = not _in_worker
        try:
            # stdout is not the channel (a stray print would corrupt it); stderr stays visible.
            self.process = subprocess.Popen(argv, pass_fds=(child_read, child_write), env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            process_group=0 if self.own_group else None)
        except BaseException:
            os.close(parent_read)
            os.close(parent_write)
            raise
        finally:
            os.close(child_read)
            os.close(child_write)
        self._replies = Connection(parent_read, writable=False)
        self._requests = Connection(parent_write, readable=False)
        self._ready = False
        self.owner_pid = os.getpid()
        _live_workers.add(self)

    @property
    def ready(self) -> bool:
        """Whether the child has reported ready (wait_ready returned)."""
        return self._ready

    def poll_ready(self) -> bool:
        """`ready`, without blocking: reads the child's "ready" if it has come; WorkerFailure if it died."""
        if not self._ready and not self._replies.closed and self._replies.poll(0):
            self.wait_ready()  # something arrived (or EOF): this reads it at once
        return self._ready

    @property
    def reply_connection(self) -> Connection:
        """The connection a finished call's reply arrives on (for multiprocessing.connection.wait)."""
        return self._replies

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the child has imported its preload modules; WorkerFailure if it cannot."""
        if self._ready:
            return
        try:
            if self._replies.poll(timeout) and self._replies.recv() == "ready":
                self._ready = True
                return
        except (EOFError, OSError):
            pass
        code = self.process.poll()
        self.kill()
        raise WorkerFailure(f"reward worker process did not start (exit code {code}); check that "
                            f"`{sys.executable} -c 'import rewards'` works in this environment")

    def submit(self, fn, args: tuple, timeout: float) -> None:
        """Send one call; its reply is read with `receive` (the pool waits on many at once)."""
        self.wait_ready()
        # The child's own CPU cap is a backstop for when the parent dies without killing it.
        cpu_limit = math.ceil(timeout) + 5
        try:
            self._requests.send((fn, args, cpu_limit))
        except (OSError, EOFError) as error:
            self.kill()
            raise WorkerFailure(f"reward worker process died: {error}") from error

    def receive(self):
        """The result of the submitted call; WorkerFailure if it raised or the child died."""
        try:
            ok, value = self._replies.recv()
        except (EOFError, OSError) as error:
            self.kill()
            raise WorkerFailure(f"reward worker process died (exit code {self.process.poll()})") from error
        if not ok:
            raise WorkerFailure(value)
        return value

    def call(self, fn, args: tuple, timeout: float):
        """`fn(*args)` in the child; WorkerTimeout (child killed) after `timeout` seconds."""
        self.submit(fn, args, timeout)
        if not self._replies.poll(timeout):
            self.kill()
            raise WorkerTimeout(f"call ran past its {timeout:g} s limit")
        return self.receive()

    def alive(self) -> bool:
        return self.process.poll() is None and not self._replies.closed

    def kill(self) -> None:
        """End the child now (SIGKILL: also stops C code that ignores signals), with the checkers it
        started (its process group), and close the pipes."""
        if self.owner_pid == os.getpid():
            if self.own_group and self.process.returncode is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for connection in (self._replies, self._requests):
            if not connection.closed:
                connection.close()


@atexit.register
def _kill_live_workers() -> None:
    for worker in list(_live_workers):
        worker.kill()


def _forget_inherited_workers() -> None:
    # A forked child must not talk to its parent's workers (two readers on one pipe); it closes
    # its copies of the pipes and starts its own workers when it needs them.
    for worker in list(_live_workers):
        worker.close_pipes()
    _live_workers.clear()


os.register_at_fork(after_in_child=_forget_inherited_workers)


def _limit_memory(limit: int) -> None:
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        pass  # a platform without RLIMIT_AS keeps the wall-clock limit, which still holds


def _limit_cpu_time(seconds: int) -> None:
    # RLIMIT_CPU counts the whole life of the process, so the cap is set relative to time used.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or soft <= hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def serve(read_fd: str, write_fd: str, memory_limit: str, preload: str, warm: str = "0") -> None:
    """Child side: answer (fn, args, cpu_limit) requests until the parent closes the pipe."""
    global _in_worker
    _in_worker = True
    # A checker shares its worker's process group (and a worker of a process without its own group the
    # terminal's): a Ctrl-C there is not ours to act on; the parent decides what happens to us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = Connection(int(read_fd), writable=False)
    replies = Connection(int(write_fd), readable=False)
    if int(memory_limit):
        _limit_memory(int(memory_limit))
    for module in filter(None, preload.split(",")):
        __import__(module)
    if int(warm):
        _keep_shelves_ready()
    replies.send("ready")
    while True:
        try:
            fn, args, cpu_limit = requests.recv()
        except (EOFError, OSError):
            return
        except Exception as error:  # an argument that cannot be unpickled here
            replies.send((False, f"cannot unpickle the call: {type(error).__name__}: {error}"))
            continue
        _limit_cpu_time(cpu_limit)
        try:
            reply = (True, fn(*args))
        except BaseException as error:  # MemoryError and RecursionError included
            reply = (False, f"{type(error).__name__}: {error}"[:2000])
        if int(warm):  # a checker replaced during this call starts now, charged to this call, not the next
            _keep_shelves_ready()
        try:
            replies.send(reply)
        except (BrokenPipeError, ConnectionError, EOFError):
            return  # the parent is gone (it killed us, or died): nobody to answer
        except Exception as error:  # a result that cannot be pickled
            replies.send((False, f"cannot pickle the result: {type(error).__name__}: {error}"))


def _keep_shelves_ready() -> None:
    for shelf in list(_shelves):
        shelf.keep_ready()


class WorkerShelf:
    """Idle started workers shared by the threads of one process: take one, give it back.

    Each caller gets a worker of its own, so threads never share a pipe; a killed worker is
    replaced at once so that its successor imports while the caller goes on.
    """

    def __init__(self, preload: tuple[str, ...], memory_limit: int | None = None, max_idle: int = 4):
        self.preload = preload
        self.memory_limit = memory_limit
        self.max_idle = max_idle
        self._idle: list[WorkerProcess] = []
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget_after_fork)
        _shelves.add(self)

    def _forget_after_fork(self) -> None:
        # The parent's workers are not ours, and its lock may have been held by another thread.
        self._idle = []
        self._lock = threading.Lock()

    def _new_worker(self) -> WorkerProcess:
        return WorkerProcess(self.preload, self.memory_limit)

    def call(self, fn, args: tuple, timeout: float):
        """`fn(*args)` in an idle worker; WorkerTimeout / WorkerFailure as WorkerProcess.call."""
        worker = self._take()
        try:
            result = worker.call(fn, args, timeout)
        except WorkerFailure:
            self._give_back(worker if worker.alive() else self._new_worker())
            raise
        except BaseException:
            worker.kill()
            self._give_back(self._new_worker())
            raise
        self._give_back(worker)
        return result

    def keep_ready(self) -> None:
        """Make sure an idle worker is started and ready (blocks while one starts). Reward-pool workers call
        this between calls (WorkerProcess(warm=True)), so a checker never starts inside a time limit."""
        with self._lock:
            idle = [w for w in self._idle if w.owner_pid == os.getpid() and w.alive()]
        for worker in idle or [self._new_worker()]:
            try:
                worker.wait_ready()
            except WorkerFailure:
                continue  # could not start: killed; the next call starts another
            if not idle:
                self._give_back(worker)

    def idle_ready(self) -> int:
        """How many idle workers are started and ready."""
        with self._lock:
            return sum(w.ready for w in self._idle)

    def _take(self) -> WorkerProcess:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.owner_pid == os.getpid() and worker.alive():
                    return worker
        return self._new_worker()

    def _give_back(self, worker: WorkerProcess) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(worker)
                return
        worker.kill()
