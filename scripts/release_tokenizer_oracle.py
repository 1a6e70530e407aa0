"""Golden token ids from the release's own tokenizer, for ``tests/unit/test_release_tokenization.py``.

The release encoded with its slow ``MossTokenizer`` (``../shared/moss_release/tokenization_moss.py``) under its
pinned transformers 4.25.1. This script builds a scratch virtualenv with exactly those pins (no torch needed),
writes tokenizer files in the released structure (the project's tiny BPE; 43 added tokens: CodeGen's 38
whitespace runs, then the 5 end tokens), runs the release's tokenizer there on

- every conversation of ``../shared/moss_data``, segment by segment as ``finetune_moss.py`` does
  (``tokenizer.encode(meta_instruction)``, then ``tokenizer.encode(value)`` for every segment of every turn)
  and whole as ``moss_cli_demo.py`` does (``tokenizer(prompt)``);
- hand-made and seeded random strings, on these files and on two variants of the special-token files,

and writes ``tests/data/release_token_ids.json`` (the tokenizer files, the strings' ids, the conversations'
lengths) and ``tests/data/release_token_ids.u16.xz`` (the conversations' ids, uint16 little-endian, xz).
Segment ids are stored only for the conversations whose segment-wise ids differ from the whole ones.

Usage:
    python scripts/release_tokenizer_oracle.py [--venv DIR] [--data DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

from moss_agent.checkpoints.files import TOKENIZER_FILES
from moss_agent.protocol.data import read_conversation
from moss_agent.testing.checkpoints import tiny_moss_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "moss_data"
RELEASE = ROOT.parent / "shared" / "moss_release" / "tokenization_moss.py"
PINS = ("transformers==4.25.1", "tokenizers==0.13.3")
NAME = "release_token_ids"

# Runs inside the scratch venv: the release's tokenizer, used exactly as its scripts use it.
WORKER = r"""
import importlib.util, json, sys
import transformers, tokenizers
job = json.load(open(sys.argv[1], encoding="utf-8"))
spec = importlib.util.spec_from_file_location("tokenization_moss", job["release"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
out = {"versions": [transformers.__version__, tokenizers.__version__], "strings": {}}
for variant, directory in job["dirs"].items():
    tok = module.MossTokenizer.from_pretrained(directory)
    calls = [tok.encode(s) for s in job["strings"]]
    called = [tok(s)["input_ids"] for s in job["strings"]]
    assert calls == called, "encode and __call__ disagree"
    out["strings"][variant] = calls
    if variant == "released":
        out["segments"] = [[tok.encode(s) for s in segs] for segs in job["segments"]]  # finetune_moss.py
        out["whole"] = [tok(text)["input_ids"] for text in job["whole"]]  # moss_cli_demo.py
json.dump(out, open(sys.argv[2], "w", encoding="utf-8"))
"""

HAND_MADE = [
    "",
    " ",
    "\n",
    "<eoh>",
    "<eom>\n",
    "<|Human|>: Hi there<eoh>\n<|MOSS|>: Hello! How can I help?<eom>\n",
    "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>:",
    "<|Results|>:\nCalculate(\"2+3\") => '5'\n<eor>\n<|MOSS|>: 5<eom>\n",
    "text   <eoh>   text",
    "a<eoh><eom>b",
    "a <eoh> <eom> b",
    "<eoh>\n\n\n<eot>\t\t<eoc>  <eor>\r\n<eom>",
    "def f(x):\n    return x\n\n\tif x:\n\t\tpass\n",
    "```python\nfor i in range(3):\n        print(i)\n```",
    "x" + " " * 31 + "y" + " " * 32 + "z" + " " * 40 + "w" + " " * 63 + "v",
    "\t" * 9 + "a" + "\t" * 10 + "b" + "\t" * 20 + "c",
    "  \n  \n    \n",
    " \t \t  \t\t   ",
    "end of text<|endoftext|> next <|endoftext|>\nline",
    "<|endoftext|><eom><|endoftext|>",
    "中文 <eoh> 文本\u3000<eom>\u3000全角",
    "nbsp\xa0<eoh>\xa0after",
    "<eo h> <eoh <eoh>> <<eom>>",
    "trailing spaces   ",
    "   leading spaces",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded strings dense in whitespace, end tokens and their neighbours."""
    rng = random.Random(seed)
    parts = ["<eoh>", "<eot>", "<eoc>", "<eor>", "<eom>", "<|endoftext|>", "\n", "\r\n", " ", "\t", "\u3000"]
    parts += ["a", "word", " word", "中", "。", "<", ">", "<eo", "1", "!", "'s"]
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(1, 14)):
            pick = rng.random()
            if pick < 0.25:
                pieces.append(rng.choice(" \t") * rng.randint(1, 45))
            else:
                pieces.append(rng.choice(parts))
        out.append("".join(pieces))
    return out


def ensure_venv(venv: Path) -> Path:
    """The scratch venv's python, created with the release's pins when missing."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import transformers, tokenizers, regex; assert transformers.__version__ == '4.25.1'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    base = sys.executable if sys.version_info[:2] == (3, 11) else "python3.11"  # the pins have 3.11 wheels
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    subprocess.run(check, check=True)
    return python


def released_files(out: Path) -> dict[str, str]:
    """The project's tiny tokenizer files, in the released structure: whitespace runs, then the end tokens."""
    tiny_moss_tokenizer_dir(out)
    return {name: (out / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}


def _dict_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def variants(files: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """Other special-token files on the same BPE (None: the file is absent).

    ``added_token_map``: special_tokens_map.json holds serialised AddedTokens (what ``save_pretrained`` of
    4.25.1 writes): ``<|endoftext|>`` strips nothing, ``<eom>`` (eos) only on its right; ``<eot>`` is an
    additional special token given as a string.
    ``no_map``: no special_tokens_map.json and no special tokens in tokenizer_config.json (the class defaults).
    """
    special = {
        "bos_token": _dict_token("<|endoftext|>"),
        "eos_token": {**_dict_token("<eom>"), "rstrip": True},
        "unk_token": _dict_token("<|endoftext|>"),
        "additional_special_tokens": ["<eot>"],
    }
    config = json.loads(files["tokenizer_config.json"])
    bare = {k: v for k, v in config.items() if k not in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {
        "added_token_map": {"special_tokens_map.json": json.dumps(special, indent=2)},
        "no_map": {"special_tokens_map.json": None, "tokenizer_config.json": json.dumps(bare, indent=2)},
    }


def conversations(data: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """Names (relative paths), segments (finetune_moss.py's order) and whole texts of every conversation."""
    names, segments, whole = [], [], []
    for path in sorted((data / "conversations").rglob("*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        turns = [raw["chat"][f"turn_{i + 1}"] for i in range(int(raw["num_turns"]))]
        segs = [raw["meta_instruction"]] + [value for turn in turns for value in turn.values()]
        text = read_conversation(path).to_text()
        if text != "".join(segs):
            raise SystemExit(f"{path}: the project's reader does not give the trained text byte for byte")
        names.append(str(path.relative_to(data / "conversations")))
        segments.append(segs)
        whole.append(text)
    return names, segments, whole


def main(argv: list[str] | None = None) -> int:
    """Run the release's tokenizer and write the golden files; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "moss-release-tokenizer")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "tests" / "data")
    args = parser.parse_args(argv)

    python = ensure_venv(args.venv)
    names, segments, whole = conversations(args.data)
    strings = HAND_MADE + random_strings(300)
    with tempfile.TemporaryDirectory() as tmp:
        files = released_files(Path(tmp) / "released")
        dirs = {"released": str(Path(tmp) / "released")}
        others = variants(files)
        for variant, changes in others.items():
            directory = Path(tmp) / variant
            directory.mkdir()
            for name in TOKENIZER_FILES:
                text = changes[name] if name in changes else files[name]
                if text is not None:
                    (directory / name).write_text(text, encoding="utf-8")
            dirs[variant] = str(directory)
        job = {"release": str(RELEASE), "dirs": dirs, "strings": strings, "segments": segments, "whole": whole}
        (Path(tmp) / "job.json").write_text(json.dumps(job), encoding="utf-8")
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER, encoding="utf-8")
        subprocess.run([str(python), str(worker), str(Path(tmp) / "job.json"), str(Path(tmp) / "out.json")], check=True)
        result = json.loads((Path(tmp) / "out.json").read_text(encoding="utf-8"))

    blob = array("H")
    lengths, segment_lengths, split = [], [], []
    for i, (segs, ids) in enumerate(zip(result["segments"], result["whole"], strict=True)):
        joined = [t for seg in segs for t in seg]
        blob.extend(ids)
        lengths.append(len(ids))
        segment_lengths.append([len(seg) for seg in segs])
        if joined != ids:
            blob.extend(joined)
            split.append(i)
    if sys.byteorder != "little":
        blob.byteswap()
    golden = {
        "about": "Ids of the release's MossTokenizer (transformers {}, tokenizers {}); made by {}".format(
            *result["versions"], "scripts/release_tokenizer_oracle.py"
        ),
        "tokenizer_files": files,
        "variants": others,
        "strings": strings,
        "string_ids": result["strings"],
        "conversations": names,
        "lengths": lengths,
        "segment_lengths": segment_lengths,
        "segments_differ": split,
        "blob": f"{NAME}.u16.xz: per conversation its whole ids, then its segment ids if listed in segments_differ",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{NAME}.json").write_text(json.dumps(golden, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out_dir / f"{NAME}.u16.xz").write_bytes(lzma.compress(blob.tobytes(), preset=9 | lzma.PRESET_EXTREME))
    total = sum(lengths)
    print(f"{len(names)} conversations, {total} ids whole; segment-wise ids differ in {len(split)} conversations")
    print(f"{len(strings)} strings x {len(dirs)} file variants; written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
