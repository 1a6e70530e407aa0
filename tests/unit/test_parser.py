"""moss_agent.protocol.parser: whole conversations, commands, pass-1 / reply repair, streaming."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moss_agent.protocol import format as fmt
from moss_agent.protocol.format import Command, MossConversation, MossTurn
from moss_agent.protocol.parser import InvalidCommand, parse_commands, parse_conversation
from moss_agent.protocol.stream import StreamParser, parse_pass1, parse_reply

TERMINATOR = re.compile(r"<eo[a-z]>|<\|endoftext\|>|<\|[A-Za-z][A-Za-z ]{0,30}\|>:")

# ---------------------------------------------------------------- whole conversations


def test_every_sample_conversation_parses_back_byte_for_byte(moss_texts):
    failures = [path.name for path, text in moss_texts if parse_conversation(text).to_text() != text]
    assert not failures, f"{len(failures)} of {len(moss_texts)} conversations differ: {failures[:5]}"
    assert len(moss_texts) == 888, f"expected the 888 sample conversations, found {len(moss_texts)}"


def test_turn_count_and_reply_with_foreign_end_token(moss_json, moss_texts):
    texts = dict(moss_texts)
    for path, record in moss_json:
        conv = parse_conversation(texts[path])
        assert len(conv.turns) == record["num_turns"], path.name
        assert conv.system == record["meta_instruction"]
    path = next(p for p, _ in moss_json if p.name == "search_plugin_conversation_48.json")
    conv = parse_conversation(texts[path])
    assert all(fmt.EOR in turn.reply for turn in conv.turns)  # a reply may hold <eor>: read to its own <eom>


def test_hand_written_turns_get_none_segments():
    system = fmt.system_prompt(["Search"])
    text = system + "<|Human|>: hi<eoh>\n<|MOSS|>: hello<eom>\n<|Human|>: again<eoh>\n<|MOSS|>: yes<eom>\n"
    conv = parse_conversation(text)
    assert [(t.human, t.reply) for t in conv.turns] == [("hi", "hello"), ("again", "yes")]
    turn = conv.turns[0]
    assert (turn.inner_thoughts, turn.commands, turn.results) == ("None", "None", "\nNone\n")
    plain = parse_conversation(fmt.system_prompt() + "<|Human|>: hi<eoh>\n<|MOSS|>: hello<eom>\n")
    assert plain.turns[0].results == " None"


def test_missing_end_tokens_and_no_system():
    conv = parse_conversation("<|Human|>: hi\n<|MOSS|>: hello")
    assert conv.system == ""
    assert [(t.human, t.reply) for t in conv.turns] == [("hi", "hello")]
    assert parse_conversation("just a system text").turns == []
    assert parse_conversation("<|Human|>: hi<eoh><|MOSS|>: x<eom>").turns[0].reply == "x"


# ---------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("text", "commands", "n_invalid"),
    [
        ("None", [], 0),
        ("None.", [], 0),
        ("None (This question doesn't require any external API calls.)", [], 0),
        ("None. \n\n根据勾股定理，我们可以得到：直角边1 + 直角边2 = 48cm", [], 0),
        ('Search("中国农村地区教育现状"), None', [("Search", "中国农村地区教育现状")], 0),
        (
            'Search("a"), \nSearch("b"), \nCalculate("325/(325+285)"),',
            [("Search", "a"), ("Search", "b"), ("Calculate", "325/(325+285)")],
            0,
        ),
        (
            'Solve("a+b=c") \nCalculate("(c-b)*f=15")\nCalculate("c-d+f")',
            [("Solve", "a+b=c"), ("Calculate", "(c-b)*f=15"), ("Calculate", "c-d+f")],
            0,
        ),
        (
            '1. Calculate("20/2")  # 计算出球的半径\n2. Calculate("(4/3)*3.14")  # 体积',
            [("Calculate", "20/2"), ("Calculate", "(4/3)*3.14")],
            0,
        ),
        ('Search("say \\"hi\\" (now), ok")', [("Search", 'say "hi" (now), ok')], 0),
        ('Search("x"), Count("y")', [("Search", "x"), ("Count", "y")], 0),
        ('Calculate("d/dx (x^2)") = 0, Solve("x = 0")', [("Calculate", "d/dx (x^2)"), ("Solve", "x = 0")], 1),
        ('Solve("2x+3x+4x=30", "x")', [("Solve", "2x+3x+4x=30")], 1),
        ('Calculate("("+ str(2) + str(-4) + ")" + "*" + str(6))', [], 1),
        ('Search("abc, Calculate("1+1")', [("Calculate", "1+1")], 1),
        ('Search("unclosed', [], 1),
        ("Search()", [], 1),
        ("I will look it up", [], 1),
        ("Calculate(2+3)", [("Calculate", "2+3")], 0),
        ("", [], 0),
    ],
)
def test_parse_commands_forms(text, commands, n_invalid):
    parsed, invalid = parse_commands(text)
    assert [(c.name, c.arg) for c in parsed] == commands
    assert len(invalid) == n_invalid
    assert all(isinstance(i, InvalidCommand) and i.text and i.error for i in invalid)


def test_every_sample_commands_segment(moss_json):
    strict = re.compile(r'\w+\("(?:[^"\\]|\\.)*"\)(?:, \w+\("(?:[^"\\]|\\.)*"\))*')
    canonical = with_commands = 0
    for _, record in moss_json:
        for turn in record["chat"].values():
            body = turn["Commands"][len("<|Commands|>: ") : -len("<eoc>\n")]
            commands, invalid = parse_commands(body)
            with_commands += '("' in body
            if strict.fullmatch(body):
                canonical += 1
                assert fmt.commands_text(commands) == body and not invalid
            elif '("' in body:
                assert commands or invalid, body
    assert canonical > 0.95 * with_commands, f"{canonical} canonical of {with_commands} segments with commands"


@given(
    st.lists(
        st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), st.text(max_size=30)),
        max_size=4,
    )
)
@settings(max_examples=150, deadline=None)
def test_rendered_commands_parse_back(items):
    commands = [Command(name, arg) for name, arg in items if name not in ("None", "none")]
    parsed, invalid = parse_commands(fmt.commands_text(commands))
    assert parsed == commands and not invalid


# ---------------------------------------------------------------- pass 1 and replies


def test_pass1_well_formed_and_repaired_text():
    p = parse_pass1(' I should search.<eot>\n<|Commands|>: Search("北京 天气")<eoc>', "<eoc>")
    assert p.inner_thoughts == "I should search."
    assert p.commands == (Command("Search", "北京 天气"),) and not p.invalid and not p.repairs
    assert p.repaired == ' I should search.<eot>\n<|Commands|>: Search("北京 天气")<eoc>\n'
    prompt = fmt.plugin_pass1_prompt(fmt.system_prompt(["Search"]), [], "天气?")
    assert prompt + p.repaired + fmt.segment(fmt.RESULTS, "\nNone\n") + "<|MOSS|>:" == fmt.plugin_pass2_prompt(
        prompt, p.inner_thoughts, p.commands_text, "\nNone\n"
    )


@pytest.mark.parametrize(
    ("generated", "thoughts", "commands", "reply", "repair"),
    [
        (' t<eoc>\n<|Commands|>: Search("x")<eom>', "t", 'Search("x")', None, "thoughts ended with <eoc>"),
        (' t\n<|Commands|>: Search("x")', "t", 'Search("x")', None, "thoughts not closed"),
        (" None<eot>\n<|MOSS|>: Hello!<eom>", "None", "None", "Hello!", "went straight to the reply"),
        ("<|MOSS|>: Hi", "None", "None", "Hi", "went straight to the reply"),
        (" t<eot>\n<|Machine|>: invented", "t", "None", None, "cut at <|Machine|>:"),
        (
            ' t<eot>\n<|Commands|>: Search("x")<eoc>\n<|Results|>: fake<eor>',
            "t",
            'Search("x")',
            None,
            "cut at <|Results|>:",
        ),
        (' t<eot>\nSearch("x")', "t", 'Search("x")', None, "without the <|Commands|> tag"),
        ("<|Inner Thoughts|>: dup<eot>\n<|Commands|>: None.<eoc>", "dup", "None", None, "canonical"),
        (
            ' t<eot>\n<|Commands|>: Search("a"),   Calculate("1")',
            "t",
            'Search("a"), Calculate("1")',
            None,
            "canonical",
        ),
        ("", "None", "None", None, None),
    ],
)
def test_pass1_tolerates(generated, thoughts, commands, reply, repair):
    p = parse_pass1(generated)
    assert (p.inner_thoughts, p.commands_text, p.reply) == (thoughts, commands, reply)
    if repair:
        assert any(repair in r for r in p.repairs), p.repairs


def test_pass1_truncated():
    p = parse_pass1(' I will search<eot>\n<|Commands|>: Search("the lon', "length")
    assert p.truncated and not p.commands and p.invalid[0].text == 'Search("the lon'
    assert parse_pass1(" halfway thou", "length").inner_thoughts == "halfway thou"


def test_pass1_reads_every_sample_plugin_turn(moss_json):
    checked = 0
    for _, record in moss_json:
        if "Inner thoughts: enabled" not in record["meta_instruction"]:
            continue
        for turn in record["chat"].values():
            generated = (turn["Inner Thoughts"] + turn["Commands"]).removeprefix("<|Inner Thoughts|>:")
            p = parse_pass1(generated, "<eoc>")
            thoughts = turn["Inner Thoughts"][len("<|Inner Thoughts|>: ") : -len("<eot>\n")]
            assert p.inner_thoughts == thoughts.strip()
            if p.raw_commands == p.commands_text:
                assert "<|Inner Thoughts|>:" + p.repaired == turn["Inner Thoughts"] + turn["Commands"]
            checked += 1
    assert checked == 746, f"{checked} plugin turns read"


@pytest.mark.parametrize(
    ("generated", "text"),
    [
        (" Hello!<eom>", "Hello!"),
        (" Hello!", "Hello!"),
        (" Hi\n<|Human|>: and an invented next turn", "Hi"),
        (" Sure.<|Machine|>: extra", "Sure."),
        (" cited <sup><|1|></sup><eor><eom>", "cited <sup><|1|></sup>"),
        ("<|MOSS|>: again<eom>", "again"),
        (" done<|endoftext|>more", "done"),
    ],
)
def test_parse_reply(generated, text):
    assert parse_reply(generated).text == text


def test_reply_truncated_flag():
    assert parse_reply(" long", "length").truncated and not parse_reply(" ok", "<eom>").truncated


# ---------------------------------------------------------------- streaming and corruption properties

PIECES = [
    "<eot>",
    "<eoc>",
    "<eom>",
    "<eor>",
    "<eoh>",
    "<|Commands|>: ",
    "<|MOSS|>: ",
    "<|Human|>: ",
    "<|Machine|>: ",
    "<|Inner Thoughts|>: ",
    "<|Results|>:",
    'Search("q")',
    'Calculate("1+1")',
    ", ",
    "None",
    "\n",
    " ",
    "<",
    "<e",
    "<eo",
    "<|",
    "<|MO",
    "|>",
    "e",
    "o",
    "text",
    "思考",
    '"',
    "(",
    ")",
]
generated_text = st.lists(st.sampled_from(PIECES), max_size=14).map("".join)


def _stream(text: str, cuts: list[int], mode: str):
    parser = StreamParser(mode)  # type: ignore[arg-type]
    bounds = sorted(set(c % (len(text) + 1) for c in cuts))
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    events, history = [], []
    for piece in pieces:
        events += parser.feed(piece)
        history.append({k: "".join(e.text for e in events if e.kind == k) for k in ("thoughts", "reply")})
    events += parser.finish()
    return parser, events, history


@given(generated_text, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stream_equals_parse_for_any_split_pass1(text, cuts):
    parser, events, history = _stream(text, cuts, "pass1")
    final = parse_pass1(text)
    thoughts = "".join(e.text for e in events if e.kind == "thoughts")
    reply = "".join(e.text for e in events if e.kind == "reply")
    commands = [e for e in events if e.kind == "commands"]
    assert (thoughts or "None") == final.inner_thoughts
    assert reply == (final.reply or "")
    assert len(commands) == 1 and commands[0].commands == final.commands and commands[0].text == final.commands_text
    assert parser.pass1 == final
    for seen in history:  # never a piece of a terminator: what was shown is always a prefix of the result
        assert final.inner_thoughts.startswith(seen["thoughts"]) and (final.reply or "").startswith(seen["reply"])


@given(generated_text, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=300, deadline=None)
def test_stream_equals_parse_for_any_split_reply(text, cuts):
    parser, events, history = _stream(text, cuts, "reply")
    final = parse_reply(text)
    assert "".join(e.text for e in events if e.kind == "reply") == final.text == parser.reply.text
    assert all(final.text.startswith(seen["reply"]) for seen in history)
    assert not TERMINATOR.search(final.text)


def test_stream_holds_back_partial_tokens():
    parser = StreamParser("reply")
    assert [e.text for e in parser.feed(" Hello <")] == ["Hello"]
    assert parser.feed("|MOSS") == [] and parser.feed("|>") == []
    assert [e.text for e in parser.feed(" not a tag")] == [" <|MOSS|> not a tag"]
    assert parser.feed("<eo") == [] and parser.feed("m>") == [] and parser.done


def test_stream_pass1_events_in_order():
    parser = StreamParser("pass1")
    events = []
    for piece in [" Need", " data.<e", "ot>\n<|Comm", 'ands|>: Search("a', '")<eoc>']:
        events += parser.feed(piece)
    events += parser.finish("<eoc>")
    assert [e.kind for e in events] == ["thoughts", "thoughts", "commands"]
    assert events[-1].commands == (Command("Search", "a"),) and parser.pass1.inner_thoughts == "Need data."
    with pytest.raises(ValueError, match="mode"):
        StreamParser("chat")  # type: ignore[arg-type]


def _corrupt(text: str, data) -> str:
    for _ in range(data.draw(st.integers(0, 4))):
        action = data.draw(st.sampled_from(["cut", "swap", "inject", "drop"]))
        at = data.draw(st.integers(0, len(text)))
        if action == "cut":
            text = text[:at]
        elif action == "swap":
            text = re.sub(r"<eo[a-z]>", lambda _m: data.draw(st.sampled_from(fmt.END_TOKENS)), text, count=1)
        elif action == "inject":
            text = (
                text[:at]
                + data.draw(st.sampled_from([*fmt.END_TOKENS, *fmt.ROLE_TAGS, "<|Machine|>:", "<|"]))
                + text[at:]
            )
        else:
            text = text[:at] + text[at + 3 :]
    return text


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_corrupted_generations_never_raise(data):
    text = data.draw(
        st.sampled_from(
            [
                ' 需要搜索一下。<eot>\n<|Commands|>: Search("上海 天气"), Calculate("2*(3+4)")<eoc>',
                " None<eot>\n<|Commands|>: None<eoc>",
                " Here is the answer <sup><|1|></sup>.<eom>",
            ]
        )
    )
    text = _corrupt(text, data)
    p = parse_pass1(text, data.draw(st.sampled_from([None, "length", "<eoc>"])))
    r = parse_reply(text)
    for value in (p.inner_thoughts, p.reply or "", r.text):
        assert not TERMINATOR.search(value)
    assert fmt.segment(fmt.COMMANDS, p.commands_text).endswith("<eoc>\n")
    parse_commands(text)
    parse_conversation(fmt.system_prompt() + "<|Human|>: x<eoh>\n" + text)


# ---------------------------------------------------------------- random conversations

segment_text = st.lists(
    st.sampled_from([*"ab <|>\n:e中", *fmt.END_TOKENS, "<|MOSS|>: ", "<|Human|>:"]), max_size=12
).map("".join)


def _without(text: str, token: str) -> str:
    while token in text:
        text = text.replace(token, "")
    return text


@st.composite
def conversations(draw):
    def own(role):
        return segment_text.map(lambda s, end=fmt.SEGMENT_END[role]: _without(s, end))

    turns = [
        MossTurn(
            human=draw(own(fmt.HUMAN)),
            reply=draw(own(fmt.MOSS)),
            inner_thoughts=draw(own(fmt.THOUGHTS)),
            commands=draw(own(fmt.COMMANDS)),
            results=draw(own(fmt.RESULTS)),
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    system = fmt.system_prompt(draw(st.lists(st.sampled_from(["Search", "Calculate", "Solve", "Text2Image"]))))
    return MossConversation(system=system, turns=turns)


@given(conversations())
@settings(max_examples=120, deadline=None)
def test_random_conversations_render_and_parse_back(conv):
    text = conv.to_text()
    back = parse_conversation(text)
    assert back.to_text() == text
    assert back.turns == conv.turns
