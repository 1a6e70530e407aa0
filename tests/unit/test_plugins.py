"""moss_agent.protocol.plugins: the plugin table and result formatting, checked against the sample data."""

from __future__ import annotations

import ast
import re

import pytest

from moss_agent.protocol import plugins
from moss_agent.protocol.plugins import (
    CALCULATOR,
    EQUATION_SOLVER,
    INNER_THOUGHTS,
    PLUGINS,
    TEXT_TO_IMAGE,
    WEB_SEARCH,
    by_api,
    by_key,
    custom_plugin,
    format_calculate,
    format_result_entry,
    format_search_hits,
    format_solve,
    quote_snippet,
    renumber_search_hits,
)


def _results(moss_json):
    for _, record in moss_json:
        for turn in record["chat"].values():
            yield turn["Tool Responses"].removeprefix("<|Results|>:").removesuffix("<eor>\n")


def test_table_lines_and_lookups():
    assert [p.label for p in PLUGINS] == [
        "Inner thoughts",
        "Web search",
        "Calculator",
        "Equation solver",
        "Text-to-image",
        "Image edition",
        "Text-to-speech",
    ]
    assert WEB_SEARCH.switch_line(True) == "- Web search: enabled. API: Search(query)\n"
    assert WEB_SEARCH.switch_line(False, trailing_space=True) == "- Web search: disabled. \n"
    assert INNER_THOUGHTS.switch_line(True) == "- Inner thoughts: enabled.\n"
    assert [by_api(a) for a in ("Search", "Calculate", "Solve", "Text2Image")] == [
        WEB_SEARCH,
        CALCULATOR,
        EQUATION_SOLVER,
        TEXT_TO_IMAGE,
    ]
    assert by_api("Count") is None and by_key("solver") is EQUATION_SOLVER
    with pytest.raises(KeyError, match="choose from"):
        by_key("nope")


def test_custom_plugin():
    tool = custom_plugin("get_weather", "city")
    assert tool.switch_line(True) == "- Get weather: enabled. API: get_weather(city)\n" and not tool.trained
    with pytest.raises(ValueError, match="not a valid MOSS command"):
        custom_plugin("get-weather")


def test_calculate_entries_match_the_data(moss_json):
    matched = 0
    for body in _results(moss_json):
        for command, value in re.findall(r"^(Calculate\(.*\)) => ('.*')$", body, re.MULTILINE):
            assert format_result_entry(command, format_calculate(ast.literal_eval(value)), "inline") == (
                f"{command} => {value}\n"
            )
            matched += 1
    assert matched > 200, f"{matched} Calculate entries"
    assert format_calculate(None) == "'No result.'"


def test_solve_entries_match_the_data(moss_json):
    matched = 0
    for body in _results(moss_json):
        for command, block in re.findall(r"^(Solve\(.*\)) =>\n((?:(?!\w+\(.*=>).*\n)*)", body, re.MULTILINE):
            lines = block.splitlines()
            pairs = [tuple(line.split(" = ", 1)) for line in lines if " = " in line]
            solutions = pairs if len(pairs) == len(lines) and pairs else None
            assert format_result_entry(command, format_solve(solutions), "block") == f"{command} =>\n{block}"
            matched += 1
    assert matched > 70, f"{matched} Solve entries"


def test_search_hits_match_the_data(moss_json):
    matched = 0
    for body in _results(moss_json):
        for number, quoted in re.findall(r"^<\|(\d+)\|>: (.*)$", body, re.MULTILINE):
            try:
                snippet = ast.literal_eval(quoted)
            except (ValueError, SyntaxError):
                continue  # a snippet the release cut without closing its quote
            if isinstance(snippet, str) and not re.search(r"[\r\n]", snippet) and len(snippet) <= plugins.SNIPPET_LIMIT:
                assert format_search_hits([snippet], start=int(number)) == f"<|{number}|>: {quoted}\n"
                matched += 1
    assert matched > 500, f"{matched} search hits"


def test_search_numbering_counts_on_across_a_turn(moss_json):
    turns = 0
    for body in _results(moss_json):
        blocks = re.findall(r"^Search\(.*\) =>\n((?:<\|\d+\|>: .*\n)+)", body, re.MULTILINE)
        if len(blocks) < 2:
            continue
        start = 1
        for block in blocks:
            from_one, _ = renumber_search_hits(re.sub(r"^<\|\d+\|>:", "<|9|>:", block, flags=re.MULTILINE), 1)
            renumbered, start = renumber_search_hits(from_one, start)
            assert renumbered == block
        turns += 1
    assert turns > 20, f"{turns} turns with several searches"


def test_snippet_quoting_and_empty_results():
    assert quote_snippet("a\nb\r\nc") == repr("a b  c")
    assert quote_snippet("x" * 500) == repr("x" * plugins.SNIPPET_LIMIT)
    assert quote_snippet("it's") == '"it\'s"'
    assert format_search_hits([]) == "No result.\n"
    assert format_search_hits(["a", "b"], start=3) == "<|3|>: 'a'\n<|4|>: 'b'\n"
    assert format_solve([]) == "No result.\n" and format_solve([("x", "1")]) == "x = 1\n"
    assert renumber_search_hits("<|1|>: 'a'\n<|2|>: 'b'\n", 5) == ("<|5|>: 'a'\n<|6|>: 'b'\n", 7)
    sentence = format_result_entry('Text2Image("cat")', plugins.TEXT2IMAGE_DONE, "sentence")
    assert sentence == 'Text2Image("cat") => Image generated successfully.\n'
