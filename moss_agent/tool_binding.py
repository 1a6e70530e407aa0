"""LangChain tools as MOSS plugins: recognition, switch lines, and commands <-> tool calls.

MOSS writes one string argument per command (``Search("query")``). A bound tool is either one of MOSS's four
trained plugins, recognised by name and shown with its trained switch line and API name, or any other tool,
shown with a switch line of the same shape (MOSS was not trained on those, so expect less reliable use). A
tool with several arguments takes a JSON object as its one string.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_openai_tool

from moss_agent import plugins as _plugins
from moss_agent.format import Command
from moss_agent.plugins import Plugin

__all__ = ["BoundTool", "bind_tools", "command_for_tool_call", "new_call_id", "to_tool_call"]

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

    Raises:
        ValueError: When two tools would be written with the same command name.
    """
    bound: list[BoundTool] = []
    for tool in tools:
        spec = convert_to_openai_tool(tool)["function"]
        name = spec["name"]
        params = spec.get("parameters") or {}
        properties = dict(params.get("properties") or {})
        required = tuple(params.get("required") or ())
        plugin = _moss_plugin(name)
        if plugin is None:
            arg = ", ".join(required + tuple(k for k in properties if k not in required)) or "input"
            plugin = _plugins.custom_plugin(name.replace("-", "_"), arg=arg.split(", ")[0])
            if len(properties) > 1:
                # The switch line shows every argument; the model passes them as one JSON object.
                plugin = Plugin(plugin.label, plugin.key, plugin.api, arg, plugin.layout)
        bound.append(BoundTool(name, plugin, properties, required, spec.get("description", "")))
    commands = [b.command for b in bound]
    dupes = {c for c in commands if commands.count(c) > 1}
    if dupes:
        raise ValueError(f"several bound tools map to the MOSS command(s) {sorted(dupes)}; bind only one of each")
    return bound


def new_call_id() -> str:
    """A fresh tool-call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _convert(value: str, schema: Mapping[str, Any]) -> Any:
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


def _args_for(command: Command, bound: BoundTool) -> dict[str, Any]:
    names = bound.arg_names
    if len(names) > 1 or not names:
        stripped = command.arg.strip()
        if stripped.startswith("{"):
            parsed = json.loads(stripped)
            if not isinstance(parsed, dict):
                raise ValueError("expected a JSON object of arguments")
            return {k: _convert(v, bound.properties.get(k, {})) if isinstance(v, str) else v for k, v in parsed.items()}
        if not names:
            return {}
    first = names[0]
    return {first: _convert(command.arg, bound.properties.get(first, {}))}


def to_tool_call(command: Command, tools: Sequence[BoundTool]) -> ToolCall | InvalidToolCall:
    """Turn a parsed command into a LangChain tool call, or an invalid one the model can be told about.

    Args:
        command: The command as MOSS wrote it.
        tools: The bound tools; a command for any other name is invalid.
    """
    call_id = new_call_id()
    match = next((b for b in tools if b.command == command.name or b.name == command.name), None)
    if match is None:
        known = ", ".join(b.command for b in tools) or "none"
        return invalid_tool_call(
            name=command.name,
            args=command.arg,
            id=call_id,
            error=f"Unknown command {command.name!r}; the enabled commands are: {known}.",
        )
    try:
        args = _args_for(command, match)
    except (ValueError, TypeError) as err:
        return invalid_tool_call(
            name=match.name, args=command.arg, id=call_id, error=f"Bad argument for {match.command}: {err}"
        )
    return tool_call(name=match.name, args=args, id=call_id)


def command_for_tool_call(call: Mapping[str, Any], tools: Sequence[BoundTool] = ()) -> Command:
    """The MOSS command for a LangChain tool call (to render history that holds tool calls)."""
    name = str(call.get("name", ""))
    args = call.get("args") or {}
    match = next((b for b in tools if b.name == name), None)
    plugin = match.plugin if match else _moss_plugin(name)
    command_name = (plugin.api if plugin else None) or name
    if isinstance(args, str):
        return Command(command_name, args)
    if len(args) == 1:
        (value,) = args.values()
        return Command(command_name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return Command(command_name, json.dumps(args, ensure_ascii=False) if args else "")
