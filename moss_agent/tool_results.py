r"""Tool outputs as MOSS's results segment, and back: the one place where results are written and split."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins
from moss_agent.protocol.format import Command

__all__ = ["HIT_LINE", "results_from_outputs", "scrub_output", "split_results"]

HIT_LINE = re.compile(r"^<\|\d+\|>: ", re.MULTILINE)
_LETTER_TAG = re.compile(r"<\|([A-Za-z][^|<>\n]{0,39})\|>")


def scrub_output(text: str) -> str:
    """Scrub a tool output but keep the ``<|N|>`` hit numbers of search results."""
    return _LETTER_TAG.sub(r"<\1>", fmt.END_TOKEN_RE.sub(" ", text))


def _quoted(value: str) -> bool:
    """Whether ``value`` is already a string written as Python's repr writes it."""
    try:
        parsed = ast.literal_eval(value) if value[:1] in ("'", '"') else None
    except (ValueError, SyntaxError):
        return False
    return isinstance(parsed, str) and repr(parsed) == value


def results_from_outputs(
    calls: Sequence[tuple[Command, str]], *, scrub_untrusted: bool = True, first_hit: int = 1
) -> str:
    r"""The raw results body for commands and their tool outputs, as the data writes it.

    Entries follow the release's execution order (Search, Calculate, Solve, Text2Image, then others); Search
    hits are numbered on across the turn; a plain-text search output becomes one quoted hit; a Calculate
    value is quoted; a lone successful Text2Image gives the bare ``Image generated successfully.``.

    Args:
        calls: Each command with the text its tool returned (``ToolMessage.content``).
        scrub_untrusted: Neutralise end tokens and role tags in the outputs.
        first_hit: The number of the first Search hit (a later tool round of a turn numbers on).

    Returns:
        The body between ``<|Results|>:`` and ``<eor>`` (``"\nNone\n"`` when there are no calls).
    """
    order = {api: i for i, api in enumerate(_plugins.EXECUTION_ORDER)}
    rows = sorted(calls, key=lambda row: order.get(row[0].name, len(order)))
    if len(rows) == 1 and _plugins.by_api(rows[0][0].name) is _plugins.TEXT_TO_IMAGE:
        if rows[0][1].strip() in ("", _plugins.TEXT2IMAGE_DONE):
            return fmt.results_body([_plugins.TEXT2IMAGE_DONE])
    entries, next_hit = [], first_hit
    for command, output in rows:
        plugin = _plugins.by_api(command.name)
        if scrub_untrusted:  # only Search results keep their <|N|> hit numbers
            output = scrub_output(output) if plugin is _plugins.WEB_SEARCH else fmt.scrub(output)
        layout = plugin.layout if plugin else "inline"
        if plugin is _plugins.WEB_SEARCH:
            if HIT_LINE.search(output):
                output, next_hit = _plugins.renumber_search_hits(output, next_hit)
            else:
                snippets = [] if output.strip() in ("", _plugins.NO_RESULT) else [output]
                output = _plugins.format_search_hits(snippets, start=next_hit)
                next_hit += len(snippets)
        elif plugin is _plugins.CALCULATOR and not _quoted(output):
            output = _plugins.format_calculate(output)
        entries.append(_plugins.format_result_entry(str(command), output, layout))
    return fmt.results_body(entries)


def split_results(body: str, commands: Sequence[Command]) -> list[str]:
    """Each command's output (what follows ``=>``) in a recorded results body; ``""`` when it has none."""
    outputs = [""] * len(commands)
    if body.strip() == _plugins.TEXT2IMAGE_DONE and len(commands) == 1:
        return [_plugins.TEXT2IMAGE_DONE]
    starts: list[tuple[int, int, int]] = []  # (entry start, output start, command index)
    taken: set[int] = set()
    for index, command in enumerate(commands):
        header = f"\n{command} =>"
        at = body.find(header)
        while at >= 0 and at in taken:
            at = body.find(header, at + 1)
        if at >= 0:
            taken.add(at)
            starts.append((at, at + len(header), index))
    starts.sort()
    ends = [start for start, _, _ in starts[1:]] + [len(body)]
    for (_, begin, index), nxt in zip(starts, ends, strict=False):
        chunk = body[begin:nxt]
        outputs[index] = chunk[1:] if chunk.startswith((" ", "\n")) else chunk
        outputs[index] = outputs[index].removesuffix("\n")
    return outputs
