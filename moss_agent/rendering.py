r"""A conversation in progress as MOSS prompt parts: finished turns, the pending turn, and its tool rounds.

The prompt of each pass is built here (see :class:`RenderedChat`). Several tool rounds in one turn are
rendered two ways:

* to let MOSS decide on another round, each round keeps its own segments and the inner thoughts open again
  after the last results (``...<|Results|>: ...<eor>\n<|Inner Thoughts|>:``). Each segment is one MOSS was
  trained on; only their repetition inside a turn is new, and it is the one place where MOSS can read the
  results and still write a command;
* for the reply, and for the turn once it is history, the rounds are merged into the one commands segment and
  one results segment the trained data uses for several commands (``Search("a"), Calculate("b")``), so the
  reply and every later turn see the exact trained layout.

Why: in the plugin data (386 conversations, 746 turns) every turn has exactly one commands and one results
segment, and 105 turns run several commands in that one segment; ``<eor>`` is always followed by ``<|MOSS|>:``.
So no trained text lets MOSS act on a result within its turn; the nearest is the next turn's pass 1, which
starts at the inner thoughts. Re-opening them after the results keeps every segment trained, keeps the prompt a
prefix of what came before (the KV cache serves it), and invents no human text. A command MOSS already ran in
the turn ends the rounds (it has those results), as does ``max_tool_rounds``.

With ``truncate="left"`` whole oldest turns are dropped until a prompt fits (:meth:`RenderedChat.fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from langchain_core.messages import BaseMessage

from moss_agent.faces import MossRequestError
from moss_agent.messages import _build_turn, _group, round_segments
from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins
from moss_agent.protocol.format import MossTurn
from moss_agent.tool_binding import BoundTool, command_for_tool_call

__all__ = ["PendingTurn", "RenderedChat", "UnsupportedContentError", "check_content", "render_messages", "system_text"]

_NOT_TEXT = {"image", "image_url", "input_image", "file", "audio", "input_audio", "video", "document"}


class UnsupportedContentError(MossRequestError):
    """A message carries content MOSS cannot read (images, audio, files): MOSS reads text only."""


def check_content(messages: Sequence[BaseMessage]) -> None:
    """Refuse messages with image, audio, video or file blocks rather than silently dropping them.

    Raises:
        UnsupportedContentError: Naming the message and the block type.
    """
    for index, message in enumerate(messages):
        if isinstance(message.content, str):
            continue
        for block in message.content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in _NOT_TEXT:
                raise UnsupportedContentError(
                    f"message {index} ({type(message).__name__}) has a {kind!r} block: MOSS has no vision or "
                    "audio and reads text only; describe the content in text instead"
                )


def system_text(
    custom: str | None,
    tools: Sequence[BoundTool],
    *,
    style: fmt.SwitchStyle = "trained",
) -> str:
    """The system text: meta instruction (with any custom instructions) and the switch block.

    Args:
        custom: Text of the caller's SystemMessage. A full MOSS system text (starting with the meta instruction)
            is used as it is; other text is added as further lines of the meta instruction, before its
            capabilities line.
        tools: Bound tools: MOSS plugins switch on their trained lines, others get lines of the same shape.
        style: The switch block style.
    """
    if custom and custom.startswith(fmt.META_INSTRUCTION.split("\n", 1)[0]):
        return custom if custom.endswith("\n") else custom + "\n"
    meta = fmt.META_INSTRUCTION
    if custom:
        head, capabilities = meta.rsplit("Capabilities", 1)
        lines = "".join(line.rstrip() + "\n" for line in custom.strip().splitlines() if line.strip())
        meta = head + lines + "Capabilities" + capabilities
    trained = [t.plugin for t in tools if t.plugin.trained]
    extra = [t.plugin for t in tools if not t.plugin.trained]
    return meta + fmt.switch_block(trained, style=style, extra=extra)


@dataclass
class PendingTurn:
    """The open turn the model answers next.

    Attributes:
        human: The user's text, scrubbed.
        inner_thoughts: Inner thoughts of the tool-calling AIMessages, if any (rounds joined by newlines).
        commands: The commands segment content, if tools were called (all rounds, as one segment).
        results: The raw results body, once the tools have answered (all rounds, as one body).
        rounds: Each tool round's own thoughts, commands and results (``results`` None while unanswered).
    """

    human: str
    inner_thoughts: str | None = None
    commands: str | None = None
    results: str | None = None
    rounds: list[MossTurn] = field(default_factory=list)

    def reply_prefix(self) -> str:
        """The turn up to ``<|MOSS|>:`` with its rounds merged: the trained layout of a turn with commands."""
        return (
            fmt.segment(fmt.HUMAN, self.human)
            + fmt.segment(fmt.THOUGHTS, self.inner_thoughts or fmt.NONE)
            + fmt.segment(fmt.COMMANDS, self.commands or fmt.NONE)
            + fmt.segment(fmt.RESULTS, self.results or "\nNone\n")
            + fmt.MOSS
            + ":"
        )

    def next_round_prefix(self) -> str:
        """The turn with each answered round in its own segments, the inner thoughts open for another round."""
        text = fmt.segment(fmt.HUMAN, self.human)
        for part in self.rounds:
            text += fmt.segment(fmt.THOUGHTS, part.inner_thoughts) + fmt.segment(fmt.COMMANDS, part.commands)
            text += fmt.segment(fmt.RESULTS, part.results)
        return text + fmt.THOUGHTS + ":"

    def done_commands(self) -> set[str]:
        """The commands already run in this turn, as written (``Search("x")``)."""
        done: set[str] = set()
        for part in self.rounds:
            done.update(c.strip() for c in _split_commands(part.commands))
        return done


def _split_commands(commands: str) -> list[str]:
    from moss_agent.protocol.parser import parse_commands

    found, _ = parse_commands(commands)
    return [str(c) for c in found]


@dataclass
class RenderedChat:
    """Messages rendered for MOSS: the finished turns and the pending one.

    Attributes:
        system: Meta instruction and switch block.
        turns: Finished turns.
        pending: The open turn, or None when the last message is a reply.
        dropped: Oldest turns left out by :meth:`fit`.
    """

    system: str
    turns: list[MossTurn] = field(default_factory=list)
    pending: PendingTurn | None = None
    dropped: int = 0

    @property
    def history(self) -> str:
        """System text and finished turns."""
        return self.system + "".join(t.to_text() for t in self.turns)

    def fit(self, prompt: str, fits: Callable[[str], bool]) -> str:
        """``prompt`` (which starts with :attr:`history`) without its oldest whole turns until ``fits`` holds.

        The system text and the pending turn always stay; when the prompt still does not fit, it is returned as
        it is and the engine reports the overflow.
        """
        while self.turns and not fits(prompt):
            head = self.system + self.turns[0].to_text()
            if not prompt.startswith(head):
                break
            prompt = self.system + prompt[len(head) :]
            self.turns.pop(0)
            self.dropped += 1
        return prompt


def render_messages(
    messages: Sequence[BaseMessage],
    tools: Sequence[BoundTool] = (),
    *,
    style: fmt.SwitchStyle = "trained",
    scrub_untrusted: bool = True,
) -> RenderedChat:
    """Group the messages of a conversation in progress into MOSS turns and the pending one.

    Args:
        messages: The conversation; SystemMessages anywhere give the system text.
        tools: The bound tools (decide the switch block and the command names of tool calls).
        style: The switch block style when no full MOSS system text is given.
        scrub_untrusted: Neutralise end tokens and role tags in human text and tool outputs.

    Raises:
        ValueError: On an empty message list, or a message MOSS has no place for.
        UnsupportedContentError: On image, audio or file content.
    """
    if not messages:
        raise MossRequestError("MOSS needs at least one message")
    check_content(messages)
    systems, _, turns = _group(messages, scrub_untrusted, lambda call: command_for_tool_call(call, tools))
    system = system_text("\n".join(systems) or None, tools, style=style)
    plugins_on = _plugins.INNER_THOUGHTS.switch_line(True) in system
    rendered = RenderedChat(system)
    if turns and not turns[-1].reply:
        last = turns.pop()
        answered = last.raw_results is not None or bool(last.outputs)
        built = _build_turn(last, plugins_on)
        rendered.pending = PendingTurn(
            human=built.human,
            inner_thoughts=built.inner_thoughts if last.thoughts else None,
            commands=built.commands if last.calls or last.raw_commands is not None else None,
            results=built.results if answered else None,
            rounds=round_segments(last, plugins_on) if answered else [],
        )
    rendered.turns = [_build_turn(t, plugins_on) for t in turns]
    return rendered
