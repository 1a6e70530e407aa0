"""MossLLM: raw text completion over the same engine as ChatMoss (settings in :mod:`moss_agent.faces`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult

from moss_agent.engines.base import Engine, Generation, SamplingParams
from moss_agent.faces import MossSettings
from moss_agent.protocol import format as fmt

__all__ = ["MossLLM", "MossSettings", "fit_raw_prompt"]


def fit_raw_prompt(prompt: str, engine: Engine, params: SamplingParams) -> str:
    """``prompt`` without its oldest whole turns (each starts at ``<|Human|>:``) until it fits the window.

    The text before the first turn (the system text) and the last turn always stay; a prompt that still does
    not fit is returned as it is, for the engine to report.
    """
    marker = fmt.HUMAN + ":"
    first = prompt.find(marker)
    if first < 0:
        return prompt
    head, body = prompt[:first], prompt[first:]
    room = engine.context_window - params.max_new_tokens
    while engine.count_tokens(head + body) > room:
        later = body.find(marker, len(marker))
        if later < 0:
            break
        body = body[later:]
    return head + body


class MossLLM(MossSettings, BaseLLM):
    """MOSS as a LangChain completion model: the prompt is raw text, continued until ``<eom>``.

    The caller writes the MOSS layout (see :mod:`moss_agent.protocol.format`); nothing is scrubbed or parsed,
    and the text is returned as generated, up to (not including) the end token or stop string that ended it.
    Useful for the base model and for prompts built by hand. Several prompts run as one batch. With
    ``truncate="left"`` the oldest whole turns (from one ``<|Human|>:`` to the next) are left out of a prompt
    that outgrows the context window.

    Example:
        .. code-block:: python

            from moss_agent import MossLLM, format

            llm = MossLLM(model="fnlp/moss-moon-003-sft")  # or MossLLM(engine=chat.get_engine())
            llm.invoke(format.chat_prompt(format.system_prompt(), [], "Hi!"))
    """

    stop_tokens: tuple[str, ...] = (fmt.EOM,)
    """MOSS end tokens that end the completion (``("<eoc>", "<eom>")`` for plugin pass 1)."""

    @property
    def _llm_type(self) -> str:
        return "moss-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self._model_name, "stop_tokens": self.stop_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        self._ls_params(params, stop, kwargs)
        return params

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        self._check_model(kwargs)
        engine = self.get_engine()
        params = self._params(stop, self.stop_tokens, kwargs)
        if kwargs.get("truncate", self.truncate) == "left":
            prompts = [fit_raw_prompt(p, engine, params) for p in prompts]
        if len(prompts) > 1:
            results = engine.generate_batch(prompts, params)
        else:
            results = [engine.generate(p, params) for p in prompts]
        generations = [[LCGeneration(text=g.text, generation_info=_info(g))] for g in results]
        usage = {
            "prompt_tokens": sum(g.prompt_tokens for g in results),
            "completion_tokens": sum(g.completion_tokens for g in results),
        }
        return LLMResult(generations=generations, llm_output={"model_name": self._model_name, "token_usage": usage})

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        self._check_model(kwargs)
        engine = self.get_engine()
        params = self._params(stop, self.stop_tokens, kwargs)
        if kwargs.get("truncate", self.truncate) == "left":
            prompt = fit_raw_prompt(prompt, engine, params)
        for delta in engine.stream(prompt, params):
            info = _info(delta.generation) if delta.generation else None
            chunk = GenerationChunk(text=delta.text, generation_info=info)
            if run_manager and delta.text:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk


def _info(generation: Generation) -> dict[str, Any]:
    return {
        "stop_reason": generation.stop_reason,
        "finish_reason": "length" if generation.stop_reason == "length" else "stop",
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "cached_tokens": generation.cached_tokens,
    }
