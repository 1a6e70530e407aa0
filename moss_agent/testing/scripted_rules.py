r"""A rule-based scripted engine: a stand-in model that answers each prompt from the prompt itself.

For tests that need a model which answers sensibly (LangChain's standard integration suite) without real
weights: everything but the model runs for real (rendering, the plugin passes, parsing, tool calls). The
engine reads the MOSS prompt it is given and writes, by where the prompt ends:

* ``<|Inner Thoughts|>:`` (plugin pass 1): when the question asks for an enabled command (it names the
  command, a word of its switch label, or, with one command enabled, "tool"), a thought and that command with
  arguments taken from the question; otherwise ``None`` thoughts and commands.
* ``<|Commands|>: Name("`` (a forced command, prefilled by ChatMoss): the arguments and ``")<eoc>``; after
  results in the turn, the arguments come from the results.
* ``<eor>\n<|Inner Thoughts|>:`` (another tool round of the turn): as pass 1, among the commands the turn has
  not run yet, so "search ... then calculate ..." runs Search, then Calculate.
* ``<|MOSS|>:``: when the turn has results, a reply that states them; otherwise a short reply that repeats
  the question.

Arguments, in order of preference: what the question writes inside ``Name(...)``, a quoted text, the numbers
(one per argument), a phrase after "in", "about", "for" or "named", a capitalised word inside the sentence,
and ``1`` when the question offers nothing (a forced call on "Hello!"). A command with several arguments gets
a JSON object; the arguments after the first get the whole question. The engine writes strings only:
converting ``"3"`` to the tool's integer is ChatMoss's work, and is tested that way.

Example::

    chat = ChatMoss(engine=RuleBasedEngine())
    chat.bind_tools([get_weather]).invoke("What is the weather in Paris?").tool_calls
    # [{"name": "get_weather", "args": {"location": "Paris"}, ...}]
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from moss_agent.engines.base import Delta, Generation, SamplingParams
from moss_agent.protocol import format as fmt
from moss_agent.settings import CONTEXT_WINDOW
from moss_agent.testing.engines import ScriptedEngine

__all__ = ["RuleBasedEngine"]

_SWITCH = re.compile(r"^- (?P<label>[^:\n]+): enabled\. API: (?P<api>\w+)\((?P<args>[^)\n]*)\)$", re.MULTILINE)
_HUMAN = re.compile(r"<\|Human\|>: (.*?)<eoh>", re.DOTALL)
_FORCED = re.compile(r'<\|Commands\|>: (\w+)\("$')
_RESULTS = re.compile(r"<\|Results\|>:(.*?)<eor>", re.DOTALL)
_RESULT_HEAD = re.compile(r'^\w+\(".*?"\) =>\s?', re.MULTILINE)
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"|「([^」]+)」")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_EXPRESSION = re.compile(r"[\d.(]+(?:\s*[-+*/^]\s*[\d.()]+)+")
_PHRASE = re.compile(r"\b(?:in|about|for|named)\s+([^?.!]+)")
_INNER_CAPITAL = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]+)")

# Words that ask for MOSS's own plugins, beside the words of their switch labels.
_HINTS = {
    "Search": ("search", "who is", "latest", "news"),
    "Calculate": ("calculate", "compute", "+", "*"),
    "Solve": ("solve", "equation", "="),
    "Text2Image": ("draw", "image", "picture", "paint"),
}


@dataclass(frozen=True)
class _Command:
    """An enabled command, as its switch line shows it."""

    label: str
    api: str
    args: tuple[str, ...]


def _commands(prompt: str) -> list[_Command]:
    return [
        _Command(m["label"], m["api"], tuple(a.strip() for a in m["args"].split(",") if a.strip()))
        for m in _SWITCH.finditer(prompt)
    ]


def _wanted(commands: Sequence[_Command], question: str, turn: str = "") -> _Command | None:
    """The command the question asks for, if any, among those the turn so far has not run."""
    lowered = question.lower()
    ran = set(re.findall(r"(\w+)\(", "".join(re.findall(r"<\|Commands\|>:(.*?)<eoc>", turn))))
    commands = [c for c in commands if c.api not in ran]
    for command in commands:
        words = [w for w in re.split(r"[\W_]+", command.label.lower()) if len(w) > 3 and w != "tool"]
        hints = _HINTS.get(command.api, ())
        if command.api.lower() in lowered or any(w in lowered for w in (*words, *hints)):
            return command
    return commands[0] if len(commands) == 1 and "tool" in lowered else None


def _string_value(command: _Command, question: str) -> str:
    literal = re.search(rf"\b{re.escape(command.api)}\((.*?)\)", question)
    if literal:
        return literal.group(1).strip().strip("'\"")
    math = command.api == "Calculate"
    for pattern in (_EXPRESSION, _QUOTED) if math else (_QUOTED,):
        found = pattern.search(question)
        if found:
            return next(g for g in (found.groups() or (found.group(0),)) if g).strip()
    for pattern in (_NUMBER, _PHRASE, _INNER_CAPITAL):
        found = pattern.search(question)
        if found:
            return next(g for g in (found.groups() or (found.group(0),)) if g).strip()
    return "1"


def _argument(command: _Command, question: str) -> str:
    """The one argument MOSS writes: a value, or a JSON object for several arguments."""
    if len(command.args) <= 1:
        return _string_value(command, question)
    numbers = _NUMBER.findall(question)
    if len(numbers) >= len(command.args):
        values: list[object] = [json.loads(n) for n in numbers]
    else:
        values = [_string_value(command, question), *[question.strip()] * len(command.args)]
    return json.dumps(dict(zip(command.args, values, strict=False)), ensure_ascii=False)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _results(turn: str) -> str | None:
    """The outputs in the turn's results segment, or None when there are none."""
    found = _RESULTS.search(turn)
    if not found or found.group(1).strip() in ("", fmt.NONE):
        return None
    lines = [line.strip().strip("'") for line in _RESULT_HEAD.sub("", found.group(1)).splitlines()]
    return "; ".join(line for line in lines if line)


class RuleBasedEngine(ScriptedEngine):
    """A :class:`~moss_agent.testing.engines.ScriptedEngine` whose outputs are written from each prompt.

    See the module docstring for the rules. Everything else is the scripted engine's: outputs are read token
    by token and stop at the stop tokens, stop strings and ``max_new_tokens``; ``calls`` records every prompt.

    Args:
        model_name: Name for response metadata.
        context_window: Prompt plus generated tokens allowed.
    """

    def __init__(self, *, model_name: str = "moss-rules", context_window: int = CONTEXT_WINDOW) -> None:
        super().__init__(model_name=model_name, context_window=context_window)
        self._answer_lock = threading.Lock()  # an answer is scripted and taken by the same call

    def answer(self, prompt: str) -> str:
        """The output for ``prompt`` (see the module docstring)."""
        humans = _HUMAN.findall(prompt)
        question = fmt.scrub(humans[-1]) if humans else ""
        commands = _commands(prompt)
        forced = _FORCED.search(prompt)
        turn = prompt[prompt.rfind(fmt.HUMAN) :]
        if forced:
            command = next((c for c in commands if c.api == forced.group(1)), _Command("", forced.group(1), ()))
            source = _results(turn[turn.rfind(fmt.RESULTS) :]) or question  # after results: answer from them
            return f'{_quote(_argument(command, source))}"){fmt.EOC}'
        if prompt.endswith(f"{fmt.THOUGHTS}:"):
            wanted = _wanted(commands, question, turn)
            if wanted is None:
                return f" None{fmt.EOT}\n{fmt.COMMANDS}: None{fmt.EOC}"
            thought = f"The user asks for {wanted.label.lower()}, I use {wanted.api}."
            written = f'{wanted.api}("{_quote(_argument(wanted, question))}")'
            return f" {thought}{fmt.EOT}\n{fmt.COMMANDS}: {written}{fmt.EOC}"
        results = _results(turn)
        if results is not None:
            return f" The result is: {results}{fmt.EOM}"
        return f' Hello! You said "{question}". How can I help you?{fmt.EOM}'

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Write the answer for ``prompt`` and replay it."""
        with self._answer_lock:
            self.add(self.answer(prompt))
            return super().generate(prompt, params)

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Write the answers for ``prompts`` and replay them."""
        with self._answer_lock:
            self.add(*(self.answer(p) for p in prompts))
            return super().generate_batch(prompts, params)

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Write the answer for ``prompt`` and replay it token by token."""
        with self._answer_lock:
            self.add(self.answer(prompt))
            deltas = super().stream(prompt, params)
            first = next(deltas)  # the scripted engine takes its output at the first delta
        yield first
        yield from deltas
