r"""The MOSS SFT data format: conversation JSON files and user-prompt JSONL files.

The sample data (``SFT_data/conversations/**.json``) stores one conversation per file::

    {"conversation_id": 1, "meta_instruction": "...", "num_turns": 2, "category": "...",
     "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>\n", "Inner Thoughts": ..., "Commands": ...,
                         "Tool Responses": ..., "MOSS": ...}, ...}}

where every segment is the exact trained text. :func:`moss_agent.messages.to_messages` and
:func:`moss_agent.messages.from_messages` convert conversations to LangChain messages and back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from moss_agent.protocol import format as fmt
from moss_agent.protocol.format import MossConversation, MossTurn
from moss_agent.protocol.parser import parse_conversation

__all__ = ["iter_conversations", "read_conversation", "read_prompts"]

_SEGMENT_KEYS = (
    ("Human", fmt.HUMAN),
    ("Inner Thoughts", fmt.THOUGHTS),
    ("Commands", fmt.COMMANDS),
    ("Tool Responses", fmt.RESULTS),
    ("MOSS", fmt.MOSS),
)

# ---------------------------------------------------------------- reading the SFT files


def read_conversation(path: str | Path) -> MossConversation:
    """Read one SFT conversation JSON file.

    Args:
        path: The ``.json`` file.

    Returns:
        The conversation, with ``conversation_id`` and ``category`` when the file has them; its ``to_text()``
        is ``meta_instruction`` followed by every segment, byte for byte.

    Raises:
        ValueError: If the file is not a MOSS conversation (no ``meta_instruction`` / ``chat``).
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "chat" not in data or "meta_instruction" not in data:
        raise ValueError(f"{path} is not a MOSS SFT conversation (expected 'meta_instruction' and 'chat' keys)")
    chat = data["chat"]
    turns = [_read_turn(chat[key], path, key) for key in sorted(chat, key=_turn_number)]
    return MossConversation(
        system=data["meta_instruction"],
        turns=turns,
        conversation_id=data.get("conversation_id"),
        category=data.get("category"),
    )


def _turn_number(key: str) -> int:
    digits = key.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0


def _read_turn(turn: Mapping[str, str], path: Path, key: str) -> MossTurn:
    try:
        parts = [turn[name] for name, _ in _SEGMENT_KEYS]
    except KeyError as err:
        raise ValueError(f"{path}: {key} lacks the {err.args[0]!r} segment") from None
    contents = []
    for text, (_, role) in zip(parts, _SEGMENT_KEYS, strict=True):
        head = role + (":" if role == fmt.RESULTS else ": ")
        tail = fmt.SEGMENT_END[role] + "\n"
        if not (text.startswith(head) and text.endswith(tail)):
            # An irregular segment: let the tolerant parser read the whole turn.
            parsed = parse_conversation("".join(parts))
            return parsed.turns[0] if parsed.turns else MossTurn(human="", reply="")
        contents.append(text[len(head) : -len(tail)])
    human, thoughts, commands, results, reply = contents
    return MossTurn(human, reply, thoughts, commands, results)


def iter_conversations(root: str | Path) -> Iterator[MossConversation]:
    """Every conversation under ``root`` (a folder searched recursively, or one file), in path order.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no MOSS data at {root}")
    paths = [root] if root.is_file() else sorted(root.rglob("*.json"))
    for path in paths:
        yield read_conversation(path)


def read_prompts(path: str | Path) -> list[str]:
    """The user prompts of a ``user_prompts`` JSONL file (``{"user_prompt": ...}`` per line), or of a folder.

    Raises:
        ValueError: On a line without a ``user_prompt`` string.
    """
    path = Path(path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    prompts = []
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("user_prompt"), str):
                raise ValueError(f"{file}:{number}: expected {{'user_prompt': str}}")
            prompts.append(record["user_prompt"])
    return prompts
