"""One model, one worker thread: requests run one at a time, in the order they arrived.

A loaded MOSS model serves one generation at a time, and a conversation's turns must not interleave. Every
job (a turn, or a change of a conversation's switches) is a generator run on a single worker thread; its items
travel to the waiting request through an :class:`asyncio.Queue`. The worker checks the request's deadline and
whether the client went away after every item (a streamed token), and then closes the job's generator, so a
turn that is cut short never reaches the store: the agent stores a turn only after its last reply token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["ModelQueue", "QueueFullError", "RequestTimeoutError"]

_T = TypeVar("_T")

_GRACE_S = 5.0
"""How long past its deadline a request still waits for the worker to notice and answer."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting for the model."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its time limit (waiting in the queue included)."""


class ModelQueue:
    """A FIFO of jobs in front of one model, run by one worker thread.

    Args:
        max_pending: Most jobs waiting or running at once; more are refused with :class:`QueueFullError`.
    """

    def __init__(self, max_pending: int = 64) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        # One worker: a ThreadPoolExecutor hands jobs out in submission order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moss-model")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    def shutdown(self) -> None:
        """Stop taking jobs; the running one finishes."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(self, job: Callable[[], Iterator[_T]], deadline: float) -> AsyncIterator[_T]:
        """Queue ``job`` and yield its items as the worker produces them.

        Args:
            job: Makes the generator to run on the worker thread.
            deadline: ``time.monotonic()`` value by which the job must be done.

        Raises:
            QueueFullError: When ``max_pending`` jobs are already queued.
            RequestTimeoutError: When the deadline passes before the job is done.
            Exception: Whatever the job raised.
        """
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFullError(
                    f"the server's queue is full ({self._pending} requests waiting for the model); retry later"
                )
            self._pending += 1
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def push(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, (kind, value))

        def work() -> None:
            try:
                if stop.is_set():
                    return
                if time.monotonic() > deadline:
                    push("error", RequestTimeoutError("the request's time limit passed while it waited in the queue"))
                    return
                generator = job()
                try:
                    for item in generator:
                        push("item", item)
                        if stop.is_set():
                            return
                        if time.monotonic() > deadline:
                            push("error", RequestTimeoutError("the request ran past its time limit"))
                            return
                finally:
                    close = getattr(generator, "close", None)
                    if close is not None:
                        close()  # a cut-short turn ends here, before it is stored
                push("done", None)
            except BaseException as err:  # the request gets the job's error; the worker lives on
                push("error", err)
            finally:
                with self._lock:
                    self._pending -= 1

        self._executor.submit(work)
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
            stop.set()  # the client is gone or the request is over: the worker drops the rest
