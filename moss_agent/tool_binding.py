r"""LangChain tools as MOSS plugins: recognition, switch lines, tool choice, and commands <-> tool calls.

MOSS writes one argument per command (``Search("query")``). A bound tool is either one of MOSS's four trained
plugins, recognised by name and shown with its trained switch line and API name, or any other tool, shown with
a switch line of the same shape (``- Get weather: enabled. API: get_weather(location)``). MOSS was not trained
on those, so expect less reliable use. A tool with several arguments takes a JSON object as its one argument
(``my_adder("{\"a\": 1, \"b\": 2}")``); unquoted literals (``my_adder(1, 2)``) are read positionally.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_openai_tool

from moss_agent.protocol import plugins as _plugins
from moss_agent.protocol.format import Command
from moss_agent.protocol.plugins import Plugin

__all__ = [
    "BoundTool",
    "ToolChoice",
    "bind_tools",
    "command_for_tool_call",
    "new_call_id",
    "resolve_tool_choice",
    "to_tool_call",
]

# Names under which users commonly pass MOSS's plugins, beside the API names and keys of the table.
_ALIASES = {
    "web_search": "search",
    "websearch": "search",
    "calculate": "calculator",
    "equation_solver": "solver",
    "solve": "solver",
    "text_to_image": "text2image",
    "text2image": "text2image",
}


@dataclass(frozen=True)
class BoundTool:
    """A tool as MOSS sees it.

    Attributes:
        name: The LangChain tool name, carried in ``tool_calls``.
        plugin: The MOSS plugin (trained) or a custom plugin in the same shape.
        properties: The JSON-schema properties of the tool's arguments.
        required: The names of required arguments.
        description: The tool's description.
    """

    name: str
    plugin: Plugin
    properties: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    description: str = ""

    @property
    def command(self) -> str:
        """The command name MOSS writes for this tool."""
        return self.plugin.api or self.name

    @property
    def arg_names(self) -> tuple[str, ...]:
        """Argument names, required ones first."""
        rest = tuple(k for k in self.properties if k not in self.required)
        return self.required + rest


def _moss_plugin(name: str) -> Plugin | None:
    plugin = _plugins.by_api(name)
    if plugin is not None:
        return plugin
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        found = _plugins.by_key(key)
    except KeyError:
        return None
    return found if found.api else None


def bind_tools(tools: Sequence[Any]) -> list[BoundTool]:
    """Describe tools (BaseTool, functions, pydantic models or OpenAI tool dicts) for MOSS.

    A tool named like one of MOSS's plugins (``Search``, ``web_search``, ``Calculate``, ``calculator``, ...)
    that takes at most one argument is that plugin; any other tool becomes a custom switch line.

    Raises:
        ValueError: When a tool name cannot be written as a command, or two different tools would be written
            with the same command name.
    """
    bound: list[BoundTool] = []
    for tool in tools:
        spec = convert_to_openai_tool(tool)["function"]
        name = spec["name"]
        params = spec.get("parameters") or {}
        properties = dict(params.get("properties") or {})
        required = tuple(params.get("required") or ())
        plugin = _moss_plugin(name) if len(properties) <= 1 else None
        if plugin is None:
            args = required + tuple(k for k in properties if k not in required)
            try:
                plugin = _plugins.custom_plugin(name.replace("-", "_"), arg=args[0] if args else "input")
            except ValueError as err:
                raise ValueError(f"cannot bind tool {name!r}: {err}; rename the tool") from err
            if len(args) > 1:  # the switch line shows every argument
                plugin = Plugin(plugin.label, plugin.key, plugin.api, ", ".join(args), plugin.layout)
        new = BoundTool(name, plugin, properties, required, spec.get("description", ""))
        same = next((b for b in bound if b.command == new.command), None)
        if same is None:
            bound.append(new)
        elif (same.name, same.arg_names) != (new.name, new.arg_names):
            raise ValueError(
                f"tools {same.name!r} and {name!r} both map to the MOSS command {new.command!r}; bind only one"
            )
        # else: the same tool twice (e.g. a pydantic model and its JSON schema): MOSS sees it once
    return bound


ToolChoice = BoundTool | Literal["auto", "none", "any"]
"""A resolved ``tool_choice``: MOSS chooses (``auto``), no tools, some tool, or this tool."""


def resolve_tool_choice(choice: Any, tools: Sequence[BoundTool]) -> ToolChoice:
    """Read a LangChain ``tool_choice``.

    Args:
        choice: ``None``/``"auto"``/``False`` (MOSS chooses), ``"none"``, ``"any"``/``"required"``/``True``
            (some tool must be called; with one tool, that tool), a tool name or command, or a dict naming
            one (``{"type": "function", "function": {"name": ...}}`` or ``{"type": "tool", "name": ...}``).
        tools: The bound tools.

    Raises:
        ValueError: For a choice that names no bound tool, or a forced choice without tools.
    """
    if choice in (None, "auto", False):
        return "auto"
    if choice == "none":
        return "none"
    if isinstance(choice, Mapping):
        function = choice.get("function")
        choice = (function.get("name") if isinstance(function, Mapping) else None) or choice.get("name")
    if not tools:
        raise ValueError(f"tool_choice={choice!r} forces a tool call, but no tools are bound")
    if choice in ("any", "required", True):
        return tools[0] if len(tools) == 1 else "any"
    match = next((t for t in tools if choice in (t.name, t.command)), None)
    if match is None:
        raise ValueError(f"tool_choice {choice!r} names no bound tool ({', '.join(t.name for t in tools)})")
    return match


def new_call_id() -> str:
    """A fresh tool-call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------- arguments


def _convert(value: str, schema: Mapping[str, Any]) -> Any:
    """A string argument as the JSON-schema type wants it; raises ValueError when it cannot be."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:  # e.g. Optional[int]: the first option that accepts the value
        errors = []
        for option in options:
            if option.get("type") == "null":
                continue
            try:
                return _convert(value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors) or f"cannot read {value!r}")
    kind = schema.get("type")
    text = value.strip()
    if kind == "integer":
        number = float(text)
        if not number.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(number)
    if kind == "number":
        number = float(text)
        return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
    if kind == "boolean":
        lowered = text.lower()
        if lowered in {"true", "yes", "1"}:
            return True
        if lowered in {"false", "no", "0"}:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind in {"array", "object"}:
        return json.loads(text)
    return value


def _typed(value: Any, schema: Mapping[str, Any]) -> Any:
    """A JSON value as the schema types it: strings are read, numbers checked (``1.5`` is no integer)."""
    if isinstance(value, str):
        return _convert(value, schema)
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return _convert(str(value), schema) if numeric and ("type" in schema or "anyOf" in schema) else value


def _positional(text: str) -> list[Any] | None:
    """``1, "a"`` read as Python literals, or None when the text is not a list of literals."""
    try:
        values = ast.literal_eval(f"[{text}]")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return values if isinstance(values, list) else None


def _args_for(command: Command, bound: BoundTool) -> dict[str, Any]:
    names = bound.arg_names
    text = command.arg.strip()
    if text.startswith("{") and (len(names) != 1 or bound.properties.get(names[0], {}).get("type") != "string"):
        parsed = json.loads(text)
        if not isinstance(parsed, dict):
            raise ValueError("expected a JSON object of arguments")
        args = {k: _typed(v, bound.properties.get(k, {})) for k, v in parsed.items()}
    elif not names:
        return {}
    elif len(names) == 1:
        args = {names[0]: _convert(command.arg, bound.properties.get(names[0], {}))}
    else:
        values = _positional(text) or [command.arg]
        if len(values) > len(names):
            raise ValueError(f"{len(values)} values for {len(names)} arguments ({', '.join(names)})")
        args = {k: _typed(v, bound.properties.get(k, {})) for k, v in zip(names, values, strict=False)}
    missing = [k for k in bound.required if k not in args]
    if missing:
        raise ValueError(
            f"missing required argument(s) {', '.join(missing)}; write a JSON object with "
            f"{', '.join(repr(n) for n in names)}"
        )
    return args


def to_tool_call(command: Command, tools: Sequence[BoundTool]) -> ToolCall | InvalidToolCall:
    """Turn a parsed command into a LangChain tool call, or an invalid one the model can be told about.

    An invalid call keeps the command as MOSS wrote it in ``args`` (never a JSON object, so that a streamed
    message does not rebuild it as a valid call) and says what is wrong in ``error``.

    Args:
        command: The command as MOSS wrote it.
        tools: The bound tools; a command for any other name is invalid.
    """
    call_id = new_call_id()
    match = next((b for b in tools if command.name in (b.command, b.name)), None)
    if match is None:
        known = ", ".join(b.command for b in tools) or "none"
        return invalid_tool_call(
            name=command.name,
            args=str(command),
            id=call_id,
            error=f"Unknown command {command.name!r}; the enabled commands are: {known}.",
        )
    try:
        args = _args_for(command, match)
    except (ValueError, TypeError) as err:
        return invalid_tool_call(
            name=match.name, args=str(command), id=call_id, error=f"Bad argument for {match.command}: {err}"
        )
    return tool_call(name=match.name, args=args, id=call_id)


def command_for_tool_call(call: Mapping[str, Any], tools: Sequence[BoundTool] = ()) -> Command:
    """The MOSS command for a LangChain tool call (to render history that holds tool calls).

    A one-argument call writes its value; others write their arguments as a JSON object.
    """
    name = str(call.get("name", ""))
    args = call.get("args") or {}
    match = next((b for b in tools if b.name == name), None)
    plugin = match.plugin if match else (_moss_plugin(name) if isinstance(args, str) or len(args) <= 1 else None)
    command_name = (plugin.api if plugin else None) or name
    if isinstance(args, str):
        return Command(command_name, args)
    if len(args) == 1 and (match is None or len(match.arg_names) <= 1):
        (value,) = args.values()
        return Command(command_name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return Command(command_name, json.dumps(args, ensure_ascii=False) if args else "")
