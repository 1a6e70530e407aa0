"""The math worker pool: a quick calculation does not queue behind slow solves; limits count from submission."""

from __future__ import annotations

import logging
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
