"""Fine-tuning data: the three input formats, malformed conversations, the release's loss spans token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moss_agent.checkpoints.files import load_tokenizer
from moss_agent.finetune import IGNORE, MalformedDataError, encode_sample, encode_samples, load_samples
from moss_agent.finetune.data import Sample, sample_from_conversation, write_jsonl
from moss_agent.protocol import format as fmt
from moss_agent.testing.checkpoints import tiny_moss_tokenizer_dir

MOSS_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "moss_data" / "conversations"


def _conversation(n_turns: int = 2) -> fmt.MossConversation:
    turns = [
        fmt.MossTurn(
            f"What is {i} plus {i}?",
            f"It is {2 * i}.",
            inner_thoughts="I should calculate it.",
            commands=f'Calculate("{i}+{i}")',
            results=f"\nCalculate(\"{i}+{i}\") => '{2 * i}'\n",
        )
        for i in range(1, n_turns + 1)
    ]
    return fmt.MossConversation(fmt.system_prompt(["Calculate"]), turns)


def _record(conv: fmt.MossConversation) -> dict:
    sample = sample_from_conversation(conv)
    chat = {f"turn_{i}": dict(turn) for i, turn in enumerate(sample.turns, 1)}
    return {"conversation_id": 1, "meta_instruction": conv.system, "num_turns": len(chat), "chat": chat}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_moss_tokenizer_dir())[0]  # the release's tokenization, as load_moss returns it


def test_three_formats_read_to_the_same_text(tmp_path: Path) -> None:
    from langchain_core.messages import messages_to_dict

    from moss_agent.messages import to_messages

    conv = _conversation()
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "one.json").write_text(json.dumps(_record(conv)), encoding="utf-8")
    (tmp_path / "release.jsonl").write_text(json.dumps(_record(conv)) + "\n\n", encoding="utf-8")
    dump = messages_to_dict(to_messages(conv))
    (tmp_path / "langchain.json").write_text(json.dumps(dump), encoding="utf-8")
    (tmp_path / "several.json").write_text(json.dumps([dump, dump]), encoding="utf-8")
    samples, problems = load_samples([tmp_path / "sft", tmp_path / "release.jsonl", tmp_path / "langchain.json",
                                      tmp_path / "several.json"])  # fmt: skip
    assert problems == []
    assert len(samples) == 5
    assert {s.to_text() for s in samples} == {conv.to_text()}
    assert samples[1].source.endswith("release.jsonl:1") and samples[3].source.endswith("several.json[0]")


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    sample = sample_from_conversation(_conversation(3))
    write_jsonl([sample, sample], tmp_path / "out.jsonl")
    again, problems = load_samples(tmp_path / "out.jsonl")
    assert not problems and [s.to_text() for s in again] == [sample.to_text()] * 2


def test_malformed_conversations_are_named_and_skipped(tmp_path: Path) -> None:
    good = _record(_conversation())
    no_moss = json.loads(json.dumps(good))
    del no_moss["chat"]["turn_2"]["MOSS"]
    bad_tag = json.loads(json.dumps(good))
    bad_tag["chat"]["turn_1"]["Human"] = "Human: hi<eoh>\n"
    short = {**good, "num_turns": 3}
    for name, record in (("good", good), ("no_moss", no_moss), ("bad_tag", bad_tag), ("short", short)):
        (tmp_path / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    samples, problems = load_samples(tmp_path)
    assert len(samples) == 1 and len(problems) == 4
    text = {Path(p.source).stem: str(p) for p in problems}
    assert "turn 2" in text["no_moss"] and "'MOSS'" in text["no_moss"]
    assert "turn 1" in text["bad_tag"] and "<|Human|>:" in text["bad_tag"]
    assert "turn 3" in text["short"] and "num_turns" in text["short"]
    assert "invalid JSON" in text["broken"]
    with pytest.raises(MalformedDataError, match=r"bad_tag\.json, turn 1"):
        load_samples(tmp_path, strict=True)


def test_missing_data_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no training data"):
        load_samples(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"no \.json or \.jsonl"):
        load_samples(tmp_path)


def test_release_spans_token_by_token(tokenizer) -> None:
    """No loss on the meta instruction and inside results (after ``<|Results|>:``, before the last 2 ids)."""
    sample = sample_from_conversation(_conversation(2))
    enc = encode_sample(sample, tokenizer)
    assert enc is not None
    labels = enc.labels()
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    meta = len(tokenizer.encode(sample.meta_instruction, add_special_tokens=False))
    assert labels[:meta] == [IGNORE] * meta
    pos = meta
    lost = []
    for turn in sample.turns:
        for key, text in turn:
            n = len(tokenizer.encode(text, add_special_tokens=False))
            segment = labels[pos : pos + n]
            if key == "Tool Responses":
                # <|Results|>: keeps its loss (3 ids on this vocabulary, the release's 5 on its own); the body
                # has none up to the last two ids, which keep theirs (the release's <eor>\n; its tokenizer
                # strips the \n, so the body's last id and <eor> keep loss, as in the release)
                assert segment[:3] == enc.input_ids[pos : pos + 3]
                assert segment[3:-2] == [IGNORE] * (n - 5)
                assert segment[-2:] == enc.input_ids[pos + n - 2 : pos + n]
                lost.append(tokens[pos + 3 : pos + n - 2])
            else:
                assert segment == enc.input_ids[pos : pos + n], key  # human turns included
            pos += n
    assert pos == len(labels)
    assert tokens[pos - 1] == "<eom>"
    # the results body "\nCalculate("1+1") => '2'\n" without its last id: the stripped tokenization at work
    assert "".join(lost[0]).replace("Ċ", "\n").replace("Ġ", " ") == '\nCalculate("1+1") => \'2'


def test_moss_spans_cover_only_moss_segments(tokenizer) -> None:
    sample = sample_from_conversation(_conversation(1))
    enc = encode_sample(sample, tokenizer, loss="moss")
    text = tokenizer.decode([i for i, label in zip(enc.input_ids, enc.labels(), strict=True) if label != IGNORE])
    turn = sample.turns[0]
    own = dict(turn)
    assert text == (own["Inner Thoughts"] + own["Commands"] + own["MOSS"]).replace("\n", "")
    with pytest.raises(ValueError, match="unknown loss rule"):
        encode_sample(sample, tokenizer, loss="all")  # type: ignore[arg-type]


def test_truncation_at_a_turn_boundary_is_counted(tokenizer) -> None:
    sample = sample_from_conversation(_conversation(3))
    full = encode_sample(sample, tokenizer)
    assert full is not None and full.turns == 3
    one_turn = encode_sample(Sample(sample.meta_instruction, sample.turns[:1]), tokenizer)
    assert one_turn is not None
    cut = encode_sample(sample, tokenizer, max_length=len(one_turn.input_ids) + 5)
    assert cut is not None and cut.turns == 1 and cut.cut_turns == 2
    assert cut.input_ids == one_turn.input_ids and cut.labels() == one_turn.labels()
    meta = len(tokenizer.encode(sample.meta_instruction, add_special_tokens=False))
    encoded, stats = encode_samples([sample, sample], tokenizer, max_length=meta + 3)
    assert encoded == [] and stats.dropped == 2
    encoded, stats = encode_samples([sample, sample], tokenizer, max_length=len(one_turn.input_ids))
    assert stats.truncated == 2 and stats.conversations == 2
    assert stats.loss_tokens == 2 * sum(label != IGNORE for label in one_turn.labels())


@pytest.mark.skipif(not MOSS_DATA.is_dir(), reason="the shared MOSS sample data (../shared/moss_data) is absent")
def test_every_shared_conversation_reads(tokenizer) -> None:
    samples, problems = load_samples(MOSS_DATA)
    assert problems == [] and len(samples) == 888
    assert all(s.to_text().startswith(fmt.META_INSTRUCTION) for s in samples)


def test_a_langgraph_style_dump_becomes_training_data(tmp_path: Path, tokenizer) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage, messages_to_dict

    messages = [
        HumanMessage("What is the weather in Oslo?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"}]),
        ToolMessage("Snow, -3 C.", tool_call_id="c1"),
        AIMessage("It is snowing in Oslo, -3 C."),
    ]
    (tmp_path / "graph.json").write_text(json.dumps({"messages": messages_to_dict(messages)}), encoding="utf-8")
    (sample,), problems = load_samples(tmp_path / "graph.json")
    assert problems == []
    turn = dict(sample.turns[0])
    assert turn["Commands"] == '<|Commands|>: get_weather("Oslo")<eoc>\n'
    assert "Snow, -3 C." in turn["Tool Responses"] and turn["MOSS"] == "<|MOSS|>: It is snowing in Oslo, -3 C.<eom>\n"
    assert "get_weather" in sample.meta_instruction  # the tool's switch line, as ChatMoss renders it
    assert encode_sample(sample, tokenizer) is not None
