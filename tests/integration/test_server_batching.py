"""Concurrent requests share the model's forward passes (continuous batching), and give what they give alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def engine() -> Any:
    import torch

    from moss_agent.engines.transformers import TransformersEngine
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    torch.set_num_threads(1)
    return TransformersEngine.from_pretrained(tiny_moss_checkpoint(), precision="fp32")


def _body(i: int, **extra: Any) -> dict[str, Any]:
    text = f"Question {i}: " + "tell me more " * (i % 3)
    return {"model": "m", "messages": [{"role": "user", "content": text}], "plugins": [], **extra}


def test_concurrent_requests_are_batched_and_equal_to_one_at_a_time(engine: Any, tmp_path: Path) -> None:
    from moss_agent.server import ServerSettings, create_app
    from moss_agent.server.testing import running_server

    app = create_app(engine, store=tmp_path / "db.sqlite3", settings=ServerSettings(max_batch=8))
    greedy = {"max_tokens": 16 + 0, "temperature": 0}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        alone = [http.post("/v1/chat/completions", json=_body(i, **greedy)).json() for i in range(6)]
        batching = app.state.service.engine()
        stats = batching.stats
        assert stats.peak_batch <= 1  # one at a time: nothing to batch
        together: list[Any] = [None] * 6
        submitted: list[Any] = []  # the rows the batching engine was given
        submit = batching._submit

        def counted(*args: Any) -> Any:
            row = submit(*args)
            submitted.append(row)
            return row

        batching._submit = counted

        def ask(i: int) -> None:
            together[i] = http.post("/v1/chat/completions", json=_body(i, **greedy)).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        # The model's lock (taken by every forward step) is held until all six rows are in the batching engine:
        # on a slow machine the first request could otherwise finish before the last one arrives.
        with engine.lock:
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while len(submitted) < 6:
                assert time.monotonic() < deadline, f"only {len(submitted)} of the six requests reached the model"
                time.sleep(0.02)
        for thread in threads:
            thread.join()
        # A sampled request shares the batch too, and a streamed one that is dropped leaves it.
        with http.stream("POST", "/v1/chat/completions", json=_body(9, stream=True, max_tokens=200)) as stream:
            next(stream.iter_lines())
        time.sleep(0.5)
        sampled = http.post("/v1/chat/completions", json=_body(7, temperature=0.7, seed=3)).json()
    assert stats.peak_batch > 1, stats
    assert [a["choices"][0]["message"]["content"] for a in alone] == [
        t["choices"][0]["message"]["content"] for t in together
    ]
    assert [a["usage"]["completion_tokens"] for a in alone] == [t["usage"]["completion_tokens"] for t in together]
    assert sampled["choices"][0]["finish_reason"] == "stop"


def test_the_batching_engine_cancels_a_closed_stream(engine: Any) -> None:
    from moss_agent.engines.base import SamplingParams
    from moss_agent.server.batching import BatchingEngine

    batching = BatchingEngine(engine, max_batch=4)
    assert batching.batched  # a TransformersEngine is StepBatchable
    params = SamplingParams(max_new_tokens=400, do_sample=False, stop_tokens=())
    long_one = batching.stream("<|Human|>: a long answer<eoh>\n<|MOSS|>:", params)
    next(long_one)
    steps = batching.stats.steps
    short = batching.generate("<|Human|>: hi<eoh>\n<|MOSS|>:", params.with_(max_new_tokens=5))
    assert short.completion_tokens == 5
    long_one.close()
    # Every forward step runs under the model's lock, and a step leaves out the rows cancelled before it began; so
    # once the lock is ours, a step that had the closed stream's row is over, and no later one can have it.
    with engine.lock:
        after = batching.stats.steps
    time.sleep(0.3)
    assert batching.stats.steps == after  # the closed stream's row left the batch: nothing runs any more
    assert after - steps < 400
    batching.close()


def test_other_engines_run_one_at_a_time_and_remote_ones_side_by_side() -> None:
    from moss_agent.engines.base import SamplingParams
    from moss_agent.engines.batch_steps import StepBatchable
    from moss_agent.server.batching import BatchingEngine
    from moss_agent.testing.scripted_rules import RuleBasedEngine

    class Counting(RuleBasedEngine):
        meet = 1  # calls that wait (a while) for each other inside the engine before answering

        def __init__(self) -> None:
            super().__init__()
            self.running = self.peak = 0
            self.count = threading.Condition()

        def stream(self, prompt: str, params: SamplingParams) -> Any:
            with self.count:
                self.running += 1
                self.peak = max(self.peak, self.running)
                self.count.notify_all()
                # Side by side, the three calls meet here, so that a thread started late (a busy machine) cannot
                # make them look one at a time; one at a time, the first waits out the timeout alone.
                self.count.wait_for(lambda: self.peak >= self.meet, timeout=10)
            try:
                for delta in super().stream(prompt, params):
                    time.sleep(0.01)
                    yield delta
            finally:
                with self.count:
                    self.running -= 1

    class RemoteEngine(Counting):  # stands for moss_agent.engines.remote.RemoteEngine (a server that batches)
        meet = 3
        batches_concurrent_calls = True

    from moss_agent.engines import remote

    assert BatchingEngine(remote.RemoteEngine("http://127.0.0.1:9")).parallel  # the real one says so too

    for engine, expected in ((Counting(), 1), (RemoteEngine(), 3)):
        batching = BatchingEngine(engine)
        assert not isinstance(engine, StepBatchable) and not batching.batched
        prompt = "<|Human|>: Hello there<eoh>\n<|MOSS|>:"
        threads = [threading.Thread(target=batching.generate, args=(prompt, SamplingParams())) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert engine.peak == expected, type(engine).__name__
