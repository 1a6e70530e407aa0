"""A persistent worker process that runs math jobs under a wall-clock limit.

sympy takes most of a second to import, so a process per call would be slow; one long-lived worker answers
each job in milliseconds. A job that runs past its limit is not waited for: the worker is killed, the call
fails with :class:`WorkerTimeout`, and a fresh worker starts in the background for the next call. So a hung
computation never hangs the agent, and a crash of the worker never takes the agent with it.

The worker loads ``evaluate.py`` and ``check.py`` from this folder under a private package
name, without running ``moss_agent``'s package ``__init__`` files, so it imports only the standard library and
sympy. Requests and replies are JSON lines on the worker's stdin and stdout.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["MathWorker", "WorkerError", "WorkerTimeout", "shared_worker"]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent

# Run by `python -c` in the worker. Drops the current directory from sys.path (nothing there may shadow
# sympy), then imports this folder as a private package so that relative imports work.
_BOOT = """
import importlib, sys, types
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
package = types.ModuleType("_moss_math_worker")
package.__path__ = [sys.argv[1]]
sys.modules["_moss_math_worker"] = package
importlib.import_module("_moss_math_worker.worker").serve(sys.argv[2], int(sys.argv[3]))
"""


class WorkerError(RuntimeError):
    """The worker could not run the job (it could not start, or it died)."""


class WorkerTimeout(WorkerError, TimeoutError):
    """The job ran past its time limit; the worker was killed and is being replaced."""


class _Process:
    """One worker process and the thread that reads its replies."""

    def __init__(self, target: str, memory_mb: int) -> None:
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.ready = False
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(_HERE), target, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        assert self.proc.stdout is not None
        threading.Thread(
            target=_read_replies, args=(self.proc.stdout, self.replies), daemon=True, name="moss-math-reader"
        ).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready:
            try:
                message = self.replies.get(timeout=timeout)
            except queue.Empty:
                message = None
            self.ready = bool(message and message.get("ready"))
        return self.ready

    def kill(self, *, wait: bool = True) -> None:
        """Kill the process and reap it; ``wait=False`` reaps it in the background.

        A process that dies with a large heap can take a good part of a second to exit on a loaded machine: a
        call past its time limit does not wait for that too (the kernel frees the memory either way).
        """
        if self.proc.poll() is None:
            self.proc.kill()
        if wait:
            self._reap()
        else:
            threading.Thread(target=self._reap, daemon=True, name="moss-math-reaper").start()

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be refused
            logger.warning("math worker %s did not exit", self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class MathWorker:
    """A pool of worker processes that run the jobs of ``evaluate.handle``, each job time-bounded.

    ``processes`` processes answer jobs side by side, so a trivial calculation does not queue behind slow
    solves. A job's time limit counts from the moment it is submitted: waiting for a free process uses it up,
    so no call takes longer than its limit plus a cold start: a process that is still importing sympy when it
    gets a job does not use up that job's limit, nor the limits of the calls that wait meanwhile. A job past
    its limit is not waited for: its process is killed and replaced (by the hot spare when there is one, so
    the next call does not wait for sympy to import).

    Args:
        target: Module of this folder whose ``handle(op, arg, options)`` serves the jobs.
        processes: Processes answering jobs at once.
        startup_timeout: Seconds to wait for a new process to import sympy and report ready.
        memory_mb: Address-space cap of each process (POSIX only), so a runaway job cannot exhaust memory.
        spare: Whether to keep one more process ready to replace a killed one.

    Raises:
        ValueError: If ``processes``, ``startup_timeout`` or ``memory_mb`` is not positive.
    """

    def __init__(
        self,
        target: str = "evaluate",
        *,
        processes: int = 2,
        startup_timeout: float = 20.0,
        memory_mb: int = 2048,
        spare: bool = True,
    ) -> None:
        if startup_timeout <= 0 or memory_mb <= 0 or processes < 1:
            raise ValueError("processes, startup_timeout and memory_mb must be positive")
        self.target = target
        self.processes = processes
        self.startup_timeout = startup_timeout
        self.memory_mb = memory_mb
        self.spare = spare
        self._cond = threading.Condition(threading.RLock())
        self._idle: list[_Process] = []  # started, not running a job (possibly still importing sympy)
        self._busy = 0
        self._cold = 0  # busy processes still importing sympy: the calls waiting for a process don't pay for that
        self._spare: _Process | None = None
        self._next_id = 0

    def start(self) -> None:
        """Start processes up to the pool size (and the spare); returns at once (they get ready in the background)."""
        with self._cond:
            for dead in [p for p in self._idle if not p.alive()]:
                dead.kill()
                self._idle.remove(dead)
            while len(self._idle) + self._busy < self.processes:
                spare, self._spare = self._spare, None
                self._idle.append(
                    spare if spare is not None and spare.alive() else _Process(self.target, self.memory_mb)
                )
            if self.spare and (self._spare is None or not self._spare.alive()):
                self._spare = _Process(self.target, self.memory_mb)
            self._cond.notify_all()

    def wait_ready(self) -> bool:
        """Start the pool and its spare if needed, and wait (each up to ``startup_timeout``) until ready.

        Returns:
            Whether every process can take jobs.
        """
        self.start()
        with self._cond:
            procs = [*self._idle, *([self._spare] if self._spare is not None else [])]
        return all(p.wait_ready(self.startup_timeout) for p in procs)

    def call(self, op: str, arg: str, options: dict[str, Any] | None = None, *, timeout: float) -> Any:
        """Run one job in a free worker process.

        Args:
            op: The job kind (``"calculate"`` or ``"solve"``).
            arg: The job's text.
            options: JSON-ready options passed on to the job.
            timeout: Seconds the call may take, counted from now: waiting for a free process included.

        Returns:
            The job's JSON-ready result.

        Raises:
            WorkerTimeout: The job ran too long (its process was killed and replaced) or no process was free
                within the limit.
            WorkerError: The worker could not start or died.
            ValueError: The job itself failed (``MathInputError`` and the like); the message says why.
        """
        proc: _Process | None
        proc, deadline = self._acquire(time.monotonic() + timeout, timeout)
        try:
            assert proc is not None
            if not proc.ready:
                # A cold start is not the call's fault: its time limit starts once a process is ready.
                if not self._warm(proc):
                    self._discard(proc)
                    proc = None
                    raise WorkerError(f"the math worker did not start within {self.startup_timeout:g} s")
                deadline = max(deadline, time.monotonic() + timeout)
            with self._cond:
                self._next_id += 1
                job_id = self._next_id
            assert proc.proc.stdin is not None
            try:
                proc.proc.stdin.write(json.dumps({"id": job_id, "op": op, "arg": arg, "options": options}) + "\n")
                proc.proc.stdin.flush()
                reply = proc.replies.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                self._discard(proc)
                proc = None
                raise WorkerTimeout(f"no result within the {timeout:g} s time limit") from None
            except OSError as err:
                self._discard(proc)
                proc = None
                raise WorkerError(f"the math worker died: {err}") from None
            if reply is None or reply.get("id") != job_id:
                self._discard(proc)
                proc = None
                raise WorkerError("the math worker died")
        finally:
            if proc is not None:
                self._give_back(proc)
        if not reply.get("ok"):
            raise ValueError(reply.get("error") or "the job failed")
        return reply.get("result")

    def _warm(self, proc: _Process) -> bool:
        """Wait for a taken process to get ready, counted in ``_cold`` meanwhile."""
        with self._cond:
            self._cold += 1
        try:
            return proc.wait_ready(self.startup_timeout)
        finally:
            with self._cond:
                self._cold -= 1
                self._cond.notify_all()

    def _acquire(self, deadline: float, timeout: float) -> tuple[_Process, float]:
        """A free process, ready ones first, and the call's deadline.

        Waits until ``deadline`` for a process; time spent waiting while a taken process is still starting is
        added to the deadline (a cold start is no call's fault).
        """
        with self._cond:
            self.start()
            while True:
                alive = [p for p in self._idle if p.alive()]
                if len(alive) < len(self._idle):
                    self.start()
                    continue
                if self._idle:
                    ready = [p for p in self._idle if p.ready or p.wait_ready(0.0)]
                    proc = ready[0] if ready else self._idle[0]
                    self._idle.remove(proc)
                    self._busy += 1
                    return proc, deadline
                now = time.monotonic()
                if self._cold:  # a process is starting: wait for it without using up the limit
                    self._cond.wait()  # woken when it is ready (or failed), or when a process comes back
                    deadline += time.monotonic() - now
                    continue
                if deadline <= now:
                    raise WorkerTimeout(
                        f"no result within the {timeout:g} s time limit: all {self.processes} math workers were busy"
                    )
                self._cond.wait(deadline - now)

    def _give_back(self, proc: _Process) -> None:
        with self._cond:
            self._busy -= 1
            self._idle.append(proc)
            self._cond.notify()

    def _discard(self, proc: _Process) -> None:
        """Kill a process that failed its job; the spare (if any) takes its place at once."""
        proc.kill(wait=False)
        with self._cond:
            self._busy -= 1
            self.start()

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._cond:
            for proc in [*self._idle, *([self._spare] if self._spare is not None else [])]:
                proc.kill()
            self._idle, self._spare = [], None


def _read_replies(stream: IO[str], replies: queue.Queue[dict[str, Any] | None]) -> None:
    for line in stream:
        try:
            replies.put(json.loads(line))
        except json.JSONDecodeError:
            continue
    replies.put(None)


_SHARED: MathWorker | None = None
_SHARED_LOCK = threading.Lock()


def shared_worker() -> MathWorker:
    """The process-wide math worker shared by the calculator and the solver (started on first use)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = MathWorker()
            atexit.register(_SHARED.close)
        return _SHARED


# ---------------------------------------------------------------- the worker side


def serve(target: str, memory_mb: int) -> None:
    """Worker main loop: answer JSON requests from stdin until it closes (run by ``_BOOT``)."""
    _cap_memory(memory_mb)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of a library must not corrupt the replies
    module = __import__(f"{__package__}.{target}", fromlist=["handle"])
    module.warm_up()
    _send(out, {"ready": True})
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request["id"]
            result = module.handle(request["op"], request["arg"], request.get("options"))
            reply = {"id": request_id, "ok": True, "result": result}
        except Exception as err:  # every failure goes back to the caller as text
            text = str(err) if type(err).__name__ == "MathInputError" else f"{type(err).__name__}: {err}"
            reply = {"id": request_id, "ok": False, "error": text[:500]}
        _send(out, reply)


def _send(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _cap_memory(memory_mb: int) -> None:
    try:
        import resource
    except ImportError:  # not POSIX: no cap
        return
    limit = memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
