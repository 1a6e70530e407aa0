"""MOSS checkpoints (tiny, in the released layout) to standard GPT-J / CodeGen checkpoints: exactness and layout."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from moss_agent.checkpoints.convert import (
    PADDING_BIAS,
    PROBE,
    ConversionError,
    convert,
    split_qkv,
    verify_conversion,
)
from moss_agent.checkpoints.files import WHITESPACE_RUNS
from moss_agent.checkpoints.hardware import Hardware
from moss_agent.checkpoints.loading import load_moss, load_tokenizer
from moss_agent.cli.convert import add_convert_parser
from moss_agent.engines.base import SamplingParams
from moss_agent.engines.transformers import TransformersEngine
from moss_agent.protocol import format as fmt
from moss_agent.testing.checkpoints import tiny_moss_checkpoint

CPU = Hardware.simulated(cpu_gib=16)


@pytest.fixture(scope="module")
def source() -> Path:
    return tiny_moss_checkpoint()


@pytest.fixture(scope="module")
def gptj(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(source, tmp_path_factory.mktemp("c") / "gptj", dtype="fp32", max_shard_size=100_000).path


def _logits(path: Path, text: str = PROBE) -> Any:
    import torch

    loaded = load_moss(path, precision="fp32", hardware=CPU)
    ids = torch.tensor([loaded.tokenizer.encode(text, add_special_tokens=False)])
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0, :, : len(loaded.tokenizer)]  # the tokens' rows
    return logits, type(loaded.model).__name__


# ---------------------------------------------------------------- exactness


def test_split_qkv_takes_q_v_k_out_of_each_of_the_four_groups() -> None:
    import torch

    n = 8  # 4 groups of 2 rows per kind
    fused = torch.arange(3 * n, dtype=torch.float32).unsqueeze(1).repeat(1, n)
    q, k, v = split_qkv(fused)
    rows = [int(r) for r in fused[:, 0]]
    groups = [rows[g * 6 : g * 6 + 6] for g in range(4)]  # each group: q q v v k k
    assert q[:, 0].tolist() == [r for g in groups for r in g[0:2]]
    assert v[:, 0].tolist() == [r for g in groups for r in g[2:4]]
    assert k[:, 0].tolist() == [r for g in groups for r in g[4:6]]
    with pytest.raises(ConversionError, match="3n, n"):
        split_qkv(torch.zeros(10, 4))


def test_gptj_logits_and_greedy_tokens_equal_the_source(source: Path, gptj: Path) -> None:
    reference, source_class = _logits(source)
    logits, converted_class = _logits(gptj)
    assert (source_class, converted_class) == ("CodeGenForCausalLM", "GPTJForCausalLM")
    assert float((logits - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    params = SamplingParams(do_sample=False, temperature=0, max_new_tokens=24, repetition_penalty=1.0)
    prompt = fmt.plugin_pass1_prompt(fmt.system_prompt(["Calculate"]), [], "What is 2+2? 请用中文回答。")
    want = TransformersEngine.from_pretrained(source, precision="fp32", hardware=CPU).generate(prompt, params)
    got = TransformersEngine.from_pretrained(gptj, precision="fp32", hardware=CPU).generate(prompt, params)
    assert got.token_ids == want.token_ids and len(want.token_ids) == 24


def test_codegen_format_is_the_same_model_without_remote_code(source: Path, tmp_path: Path) -> None:
    report = convert(source, tmp_path / "codegen", format="codegen", dtype="fp32", verify=True)
    assert report.max_abs_diff == 0.0 and report.argmax_agreement == 1.0
    config = json.loads((report.path / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["n_ctx"]) == ("codegen", ["CodeGenForCausalLM"], 2048)


@pytest.mark.parametrize(("dtype", "torch_name"), [("bf16", "BF16"), (None, "F16")])
def test_dtypes_are_written_and_verified(source: Path, tmp_path: Path, dtype: str | None, torch_name: str) -> None:
    report = convert(source, tmp_path / "out", dtype=dtype, verify=True)
    assert report.max_abs_diff is not None and report.argmax_agreement is not None and report.argmax_agreement > 0.95
    header = _safetensors_header(next(report.path.glob("*.safetensors")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {torch_name}
    assert report.total_bytes == report.parameters * 2


def test_verification_catches_a_wrong_split(source: Path, gptj: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in gptj.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    q, k = "transformer.h.0.attn.q_proj.weight", "transformer.h.0.attn.k_proj.weight"
    for name, other in ((q, k), (k, q)):  # q and k taken from the wrong places of the groups
        tensors = load_file(broken / weight_map[name])
        tensors[name] = load_file(broken / weight_map[other])[other]
        save_file(tensors, str(broken / weight_map[name]), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="logits differ"):
        verify_conversion(source, broken)


# ---------------------------------------------------------------- layout


def _safetensors_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as f:
        return dict(json.loads(f.read(int.from_bytes(f.read(8), "little"))))


def test_layout_is_standard_sharded_safetensors_with_configs(source: Path, gptj: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    files = sorted(p.name for p in gptj.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and all(f"-of-{len(shards):05d}" in f for f in shards)
    assert not [f for f in files if f.endswith((".py", ".bin"))]
    index = json.loads((gptj / "model.safetensors.index.json").read_text())
    stored = {k: s for s in shards for k in _safetensors_header(gptj / s) if k != "__metadata__"}
    assert index["weight_map"] == stored
    assert not [k for k in stored if "causal_mask" in k or "qkv_proj" in k]
    assert all(_safetensors_header(gptj / s)["__metadata__"] == {"format": "pt"} for s in shards)

    config = AutoConfig.from_pretrained(gptj, trust_remote_code=False)
    assert (config.model_type, config.architectures) == ("gptj", ["GPTJForCausalLM"])
    assert "auto_map" not in json.loads((gptj / "config.json").read_text())
    _, ends = load_tokenizer(source)
    generation = GenerationConfig.from_pretrained(gptj)
    assert generation.eos_token_id == ends["<eom>"] == config.eos_token_id
    assert (generation.temperature, generation.top_p, generation.top_k, generation.repetition_penalty) == (
        0.7,
        0.8,
        40,
        1.02,
    )
    tokenizer = AutoTokenizer.from_pretrained(gptj, trust_remote_code=False)
    n_tokens = len(load_tokenizer(source)[0])
    assert tokenizer.eos_token == "<eom>" and len(tokenizer) == n_tokens
    model = AutoModelForCausalLM.from_pretrained(gptj)
    assert model.num_parameters() == index["metadata"]["total_size"] // 4
    # The vocabulary's padding rows (no token) can never be picked; the token rows are the source's.
    bias, reference = model.lm_head.bias, load_moss(source, precision="fp32", hardware=CPU).model.lm_head.bias
    assert config.vocab_size > n_tokens and bool((bias[n_tokens:] == PADDING_BIAS).all())
    assert bool((bias[:n_tokens] == reference[:n_tokens]).all())


def test_shards_stay_under_the_limit(source: Path, tmp_path: Path) -> None:
    limit = 64 * 1024
    report = convert(source, tmp_path / "small", dtype="fp32", max_shard_size=limit)
    for shard in report.path.glob("*.safetensors"):
        header = _safetensors_header(shard)
        sizes = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
        assert sum(sizes) <= limit or len(sizes) == 1  # a single tensor larger than the limit has its own shard


@pytest.mark.slow  # a 52 MiB checkpoint and a fresh interpreter: 10-30 s
def test_conversion_streams_with_private_memory_well_under_the_checkpoint(tmp_path: Path) -> None:
    src = tiny_moss_checkpoint(tmp_path / "mid", n_embd=512, n_layer=8, n_head=8, rotary_dim=32, shards=4)
    size = sum(f.stat().st_size for f in src.glob("*.bin"))
    script = textwrap.dedent(
        f"""
        import threading, time
        from pathlib import Path
        import safetensors.torch, torch, transformers
        from moss_agent.checkpoints.convert import convert
        from moss_agent.checkpoints.loading import load_tokenizer
        load_tokenizer(Path({str(src)!r}))  # imports and caches warm, before measuring
        def anon():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) * 1024
        base, peak, done = anon(), [0], []
        def watch():
            while not done:
                peak[0] = max(peak[0], anon()); time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        convert({str(src)!r}, {str(tmp_path / "out")!r}, max_shard_size=4 * 2**20)
        done.append(1); t.join()
        print(peak[0] - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    growth = int(out.stdout.strip().splitlines()[-1])
    assert size > 40 * 2**20
    assert growth < size / 4, f"private memory grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"


# ---------------------------------------------------------------- tokenizer


@lru_cache(maxsize=1)
def _reference_bpe(path: str) -> Any:
    """GPT-2's byte-level BPE as the slow MossTokenizer (transformers 4.25.1) ran it: the text cut at the added
    tokens (leftmost, longest), then left to right every added token strips the whitespace on both sides (the tiny
    checkpoint's, as the release's, are all plain strings: CodeGen's whitespace runs and the end tokens), so a run
    that its neighbour strips away is gone and strips nothing itself; then regex + merges on every other piece."""
    import regex

    vocab = json.loads((Path(path) / "vocab.json").read_text(encoding="utf-8"))
    added = json.loads((Path(path) / "added_tokens.json").read_text(encoding="utf-8"))
    merges = (Path(path) / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    words = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    special = [*added, "<|endoftext|>"]
    splitter = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")

    def bpe(word: tuple[str, ...]) -> list[str]:
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        pieces = [piece for piece in splitter.split(text) if piece]  # the release's cuts: no empty pieces
        for i, piece in enumerate(pieces):  # the current value: an emptied run is no token any more
            if piece in special:
                if i + 1 < len(pieces):
                    pieces[i + 1] = pieces[i + 1].lstrip()
                if i > 0:
                    pieces[i - 1] = pieces[i - 1].rstrip()
        for piece in pieces:
            if not piece:
                continue
            if piece in added:
                ids.append(added[piece])
            elif piece in vocab and piece in special:
                ids.append(vocab[piece])
            else:
                for word in words.findall(piece):
                    ids += [vocab[t] for t in bpe(tuple(byte_char[b] for b in word.encode("utf-8")))]
        return ids

    return encode


SAMPLES = [
    fmt.MossConversation(
        fmt.system_prompt(["Search", "Calculate"]),
        [
            fmt.MossTurn("你好，请问你是谁？", "我是MOSS，一个由复旦大学开发的人工智能助手。"),
            fmt.MossTurn(
                "What's 3.14 * 12^2?",
                "It is 452.16.",
                inner_thoughts="I should use Calculate.",
                commands='Calculate("3.14*12^2")',
                results=fmt.results_body(["Calculate(\"3.14*12^2\") => '452.16'\n"]),
            ),
        ],
    ).to_text(),
    "<eoh><eot><eoc><eor><eom><|endoftext|>  two  spaces\t\ttabs\n\n\nnewlines 😀 émigré ×÷ 中文 123456789 it's we'll",
    " leading space, trailing space ",
    # whitespace runs: the newline before an indentation goes, a run right after an end token goes, and so does
    # the rest of a long run after its first 31 spaces or 9 tabs
    "def f(x):\n    return x\n\n\tif x:\n\t\tpass\n<eom>\n",
    "x" + " " * 35 + "y <eom>  z\tw" + "\t" * 12 + "v",
]


def test_tokenizer_json_gives_the_release_ids(source: Path, gptj: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    reference = _reference_bpe(str(source))
    fast, _ = load_tokenizer(source)
    converted, _ = load_tokenizer(gptj)  # its own cuts, on a tokenizer.json whose tokens strip too: no double effect
    plain, _ = load_tokenizer(source, tokenization="plain")
    raw = Tokenizer.from_file(str(gptj / "tokenizer.json"))  # plain BPE with the added tokens' lstrip / rstrip
    auto = AutoTokenizer.from_pretrained(gptj)
    added = json.loads((source / "added_tokens.json").read_text(encoding="utf-8"))
    assert set(WHITESPACE_RUNS) <= set(added)  # the release's 38 runs: their stripping is exercised here
    assert {t.content: (t.lstrip, t.rstrip) for t in raw.get_added_tokens_decoder().values()} == dict.fromkeys(
        [*added, "<|endoftext|>"], (True, True)
    )
    runs = {added[run] for run in WHITESPACE_RUNS}
    assert any(runs & set(reference(text)) for text in SAMPLES)
    for text in SAMPLES:
        want = reference(text)
        assert fast.encode(text, add_special_tokens=False) == want
        assert converted.encode(text, add_special_tokens=False) == want
        assert raw.encode(text, add_special_tokens=False).ids == want
        assert auto(text)["input_ids"] == want  # what a server runs: no bos added
        assert auto.decode(want) == fast.decode(want)
        if not any(token in text for token in fast.added_tokens_encoder):
            assert auto.decode(want) == text
    assert any(plain.encode(text) != reference(text) for text in SAMPLES)  # the stripping is there to see


def test_tokenizer_json_on_the_moss_sample_data(source: Path, gptj: Path, moss_texts: list[tuple[Path, str]]) -> None:
    from tokenizers import Tokenizer

    reference = _reference_bpe(str(source))
    raw = Tokenizer.from_file(str(gptj / "tokenizer.json"))
    for path, text in moss_texts[::25]:
        assert raw.encode(text, add_special_tokens=False).ids == reference(text), path


# ---------------------------------------------------------------- refusals and the command line


def test_refusals(source: Path, gptj: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not empty"):
        convert(source, gptj)
    with pytest.raises(ConversionError, match="already a GPT-J"):
        convert(gptj, tmp_path / "again")
    with pytest.raises(ConversionError, match="format"):
        convert(source, tmp_path / "x", format="llama")  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="dtype"):
        convert(source, tmp_path / "x", dtype="int8")
    with pytest.raises(ConversionError, match="not a GPTQ checkpoint"):
        convert(source, tmp_path / "x", keep_quantization=True)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x-*"))


def test_command_line(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="moss-agent")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(source), str(tmp_path / "cli"), "--dtype", "fp32", "--verify"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "gptj, float32" in printed and "largest logit difference 0" in printed
    assert (tmp_path / "cli" / "tokenizer.json").is_file()
