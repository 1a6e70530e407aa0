"""The release's tokenization: ids equal to those of its own slow MossTokenizer under transformers 4.25.1.

The golden ids in ``tests/data/release_token_ids.*`` were made by ``scripts/release_tokenizer_oracle.py``, which
ran the release's ``tokenization_moss.py`` in a scratch virtualenv with its pins, on the tokenizer files stored
in the golden file (the project's tiny BPE in the released structure: 43 added tokens). No scratch environment
is needed here.
"""

from __future__ import annotations

import json
import lzma
import re
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from moss_agent.checkpoints.files import WHITESPACE_RUNS
from moss_agent.checkpoints.tokenization import (
    AddedTokenRules,
    MossTokenizerFast,
    load_moss_tokenizer,
)

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = json.loads((DATA / "release_token_ids.json").read_text(encoding="utf-8"))
VARIANTS = ["released", *GOLDEN["variants"]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The golden tokenizer files and their variants, written out."""
    out = {}
    for variant in VARIANTS:
        changes = GOLDEN["variants"].get(variant, {})
        directory = tmp_path_factory.mktemp(variant)
        for name, text in GOLDEN["tokenizer_files"].items():
            text = changes[name] if name in changes else text
            if text is not None:
                (directory / name).write_text(text, encoding="utf-8")
        out[variant] = directory
    return out


@pytest.fixture(scope="module")
def tok(dirs: dict[str, Path]) -> MossTokenizerFast:
    return load_moss_tokenizer(dirs["released"])


@pytest.fixture(scope="module")
def plain(dirs: dict[str, Path]) -> MossTokenizerFast:
    return load_moss_tokenizer(dirs["released"], tokenization="plain")


@pytest.fixture(scope="module")
def golden_conversations(moss_json: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per conversation: its segments (finetune_moss.py's order), whole ids and segment ids from the oracle."""
    blob = array("H")
    blob.frombytes(lzma.decompress((DATA / "release_token_ids.u16.xz").read_bytes()))
    if sys.byteorder != "little":
        blob.byteswap()
    root = moss_json[0][0].parents[0]
    while root.name != "conversations":
        root = root.parent
    records = {str(path.relative_to(root)): record for path, record in moss_json}
    assert sorted(records) == GOLDEN["conversations"], "the sample data differs from the one the oracle read"
    out, pos, differ = [], 0, set(GOLDEN["segments_differ"])
    for i, name in enumerate(GOLDEN["conversations"]):
        record = records[name]
        turns = [record["chat"][f"turn_{k + 1}"] for k in range(int(record["num_turns"]))]
        segments = [record["meta_instruction"], *(value for turn in turns for value in turn.values())]
        whole = blob[pos : pos + GOLDEN["lengths"][i]].tolist()
        pos += len(whole)
        joined = whole
        if i in differ:
            joined = blob[pos : pos + sum(GOLDEN["segment_lengths"][i])].tolist()
            pos += len(joined)
        cuts, split, at = GOLDEN["segment_lengths"][i], [], 0
        for n in cuts:
            split.append(joined[at : at + n])
            at += n
        out.append({"name": name, "segments": segments, "whole": whole, "segment_ids": split})
    assert pos == len(blob)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_strings_equal_the_release(dirs: dict[str, Path], variant: str) -> None:
    # Hand-made and seeded random strings, on the released files and on two other special-token setups.
    tokenizer = load_moss_tokenizer(dirs[variant])
    expected = GOLDEN["string_ids"][variant]
    got = [tokenizer.encode(s) for s in GOLDEN["strings"]]
    wrong = [(s, g, e) for s, g, e in zip(GOLDEN["strings"], got, expected, strict=True) if g != e]
    assert not wrong, f"{len(wrong)} strings differ, first: {wrong[0]}"
    assert tokenizer(GOLDEN["strings"])["input_ids"] == expected


@pytest.mark.slow  # about 5 s on two idle cores: 4.5 M characters
def test_whole_conversations_equal_the_release(tok: MossTokenizerFast, golden_conversations: list[Any]) -> None:
    # As moss_cli_demo.py encodes a prompt: the whole text in one call.
    got = tok(["".join(c["segments"]) for c in golden_conversations])["input_ids"]
    wrong = [c["name"] for c, ids in zip(golden_conversations, got, strict=True) if ids != c["whole"]]
    assert len(golden_conversations) == 888
    assert not wrong, f"{len(wrong)} of {len(got)} conversations differ, e.g. {wrong[:3]}"


@pytest.mark.slow  # about 5 s on two idle cores: 18,000 segments
def test_segments_equal_the_release(tok: MossTokenizerFast, golden_conversations: list[Any]) -> None:
    # As finetune_moss.py encodes: the meta instruction, then every segment of every turn, one call each.
    flat = [s for c in golden_conversations for s in c["segments"]]
    expected = [ids for c in golden_conversations for ids in c["segment_ids"]]
    got = tok(flat)["input_ids"]
    wrong = [s for s, g, e in zip(flat, got, expected, strict=True) if g != e]
    assert not wrong, f"{len(wrong)} of {len(flat)} segments differ, first: {wrong[0]!r}"
    assert [tok.encode(s) for s in flat[:50]] == expected[:50]


def test_plain_differs_from_the_release(
    tok: MossTokenizerFast, plain: MossTokenizerFast, golden_conversations: list[Any]
) -> None:
    texts = ["".join(c["segments"]) for c in golden_conversations[:40]]
    release_ids, plain_ids = tok(texts)["input_ids"], plain(texts)["input_ids"]
    assert all(r != p for r, p in zip(release_ids, plain_ids, strict=True))
    assert sum(map(len, plain_ids)) > sum(map(len, release_ids))
    newline = plain.convert_tokens_to_ids("Ċ")
    turn = "<|Human|>: hi<eoh>\n<|MOSS|>: hello<eom>\n"
    assert newline in plain.encode(turn) and newline not in tok.encode(turn)
    assert plain.encode(turn) == plain.encode(turn, add_special_tokens=False)
    assert tok.decode(plain.encode(turn)) == turn  # decoding is the same in both modes
    assert tok.decode(tok.encode(turn)) == "<|Human|>: hi<eoh><|MOSS|>: hello<eom>"


def test_encode_call_batch_tokenize_and_offsets_agree(tok: MossTokenizerFast) -> None:
    texts = ["<|Human|>: hi <eoh>\n<|MOSS|>:", "", "    def f():\n\treturn 1<eom>\n", "中文\u3000<eoh>  x"]
    single = [tok.encode(t) for t in texts]
    assert [tok(t)["input_ids"] for t in texts] == single
    assert tok(texts)["input_ids"] == single
    assert [tok.convert_tokens_to_ids(tok.tokenize(t)) for t in texts] == single
    assert tok(texts[0], return_tensors="np")["input_ids"].tolist() == [single[0]]
    with_offsets = tok(texts[0], return_tensors="np", return_offsets_mapping=True)
    assert with_offsets["input_ids"].tolist() == [single[0]] and with_offsets["offset_mapping"].shape[:2] == (
        1,
        len(single[0]),
    )
    assert tok.encode("") == [] and tok("")["input_ids"] == []
    for text in texts:
        enc = tok(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        assert len(offsets) == len(enc["input_ids"])
        assert all(0 <= a <= b <= len(text) for a, b in offsets)
        assert [a for a, _ in offsets] == sorted(a for a, _ in offsets)
        for (a, b), token in zip(offsets, enc.tokens(), strict=True):
            if token in tok.added_tokens_encoder:
                assert text[a:b] == token
    pair = tok("<eoh> a", "b <eom> c", return_offsets_mapping=True)
    assert pair["input_ids"] == tok.encode("<eoh> a") + tok.encode("b <eom> c")
    assert pair["offset_mapping"][-1] == (8, 9)


def test_tiny_checkpoints_carry_the_released_structure() -> None:
    """The suite's tiny tokenizer (every tiny checkpoint's) has the added tokens of the files the release ran on."""
    from moss_agent.testing.checkpoints import tiny_moss_tokenizer_dir

    def layout(read: Any) -> tuple[Any, ...]:
        vocab, added = json.loads(read("vocab.json")), json.loads(read("added_tokens.json"))
        end = vocab["<|endoftext|>"]
        assert end == len(vocab) - 1
        after_end = [(token, i - end) for token, i in added.items()]
        return after_end, json.loads(read("special_tokens_map.json")), json.loads(read("tokenizer_config.json"))

    tiny = tiny_moss_tokenizer_dir()
    assert layout(lambda name: (tiny / name).read_text(encoding="utf-8")) == layout(GOLDEN["tokenizer_files"].get)


def test_rules_come_from_the_files(dirs: dict[str, Path]) -> None:
    added = json.loads(GOLDEN["tokenizer_files"]["added_tokens.json"])
    assert list(added)[: len(WHITESPACE_RUNS)] == list(WHITESPACE_RUNS) and len(added) == 43
    released = AddedTokenRules.from_files(dirs["released"])
    assert released.tokens == {*added, "<|endoftext|>"} and not released.strips  # all plain strings
    mapped = AddedTokenRules.from_files(dirs["added_token_map"])
    assert mapped.strips == {"<|endoftext|>": (False, False), "<eom>": (False, True)}
    bare = AddedTokenRules.from_files(dirs["no_map"])  # the slow class's defaults, which strip nothing
    assert bare.strips == {"<|endoftext|>": (False, False), "<eom>": (False, False)}
    text = "a \n<eoh>\n b" + " " * 35 + "c"
    assert [text[s:e] for s, e in released.pieces(text)] == ["a", "<eoh>", "b", " " * 31, "c"]


def test_mode_is_a_choice(dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="tokenization must be one of release, plain"):
        load_moss_tokenizer(dirs["released"], tokenization="exact")  # type: ignore[arg-type]
    tokenizer = load_moss_tokenizer(dirs["released"])
    assert tokenizer.tokenization == "release"
    ids = tokenizer.encode("x <eom> y")
    tokenizer.tokenization = "plain"
    assert tokenizer.encode("x <eom> y") != ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_saved_tokenizer_loads_with_the_same_rules(dirs: dict[str, Path], variant: str, tmp_path: Path) -> None:
    from moss_agent.checkpoints.files import load_tokenizer

    tokenizer, _ = load_tokenizer(dirs[variant])
    assert isinstance(tokenizer, MossTokenizerFast) and tokenizer.tokenization == "release"
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_tokenizer(tmp_path)
    assert isinstance(again, MossTokenizerFast) and again.added_token_rules == tokenizer.added_token_rules
    assert [again.encode(s) for s in GOLDEN["strings"]] == GOLDEN["string_ids"][variant]
    assert load_tokenizer(dirs[variant], tokenization="plain")[0].tokenization == "plain"


# ---------------------------------------------------------------- the tokenizer.json that `moss-agent convert` writes


@pytest.fixture(scope="module")
def converted(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every variant's tokenizer files as ``moss-agent convert`` writes them (tokenizer.json and its config)."""
    from moss_agent.checkpoints.convert import _write_tokenizer

    out = {}
    for variant, directory in dirs.items():
        out[variant] = tmp_path_factory.mktemp(f"converted-{variant}")
        _write_tokenizer(directory, out[variant], 2048)
    return out


def _known_difference(text: str, raw: Any) -> bool:
    """Whether ``text`` is where tokenizers' lstrip / rstrip cannot act as the release's cuts did.

    That is whitespace next to a token that strips it, holding a whitespace-run token (2+ spaces or tabs) and, on
    the right, more than that one run: tokenizers strips the whole whitespace, runs included, where the release
    strips only the neighbouring piece (a run it empties is dropped and strips nothing itself), and on the left a
    run's match has ended before the next token's lstrip could take it; or a separator ``\\x1c``-``\\x1f``
    (``str.strip`` takes it, Rust's ``char::is_whitespace`` does not).
    """
    added = {t.content: t for t in raw.get_added_tokens_decoder().values()}
    pattern = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))))
    for match in pattern.finditer(text):
        token = added[match[0]]
        left = re.search(r"\s*$", text[: match.start()])[0]  # type: ignore[index]
        right = re.match(r"\s*", text[match.end() :])[0]  # type: ignore[index]
        if token.lstrip and ("  " in left or "\t\t" in left):
            return True
        if token.rstrip and ("  " in right or "\t\t" in right) and right not in WHITESPACE_RUNS:
            return True
    return any("\x1c" <= c <= "\x1f" for c in text)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_tokenizer_json_strips_as_the_release(converted: dict[str, Path], variant: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from moss_agent.checkpoints.files import load_tokenizer

    raw = Tokenizer.from_file(str(converted[variant] / "tokenizer.json"))
    server = AutoTokenizer.from_pretrained(converted[variant])  # what `transformers serve` and vLLM load
    local, _ = load_tokenizer(converted[variant])
    expected = GOLDEN["string_ids"][variant]
    assert [local.encode(s) for s in GOLDEN["strings"]] == expected  # its own cuts: the flags add nothing
    got = [e.ids for e in raw.encode_batch(GOLDEN["strings"], add_special_tokens=False)]
    assert server(GOLDEN["strings"])["input_ids"] == got
    differ = [(s, e, g) for s, e, g in zip(GOLDEN["strings"], expected, got, strict=True) if e != g]
    assert [d for d in differ if not _known_difference(d[0], raw)] == []
    equal = len(expected) - len(differ)
    assert equal >= {"released": 135, "added_token_map": 141, "no_map": 142}[variant]  # of 325 edge cases
    strips = {t.content: (t.lstrip, t.rstrip) for t in raw.get_added_tokens_decoder().values()}
    assert strips["<eoh>"] == strips[" " * 31] == (True, True)
    assert strips["<eom>"] == {"released": (True, True), "added_token_map": (False, True)}.get(variant, (False, False))


@pytest.mark.slow  # about 10 s on two idle cores: 4.5 M characters, twice
def test_converted_tokenizer_json_on_the_sample_conversations(
    converted: dict[str, Path], golden_conversations: list[Any]
) -> None:
    from tokenizers import Tokenizer

    from moss_agent.checkpoints.files import load_tokenizer

    raw = Tokenizer.from_file(str(converted["released"] / "tokenizer.json"))
    texts = ["".join(c["segments"]) for c in golden_conversations]
    got = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    differ = [i for i, (c, ids) in enumerate(zip(golden_conversations, got, strict=True)) if ids != c["whole"]]
    # Measured: 874 of 888 equal. The 14 others are code with trailing whitespace before a newline and an
    # indentation ("x;  \n  y"): the release keeps both whitespace-run tokens and drops the newline; tokenizers'
    # rstrip on the first run eats the newline and the second run.
    assert len(golden_conversations) - len(differ) >= 874
    assert all(_known_difference(texts[i], raw) for i in differ)
    local, _ = load_tokenizer(converted["released"])
    assert local(texts)["input_ids"] == [c["whole"] for c in golden_conversations]
