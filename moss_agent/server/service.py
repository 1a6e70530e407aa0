"""What the server does with a request, on the model's worker thread: conversations, switches and turns.

A conversation lives in the SQLite store under its id. Its plugin switches are the switch block of its
stored system text, which is what MOSS reads, so the setting and the prompt can never disagree.

A turn's earlier turns come from the store when the conversation has stored turns; otherwise from the
request's messages before its last user message (and those are then stored as the conversation's start). A
request without ``tools`` runs MOSS's plugin loop with the conversation's switched-on plugins
(:class:`~moss_agent.agent.MossAgent`); a request with ``tools`` binds them to ChatMoss and returns MOSS's
commands as ``tool_calls`` for the client to run, and stores the turn once the client's tools have answered
and MOSS has replied.

A turn writes nothing until it is whole: its memory works on a :class:`~moss_agent.server.staging.StagedSession`,
committed in one transaction after the last reply token, unless the request was cancelled by then. So a
refused, cancelled or cut-off request stores nothing, imported history included.

Conversation ids here are the store's (``USER:ID`` for a user of a keys file, see :mod:`moss_agent.server.users`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from moss_agent.agent import CommandRun, MossAgent, TurnResult
from moss_agent.chat_model import ChatMoss
from moss_agent.memory import ContextBudgetError, TokenBudgetMemory
from moss_agent.memory.store import SQLiteStore, json_artifacts
from moss_agent.messages import (
    RAW_COMMANDS,
    REASONING,
    from_messages,
    message_text,
    to_messages,
)
from moss_agent.protocol import format as fmt
from moss_agent.protocol import plugins as _plugins
from moss_agent.rendering import render_messages, system_text
from moss_agent.server.batching import BatchingEngine
from moss_agent.server.staging import StagedSession
from moss_agent.tool_binding import bind_tools

__all__ = ["IMAGE_NAME", "Event", "MossService", "TurnRequest", "plugin_key"]

IMAGE_NAME = re.compile(r"[0-9a-f]{32}\.png")
"""The names Text2Image gives its pictures (uuid4 hex): the only names the image route serves."""

_CAPABILITIES = fmt.META_INSTRUCTION.rsplit("\n", 2)[-2] + "\n"  # "Capabilities and tools that MOSS can possess."
_RESULTS_ROOM = 256  # prompt tokens kept free for a plugin turn's results
_MIN_PROMPT = 64  # prompt tokens a turn needs at least beside what it generates


def plugin_key(tool: BaseTool) -> str:
    """The plugin key of a server-side tool: MOSS's own (``calculator``) or the tool's name."""
    plugin = _plugins.by_api(tool.name)
    return plugin.key if plugin is not None else tool.name


@dataclass
class TurnRequest:
    """One chat-completion request, as the worker runs it.

    Attributes:
        conversation_id: The conversation's store id.
        messages: The request's messages (system messages included).
        plugins: Plugin keys to switch on from now on; None keeps the conversation's.
        tools: Client-side tools (OpenAI tool dicts); None for a server-side plugin turn.
        tool_choice: The request's ``tool_choice``.
        sampling: ChatMoss fields to set for this request (temperature ...).
        max_tokens: Most tokens per generation pass.
        max_tokens_given: Whether the client chose ``max_tokens`` (else it may be lowered to fit a plugin turn).
        public_id: The id the client knows the conversation by (``conversation_id`` when None).
        cancelled: Tells whether the client has gone away; a cancelled turn is not stored.
    """

    conversation_id: str
    messages: list[BaseMessage]
    plugins: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 256
    max_tokens_given: bool = True
    public_id: str | None = None
    cancelled: Callable[[], bool] = lambda: False


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
        max_batch: Most generations batched together on the model.
    """

    def __init__(
        self,
        chat: ChatMoss,
        tools: Sequence[BaseTool],
        store: SQLiteStore,
        image_dir: Path | None = None,
        default_plugins: Sequence[str] | None = None,
        max_batch: int = 8,
    ) -> None:
        self.chat = chat
        self.max_batch = max_batch
        self._engine_lock = threading.Lock()
        self.tools = {plugin_key(t): t for t in tools}
        self.store = store
        self.image_dir = image_dir.resolve() if image_dir is not None else None
        self.default_plugins = self.check_plugins(default_plugins) if default_plugins is not None else list(self.tools)

    def engine(self) -> BatchingEngine:
        """The batching engine over the chat model's engine (loading it on first use)."""
        with self._engine_lock:
            engine = self.chat.get_engine()
            if not isinstance(engine, BatchingEngine):
                engine = BatchingEngine(engine, max_batch=self.max_batch)
                self.chat = self.chat.model_copy(update={"engine": engine})
            return engine

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

    def conversation_plugins(self, conversation_id: str, saved: Any = ...) -> list[str]:
        """The plugin keys the conversation has switched on (the defaults for a new one)."""
        saved = self.store.load(conversation_id) if saved is ... else saved
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

    def list_conversations(
        self, visible: Callable[[str], str | None] = lambda i: i, limit: int = 200
    ) -> list[dict[str, Any]]:
        """The stored conversations ``visible`` names (store id -> shown id or None), most recent first."""
        out = []
        shown = [(info, name) for info in self.store.list_sessions() if (name := visible(info.session_id))]
        for info, name in shown[:limit]:
            saved = self.store.load(info.session_id)
            first = saved.records[0].turn.human if saved is not None and saved.records else ""
            out.append(
                {
                    "id": name,
                    "object": "conversation",
                    "title": info.title or " ".join(first.split())[:80],
                    "created_at": info.created_at,
                    "updated_at": info.updated_at,
                    "num_turns": info.num_turns,
                }
            )
        return out

    def conversation(self, conversation_id: str, shown_id: str | None = None) -> dict[str, Any] | None:
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
                    # The turn's Search hits in order: <|N|> in its reply cites the N-th.
                    "sources": [
                        h for a in artifacts if isinstance(a, list) for h in a if isinstance(h, dict) and "url" in h
                    ],
                    "created_at": record.created_at,
                }
            )
        return {
            "id": shown_id or conversation_id,
            "object": "conversation",
            "plugins": self.conversation_plugins(conversation_id, saved),
            "turns": turns,
        }

    # ------------------------------------------------------------------ turns

    def run(self, request: TurnRequest) -> Iterator[Event]:
        """Run one turn (on a worker thread); the last event is ``final``; nothing is stored before it."""
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
        keys = self.check_plugins(request.plugins) if request.plugins is not None else None
        stage = StagedSession(self.store, request.conversation_id, from_messages(prior).turns if prior else ())
        saved = stage.saved
        stored_meta = _meta_part(saved.system) if saved is not None and saved.system else fmt.META_INSTRUCTION
        # The client's system text joins the meta instruction, as ChatMoss does (a whole MOSS system text replaces
        # it). It becomes the conversation's when the conversation starts; later, it applies to its own turn only.
        meta = stored_meta
        if client_system:
            meta = _meta_part(system_text(fmt.scrub(client_system), [], style=self.chat.switch_style))
        self.engine()  # loaded once, before the per-request copy below shares it
        chat = self.chat.model_copy(update={**request.sampling, "max_new_tokens": request.max_tokens})
        on = keys if keys is not None else self.conversation_plugins(request.conversation_id, saved)
        if request.tools is None:
            events = self._plugin_turn(request, chat, meta, stage, on)
        else:
            events = self._client_turn(request, chat, meta, stage, current)
        for event in events:
            if event.kind == "final" and event.data["message"]["moss"].get("stored", True):
                if request.cancelled():
                    return  # the client went away: a cancelled turn is not stored
                system = None  # an existing conversation keeps its system text, unless its switches change
                if stage.is_new or keys is not None:
                    system = self._system(meta if stage.is_new else stored_meta, [self.tools[k] for k in on])
                stage.commit(system)
            yield event

    def _memory(self, request: TurnRequest, system: str, tools_on: bool, stage: StagedSession) -> TokenBudgetMemory:
        """The conversation's memory on the staged session (the request's earlier turns when it has none).

        A plugin turn generates twice (pass 2 continues pass 1's prompt, its output and the results), so both
        passes and the results are kept free; a ``max_tokens`` that cannot fit is refused here, before pass 1.
        """
        engine = self.engine()
        window = engine.context_window
        if tools_on and not request.max_tokens_given:  # the server's default: lowered to fit both passes
            request.max_tokens = max(1, min(request.max_tokens, (window - _RESULTS_ROOM - _MIN_PROMPT) // 4))
        budget = request.max_tokens * (2 if tools_on else 1) + (_RESULTS_ROOM if tools_on else 0)
        if budget > window - _MIN_PROMPT:
            need = f"2 x max_tokens + {_RESULTS_ROOM} tokens of results" if tools_on else "max_tokens"
            raise ContextBudgetError(
                f"max_tokens={request.max_tokens} does not fit: this turn needs {need} = {budget} tokens beside "
                f"the prompt, within the context window of {window} tokens; lower max_tokens"
            )
        return TokenBudgetMemory(
            engine.count_tokens,
            context_window=window,
            max_new_tokens=budget,
            store=stage,  # type: ignore[arg-type]  # reads, and notes writes, as the store would
            session_id=request.conversation_id,
            system=system,
        )

    def _plugin_turn(
        self, request: TurnRequest, chat: ChatMoss, meta: str, stage: StagedSession, keys: list[str]
    ) -> Iterator[Event]:
        tools = [self.tools[k] for k in keys]
        system = self._system(meta, tools)
        memory = self._memory(request, system, bool(tools), stage)
        chat = chat.model_copy(update={"max_new_tokens": request.max_tokens})  # lowered to fit both passes
        human = message_text(next(m for m in reversed(request.messages) if isinstance(m, HumanMessage)))
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
                summary = self._summary(request.public_id or request.conversation_id, index, keys, result)
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
        stage: StagedSession,
        current: list[BaseMessage],
    ) -> Iterator[Event]:
        tools = [convert_to_openai_tool(t) for t in request.tools or ()]
        system = self._system(meta, tools)
        memory = self._memory(request, system, False, stage)  # one pass per request: the client runs the tools
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
            "conversation_id": request.public_id or request.conversation_id,
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
