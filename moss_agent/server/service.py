"""What the server does with a request, on the model's worker thread: conversations, switches and turns.

A conversation lives in the SQLite store under its id. Its plugin switches are the switch block of its
stored system text, which is what MOSS reads, so the setting and the prompt can never disagree.

A turn's earlier turns come from the store when the conversation has stored turns; otherwise from the
request's messages before its last user message (and those are then stored as the conversation's start). A
request without ``tools`` runs MOSS's plugin loop with the conversation's switched-on plugins
(:class:`~moss_agent.agent.MossAgent`); a request with ``tools`` binds them to ChatMoss and returns MOSS's
commands as ``tool_calls`` for the client to run, and stores the turn once the client's tools have answered
and MOSS has replied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from moss_agent.agent import CommandRun, MossAgent, TurnResult
from moss_agent.chat_model import ChatMoss
from moss_agent.memory import TokenBudgetMemory
from moss_agent.memory.store import SQLiteStore, json_artifacts
from moss_agent.messages import (
    RAW_COMMANDS,
    REASONING,
    from_messages,
    message_text,
    render_messages,
    system_text,
    to_messages,
)
from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins
from moss_agent.tool_binding import bind_tools

__all__ = ["IMAGE_NAME", "Event", "MossService", "TurnRequest", "plugin_key"]

IMAGE_NAME = re.compile(r"[0-9a-f]{32}\.png")
"""The names Text2Image gives its pictures (uuid4 hex): the only names the image route serves."""

_CAPABILITIES = fmt.META_INSTRUCTION.rsplit("\n", 2)[-2] + "\n"  # "Capabilities and tools that MOSS can possess."
_RESULTS_ROOM = 256  # prompt tokens kept free for a plugin turn's results


def plugin_key(tool: BaseTool) -> str:
    """The plugin key of a server-side tool: MOSS's own (``calculator``) or the tool's name."""
    plugin = _plugins.by_api(tool.name)
    return plugin.key if plugin is not None else tool.name


@dataclass
class TurnRequest:
    """One chat-completion request, as the worker runs it.

    Attributes:
        conversation_id: The conversation.
        messages: The request's messages (system messages included).
        plugins: Plugin keys to switch on from now on; None keeps the conversation's.
        tools: Client-side tools (OpenAI tool dicts); None for a server-side plugin turn.
        tool_choice: The request's ``tool_choice``.
        sampling: ChatMoss fields to set for this request (temperature ...).
        max_tokens: Most tokens per generation pass.
    """

    conversation_id: str
    messages: list[BaseMessage]
    plugins: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 256


@dataclass
class Event:
    """What a turn yields: ``reply`` and ``reasoning`` text deltas, ``moss`` plugin events, ``final`` (last)."""

    kind: Literal["reply", "reasoning", "moss", "final"]
    data: Any


def _meta_part(system: str) -> str:
    """The meta instruction of a system text, without its switch block."""
    head, found, _ = system.partition(_CAPABILITIES)
    return head + found if found else (system if system.endswith("\n") else system + "\n")


class MossService:
    """The server's conversations over one ChatMoss, its server-side tools and one store.

    Args:
        chat: The chat model (its engine is loaded on the first turn when not loaded yet).
        tools: Server-side plugins, keyed by :func:`plugin_key`.
        store: Where conversations live.
        image_dir: The folder Text2Image writes to; images there are served by name.
        default_plugins: Keys switched on in a new conversation; all tools when None.
    """

    def __init__(
        self,
        chat: ChatMoss,
        tools: Sequence[BaseTool],
        store: SQLiteStore,
        image_dir: Path | None = None,
        default_plugins: Sequence[str] | None = None,
    ) -> None:
        self.chat = chat
        self.tools = {plugin_key(t): t for t in tools}
        self.store = store
        self.image_dir = image_dir.resolve() if image_dir is not None else None
        self.default_plugins = self.check_plugins(default_plugins) if default_plugins is not None else list(self.tools)

    # ------------------------------------------------------------------ switches

    def check_plugins(self, keys: Sequence[str]) -> list[str]:
        """``keys`` in the server's order, each once.

        Raises:
            ValueError: For a key the server has no tool for.
        """
        unknown = [k for k in keys if k not in self.tools]
        if unknown:
            raise ValueError(f"unknown plugin(s) {unknown}; this server has {sorted(self.tools)}")
        return [k for k in self.tools if k in keys]

    def conversation_plugins(self, conversation_id: str) -> list[str]:
        """The plugin keys the conversation has switched on (the defaults for a new one)."""
        saved = self.store.load(conversation_id)
        if saved is None or saved.system is None:
            return list(self.default_plugins)
        lines = set(saved.system.split("\n"))
        return [k for k, tool in self.tools.items() if self._plugin(tool).switch_line(True).rstrip("\n") in lines]

    def set_plugins(self, conversation_id: str, keys: Sequence[str]) -> list[str]:
        """Switch the conversation's plugins (creating it if needed); returns the keys now on."""
        keys = self.check_plugins(keys)
        saved = self.store.load(conversation_id)
        meta = _meta_part(saved.system) if saved is not None and saved.system else fmt.META_INSTRUCTION
        self.store.set_system(conversation_id, self._system(meta, [self.tools[k] for k in keys]))
        return keys

    @staticmethod
    def _plugin(tool: BaseTool) -> _plugins.Plugin:
        return bind_tools([tool])[0].plugin

    def _system(self, meta: str, tools: Sequence[Any]) -> str:
        """Meta instruction plus the switch block of ``tools`` (LangChain or OpenAI tools)."""
        bound = bind_tools(list(tools))
        trained = [b.plugin for b in bound if b.plugin.trained]
        extra = [b.plugin for b in bound if not b.plugin.trained]
        return meta + fmt.switch_block(trained, style=self.chat.switch_style, extra=extra)

    # ------------------------------------------------------------------ reading

    def image_url(self, artifact: Any) -> str | None:
        """The URL of an image artifact written to the image folder, else None."""
        if self.image_dir is None or not isinstance(artifact, str):
            return None
        path = Path(artifact)
        if not IMAGE_NAME.fullmatch(path.name) or path.resolve().parent != self.image_dir:
            return None
        return f"/v1/images/{path.name}"

    def image_path(self, name: str) -> Path | None:
        """The file of an image URL's name, or None (only uuid names directly inside the image folder)."""
        if self.image_dir is None or not IMAGE_NAME.fullmatch(name):
            return None
        path = self.image_dir / name
        return path if path.is_file() and not path.is_symlink() else None

    def list_conversations(self, limit: int = 200) -> list[dict[str, Any]]:
        """The stored conversations, most recent first, with a title (the first question)."""
        out = []
        for info in self.store.list_sessions()[:limit]:
            saved = self.store.load(info.session_id)
            first = saved.records[0].turn.human if saved is not None and saved.records else ""
            out.append(
                {
                    "id": info.session_id,
                    "object": "conversation",
                    "title": " ".join(first.split())[:80],
                    "created_at": info.created_at,
                    "updated_at": info.updated_at,
                    "num_turns": info.num_turns,
                }
            )
        return out

    def conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """A stored conversation with its turns, images and switches, or None."""
        saved = self.store.load(conversation_id)
        if saved is None:
            return None
        turns = []
        for index, record in enumerate(saved.records):
            turn = record.turn
            artifacts = record.artifacts if isinstance(record.artifacts, list) else []
            turns.append(
                {
                    "index": index,
                    "human": turn.human,
                    "reply": turn.reply,
                    "inner_thoughts": None if turn.inner_thoughts == fmt.NONE else turn.inner_thoughts,
                    "commands": turn.commands,
                    "results": turn.results,
                    "images": [url for a in artifacts if (url := self.image_url(a))],
                    "created_at": record.created_at,
                }
            )
        return {
            "id": conversation_id,
            "object": "conversation",
            "plugins": self.conversation_plugins(conversation_id),
            "turns": turns,
        }

    # ------------------------------------------------------------------ turns

    def run(self, request: TurnRequest) -> Iterator[Event]:
        """Run one turn (on the worker thread); the last event is ``final``."""
        messages = request.messages
        humans = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
        if not humans:
            raise ValueError("the messages need a user message for MOSS to answer")
        last = humans[-1]
        client_system = "\n".join(message_text(m) for m in messages if isinstance(m, SystemMessage))
        prior = [m for m in messages[:last] if not isinstance(m, SystemMessage)]
        current = [m for m in messages[last:] if not isinstance(m, SystemMessage)]
        if request.tools is None and len(current) != 1:
            raise ValueError(
                "the last message must be the user's; to continue a client-side tool call, send the tools too"
            )
        if request.plugins is not None:
            self.set_plugins(request.conversation_id, request.plugins)
        saved = self.store.load(request.conversation_id)
        if client_system:  # its text joins the meta instruction, as ChatMoss does; a whole MOSS system text replaces it
            meta = _meta_part(system_text(client_system, [], style=self.chat.switch_style))
        elif saved is not None and saved.system:
            meta = _meta_part(saved.system)
        else:
            meta = fmt.META_INSTRUCTION
        self.chat.get_engine()  # loaded once, before the per-request copy below shares it
        chat = self.chat.model_copy(update={**request.sampling, "max_new_tokens": request.max_tokens})
        if request.tools is None:
            yield from self._plugin_turn(request, chat, meta, prior, message_text(current[0]))
        else:
            yield from self._client_turn(request, chat, meta, prior, current)

    def _memory(self, request: TurnRequest, system: str, tools_on: bool, prior: list[BaseMessage]) -> TokenBudgetMemory:
        """The conversation's memory, seeded with the request's earlier turns when it has none."""
        engine = self.chat.get_engine()
        budget = request.max_tokens * (2 if tools_on else 1) + (_RESULTS_ROOM if tools_on else 0)
        memory = TokenBudgetMemory(
            engine.count_tokens,
            context_window=engine.context_window,
            max_new_tokens=min(budget, engine.context_window // 2),
            store=self.store,
            session_id=request.conversation_id,
            system=system,
        )
        if prior and not len(memory):
            for turn in from_messages(prior).turns:
                memory.add_turn(turn)
        return memory

    def _plugin_turn(
        self, request: TurnRequest, chat: ChatMoss, meta: str, prior: list[BaseMessage], human: str
    ) -> Iterator[Event]:
        keys = self.conversation_plugins(request.conversation_id)
        tools = [self.tools[k] for k in keys]
        system = self._system(meta, tools)
        memory = self._memory(request, system, bool(tools), prior)
        index = len(memory)
        agent = MossAgent(chat, tools=tools, memory=memory, system=system)
        for event in agent.stream_events_of_turn(human):
            if event.type == "reply":
                yield Event("reply", event.data)
            elif event.type == "thoughts":
                yield Event("moss", {"type": "thoughts", "text": None if event.data == fmt.NONE else event.data})
            elif event.type == "command":
                yield Event("moss", {"type": "command", "command": event.data.text, "tool": event.data.tool})
            elif event.type == "result":
                yield Event("moss", {"type": "result", **self._run(event.data)})
            elif event.type == "turn":
                result: TurnResult = event.data
                summary = self._summary(request.conversation_id, index, keys, result)
                message = {"role": "assistant", "content": result.output, "moss": summary}
                if result.inner_thoughts != fmt.NONE:
                    message["reasoning_content"] = result.inner_thoughts
                yield Event("final", {"message": message, "finish_reason": "stop", "usage": result.usage})

    def _run(self, run: CommandRun) -> dict[str, Any]:
        return {
            "command": run.text,
            "tool": run.tool,
            "args": run.args,
            "output": run.output,
            "error": run.error,
            "ran": run.ran,
            "artifact": json_artifacts(run.artifact),
            "image_url": self.image_url(run.artifact),
        }

    def _summary(self, conversation_id: str, index: int, keys: list[str], result: TurnResult) -> dict[str, Any]:
        runs = [self._run(r) for r in result.runs]
        return {
            "conversation_id": conversation_id,
            "turn_index": index,
            "plugins": keys,
            "inner_thoughts": None if result.inner_thoughts == fmt.NONE else result.inner_thoughts,
            "commands": result.commands,
            "results": result.results,
            "runs": runs,
            "images": [r["image_url"] for r in runs if r["image_url"]],
        }

    def _client_turn(
        self,
        request: TurnRequest,
        chat: ChatMoss,
        meta: str,
        prior: list[BaseMessage],
        current: list[BaseMessage],
    ) -> Iterator[Event]:
        tools = [convert_to_openai_tool(t) for t in request.tools or ()]
        system = self._system(meta, tools)
        memory = self._memory(request, system, bool(tools), prior)
        memory.fit(fmt.segment(fmt.HUMAN, message_text(current[0])) + fmt.THOUGHTS + ":")
        history = to_messages(fmt.MossConversation(system=system, turns=memory.turns()))
        model = chat.bind_tools(tools, tool_choice=request.tool_choice) if tools else chat
        final: Any = None
        for piece in model.stream([*history, *current]):
            final = piece if final is None else final + piece
            if piece.content:
                yield Event("reply", message_text(piece))
            thoughts = piece.additional_kwargs.get(REASONING)
            if thoughts:
                yield Event("reasoning", thoughts)
        assert final is not None, "ChatMoss streamed nothing"
        thoughts = final.additional_kwargs.get(REASONING)
        reply = message_text(final)
        calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": _json(c["args"])}}
            for c in final.tool_calls
        ]
        # MOSS's malformed commands go to the client as calls whose arguments do not parse; its error answer
        # comes back as a result MOSS reads, as with any model that writes bad arguments.
        for bad in final.invalid_tool_calls:
            if bad.get("id"):
                function = {"name": bad.get("name") or "invalid", "arguments": str(bad.get("args") or "")}
                calls.append({"id": bad["id"], "type": "function", "function": function})
        index = len(memory)
        if not calls:
            extra = {k: v for k, v in final.additional_kwargs.items() if k in (REASONING, RAW_COMMANDS)}
            # Rendered as ChatMoss rendered it (the bound tools' command names), so the stored turn is the prompt's.
            done = [SystemMessage(system), *current, AIMessage(reply, additional_kwargs=extra)]
            memory.add_turn(render_messages(done, bind_tools(tools), style=chat.switch_style).turns[-1])
        summary = {
            "conversation_id": request.conversation_id,
            "turn_index": index,
            "inner_thoughts": thoughts,
            "commands": final.additional_kwargs.get(RAW_COMMANDS),
            "stored": not calls,
        }
        message: dict[str, Any] = {"role": "assistant", "content": reply or (None if calls else ""), "moss": summary}
        if thoughts:
            message["reasoning_content"] = thoughts
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else str(final.response_metadata.get("finish_reason") or "stop")
        yield Event("final", {"message": message, "finish_reason": finish, "usage": final.usage_metadata})


def _json(args: Any) -> str:
    return json.dumps(args, ensure_ascii=False)
