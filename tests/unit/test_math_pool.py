"""The math worker pool: a quick calculation does not queue behind slow solves; limits count from submission."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from moss_agent.protocol.plugins import format_calculate
from moss_agent.tools.calculator import evaluate
from moss_agent.tools.equation_solver import solve_equations
from moss_agent.tools.math.worker import MathWorker

SLOW = "sin(x)+cos(y)=1;x^2+y=3"  # sympy works on this for many seconds


@pytest.fixture
def pool() -> Iterator[MathWorker]:
    worker = MathWorker(processes=2, startup_timeout=120)  # three sympy imports at once: slow on a loaded machine
    assert worker.wait_ready()
    yield worker
    worker.close()


def _wait_until_busy(pool: MathWorker, processes: int) -> None:
    """Wait until ``processes`` of the pool hold a job (a fixed sleep is too short on a loaded machine)."""
    deadline = time.monotonic() + 60
    while pool._busy < processes:
        assert time.monotonic() < deadline, f"only {pool._busy} of {processes} math processes took a job"
        time.sleep(0.01)


def test_a_trivial_calculation_does_not_wait_behind_a_slow_solve(pool: MathWorker) -> None:
    slow = threading.Thread(target=solve_equations, args=(SLOW,), kwargs={"timeout": 5.0, "worker": pool})
    slow.start()
    _wait_until_busy(pool, 1)
    started = time.monotonic()
    assert evaluate("6*3", worker=pool)["text"] == "18"
    waited = time.monotonic() - started
    assert slow.is_alive(), waited  # the second process answered while the first still solved
    assert waited < 2.5, waited
    slow.join()


def test_the_limit_counts_from_submission_and_the_reason_is_kept(
    pool: MathWorker, caplog: pytest.LogCaptureFixture
) -> None:
    slow = [
        threading.Thread(target=solve_equations, args=(SLOW,), kwargs={"timeout": 3.0, "worker": pool})
        for _ in range(4)
    ]
    for thread in slow:
        thread.start()
    _wait_until_busy(pool, 2)  # both processes hold a slow solve (for 3 s), two more solves queue
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = evaluate("6*3", timeout=0.5, worker=pool)  # both processes stay busy past its limit
    waited = time.monotonic() - started
    assert waited < 2.0, waited  # gave up at its own limit: not 3 s for a process, not 6 s behind the queue
    assert result["text"] is None and "busy" in (result["error"] or "")
    assert format_calculate(result["text"]) == "'No result.'"  # what MOSS reads, as the calculator data has it
    assert any("busy" in r.getMessage() for r in caplog.records)  # the reason goes to the log
    for thread in slow:
        thread.join()
    assert evaluate("6*3", worker=pool)["text"] == "18"  # the killed processes were replaced


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="freezes the starting process with SIGSTOP (POSIX)")
def test_calls_queued_behind_a_cold_start_do_not_pay_for_it() -> None:
    """Right after start (a server's first requests), calls that wait for a process still importing sympy get
    their whole limit once it is ready; before, they ran out of it and answered 'No result.' (all busy)."""
    worker = MathWorker(processes=1, spare=False, startup_timeout=120)
    try:
        worker.start()
        (cold,) = worker._idle
        os.kill(cold.proc.pid, signal.SIGSTOP)  # a cold start of at least a second, on any machine
        assert not cold.wait_ready(0.0)
        results: dict[str, dict[str, object]] = {}

        def ask(name: str, text: str, timeout: float) -> None:
            results[name] = evaluate(text, timeout=timeout, worker=worker)

        holder = threading.Thread(target=ask, args=("holder", "6*3", 0.2))
        holder.start()
        while worker._busy < 1:  # the holder took the cold process
            time.sleep(0.001)
        queued = threading.Thread(target=ask, args=("queued", "6*4", 0.2))
        queued.start()
        time.sleep(1.0)  # five times the queued call's limit
        os.kill(cold.proc.pid, signal.SIGCONT)
        holder.join()
        queued.join()
        assert results["holder"]["text"] == "18", results
        assert results["queued"]["text"] == "24", results
    finally:
        worker.close()
