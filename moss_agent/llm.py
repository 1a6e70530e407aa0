"""MossLLM: raw text completion over the same engine as ChatMoss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult

from moss_agent import format as fmt
from moss_agent.chat_model import MossSettings

__all__ = ["MossLLM"]


class MossLLM(MossSettings, BaseLLM):
    """MOSS as a LangChain completion model: the prompt is raw text, continued until ``<eom>``.

    The caller writes the MOSS layout (see :mod:`moss_agent.format`); no scrubbing is applied. Useful for the
    base model and for prompts built by hand.

    Example:
        .. code-block:: python

            from moss_agent import MossLLM, format

            llm = MossLLM(model="fnlp/moss-moon-003-sft")  # or MossLLM(engine=chat._engine())
            llm.invoke(format.chat_prompt(format.system_prompt(), [], "Hi!"))
    """

    stop_tokens: tuple[str, ...] = (fmt.EOM,)
    """MOSS end tokens that end the completion."""

    @property
    def _llm_type(self) -> str:
        return "moss-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self._model_name, "stop_tokens": self.stop_tokens}

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine = self._engine()
        params = self._params(stop, self.stop_tokens)
        if len(prompts) > 1:
            results = engine.generate_batch(prompts, params)
        else:
            results = [engine.generate(p, params) for p in prompts]
        generations = [
            [
                LCGeneration(
                    text=g.text,
                    generation_info={
                        "stop_reason": g.stop_reason,
                        "prompt_tokens": g.prompt_tokens,
                        "completion_tokens": g.completion_tokens,
                    },
                )
            ]
            for g in results
        ]
        return LLMResult(generations=generations, llm_output={"model_name": self._model_name})

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine = self._engine()
        for delta in engine.stream(prompt, self._params(stop, self.stop_tokens)):
            info = {"stop_reason": delta.generation.stop_reason} if delta.generation else None
            chunk = GenerationChunk(text=delta.text, generation_info=info)
            if run_manager and delta.text:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids under the MOSS tokenizer."""
        return self._engine().token_ids(text)
