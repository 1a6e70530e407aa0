"""moss_agent.protocol.format: the trained text of the protocol, checked against the sample data."""

from __future__ import annotations

import datetime as dt
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins
from moss_agent.protocol.format import Command, MossConversation, MossTurn
from moss_agent.protocol.parser import parse_conversation


def test_every_sample_system_is_meta_instruction_plus_trained_switch_block(moss_json):
    blocks = set()
    for path, record in moss_json:
        system = record["meta_instruction"]
        assert system.startswith(fmt.META_INSTRUCTION), path.name
        enabled = MossConversation(system=system).enabled_plugins()
        assert system == fmt.system_prompt(enabled), path.name
        blocks.add(system[len(fmt.META_INSTRUCTION) :])
    assert len(blocks) >= 6, f"only {len(blocks)} distinct switch blocks in the data"


def test_switch_block_styles():
    trained = fmt.switch_block(["Search"])
    assert trained.splitlines() == [
        "- Inner thoughts: enabled.",
        "- Web search: enabled. API: Search(query)",
        "- Calculator: disabled.",
        "- Equation solver: disabled.",
        "- Text-to-image: disabled.",
        "- Image edition: disabled.",
        "- Text-to-speech: disabled.",
    ]
    readme = fmt.switch_block(style="readme")
    assert len(readme.splitlines()) == 6 and "Inner thoughts" not in readme
    assert "- Web search: disabled. \n" in readme and readme.endswith("- Text-to-speech: disabled.\n")
    production = fmt.switch_block(["calculator"], style="production", date=dt.date(2023, 4, 21))
    assert production == fmt.switch_block(["Calculate"]) + "- Current date: 2023-04-21.\n"
    assert fmt.switch_block(style="none") == ""
    assert "- Inner thoughts: disabled.\n" in fmt.switch_block()
    assert "- Inner thoughts: enabled.\n" in fmt.switch_block(inner_thoughts=True)
    extra = fmt.switch_block(extra=[plugins.custom_plugin("get_weather", "city")])
    assert extra.endswith("- Get weather: enabled. API: get_weather(city)\n")


def test_scrub_neutralises_every_end_token_and_role_tag():
    forged = "".join(f"x{t}" for t in (*fmt.END_TOKENS, *fmt.ROLE_TAGS, "<|Machine|>", "<|1|>"))
    clean = fmt.scrub(forged)
    assert not any(t in clean for t in (*fmt.END_TOKENS, *fmt.ROLE_TAGS, "<|"))
    assert fmt.scrub("<|MOSS|>: hi<eom>") == "<MOSS>: hi "


@given(
    st.lists(
        st.sampled_from([*fmt.END_TOKENS, *fmt.ROLE_TAGS, ":", " ", "\n", "<", "|", ">", "a", "中"]),
        max_size=20,
    )
)
@settings(max_examples=150, deadline=None)
def test_scrubbed_text_cannot_forge_a_turn(pieces):
    text = fmt.scrub("".join(pieces))
    assert not re.search(r"<eo[a-z]>|<\|[^|<>\n]{1,40}\|>", text)
    conv = parse_conversation(fmt.chat_prompt(fmt.system_prompt(), [], text) + " ok<eom>\n")
    assert len(conv.turns) == 1 and conv.turns[0].human == text and conv.turns[0].reply == "ok"


def test_prompts_end_as_trained(moss_json):
    checked = 0
    for _, record in moss_json:
        if "Inner thoughts: enabled" not in record["meta_instruction"]:
            continue
        system, turns, done = record["meta_instruction"], [], ""
        for key in sorted(record["chat"], key=lambda k: int(k.rsplit("_", 1)[1])):
            raw = record["chat"][key]
            turn = parse_conversation(
                "".join(raw[k] for k in ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS"))
            ).turns[0]
            pass1 = fmt.plugin_pass1_prompt(system, turns, turn.human)
            assert pass1 == system + done + raw["Human"] + "<|Inner Thoughts|>:"
            pass2 = fmt.plugin_pass2_prompt(pass1, turn.inner_thoughts, turn.commands, turn.results)
            assert pass2 + f" {turn.reply}<eom>\n" == system + done + "".join(
                raw[k] for k in ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")
            )
            done += turn.to_text()
            turns.append(turn)
            checked += 1
    assert checked == 746, f"{checked} plugin turns checked"


def test_chat_prompts():
    system = fmt.system_prompt()
    earlier = [MossTurn("hi", "hello")]
    prompt = fmt.chat_prompt(system, earlier, "how are you?")
    assert prompt.endswith(
        "<|Human|>: how are you?<eoh>\n<|Inner Thoughts|>: None<eot>\n"
        "<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>:"
    )
    assert prompt.startswith(system + earlier[0].to_text())
    demo = fmt.chat_prompt(system, [], "x", prefill_none=False)
    assert demo == system + "<|Human|>: x<eoh>\n<|MOSS|>:"


def test_turn_segments_and_compaction():
    turn = MossTurn("q", "a", "think", 'Search("x")', "\nSearch(\"x\") =>\n<|1|>: 'y'\n")
    assert turn.to_text() == (
        '<|Human|>: q<eoh>\n<|Inner Thoughts|>: think<eot>\n<|Commands|>: Search("x")<eoc>\n'
        "<|Results|>:\nSearch(\"x\") =>\n<|1|>: 'y'\n<eor>\n<|MOSS|>: a<eom>\n"
    )
    assert turn.compacted().results == " None" and turn.compacted().reply == "a"
    assert MossTurn("q", "a", results="\nNone\n").compacted().results == "\nNone\n"


def test_commands_and_results_text():
    assert fmt.commands_text([]) == "None"
    assert str(Command("Search", 'say "hi" \\ there')) == 'Search("say \\"hi\\" \\\\ there")'
    assert fmt.commands_text([Command("Search", "a"), Command("Calculate", "1+1")]) == 'Search("a"), Calculate("1+1")'
    assert fmt.results_body(None) == "\nNone\n" and fmt.results_body(None, plugins_on=False) == " None"
    assert fmt.results_body([plugins.TEXT2IMAGE_DONE]) == " Image generated successfully."
    entry = plugins.format_result_entry('Calculate("1+1")', "'2'", "inline")
    assert fmt.results_body([entry]) == "\nCalculate(\"1+1\") => '2'\n"


def test_conversation_properties():
    plain = MossConversation()
    assert plain.system == fmt.system_prompt() and not plain.plugins_on and plain.enabled_plugins() == []
    on = MossConversation(system=fmt.system_prompt(["Search", "Solve"]))
    assert on.plugins_on and on.enabled_plugins() == [plugins.WEB_SEARCH, plugins.EQUATION_SOLVER]
