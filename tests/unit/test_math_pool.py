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
    worker = MathWorker(processes=2)
    assert worker.wait_ready()
    yield worker
    worker.close()


def test_a_trivial_calculation_does_not_wait_behind_a_slow_solve(pool: MathWorker) -> None:
    slow = threading.Thread(target=solve_equations, args=(SLOW,), kwargs={"timeout": 2.0, "worker": pool})
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert evaluate("6*3", worker=pool)["text"] == "18"
    assert time.monotonic() - started < 1.0  # the second process answered while the first solved
    slow.join()


def test_the_limit_counts_from_submission_and_the_reason_is_kept(
    pool: MathWorker, caplog: pytest.LogCaptureFixture
) -> None:
    slow = [
        threading.Thread(target=solve_equations, args=(SLOW,), kwargs={"timeout": 1.5, "worker": pool})
        for _ in range(4)
    ]
    for thread in slow:
        thread.start()
    time.sleep(0.4)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = evaluate("6*3", timeout=0.5, worker=pool)  # both processes are busy for another second
    waited = time.monotonic() - started
    assert waited < 1.0, waited  # not 5 s behind four slow solves
    assert result["text"] is None and "busy" in (result["error"] or "")
    assert format_calculate(result["text"]) == "'No result.'"  # what MOSS reads, as the calculator data has it
    assert any("busy" in r.getMessage() for r in caplog.records)  # the reason goes to the log
    for thread in slow:
        thread.join()
    assert evaluate("6*3", worker=pool)["text"] == "18"  # the killed processes were replaced
