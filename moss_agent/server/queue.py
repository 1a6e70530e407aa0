"""The scheduler in front of the model: fair between users, one turn at a time per conversation.

Every job (a turn, a change of a conversation's switches, a deletion) is a generator run on one of
``workers`` threads; its items travel to the waiting request through an :class:`asyncio.Queue`. Several turns
run at once, so that their generations share the model's forward passes
(:class:`~moss_agent.server.batching.BatchingEngine`); the jobs of one conversation never overlap, so its
turns cannot interleave.

Fairness: each user's jobs wait in their own line, and a free worker serves the lines in turn (round robin),
so a user with a hundred queued requests delays another user's request by at most one job per worker. A user
may hold at most ``max_pending_per_user`` jobs; beyond that, or beyond ``max_pending`` in all, a request is
refused with :class:`QueueFullError` (429) carrying a Retry-After estimate from recent job durations.

Cancellation: a request that goes away (its client disconnected, or it ran past its deadline) sets its job's
stop flag. A job still waiting is removed at once and never runs; a running job is closed after its next item
(a streamed token), before its turn is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["ModelQueue", "QueueFullError", "RequestTimeoutError"]

_T = TypeVar("_T")

_GRACE_S = 5.0
"""How long past its deadline a request still waits for the worker to notice and answer."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting (in all, or of this user).

    Attributes:
        retry_after: Seconds after which a retry is likely to be taken.
    """

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(TimeoutError):
    """A request ran past its time limit (waiting in the queue included)."""


@dataclass(eq=False)
class _Job:
    make: Callable[[], Iterator[Any]]
    user: str
    key: str | None
    deadline: float
    push: Callable[[str, Any], None]
    stop: threading.Event = field(default_factory=threading.Event)
    started: bool = False


class ModelQueue:
    """Jobs in per-user lines, run by ``workers`` threads.

    Args:
        max_pending: Most jobs waiting or running at once.
        workers: Jobs running at once (turns whose generations the engine batches).
        max_pending_per_user: Most jobs of one user waiting or running; ``max_pending`` when None.
    """

    def __init__(self, max_pending: int = 64, *, workers: int = 1, max_pending_per_user: int | None = None) -> None:
        if max_pending < 1 or workers < 1:
            raise ValueError(f"max_pending and workers must be at least 1, got {max_pending} and {workers}")
        self.max_pending = max_pending
        self.max_pending_per_user = max_pending_per_user or max_pending
        self.workers = workers
        self._cond = threading.Condition()
        self._lines: dict[str, deque[_Job]] = {}
        self._order: deque[str] = deque()  # users in round-robin order
        self._per_user: dict[str, int] = {}
        self._busy: set[str] = set()  # conversations with a running job
        self._pending = 0
        self._closed = False
        self._mean_s = 1.0  # moving average of job durations, for Retry-After
        self._threads = [
            threading.Thread(target=self._work, name=f"moss-turn-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    def retry_after(self) -> int:
        """Seconds after which a refused request may well be taken."""
        return max(1, min(120, math.ceil(self._mean_s * (self._pending + 1) / self.workers)))

    def shutdown(self) -> None:
        """Stop taking jobs; running ones finish, waiting ones are dropped."""
        with self._cond:
            self._closed = True
            for line in self._lines.values():
                for job in line:
                    job.push("error", RuntimeError("the server is shutting down"))
            self._cond.notify_all()

    # ------------------------------------------------------------------ the request side

    async def stream(
        self,
        job: Callable[[], Iterator[_T]],
        deadline: float,
        *,
        user: str = "-",
        key: str | None = None,
        stop: threading.Event | None = None,
    ) -> AsyncIterator[_T]:
        """Queue ``job`` and yield its items as a worker produces them.

        Args:
            job: Makes the generator to run on a worker thread.
            deadline: ``time.monotonic()`` value by which the job must be done.
            user: Whose job it is (fairness and the per-user cap).
            key: The conversation it touches: jobs with the same key run one after another.
            stop: Set when the request goes away (made here when None); the job may watch it too.

        Raises:
            QueueFullError: When the queue, or this user's share of it, is full.
            RequestTimeoutError: When the deadline passes before the job is done.
            Exception: Whatever the job raised.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def push(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits any more
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))

        entry = _Job(job, user, key, deadline, push, stop or threading.Event())
        with self._cond:
            if self._closed:
                raise QueueFullError("the server is shutting down", 5)
            if self._pending >= self.max_pending:
                raise QueueFullError(
                    f"the server's queue is full ({self._pending} requests waiting for the model); retry later",
                    self.retry_after(),
                )
            if self._per_user.get(user, 0) >= self.max_pending_per_user:
                raise QueueFullError(
                    f"you have {self.max_pending_per_user} requests waiting already; retry later", self.retry_after()
                )
            self._pending += 1
            self._per_user[user] = self._per_user.get(user, 0) + 1
            if user not in self._lines:  # a user with nothing waiting goes first: served least recently
                self._lines[user] = deque()
                self._order.appendleft(user)
            self._lines[user].append(entry)
            self._cond.notify()
        try:
            while True:
                remaining = deadline - time.monotonic() + _GRACE_S
                try:
                    kind, value = await asyncio.wait_for(items.get(), timeout=max(remaining, 0.0))
                except asyncio.TimeoutError:  # not the builtin on Python 3.10
                    raise RequestTimeoutError("the request ran past its time limit") from None
                if kind == "item":
                    yield value
                elif kind == "done":
                    return
                else:
                    raise value
        finally:
            entry.stop.set()  # the client is gone or the request is over: the job stops or never starts
            with self._cond:
                line = self._lines.get(user)
                if not entry.started and line is not None and entry in line:
                    line.remove(entry)
                    self._release(entry)

    # ------------------------------------------------------------------ the worker side

    def _release(self, job: _Job) -> None:
        """Count a job out (the caller holds the condition)."""
        self._pending -= 1
        self._per_user[job.user] -= 1
        if not self._per_user[job.user]:
            del self._per_user[job.user]
            self._lines.pop(job.user, None)
            if job.user in self._order:
                self._order.remove(job.user)
        self._cond.notify_all()

    def _take(self) -> _Job | None:
        """The next job in round-robin order whose conversation is free (the caller holds the condition)."""
        for _ in range(len(self._order)):
            user = self._order[0]
            self._order.rotate(-1)
            for job in self._lines.get(user, ()):
                if job.key is None or job.key not in self._busy:
                    self._lines[user].remove(job)
                    return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed and (job := self._take()) is None:
                    self._cond.wait()
                if job is None:
                    return
                job.started = True
                if job.key is not None:
                    self._busy.add(job.key)
            began = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._cond:
                    if job.key is not None:
                        self._busy.discard(job.key)
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - began)
                    self._release(job)

    @staticmethod
    def _run(job: _Job) -> None:
        try:
            if job.stop.is_set():
                return
            if time.monotonic() > job.deadline:
                job.push("error", RequestTimeoutError("the request's time limit passed while it waited in the queue"))
                return
            generator = job.make()
            try:
                for item in generator:
                    job.push("item", item)
                    if job.stop.is_set():
                        return
                    if time.monotonic() > job.deadline:
                        job.push("error", RequestTimeoutError("the request ran past its time limit"))
                        return
            finally:
                close = getattr(generator, "close", None)
                if close is not None:
                    close()  # a cut-short turn ends here, before it is stored
            job.push("done", None)
        except BaseException as err:  # the request gets the job's error; the worker lives on
            job.push("error", err)
