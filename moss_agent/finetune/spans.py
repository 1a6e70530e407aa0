r"""Token ids and loss spans of training conversations, as the release's ``finetune_moss.py`` computes them.

The release encodes the meta instruction and then every segment of every turn separately
(``tokenizer.encode(segment)``) and concatenates the ids. Two loss rules:

- ``release`` (the default, the release's): no loss on the meta instruction; no loss inside each
  ``Tool Responses`` segment, from after the ids of ``<|Results|>:`` (the release's ``+ 5``: five ids on the
  released vocabulary, counted here on the tokenizer at hand) to the segment's last two ids (the release's
  ``- 2``, meant for ``<eor>\n``); loss on every other id, human turns included. With the release's tokenization
  the ``\n`` after ``<eor>`` is stripped, so the last id of the results body keeps its loss, as it did there.
- ``moss``: loss only on MOSS's own segments (inner thoughts, commands, reply), role tags and end tokens
  included.

A conversation longer than ``max_length`` stops after the last whole turn that fits (the release's rule); one
whose first turn does not fit is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moss_agent.finetune.data import Sample
from moss_agent.protocol import format as fmt
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["IGNORE", "LOSS_MODES", "EncodeStats", "Encoded", "LossMode", "encode_sample", "encode_samples"]

IGNORE = -100
"""The label of an id without loss (PyTorch's cross-entropy ``ignore_index``)."""

LossMode = Literal["release", "moss"]
LOSS_MODES: tuple[str, ...] = ("release", "moss")
RELEASE_TAIL = 2
"""finetune_moss.py leaves the last two ids of a results segment with loss (its ``<eor>\\n``)."""
OWN_SEGMENTS = frozenset({"Inner Thoughts", "Commands", "MOSS"})
"""The segments MOSS writes itself (``--loss moss``)."""


@dataclass
class Encoded:
    """One conversation as ids with the spans that get no loss.

    Attributes:
        input_ids: The ids, meta instruction first.
        no_loss: ``(start, end)`` id ranges without loss.
        turns: Turns kept.
        cut_turns: Turns dropped at the end because of ``max_length``.
        source: Where the conversation came from.
    """

    input_ids: list[int]
    no_loss: list[tuple[int, int]]
    turns: int
    cut_turns: int = 0
    source: str = ""

    def labels(self) -> list[int]:
        """The labels: the ids, with :data:`IGNORE` inside every no-loss span."""
        labels = list(self.input_ids)
        for start, end in self.no_loss:
            labels[start:end] = [IGNORE] * max(0, end - start)
        return labels


@dataclass
class EncodeStats:
    """What encoding did to the data.

    Attributes:
        conversations: Conversations kept.
        truncated: Conversations cut at a turn boundary to fit ``max_length``.
        dropped: Conversations dropped because their first turn does not fit.
        tokens: Ids kept in all.
        loss_tokens: Ids with loss (labels that are not :data:`IGNORE`).
    """

    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    loss_tokens: int = 0


def _encoder(tokenizer: Any) -> Any:
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return encode


def encode_sample(
    sample: Sample, tokenizer: Any, *, loss: LossMode = "release", max_length: int = CONTEXT_WINDOW
) -> Encoded | None:
    """Ids and no-loss spans of one conversation.

    Args:
        sample: The conversation.
        tokenizer: The tokenizer :func:`~moss_agent.checkpoints.loading.load_moss` returns (its ``encode``).
        loss: ``release`` or ``moss`` (see the module docstring).
        max_length: Most ids kept; later turns are cut at a turn boundary.

    Returns:
        The encoding, or None when not even the first turn fits.

    Raises:
        ValueError: On an unknown loss rule.
    """
    if loss not in LOSS_MODES:
        raise ValueError(f"unknown loss rule {loss!r}; choose {' or '.join(LOSS_MODES)}")
    encode = _encoder(tokenizer)
    head = len(encode(fmt.RESULTS + ":"))
    ids = encode(sample.meta_instruction)
    no_loss = [(0, len(ids))]
    kept = 0
    for turn in sample.turns:
        turn_ids: list[int] = []
        turn_spans = []
        for key, text in turn:
            seg = encode(text)
            start = len(ids) + len(turn_ids)
            if loss == "release" and key == "Tool Responses":
                turn_spans.append((start + head, start + len(seg) - RELEASE_TAIL))
            elif loss == "moss" and key not in OWN_SEGMENTS:
                turn_spans.append((start, start + len(seg)))
            turn_ids.extend(seg)
        if len(ids) + len(turn_ids) > max_length:
            break
        ids.extend(turn_ids)
        no_loss.extend(turn_spans)
        kept += 1
    if kept == 0:
        return None
    return Encoded(ids, no_loss, kept, len(sample.turns) - kept, sample.source)


def encode_samples(
    samples: Sequence[Sample], tokenizer: Any, *, loss: LossMode = "release", max_length: int = CONTEXT_WINDOW
) -> tuple[list[Encoded], EncodeStats]:
    """Encode every conversation; count the truncated and dropped ones."""
    out: list[Encoded] = []
    stats = EncodeStats()
    for sample in samples:
        enc = encode_sample(sample, tokenizer, loss=loss, max_length=max_length)
        if enc is None:
            stats.dropped += 1
            continue
        stats.truncated += enc.cut_turns > 0
        stats.tokens += len(enc.input_ids)
        stats.loss_tokens += sum(label != IGNORE for label in enc.labels())
        out.append(enc)
    stats.conversations = len(out)
    return out, stats
