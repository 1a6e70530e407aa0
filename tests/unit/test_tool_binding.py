"""moss_agent.tool_binding: tools as MOSS plugins, tool_choice, and commands <-> typed tool calls."""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from moss_agent.protocol import plugins
from moss_agent.protocol.format import Command
from moss_agent.protocol.parser import parse_commands
from moss_agent.tool_binding import (
    BoundTool,
    bind_tools,
    command_for_tool_call,
    resolve_tool_choice,
    to_tool_call,
)


@tool
def web_search(query: str) -> str:
    """Search the web."""
    return ""


@tool("Calculate")
def calc(expression: str) -> str:
    """Calculate."""
    return ""


@tool
def get_weather(location: str) -> str:
    """Weather at a place."""
    return ""


@tool
def my_adder(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def no_args() -> int:
    """Takes nothing."""
    return 5


class Typed(BaseModel):
    """Every JSON-schema type."""

    count: int
    ratio: float
    flag: bool
    tags: list[str]
    maybe: int | None = None
    mode: Literal["a", "b"] = "a"


def test_moss_plugins_are_recognised_and_others_get_a_same_shape_switch_line():
    search, calculator, weather, adder, empty = bind_tools([web_search, calc, get_weather, my_adder, no_args])
    assert search.plugin is plugins.WEB_SEARCH and search.command == "Search" and search.name == "web_search"
    assert calculator.plugin is plugins.CALCULATOR and calculator.command == "Calculate"
    assert weather.plugin.switch_line(True) == "- Get weather: enabled. API: get_weather(location)\n"
    assert not weather.plugin.trained and weather.command == "get_weather"
    assert adder.plugin.switch_line(True) == "- My adder: enabled. API: my_adder(a, b)\n"
    assert empty.plugin.switch_line(True) == "- No args: enabled. API: no_args(input)\n"


def test_a_plugin_name_with_several_arguments_is_a_custom_tool():
    @tool("calculate")
    def two(a: int, b: int) -> int:
        """Not MOSS's calculator."""
        return a

    (bound,) = bind_tools([two])
    assert bound.plugin is not plugins.CALCULATOR and bound.command == "calculate"


def test_bind_tools_errors_name_the_fix():
    @tool("Search")
    def other(query: str) -> str:
        """A second search."""
        return ""

    with pytest.raises(ValueError, match="both map to the MOSS command 'Search'; bind only one"):
        bind_tools([web_search, other])
    assert len(bind_tools([my_adder, my_adder.args_schema.model_json_schema() | {"title": "my_adder"}])) == 1
    with pytest.raises(ValueError, match="rename the tool"):
        bind_tools([{"type": "function", "function": {"name": "get weather", "parameters": {}}}])


def test_resolve_tool_choice():
    tools = bind_tools([web_search, get_weather])
    assert resolve_tool_choice(None, tools) == "auto" and resolve_tool_choice("auto", tools) == "auto"
    assert resolve_tool_choice("none", tools) == "none"
    assert resolve_tool_choice("any", tools) == "any" and resolve_tool_choice(True, tools) == "any"
    assert resolve_tool_choice("required", tools[:1]) is tools[0]  # one tool: that tool
    assert resolve_tool_choice("Search", tools) is tools[0]  # by command
    assert resolve_tool_choice("web_search", tools) is tools[0]  # by tool name
    assert resolve_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools) is tools[1]
    assert resolve_tool_choice({"type": "tool", "name": "get_weather"}, tools) is tools[1]
    with pytest.raises(ValueError, match="names no bound tool"):
        resolve_tool_choice("nope", tools)
    with pytest.raises(ValueError, match="no tools are bound"):
        resolve_tool_choice("any", [])


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('{"count": "3", "ratio": "0.5", "flag": "yes", "tags": ["x"]}', {"count": 3, "ratio": 0.5, "flag": True}),
        ('{"count": 3.0, "ratio": 2, "flag": false, "tags": [], "maybe": "7"}', {"count": 3, "maybe": 7}),
        ('3, 1.5, True, ["a", "b"]', {"count": 3, "ratio": 1.5, "flag": True, "tags": ["a", "b"]}),
    ],
)
def test_arguments_take_the_schema_types(written, expected):
    (bound,) = bind_tools([Typed])
    call = to_tool_call(Command("Typed", written), [bound])
    assert call["type"] == "tool_call", call
    assert expected.items() <= call["args"].items()
    assert type(call["args"]["count"]) is int and type(call["args"]["ratio"]) in (int, float)
    assert call["id"].startswith("call_")


def test_single_argument_conversion_and_ids():
    tools = bind_tools([my_adder, get_weather, no_args, calc])
    first = to_tool_call(Command("get_weather", "San Francisco, CA"), tools)
    assert first["args"] == {"location": "San Francisco, CA"}  # commas stay in a one-argument string
    assert to_tool_call(Command("my_adder", '{"a": "1", "b": 2}'), tools)["args"] == {"a": 1, "b": 2}
    assert to_tool_call(Command("my_adder", "1, 2"), tools)["args"] == {"a": 1, "b": 2}
    assert to_tool_call(Command("no_args", ""), tools)["args"] == {}
    json_text = to_tool_call(Command("Calculate", '{"not": "an object"}'), tools)
    assert json_text["args"] == {"expression": '{"not": "an object"}'}  # a string argument is kept as written
    ids = {to_tool_call(Command("no_args", ""), tools)["id"] for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (Command("Search", "q"), "Unknown command 'Search'; the enabled commands are: my_adder, Typed"),
        (Command("my_adder", '{"a": 1}'), "missing required argument(s) b"),
        (Command("my_adder", '{"a": "one", "b": 2}'), "Bad argument for my_adder"),
        (Command("my_adder", "1, 2, 3"), "3 values for 2 arguments"),
        (Command("my_adder", "[1, 2]"), "Bad argument"),
        (Command("Typed", '{"count": 1.5, "ratio": 1, "flag": true, "tags": []}'), "expected an integer"),
        (Command("Typed", '{"count": 1, "ratio": 1, "flag": "maybe", "tags": []}'), "expected true or false"),
    ],
)
def test_model_mistakes_become_invalid_calls_never_errors(command, error):
    call = to_tool_call(command, bind_tools([my_adder, Typed]))
    assert call["type"] == "invalid_tool_call"
    assert error in call["error"]
    assert call["args"] == str(command)  # the command as written: never a JSON object a stream could rebuild


def test_tool_calls_render_as_commands_that_read_back_to_the_same_call():
    tools = bind_tools([web_search, my_adder, get_weather, no_args])
    cases = [
        ("web_search", {"query": 'say "hi"'}, 'Search("say \\"hi\\"")'),
        ("my_adder", {"a": 1, "b": 2}, 'my_adder("{\\"a\\": 1, \\"b\\": 2}")'),
        ("get_weather", {"location": "北京"}, 'get_weather("北京")'),
        ("no_args", {}, 'no_args("")'),
    ]
    for name, args, text in cases:
        command = command_for_tool_call({"name": name, "args": args}, tools)
        assert str(command) == text
        (parsed,), bad = parse_commands(str(command))
        assert not bad
        back = to_tool_call(parsed, tools)
        assert (back["name"], back["args"]) == (name, args)


def test_unbound_calls_render_with_plugin_names_or_their_own():
    assert str(command_for_tool_call({"name": "web_search", "args": {"query": "x"}})) == 'Search("x")'
    assert str(command_for_tool_call({"name": "lookup", "args": {"n": 3}})) == 'lookup("3")'
    assert str(command_for_tool_call({"name": "calculate", "args": {"a": 1, "b": 2}})) == (
        'calculate("{\\"a\\": 1, \\"b\\": 2}")'
    )


def test_bound_tool_properties():
    @tool
    def opt(text: str, limit: int = Field(default=3)) -> str:
        """Optional second argument."""
        return text

    (bound,) = bind_tools([opt])
    assert isinstance(bound, BoundTool) and bound.arg_names == ("text", "limit") and bound.required == ("text",)
    assert to_tool_call(Command("opt", '{"text": "x"}'), [bound])["args"] == {"text": "x"}
    assert bound.description == "Optional second argument."
