r"""Training data for fine-tuning: the three inputs read into one shape, malformed ones reported.

Every source becomes a list of :class:`Sample`: a meta instruction and turns, each turn the exact segment texts
in the release's order (``Human``, ``Inner Thoughts``, ``Commands``, ``Tool Responses``, ``MOSS``). Sources:

- SFT conversation JSON files (the ``moss_data`` format), one conversation per file, or folders of them;
- JSONL in the release's finetune format (``num_turns``, ``meta_instruction``, ``chat`` per line);
- JSON dumps of LangChain message lists (``messages_to_dict`` output: ``[{"type": "human", "data": {...}}, ...]``,
  a list of such lists, or ``{"messages": [...]}``), converted with :func:`moss_agent.messages.from_messages`.

A conversation that breaks the format (a missing segment, a segment without its role tag or end token, a
``num_turns`` that does not match) is reported as a :class:`Problem` naming the file and the turn, and skipped;
``strict=True`` raises :class:`MalformedDataError` instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moss_agent.protocol import format as fmt

__all__ = [
    "SEGMENTS",
    "MalformedDataError",
    "Problem",
    "Sample",
    "load_samples",
    "sample_from_conversation",
    "write_jsonl",
]

SEGMENTS: dict[str, tuple[str, str]] = {
    "Human": (fmt.HUMAN + ": ", fmt.EOH + "\n"),
    "Inner Thoughts": (fmt.THOUGHTS + ": ", fmt.EOT + "\n"),
    "Commands": (fmt.COMMANDS + ": ", fmt.EOC + "\n"),
    "Tool Responses": (fmt.RESULTS + ":", fmt.EOR + "\n"),
    "MOSS": (fmt.MOSS + ": ", fmt.EOM + "\n"),
}
"""The release's segment keys, in order, with the text each segment starts and ends with."""


class MalformedDataError(ValueError):
    """A conversation breaks the MOSS format (raised under ``strict``, or when nothing usable is left)."""


@dataclass(frozen=True)
class Problem:
    """One malformed conversation: where it is and what is wrong.

    Attributes:
        source: ``file`` or ``file:line``.
        turn: The 1-based turn, or None when the problem is not in one turn.
        reason: What is wrong.
    """

    source: str
    turn: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}, turn {self.turn}" if self.turn else self.source
        return f"{where}: {self.reason}"


@dataclass
class Sample:
    """One training conversation as the release reads it.

    Attributes:
        meta_instruction: The system text (meta instruction plus switch block).
        turns: Per turn, ``(segment key, exact text)`` pairs in order.
        source: Where it came from, for messages.
    """

    meta_instruction: str
    turns: list[list[tuple[str, str]]] = field(default_factory=list)
    source: str = ""

    def to_text(self) -> str:
        """The whole trained text."""
        return self.meta_instruction + "".join(text for turn in self.turns for _, text in turn)


class _Bad(Exception):
    def __init__(self, turn: int | None, reason: str) -> None:
        super().__init__(reason)
        self.turn, self.reason = turn, reason


def _check_turn(number: int, turn: Any) -> list[tuple[str, str]]:
    if not isinstance(turn, Mapping):
        raise _Bad(number, f"expected an object of segments, got {type(turn).__name__}")
    unknown = [k for k in turn if k not in SEGMENTS]
    if unknown:
        raise _Bad(number, f"unknown segment {unknown[0]!r}; expected {', '.join(SEGMENTS)}")
    missing = [k for k in SEGMENTS if k not in turn]
    if missing:
        raise _Bad(number, f"lacks the {missing[0]!r} segment")
    segments = []
    for key, (head, tail) in SEGMENTS.items():
        text = turn[key]
        if not isinstance(text, str):
            raise _Bad(number, f"{key!r} is {type(text).__name__}, not text")
        if not text.startswith(head.rstrip(" ")) or not text.endswith(tail):
            raise _Bad(number, f"{key!r} segment must start with {head.strip()!r} and end with {tail!r}: {text[:60]!r}")
        segments.append((key, text))
    return segments


def _sample(record: Any, source: str) -> Sample:
    """A release-format record (``meta_instruction``, ``chat``, optional ``num_turns``) -> Sample."""
    if not isinstance(record, Mapping) or "chat" not in record or "meta_instruction" not in record:
        raise _Bad(None, "not a MOSS conversation (expected 'meta_instruction' and 'chat')")
    meta, chat = record["meta_instruction"], record["chat"]
    if not isinstance(meta, str) or not meta:
        raise _Bad(None, "'meta_instruction' must be non-empty text")
    if not isinstance(chat, Mapping) or not chat:
        raise _Bad(None, "'chat' must be a non-empty object of turns")
    num_turns = record.get("num_turns", len(chat))
    try:
        num_turns = int(num_turns)
    except (TypeError, ValueError):
        raise _Bad(None, f"'num_turns' is {num_turns!r}, not a number") from None
    if num_turns < 1:
        raise _Bad(None, f"'num_turns' is {num_turns}")
    turns = []
    for i in range(1, num_turns + 1):  # the release reads turn_1 .. turn_{num_turns}
        if f"turn_{i}" not in chat:
            raise _Bad(i, f"'num_turns' is {num_turns} but 'turn_{i}' is missing")
        turns.append(_check_turn(i, chat[f"turn_{i}"]))
    return Sample(meta, turns, source)


def sample_from_conversation(conv: fmt.MossConversation, source: str = "") -> Sample:
    """A :class:`~moss_agent.protocol.format.MossConversation` as a training sample."""
    turns = []
    for turn in conv.turns:
        values = (turn.human, turn.inner_thoughts, turn.commands, turn.results, turn.reply)
        roles = (fmt.HUMAN, fmt.THOUGHTS, fmt.COMMANDS, fmt.RESULTS, fmt.MOSS)
        turns.append([(k, fmt.segment(r, v)) for k, r, v in zip(SEGMENTS, roles, values, strict=True)])
    return Sample(conv.system, turns, source)


def _from_langchain(items: Sequence[Any], source: str) -> Sample:
    from langchain_core.messages import messages_from_dict

    from moss_agent.messages import from_messages

    try:
        messages = messages_from_dict(list(items))
    except (KeyError, TypeError, ValueError) as err:
        raise _Bad(None, f"not a LangChain message list ({err})") from None
    try:
        conv = from_messages(messages, scrub_untrusted=False)
    except ValueError as err:
        raise _Bad(None, str(err)) from None
    if not conv.turns:
        raise _Bad(None, "the message list has no human turn")
    sample = sample_from_conversation(conv, source)
    for number, turn in enumerate(sample.turns, 1):
        _check_turn(number, dict(turn))
    return sample


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) and "type" in m for m in value)


def _read_json(path: Path) -> Iterable[tuple[str, Any]]:
    """(source, record-or-message-list) pairs of one ``.json`` file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, Mapping) and "messages" in data and "chat" not in data:
        data = data["messages"]
    if isinstance(data, list) and data and all(_is_messages(x) for x in data):
        return [(f"{path}[{i}]", x) for i, x in enumerate(data)]
    return [(str(path), data)]


def _records(path: Path) -> Iterable[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except ValueError as err:
                    yield f"{path}:{number}", _Bad(None, f"invalid JSON ({err})")
        return
    try:
        yield from _read_json(path)
    except ValueError as err:
        yield str(path), _Bad(None, f"invalid JSON ({err})")


def _files(source: str | Path) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no .json or .jsonl files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"no training data at {path}")
    return [path]


def load_samples(
    sources: str | Path | Sequence[str | Path], *, strict: bool = False
) -> tuple[list[Sample], list[Problem]]:
    """Read every conversation of ``sources`` (files or folders, searched recursively).

    Args:
        sources: Paths of ``.json`` / ``.jsonl`` files or folders.
        strict: Raise on the first malformed conversation instead of skipping it.

    Returns:
        The samples, and the problems of the skipped conversations.

    Raises:
        FileNotFoundError: A path that does not exist or a folder without data files.
        MalformedDataError: Under ``strict``, on the first malformed conversation.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    samples: list[Sample] = []
    problems: list[Problem] = []
    for source in sources:
        for file in _files(source):
            for where, record in _records(file):
                try:
                    if isinstance(record, _Bad):
                        raise record
                    samples.append(_from_langchain(record, where) if _is_messages(record) else _sample(record, where))
                except _Bad as bad:
                    problem = Problem(where, bad.turn, bad.reason)
                    if strict:
                        raise MalformedDataError(f"{problem} (drop --strict to skip such conversations)") from None
                    problems.append(problem)
    return samples, problems


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples in the release's finetune JSONL format (``num_turns``, ``meta_instruction``, ``chat``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for number, sample in enumerate(samples, 1):
            chat = {f"turn_{i}": dict(turn) for i, turn in enumerate(sample.turns, 1)}
            record = {"conversation_id": number, "meta_instruction": sample.meta_instruction,
                      "num_turns": len(chat), "chat": chat}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
