"""LangChain's standard unit suite for ChatMoss, constructed lazily on the real hub id (nothing is loaded)."""

from __future__ import annotations

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from moss_agent.chat_model import ChatMoss

pytestmark = pytest.mark.disable_socket  # construction must never reach the network


class TestChatMossUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatMoss]:
        return ChatMoss

    @property
    def chat_model_params(self) -> dict:
        return {"model": "fnlp/moss-moon-003-sft-plugin"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        env = {"MOSS_AGENT_API_KEY": "secret-from-env"}
        return env, {"model": "moss", "base_url": "http://127.0.0.1:8000/v1"}, {"api_key": "secret-from-env"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatMoss serves one loaded 16B model; a per-call model= raises
