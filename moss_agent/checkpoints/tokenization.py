"""MOSS's tokenizer as the release ran it: byte-level BPE, with the release's treatment of added tokens.

The release encoded with a slow ``MossTokenizer`` under transformers 4.25.1, which does this before BPE:

1. The text is cut at every added token (the entries of ``added_tokens.json`` and the special tokens):
   leftmost match first, the longest one where several start at the same place.
2. Left to right, every added token strips the whitespace next to it: on both sides when the files give it as a
   plain string (every entry of ``added_tokens.json`` and any special token written as a string), and as its own
   ``lstrip`` / ``rstrip`` say when a special token is a serialised ``AddedToken``. A whitespace-run token that a
   neighbour strips away entirely is gone, and strips nothing itself.
3. Every remaining text piece is BPE-encoded on its own.

So the newline after ``<eoh>`` never reaches the model, nor the newline before an indentation that one of
CodeGen's whitespace-run tokens encodes. :class:`MossTokenizerFast` gives these ids through ``encode``,
``__call__`` (single, pairs, batches; offsets point into the original text) and ``tokenize``, with the BPE of the
fast tokenizer; ``tokenization="plain"`` keeps the fast tokenizer's own behaviour. Decoding is the same in both.
Which tokens strip is read from the tokenizer files (see :meth:`AddedTokenRules.from_files`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

__all__ = [
    "TOKENIZATIONS",
    "AddedTokenRules",
    "MossTokenizerFast",
    "Tokenization",
    "load_moss_tokenizer",
]

Tokenization = Literal["release", "plain"]
TOKENIZATIONS: tuple[str, ...] = ("release", "plain")
"""``release``: the release's ids (the default); ``plain``: the fast tokenizer's plain BPE around added tokens."""

_SPECIAL_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
_WRAPPED = ("bos_token", "eos_token", "unk_token", "pad_token")
"""The slow class turns string values of these ``__init__`` arguments into AddedTokens that strip nothing."""
_DEFAULTS = {
    "MossTokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<eom>", "unk_token": "<|endoftext|>"},
    "": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}

Strip = tuple[bool, bool]
"""``(lstrip, rstrip)``: whether an added token eats the whitespace on its left / right."""
_BOTH: Strip = (True, True)
SAVED_STRIPS_KEY = "moss_agent_added_token_strips"
"""The ``tokenizer_config.json`` key where :meth:`MossTokenizerFast.save_pretrained` keeps the rules."""


@dataclass(frozen=True)
class _Flags:
    """A special token given as a serialised AddedToken."""

    content: str
    strip: Strip


@dataclass(frozen=True)
class AddedTokenRules:
    """Where the release cuts a text before BPE, and which whitespace each added token strips.

    Attributes:
        tokens: The added tokens (cut out, never BPE-encoded).
        strips: ``(lstrip, rstrip)`` of the tokens that do not strip on both sides.
    """

    tokens: frozenset[str]
    strips: Mapping[str, Strip] = field(default_factory=dict)

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        # Longest first: at one position the alternation takes the first that matches, i.e. the longest.
        ordered = sorted((t for t in self.tokens if t), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def pieces(self, text: str) -> list[tuple[int, int]]:
        """The ``(start, end)`` spans of ``text`` that the release encodes, in order, none empty.

        A span is either one added token or text to BPE-encode; whitespace the tokens strip lies between spans.
        """
        spans: list[list[int]] = []
        pos = 0
        for match in self._pattern.finditer(text) if self._pattern else ():
            if match.start() > pos:
                spans.append([pos, match.start()])
            spans.append([match.start(), match.end()])
            pos = match.end()
        if pos < len(text):
            spans.append([pos, len(text)])
        for i, span in enumerate(spans):
            token = text[span[0] : span[1]]
            if token not in self.tokens:  # text, or a token its neighbour stripped to nothing
                continue
            lstrip, rstrip = self.strips.get(token, _BOTH)
            if rstrip and i + 1 < len(spans):
                right = spans[i + 1]
                while right[0] < right[1] and text[right[0]].isspace():
                    right[0] += 1
            if lstrip and i > 0:
                left = spans[i - 1]
                while left[1] > left[0] and text[left[1] - 1].isspace():
                    left[1] -= 1
        return [(start, end) for start, end in spans if start < end]

    @classmethod
    def from_files(cls, directory: str | Path, extra_tokens: Iterable[str] = ()) -> AddedTokenRules:
        """The rules the release derives from a checkpoint's tokenizer files.

        The added tokens are the keys of ``added_tokens.json`` (when absent: ``extra_tokens``, the added tokens of
        the loaded tokenizer) and every special token. A special token keeps its own ``lstrip`` / ``rstrip`` when
        its value is an AddedToken: a serialised one (``{"__type": "AddedToken", ...}`` in
        ``tokenizer_config.json``, any object in ``special_tokens_map.json``), or a string given to the slow class
        for bos / eos / unk / pad in ``tokenizer_config.json`` (or its default). ``special_tokens_map.json`` is
        read last and overrides; a plain string there strips on both sides, as do all other added tokens. A folder
        written by :meth:`MossTokenizerFast.save_pretrained` carries the rules under :data:`SAVED_STRIPS_KEY`.

        Args:
            directory: The folder with the tokenizer files.
            extra_tokens: Further added tokens (cut out and stripping on both sides unless special).

        Raises:
            ValueError: If a file is not valid JSON of the expected shape.
        """
        directory = Path(directory)
        config = _read_json(directory / "tokenizer_config.json") or {}
        values: dict[str, Any] = {}
        defaults = _DEFAULTS[
            "MossTokenizer" if config.get("tokenizer_class", "MossTokenizer") == "MossTokenizer" else ""
        ]
        for attribute in _SPECIAL_ATTRIBUTES:
            value = _from_config(config.get(attribute, defaults.get(attribute)))
            if attribute in _WRAPPED and isinstance(value, str):
                value = _Flags(value, (False, False))
            values[attribute] = value
        special_map = _read_json(directory / "special_tokens_map.json") or {}
        for attribute, value in special_map.items():
            values[attribute] = _from_map(value)
        specials: list[str | _Flags] = []
        for value in values.values():
            specials.extend(value if isinstance(value, list) else [value] if value is not None else [])
        strips: dict[str, Strip] = {}
        for value in specials:  # the first AddedToken of a content decides, as in the slow tokenizer
            if isinstance(value, _Flags) and value.content not in strips:
                strips[value.content] = value.strip
        saved = config.get(SAVED_STRIPS_KEY) or {}  # written by save_pretrained: it has the last word
        strips.update({str(t): (bool(s[0]), bool(s[1])) for t, s in saved.items()})
        added = _read_json(directory / "added_tokens.json")
        listed = list(added) if isinstance(added, dict) else list(extra_tokens)
        tokens = frozenset(listed) | {v.content if isinstance(v, _Flags) else str(v) for v in specials} | set(saved)
        return cls(tokens - {""}, {t: s for t, s in strips.items() if s != _BOTH})


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _flags(value: Mapping[str, Any]) -> _Flags:
    return _Flags(str(value.get("content", "")), (bool(value.get("lstrip")), bool(value.get("rstrip"))))


def _from_config(value: Any) -> Any:
    """A ``tokenizer_config.json`` value: only dicts marked ``__type: AddedToken`` become AddedTokens."""
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return _flags(value)
    if isinstance(value, list):
        return [_from_config(v) for v in value]
    return value


def _from_map(value: Any) -> Any:
    """A ``special_tokens_map.json`` value: every dict is an AddedToken."""
    if isinstance(value, dict):
        return _flags(value)
    if isinstance(value, list):
        return [_flags(v) if isinstance(v, dict) else v for v in value]
    return value


class MossTokenizerFast(GPT2TokenizerFast):  # type: ignore[misc]
    """A fast GPT-2 tokenizer that encodes as the MOSS release did (see the module docstring).

    Load it with :func:`load_moss_tokenizer` or ``MossTokenizerFast.from_pretrained(path, tokenization=...)``.
    ``tokenization`` (``release`` or ``plain``) can be changed on an instance. In ``release`` mode, input that is
    already split into words, and calls with ``split_special_tokens=True``, are encoded as in ``plain`` mode.
    """

    tokenization: Tokenization = "release"
    added_token_rules: AddedTokenRules | None = None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | Path, *args: Any, tokenization: Tokenization = "release", **kwargs: Any
    ) -> MossTokenizerFast:
        """Load the tokenizer files of ``path``; the rules come from the same files (see :class:`AddedTokenRules`)."""
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)} (got {tokenization!r})")
        tokenizer = super().from_pretrained(path, *args, **kwargs)
        tokenizer.tokenization = tokenization
        if Path(path).is_dir():
            tokenizer.added_token_rules = AddedTokenRules.from_files(path, tokenizer.added_tokens_encoder)
        return tokenizer

    def release_rules(self) -> AddedTokenRules:
        """The rules in use: from the files when loaded from a folder, else from this tokenizer's own tokens."""
        if self.added_token_rules is None:
            strips = {
                str(t): (bool(t.lstrip), bool(t.rstrip))
                for t in self.added_tokens_decoder.values()
                if getattr(t, "special", False)
            }
            self.added_token_rules = AddedTokenRules(frozenset(self.added_tokens_encoder), strips)
        return self.added_token_rules

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Save as the fast tokenizer does, and keep the rules in ``tokenizer_config.json``.

        ``tokenizer.json`` lists the added tokens; :data:`SAVED_STRIPS_KEY` gives ``[lstrip, rstrip]`` for the
        special tokens and for every token that does not strip on both sides, so that :meth:`from_pretrained`
        on the saved folder cuts and strips as this tokenizer does.
        """
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config[SAVED_STRIPS_KEY] = self.saved_strips()
        path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return saved

    def saved_strips(self) -> dict[str, list[bool]]:
        """The value saved under :data:`SAVED_STRIPS_KEY`.

        ``[lstrip, rstrip]`` of the special tokens and of every token that does not strip on both sides.
        """
        rules = self.release_rules()
        specials = {str(t) for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t}
        return {t: list(rules.strips.get(t, _BOTH)) for t in sorted({*rules.strips, *specials})}

    def release_backend_json(self) -> str:
        r"""This tokenizer's ``tokenizer.json`` with the release's stripping as the added tokens' lstrip / rstrip.

        Plain ``tokenizers`` (servers) then strips nearly as the release did; it differs in three ways. It strips
        by Rust's ``char::is_whitespace``, which leaves ``\x1c``-``\x1f`` (``str.strip`` takes them). Its
        rstrip eats all the whitespace after a token, whitespace-run tokens included, where the release strips
        only the next piece (``"x;  \n  y"``: the release keeps both runs and drops the newline). A run just
        before a token that lstrips stays, where the release drops it. A :class:`MossTokenizerFast` loaded from
        the result strips by its own cuts (``release`` mode), on which the flags have no further effect.
        """
        rules = self.release_rules()
        data = json.loads(self.backend_tokenizer.to_str())
        for added in data.get("added_tokens") or ():
            if added.get("content") in rules.tokens:
                added["lstrip"], added["rstrip"] = rules.strips.get(added["content"], _BOTH)
                # tokenizers 0.23 panics ("AddedVocabulary bad split") on a whitespace token that lstrips but
                # not rstrips, found inside whitespace another token's rstrip ate: such a token rstrips too.
                added["rstrip"] = added["rstrip"] or (added["lstrip"] and not added["content"].strip())
        return json.dumps(data, ensure_ascii=False)

    def release_pieces(self, text: str) -> list[str]:
        """The pieces the release encodes one by one: added tokens and the text between them, whitespace stripped."""
        return [text[a:b] for a, b in self.release_rules().pieces(text)]

    def _encode_plus(  # type: ignore[override]
        self,
        text: Any,
        text_pair: Any = None,
        *args: Any,
        is_split_into_words: bool = False,
        split_special_tokens: bool | None = None,
        return_offsets_mapping: bool = False,
        return_tensors: Any = None,
        **kwargs: Any,
    ) -> Any:
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        pairs = (list(text_pair) if batched else [text_pair]) if text_pair is not None else []
        plain = (
            self.tokenization == "plain"
            or is_split_into_words
            or bool(self.split_special_tokens if split_special_tokens is None else split_special_tokens)
            or kwargs.get("sanitize_control_tokens")
            or args
            or not texts
            or not all(isinstance(t, str) for t in texts + pairs)
        )
        if plain:
            return super()._encode_plus(
                text,
                text_pair,
                *args,
                is_split_into_words=is_split_into_words,
                split_special_tokens=split_special_tokens,
                return_offsets_mapping=return_offsets_mapping,
                return_tensors=return_tensors,
                **kwargs,
            )
        if self.add_prefix_space:
            raise ValueError("the release's tokenization needs add_prefix_space false; use tokenization='plain'")
        rules = self.release_rules()
        spans = [rules.pieces(t) for t in texts]
        pair_spans = [rules.pieces(t) for t in pairs]
        words = [[t[a:b] for a, b in s] for t, s in zip(texts, spans, strict=True)]
        pair_words = [[t[a:b] for a, b in s] for t, s in zip(pairs, pair_spans, strict=True)]
        # Pre-split words keep the release's cuts; BPE never crosses a word.
        encoded = super()._encode_plus(
            words if batched else words[0],
            (pair_words if batched else pair_words[0]) if pairs else None,
            is_split_into_words=True,
            split_special_tokens=False,
            return_offsets_mapping=return_offsets_mapping,
            return_tensors=None if return_offsets_mapping else return_tensors,
            **kwargs,
        )
        if return_offsets_mapping:
            _shift_offsets(encoded, spans, pair_spans)
            if return_tensors is not None:
                encoded.convert_to_tensors(return_tensors, prepend_batch_axis=not batched and _is_flat(encoded))
        return encoded


def _is_flat(encoded: Any) -> bool:
    ids = encoded["input_ids"]
    return not ids or not isinstance(ids[0], list)


def _shift_offsets(encoded: Any, spans: list[list[tuple[int, int]]], pair_spans: list[list[tuple[int, int]]]) -> None:
    """Offsets of words (relative to each piece) -> offsets into the caller's texts."""
    rows = encoded["offset_mapping"] if not _is_flat(encoded) else [encoded["offset_mapping"]]
    samples = encoded.get("overflow_to_sample_mapping") or list(range(len(rows)))
    for row, (offsets, encoding, sample) in enumerate(zip(rows, encoded.encodings, samples, strict=True)):
        shifted = []
        for (a, b), word, seq in zip(offsets, encoding.word_ids, encoding.sequence_ids, strict=True):
            if word is None:  # a special token of a template: no place in the text
                shifted.append((a, b))
                continue
            start = (spans if seq != 1 else pair_spans)[sample][word][0]
            shifted.append((a + start, b + start))
        rows[row][:] = shifted


def load_moss_tokenizer(path: str | Path, tokenization: Tokenization = "release") -> MossTokenizerFast:
    """The MOSS tokenizer of a checkpoint folder (vocab.json, merges.txt, added_tokens.json, ...).

    Args:
        path: The folder.
        tokenization: ``release`` (the release's ids) or ``plain``.
    """
    return MossTokenizerFast.from_pretrained(path, tokenization=tokenization)
