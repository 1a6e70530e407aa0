"""The one table where MOSS plugin names meet code.

Each MOSS plugin ties together a switch line in the meta instruction, an API name used in ``<|Commands|>``,
the name of its single argument, and the way its result is written inside ``<|Results|>``. Everything else in
moss-agent looks plugins up here; no other module spells ``Search`` or ``Calculate``.

Result formats follow the sample training data byte for byte::

    Search("q") =>
    <|1|>: 'snippet one'
    <|2|>: 'snippet two'
    Calculate("1+1") => '2'
    Solve("x+1=2") =>
    x = 1

and a turn whose only command is ``Text2Image`` gets ``<|Results|>: Image generated successfully.<eor>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CALCULATOR",
    "EQUATION_SOLVER",
    "EXECUTION_ORDER",
    "IMAGE_EDITION",
    "INNER_THOUGHTS",
    "MAX_COMMANDS",
    "NO_RESULT",
    "PLUGINS",
    "SNIPPET_LIMIT",
    "TEXT2IMAGE_DONE",
    "TEXT_TO_IMAGE",
    "TEXT_TO_SPEECH",
    "TOOL_KEYS",
    "WEB_SEARCH",
    "Plugin",
    "by_api",
    "by_key",
    "custom_plugin",
    "format_calculate",
    "format_result_entry",
    "format_search_hits",
    "format_solve",
    "quote_snippet",
    "renumber_search_hits",
]

ResultLayout = Literal["inline", "block", "sentence"]

NO_RESULT = "No result."
"""What a plugin reports when it has nothing (the release's wording)."""

TEXT2IMAGE_DONE = "Image generated successfully."
"""The whole results text of a Text2Image turn."""

SNIPPET_LIMIT = 400
"""Production cut every search snippet to this many characters."""

MAX_COMMANDS = 4
"""Production ran at most this many commands of one turn."""


@dataclass(frozen=True)
class Plugin:
    """One MOSS plugin, or a user tool presented to MOSS in the same shape.

    Attributes:
        label: The name on the switch line, e.g. ``"Web search"``.
        key: A short identifier for configuration and the CLI, e.g. ``"search"``.
        api: The command name in ``<|Commands|>``, e.g. ``"Search"``; None for switches without an API.
        arg: The argument name on the switch line, e.g. ``"query"``.
        layout: How a result is written after ``=>``: on the same line (``inline``), on the following lines
            (``block``) or as a fixed sentence (``sentence``).
        trained: Whether MOSS saw this plugin enabled in training. User tools are never trained.
    """

    label: str
    key: str
    api: str | None = None
    arg: str | None = None
    layout: ResultLayout = "inline"
    trained: bool = False

    def switch_line(self, enabled: bool, *, trailing_space: bool = False) -> str:
        r"""The switch line, newline included.

        Args:
            enabled: Whether the plugin is switched on.
            trailing_space: Add the space the README form has after ``disabled.``.

        Returns:
            ``"- Web search: enabled. API: Search(query)\n"`` or ``"- Web search: disabled.\n"``.
        """
        if not enabled:
            return f"- {self.label}: disabled.{' ' if trailing_space else ''}\n"
        if self.api is None:
            return f"- {self.label}: enabled.\n"
        return f"- {self.label}: enabled. API: {self.api}({self.arg})\n"


INNER_THOUGHTS = Plugin("Inner thoughts", "inner_thoughts", trained=True)
WEB_SEARCH = Plugin("Web search", "search", "Search", "query", layout="block", trained=True)
CALCULATOR = Plugin("Calculator", "calculator", "Calculate", "expression", layout="inline", trained=True)
EQUATION_SOLVER = Plugin("Equation solver", "solver", "Solve", "equation", layout="block", trained=True)
TEXT_TO_IMAGE = Plugin("Text-to-image", "text2image", "Text2Image", "description", layout="sentence", trained=True)
IMAGE_EDITION = Plugin("Image edition", "image_edition")
TEXT_TO_SPEECH = Plugin("Text-to-speech", "text_to_speech")

PLUGINS: tuple[Plugin, ...] = (
    INNER_THOUGHTS,
    WEB_SEARCH,
    CALCULATOR,
    EQUATION_SOLVER,
    TEXT_TO_IMAGE,
    IMAGE_EDITION,
    TEXT_TO_SPEECH,
)
"""Every MOSS switch, in the order of the trained switch block."""

TOOL_KEYS: tuple[str, ...] = tuple(p.key for p in PLUGINS if p.api)
"""Keys of the plugins that run a tool (``search``, ``calculator``, ``solver``, ``text2image``)."""

EXECUTION_ORDER: tuple[str, ...] = ("Search", "Calculate", "Solve", "Text2Image")
"""The order in which the release ran the commands of one turn, by API name."""

_BY_API = {p.api: p for p in PLUGINS if p.api}
_BY_KEY = {p.key: p for p in PLUGINS}


def by_api(api: str) -> Plugin | None:
    """The MOSS plugin whose command is ``api`` (e.g. ``"Search"``), or None."""
    return _BY_API.get(api)


def by_key(key: str) -> Plugin:
    """The MOSS plugin with the short key ``key``.

    Raises:
        KeyError: With the list of valid keys.
    """
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown MOSS plugin {key!r}; choose from {', '.join(_BY_KEY)}") from None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def custom_plugin(name: str, arg: str = "input", label: str | None = None) -> Plugin:
    """A switch for a user tool, in the shape of MOSS's own (MOSS was not trained on it).

    Args:
        name: The command name the model should write, e.g. ``"get_weather"``.
        arg: The argument name shown on the switch line.
        label: The switch label; defaults to the name with underscores as spaces, capitalised.

    Raises:
        ValueError: If ``name`` or ``arg`` is not an identifier (the parser could not read it back).
    """
    for value in (name, arg):
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid MOSS command or argument name (letters, digits, _)")
    if label is None:
        label = name.replace("_", " ").strip().capitalize()
    return Plugin(label=label, key=name, api=name, arg=arg, layout="inline")


# ---------------------------------------------------------------- result formatting


def quote_snippet(text: str, limit: int = SNIPPET_LIMIT) -> str:
    """Quote a search snippet as the data does: newlines to spaces, cut to ``limit``, Python repr.

    The text should already be scrubbed (see ``moss_agent.protocol.format.scrub``).
    """
    flat = " ".join(text.replace("\r", " ").split("\n"))
    return repr(flat[:limit])


def format_search_hits(snippets: Sequence[str], start: int = 1, limit: int = SNIPPET_LIMIT) -> str:
    r"""Hit lines ``<|N|>: 'snippet'``, numbered from ``start``, each ending in a newline.

    Returns:
        The lines, or ``"No result.\n"`` when there are no snippets.
    """
    if not snippets:
        return NO_RESULT + "\n"
    return "".join(f"<|{start + i}|>: {quote_snippet(s, limit)}\n" for i, s in enumerate(snippets))


_HIT_NUMBER = re.compile(r"^<\|(\d+)\|>:", re.MULTILINE)


def renumber_search_hits(text: str, start: int) -> tuple[str, int]:
    """Renumber ``<|N|>:`` hit lines so that a turn's hits count on across its Search calls.

    Args:
        text: A Search result, numbered from any start.
        start: The number the first hit should get.

    Returns:
        The renumbered text and the next free number.
    """
    counter = iter(range(start, start + 10_000))
    new = _HIT_NUMBER.sub(lambda _m: f"<|{next(counter)}|>:", text)
    return new, start + len(_HIT_NUMBER.findall(text))


def format_calculate(value: str | None) -> str:
    """A calculator result as written after ``=>``: ``'1200.0'`` or ``'No result.'``."""
    return repr(NO_RESULT if value is None else value)


def format_solve(solutions: Iterable[tuple[str, str]] | None) -> str:
    """Solver result lines ``name = value``, each ending in a newline, or ``No result.``."""
    lines = [f"{name} = {value}\n" for name, value in solutions or ()]
    return "".join(lines) if lines else NO_RESULT + "\n"


def format_result_entry(command: str, output: str, layout: ResultLayout) -> str:
    r"""One command's entry in a results block, newline included.

    Args:
        command: The command as the model wrote it, e.g. ``'Calculate("1+1")'``.
        output: What the tool returned (for ``block`` layout, lines ending in newlines).
        layout: The plugin's result layout.

    Returns:
        ``'Calculate("1+1") => \'2\'\n'``, ``'Search("q") =>\n<|1|>: ...\n'`` or, for ``sentence``,
        ``'Text2Image("d") => Image generated successfully.\n'`` (used when Text2Image is not the turn's only
        command; alone it is written as the bare sentence by ``moss_agent.protocol.format``).
    """
    if layout == "block":
        body = output if output.endswith("\n") else output + "\n"
        return f"{command} =>\n{body}"
    return f"{command} => {output.rstrip(chr(10))}\n"
