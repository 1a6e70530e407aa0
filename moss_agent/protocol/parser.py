"""Recorded MOSS text back into segments, and commands segments into commands. Pure string work.

* :func:`parse_conversation` reads a whole trained conversation back into a
  :class:`~moss_agent.protocol.format.MossConversation`, byte for byte (``parse_conversation(t).to_text() == t``).
* :func:`parse_commands` reads a commands segment; a malformed command becomes an :class:`InvalidCommand` whose
  ``error`` is written for the model to read and retry.

What the model generates is read by :mod:`moss_agent.protocol.stream`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from moss_agent.protocol import format as fmt
from moss_agent.protocol.format import Command, MossConversation, MossTurn

__all__ = ["InvalidCommand", "parse_commands", "parse_conversation"]

# ---------------------------------------------------------------- whole conversations

_KNOWN_TAG = re.compile(r"<\|(Human|Inner Thoughts|Commands|Results|MOSS)\|>:")


def parse_conversation(text: str) -> MossConversation:
    """Read a whole MOSS conversation (system text, then turns of segments).

    Each segment is read up to its own end token followed by a newline and the next role tag (or the end),
    so that a reply may contain another end token, as one sample of the data does. Hand-written text is
    tolerated: a missing end token ends the segment at the next role tag, and missing segments (e.g. turns of
    only ``<|Human|>`` and ``<|MOSS|>``) get their ``None`` forms.

    Args:
        text: The conversation text; everything before the first ``<|Human|>:`` is the system text.

    Returns:
        The conversation; ``to_text()`` gives ``text`` back for any well-formed conversation.
    """
    first = text.find(fmt.HUMAN + ":")
    if first < 0:
        return MossConversation(system=text, turns=[])
    conv = MossConversation(system=text[:first], turns=[])
    none_results = "\nNone\n" if conv.plugins_on else " None"
    current: dict[str, str] | None = None
    for role, content in _segments(text, first):
        if role == fmt.HUMAN or current is None:
            if current is not None:
                conv.turns.append(_turn(current, none_results))
            current = {}
        # A repeated segment in one turn (hand-written text) is joined rather than lost.
        current[role] = current[role] + "\n" + content if role in current else content
    if current is not None:
        conv.turns.append(_turn(current, none_results))
    return conv


def _segments(text: str, pos: int) -> Iterator[tuple[str, str]]:
    while pos < len(text):
        tag = _KNOWN_TAG.search(text, pos)
        if tag is None:
            return
        role = f"<|{tag.group(1)}|>"
        start = tag.end()
        if role != fmt.RESULTS and text.startswith(" ", start):
            start += 1
        end, pos = _segment_end(text, start, fmt.SEGMENT_END[role])
        yield role, text[start:end]


def _segment_end(text: str, start: int, end_token: str) -> tuple[int, int]:
    """Where a segment's content ends, and where the next segment starts."""
    at = text.find(end_token, start)
    while at >= 0:
        after = at + len(end_token)
        if text.startswith("\n", after):
            after += 1
        if after == len(text) or _KNOWN_TAG.match(text, after):
            return at, after
        at = text.find(end_token, at + 1)
    # No proper end: the content runs to the next role tag, less a trailing end token and whitespace.
    tag = _KNOWN_TAG.search(text, start)
    stop = tag.start() if tag else len(text)
    content = text[start:stop].rstrip()
    for token in fmt.END_TOKENS:
        content = content.removesuffix(token)
    return start + len(content), stop


def _turn(parts: dict[str, str], none_results: str) -> MossTurn:
    return MossTurn(
        human=parts.get(fmt.HUMAN, ""),
        reply=parts.get(fmt.MOSS, ""),
        inner_thoughts=parts.get(fmt.THOUGHTS, fmt.NONE),
        commands=parts.get(fmt.COMMANDS, fmt.NONE),
        results=parts.get(fmt.RESULTS, none_results),
    )


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class InvalidCommand:
    """A piece of a commands segment that is not a well-formed command.

    Attributes:
        text: The offending text, as written.
        error: What is wrong and how to write it, addressed to the model.
    """

    text: str
    error: str


_CALL_HEAD = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)[ \t]*\(")
_SEPARATORS = re.compile(r"(?:[\s,;]+|#[^\n]*|(?<![^\s,;])(?:\d{1,2}[.)、]|[-*•])(?=\s))+")
_NONE_WORD = re.compile(r"[Nn]one\b\.?")
_NEXT_ITEM = re.compile(r"[,;\n][\s,;]*(?:(?:\d{1,2}[.)、]|[-*•])\s+)?(?=[A-Za-z_][A-Za-z0-9_.]*[ \t]*\(|None\b)")
_QUOTES = {'"': '"', "'": "'", "“": "”"}
_FORM = 'write each command as Name("argument"), separated by ", "'


def parse_commands(text: str) -> tuple[list[Command], list[InvalidCommand]]:
    """Read the content of a commands segment.

    Accepts what MOSS writes and what the sample data holds: ``Name("arg")`` items separated by commas,
    semicolons or newlines, numbered lists with ``# comments``, trailing commas, ``None`` (also ``None.``,
    ``None (...)`` or ``None`` followed by free text), escaped quotes and any text inside the quotes.
    Unknown command names are still commands (the caller checks them against the plugin table).

    Args:
        text: The segment content, e.g. ``Search("a"), Calculate("1+1")``.

    Returns:
        The well-formed commands in order, and the malformed pieces. Never raises.
    """
    body = text.strip()
    if _NONE_WORD.match(body):
        return [], []  # "None", "None.", "None (...)" or "None" and free text: no command
    commands: list[Command] = []
    invalid: list[InvalidCommand] = []
    pos = 0
    while True:
        skip = _SEPARATORS.match(body, pos)
        pos = skip.end() if skip else pos
        if pos >= len(body):
            return commands, invalid
        none = _NONE_WORD.match(body, pos)
        if none:
            pos = none.end()
            continue
        head = _CALL_HEAD.match(body, pos)
        if head is None:
            end = _next_item(body, pos)
            invalid.append(InvalidCommand(body[pos:end].strip(" \t\n,;"), f"not a command: {_FORM}"))
            pos = end
            continue
        pos = _read_call(body, pos, head, commands, invalid)


def _next_item(body: str, pos: int) -> int:
    found = _NEXT_ITEM.search(body, pos + 1)
    return found.start() if found else len(body)


def _read_call(body: str, pos: int, head: re.Match[str], commands: list[Command], bad: list[InvalidCommand]) -> int:
    """Read one ``Name(...)`` at ``pos`` into ``commands`` or ``bad``; return where to go on."""
    name, at = head.group(1), _skip_blanks(body, head.end())
    if at < len(body) and body[at] in _QUOTES:
        arg, at, error = _read_string(body, at)
        at = _skip_blanks(body, at)
        extras: list[str] = []
        while error is None and body.startswith(",", at) and _skip_blanks(body, at + 1) < len(body):
            nxt = _skip_blanks(body, at + 1)
            if body[nxt] not in _QUOTES:
                break
            _, after, error = _read_string(body, nxt)
            extras.append(body[nxt:after])
            at = _skip_blanks(body, after)
        if error is None and body.startswith(")", at):
            commands.append(Command(name, arg))
            if extras:
                bad.append(InvalidCommand(", ".join(extras), f"{name} takes one argument; extra ignored"))
            return at + 1
        error = error or f"expected ')' after the argument of {name}; escape quotes inside it as \\\""
    else:
        close = _matching_paren(body, head.end())
        if close is not None and body[head.end() : close].strip():
            # Unquoted argument, e.g. Calculate(2+3): read up to the matching parenthesis.
            commands.append(Command(name, body[head.end() : close].strip()))
            return close + 1
        error = f'{name} needs one quoted argument: {name}("...")'
    end = _next_item(body, pos)
    bad.append(InvalidCommand(body[pos:end].strip(" \t\n,;"), error))
    return end


def _skip_blanks(body: str, at: int) -> int:
    while at < len(body) and body[at] in " \t":
        at += 1
    return at


def _read_string(body: str, at: int) -> tuple[str, int, str | None]:
    """Read a quoted string at ``at``: (value, index after the closing quote, error or None)."""
    close = _QUOTES[body[at]]
    out: list[str] = []
    i = at + 1
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] in (close, "\\"):
            out.append(body[i + 1])
            i += 2
            continue
        if ch == close:
            return "".join(out), i + 1, None
        out.append(ch)
        i += 1
    return "".join(out), len(body), "unclosed quote: close the argument with a quote and a ')'"


def _matching_paren(body: str, start: int) -> int | None:
    depth = 1
    for i in range(start, len(body)):
        if body[i] == "(":
            depth += 1
        elif body[i] == ")":
            depth -= 1
            if depth == 0:
                return i
        elif body[i] == "\n":
            return None
    return None
