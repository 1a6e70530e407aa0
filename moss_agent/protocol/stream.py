"""What MOSS generated, read back into thoughts, commands and reply; tolerant and streaming-safe.

* :func:`parse_pass1` and :func:`parse_reply` read what the model generated after a pass-1 prompt (ending in
  ``<|Inner Thoughts|>:``) or a reply prompt (ending in ``<|MOSS|>:``). They never raise: wrong or missing end
  tokens are repaired as the production backend did (any ``<eo?>`` closes a segment), invented role tags
  (``<|Machine|>:``) cut the text, and what went wrong is listed in ``repairs``.
* :class:`StreamParser` does the same incrementally and never emits part of an end token or role tag.

Pure string work (never imports torch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from moss_agent.protocol import format as fmt
from moss_agent.protocol.format import Command
from moss_agent.protocol.parser import InvalidCommand, parse_commands

__all__ = ["Pass1", "Reply", "StreamEvent", "StreamParser", "parse_pass1", "parse_reply"]

# ---------------------------------------------------------------- generated text: the shared scanner

Mode = Literal["pass1", "reply"]
Section = Literal["thoughts", "commands", "reply"]

_END = r"<eo[a-z]>|<\|endoftext\|>"
_TAG = r"<\|([A-Za-z][A-Za-z ]{0,30})\|>:"
_TERMINATOR = re.compile(f"{_END}|{_TAG}")
_ROLE_TAG = re.compile(_TAG)
# A suffix that may still grow into a terminator: "<", "<eo", "<|MOS", "<|MOSS|>" ...
_PARTIAL = re.compile(r"<(?:e(?:o[a-z]?)?|\|(?:[A-Za-z][A-Za-z ]{0,30}(?:\|>?)?)?)?\Z")
_OWN_TAG = {"thoughts": "Inner Thoughts", "commands": "Commands", "reply": "MOSS"}
_OWN_END = {"thoughts": fmt.EOT, "commands": fmt.EOC, "reply": fmt.EOM}


@dataclass
class _Part:
    role: Section
    content: str
    closed: bool


@dataclass
class _Scan:
    parts: list[_Part] = field(default_factory=list)
    settled: bool = False  # nothing after the last part can be content any more
    repairs: list[str] = field(default_factory=list)

    def get(self, role: Section) -> _Part | None:
        return next((p for p in self.parts if p.role == role), None)


def _held_back(text: str) -> int:
    """Where a trailing partial terminator starts (``len(text)`` when there is none)."""
    at = text.rfind("<")
    return at if at >= 0 and _PARTIAL.match(text, at) else len(text)


def _scan(text: str, mode: Mode, final: bool) -> _Scan:
    """Split generated text into sections; with ``final=False`` hold back what more text could change."""
    scan = _Scan()
    role: Section | None = "reply" if mode == "reply" else "thoughts"
    pos, restarted = 0, False
    while role is not None:
        term = _TERMINATOR.search(text, pos)
        if term is None:
            content = text[pos:] if final else text[pos : _held_back(text)]
            scan.parts.append(_Part(role, content, closed=False))
            scan.settled = final
            return scan
        tag = term.group(1)
        if tag == _OWN_TAG[role] and not restarted and not text[pos : term.start()].strip():
            pos, restarted = term.end(), True  # the model repeated the tag the prompt ended with
            continue
        scan.parts.append(_Part(role, text[pos : term.start()], closed=True))
        role, pos = _next_section(text, term, role, mode, final, scan)
    return scan


def _next_section(
    text: str, term: re.Match[str], role: Section, mode: Mode, final: bool, scan: _Scan
) -> tuple[Section | None, int]:
    tag, pos = term.group(1), term.end()
    if tag is None:
        if term.group(0) != _OWN_END[role]:
            scan.repairs.append(f"{role} ended with {term.group(0)} instead of {_OWN_END[role]}")
        pos = len(text) - len(text[pos:].lstrip())
        found = _ROLE_TAG.match(text, pos)
        if found is None:
            if pos == len(text) or (not final and _PARTIAL.match(text, pos)):
                scan.settled = final or role == "reply"  # only a reply can close the text for good
                return None, pos
            if role == "thoughts":
                scan.repairs.append("commands written without the <|Commands|> tag")
                return "commands", pos
            scan.repairs.append(f"text after the {role} ignored")
            scan.settled = True
            return None, pos
        tag, pos = found.group(1), found.end()
    else:
        scan.repairs.append(f"{role} not closed by {_OWN_END[role]}")
    if role == "thoughts" and tag == "Commands":
        return "commands", pos
    if mode == "pass1" and role != "reply" and tag == "MOSS":
        scan.repairs.append("went straight to the reply")
        return "reply", pos
    scan.repairs.append(f"cut at <|{tag}|>:")
    scan.settled = True
    return None, pos


# ---------------------------------------------------------------- generated text: results


@dataclass(frozen=True)
class Pass1:
    r"""What the model generated in plugin pass 1, repaired.

    Attributes:
        inner_thoughts: The inner thoughts, stripped; ``"None"`` when there are none.
        commands_text: The commands segment content to record, in canonical form: the well-formed commands
            joined by ``", "``, or ``"None"``.
        raw_commands: The commands segment content as the model wrote it (stripped; ``""`` if absent).
        commands: The well-formed commands, unknown names included.
        invalid: The malformed pieces.
        reply: A reply the model wrote in pass 1 (skipping the results), else None.
        truncated: The generation hit its length limit.
        repairs: What was repaired, for logs.
        repaired: The canonical continuation of the pass-1 prompt:
            ``" {inner_thoughts}<eot>\n<|Commands|>: {commands_text}<eoc>\n"``.
    """

    inner_thoughts: str
    commands_text: str
    raw_commands: str
    commands: tuple[Command, ...]
    invalid: tuple[InvalidCommand, ...]
    reply: str | None = None
    truncated: bool = False
    repairs: tuple[str, ...] = ()

    @property
    def repaired(self) -> str:
        r"""The canonical text that continues the pass-1 prompt, up to and including ``<eoc>\n``."""
        return f" {self.inner_thoughts}{fmt.EOT}\n" + fmt.segment(fmt.COMMANDS, self.commands_text)


@dataclass(frozen=True)
class Reply:
    """A reply (plugin pass 2 or plain chat), repaired.

    Attributes:
        text: The reply, stripped, without end token or anything after an invented role tag.
        truncated: The generation hit its length limit.
        repairs: What was repaired, for logs.
    """

    text: str
    truncated: bool = False
    repairs: tuple[str, ...] = ()


def parse_pass1(generated: str, stop_reason: str | None = None) -> Pass1:
    r"""Read the text generated after a pass-1 prompt (which ends with ``<|Inner Thoughts|>:``).

    Args:
        generated: The continuation, usually `` thoughts<eot>\n<|Commands|>: Search("q")``, with or
            without its final ``<eoc>``.
        stop_reason: Why generation stopped; ``"length"`` marks the result truncated.

    Returns:
        The repaired pass-1 result. Never raises.
    """
    return _pass1_from(_scan(generated, "pass1", final=True), stop_reason)


def parse_reply(generated: str, stop_reason: str | None = None) -> Reply:
    r"""Read a reply generated after a prompt ending with ``<|MOSS|>:``.

    Args:
        generated: The continuation, e.g. `` Hello!<eom>`` or `` Hello!\n<|Human|>: ...`` (cut there).
        stop_reason: Why generation stopped; ``"length"`` marks the reply truncated.

    Returns:
        The repaired reply. Never raises.
    """
    return _reply_from(_scan(generated, "reply", final=True), stop_reason)


def _pass1_from(scan: _Scan, stop_reason: str | None) -> Pass1:
    thoughts = scan.get("thoughts")
    section = scan.get("commands")
    reply = scan.get("reply")
    raw = section.content.strip() if section else ""
    commands, invalid = parse_commands(raw)
    repairs = list(scan.repairs)
    if raw and raw != fmt.commands_text(commands):
        repairs.append("commands rewritten in canonical form")
    return Pass1(
        inner_thoughts=(thoughts.content.strip() if thoughts else "") or fmt.NONE,
        commands_text=fmt.commands_text(commands),
        raw_commands=raw,
        commands=tuple(commands),
        invalid=tuple(invalid),
        reply=reply.content.strip() if reply else None,
        truncated=stop_reason == "length",
        repairs=tuple(repairs),
    )


def _reply_from(scan: _Scan, stop_reason: str | None) -> Reply:
    part = scan.get("reply")
    return Reply(part.content.strip() if part else "", stop_reason == "length", tuple(scan.repairs))


# ---------------------------------------------------------------- streaming


@dataclass(frozen=True)
class StreamEvent:
    """One event of :class:`StreamParser`.

    Attributes:
        kind: ``"thoughts"`` or ``"reply"`` (a piece of text), or ``"commands"`` (the commands segment is
            complete; emitted once per pass 1, with no commands when the model wrote none).
        text: The new text; for ``"commands"``, the canonical commands segment content.
        commands: For ``"commands"``: the well-formed commands.
        invalid: For ``"commands"``: the malformed pieces.
    """

    kind: Section
    text: str = ""
    commands: tuple[Command, ...] = ()
    invalid: tuple[InvalidCommand, ...] = ()


class StreamParser:
    """Incremental :func:`parse_pass1` / :func:`parse_reply` over streamed text deltas.

    Text events never contain part of an end token or role tag: a suffix that could still become one is
    held back until the next delta decides. Whatever the split of the input, the concatenated text events
    equal the non-streaming result (the thoughts of :func:`parse_pass1` before their ``"None"`` fill-in).

    Example:
        >>> p = StreamParser("reply")
        >>> [e.text for e in p.feed(" Hi<e")], [e.text for e in p.feed("om>")], p.done
        (['Hi'], [], True)
    """

    def __init__(self, mode: Mode = "reply") -> None:
        """Start a parser.

        Args:
            mode: ``"pass1"`` for text after ``<|Inner Thoughts|>:``, ``"reply"`` for text after
                ``<|MOSS|>:``.
        """
        if mode not in ("pass1", "reply"):
            raise ValueError(f"mode must be 'pass1' or 'reply', not {mode!r}")
        self.mode: Mode = mode
        self.text = ""
        self._sent: dict[Section, str] = {"thoughts": "", "reply": ""}
        self._commands_sent = False
        self._done = False
        self._pass1: Pass1 | None = None
        self._reply: Reply | None = None

    @property
    def done(self) -> bool:
        """Whether the text so far is complete: more text would be ignored (generation may stop)."""
        return self._done

    @property
    def pass1(self) -> Pass1 | None:
        """The pass-1 result, after :meth:`finish` in ``pass1`` mode."""
        return self._pass1

    @property
    def reply(self) -> Reply | None:
        """The reply, after :meth:`finish` in ``reply`` mode."""
        return self._reply

    def feed(self, delta: str) -> list[StreamEvent]:
        """Add generated text; return the events it completes."""
        self.text += delta
        return self._events(_scan(self.text, self.mode, final=False), final=False)

    def finish(self, stop_reason: str | None = None) -> list[StreamEvent]:
        """End the stream: flush held-back text and set :attr:`pass1` or :attr:`reply`."""
        scan = _scan(self.text, self.mode, final=True)
        events = self._events(scan, final=True)
        if self.mode == "pass1":
            self._pass1 = _pass1_from(scan, stop_reason)
        else:
            self._reply = _reply_from(scan, stop_reason)
        return events

    def _events(self, scan: _Scan, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self._done = scan.settled
        for part in scan.parts:
            if part.role == "commands":
                if part.closed or final:
                    events.extend(self._commands_event(part.content))
                continue
            if part.role == "reply":
                events.extend(self._commands_event(""))  # a reply in pass 1 means no (more) commands
            stable = part.content.strip()  # open parts come without their held-back suffix
            sent = self._sent[part.role]
            if len(stable) > len(sent) and stable.startswith(sent):
                events.append(StreamEvent(part.role, stable[len(sent) :]))
                self._sent[part.role] = stable
        if final:
            events.extend(self._commands_event(""))
        return events

    def _commands_event(self, content: str) -> list[StreamEvent]:
        if self.mode != "pass1" or self._commands_sent:
            return []
        self._commands_sent = True
        commands, invalid = parse_commands(content)
        return [StreamEvent("commands", fmt.commands_text(commands), tuple(commands), tuple(invalid))]
