"""MossLLM: raw text completion over the same engine as ChatMoss, and the settings both faces share."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from moss_agent import settings
from moss_agent.engines.base import Engine, Generation, SamplingParams
from moss_agent.protocol import format as fmt
from moss_agent.settings import CALL_OPTIONS

__all__ = ["EngineHolder", "MossLLM", "MossSettings"]


class EngineHolder:
    """Lazily builds one engine and shares it among faces (ChatMoss, MossLLM, MossAgent)."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the engine has been built."""
        return self._engine is not None

    def get(self) -> Engine:
        """The engine, built on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = self._factory()
            return self._engine


class MossSettings(BaseModel):
    """Fields and engine handling shared by the MOSS faces (ChatMoss, MossLLM)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str | None = None
    """A MOSS checkpoint: local directory or hub id (``fnlp/moss-moon-003-sft-plugin``)."""
    engine: Any = Field(default=None, exclude=True)
    """A ready :class:`~moss_agent.engines.base.Engine` to share instead of loading ``model``."""
    precision: str = "auto"
    """``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``int4``."""
    device_map: Any = "auto"
    """Where the layers go: ``auto``, ``cpu``, ``cuda:0`` or an explicit accelerate device map."""
    max_memory: dict[Any, Any] | None = None
    """Per-device memory limits for the device map, e.g. ``{0: "20GiB", "cpu": "30GiB"}``."""
    offload_folder: str | None = None
    """Folder for weights that fit nowhere else."""
    max_new_tokens: int = Field(default=settings.MAX_NEW_TOKENS, alias="max_tokens")
    """Upper bound on generated tokens per pass (also accepted as ``max_tokens``)."""
    temperature: float = settings.TEMPERATURE
    """Sampling temperature; 0 is greedy."""
    top_p: float = settings.TOP_P
    """Nucleus sampling mass."""
    top_k: int = settings.TOP_K
    """Top-k sampling."""
    repetition_penalty: float = settings.REPETITION_PENALTY
    """Repetition penalty of the release."""
    do_sample: bool = True
    """False for greedy decoding."""
    seed: int | None = None
    """Seed for reproducible sampling."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Extra stop strings: they end MOSS's reply (inner thoughts and commands are never cut)."""
    switch_style: fmt.SwitchStyle = "trained"
    """Form of the switch block: ``trained``, ``readme``, ``production`` or ``none``."""
    base_url: str | None = None
    """An OpenAI-compatible server (``http://host:8000/v1``: vLLM, ``transformers serve``) that serves ``model``
    (see ``moss-agent convert``); generation then happens there instead of loading weights here."""
    api_key: SecretStr | None = None
    """The server's API key (else ``$MOSS_AGENT_API_KEY``)."""
    dialect: Literal["openai", "vllm", "transformers"] = "openai"
    """The server's kind, which tells how it reports the stop token that ended a generation."""
    tokenizer: str | None = None
    """A local MOSS tokenizer directory for exact token counts with ``base_url`` (default: ``model`` when it is
    a local directory)."""

    _holder: EngineHolder | None = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)

    def get_engine(self) -> Engine:
        """The engine: the one given, or ``model`` loaded on first use (shared by copies of this object).

        Raises:
            ValueError: When neither ``model`` nor ``engine`` is set.
        """
        if self.engine is not None:
            return self.engine  # type: ignore[no-any-return]
        if self._holder is None:
            if not self.model:
                raise ValueError(
                    f"{type(self).__name__} needs a model (a MOSS checkpoint directory or hub id) or an engine"
                )
            model, kwargs = self.model, self._load_kwargs()

            def build() -> Engine:
                if self.base_url:
                    from moss_agent.engines.remote import RemoteEngine

                    local = self.tokenizer or (model if Path(model).is_dir() else None)
                    key = self.api_key.get_secret_value() if self.api_key else None
                    return RemoteEngine(self.base_url, model=model, api_key=key, dialect=self.dialect, tokenizer=local)
                from moss_agent.engines.transformers import TransformersEngine

                return TransformersEngine.from_pretrained(model, **kwargs)

            self._holder = EngineHolder(build)
        return self._holder.get()

    def _engine(self) -> Engine:
        """The older private name of :meth:`get_engine`, still used by callers."""
        return self.get_engine()

    def _load_kwargs(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
        }

    def _params(
        self, stop: Sequence[str] | None, stop_tokens: tuple[str, ...], options: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """Sampling parameters from the fields, with per-call ``options`` (see ``CALL_OPTIONS``) on top."""
        values = {name: getattr(self, name) for name in set(CALL_OPTIONS.values())}
        values.update({CALL_OPTIONS[k]: v for k, v in (options or {}).items() if k in CALL_OPTIONS})
        stops = tuple(dict.fromkeys((*(self.stop or ()), *(stop or ()))))
        return SamplingParams(**values, stop_tokens=stop_tokens, stop=stops)

    @property
    def _model_name(self) -> str:
        if self.engine is not None:
            return str(getattr(self.engine, "model_name", "moss"))
        return self.model or "moss"

    def _check_model(self, kwargs: Mapping[str, Any]) -> None:
        asked = kwargs.get("model")
        if asked is not None and asked not in (self.model, self._model_name):
            raise ValueError(
                f"{type(self).__name__} serves one loaded model ({self._model_name}); a per-call model={asked!r} "
                "is not supported: create another instance for that model"
            )

    def _ls_params(self, params: LangSmithParams, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> None:
        params["ls_provider"] = "moss"
        params["ls_model_name"] = str(kwargs.get("model") or self._model_name)
        params["ls_max_tokens"] = int(kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_new_tokens)
        stops = [*(self.stop or ()), *(stop or ())]
        if stops:
            params["ls_stop"] = stops

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids under the MOSS tokenizer: the engine's, or the checkpoint's tokenizer files alone.

        Before the model is loaded, only the tokenizer files are read (no weights; a hub id is fetched only
        when it is not cached and the hub is reachable).
        """
        if self.engine is not None or self.base_url or (self._holder is not None and self._holder.loaded):
            return self.get_engine().token_ids(text)
        if self._tokenizer is None:
            if not self.model:
                raise ValueError(f"{type(self).__name__} needs a model or an engine to count tokens")
            from moss_agent.checkpoints.loading import load_tokenizer, resolve_checkpoint

            self._tokenizer = load_tokenizer(resolve_checkpoint(self.model, weights=False))[0]
        return list(self._tokenizer.encode(text, add_special_tokens=False))


class MossLLM(MossSettings, BaseLLM):
    """MOSS as a LangChain completion model: the prompt is raw text, continued until ``<eom>``.

    The caller writes the MOSS layout (see :mod:`moss_agent.protocol.format`); nothing is scrubbed or parsed, and the
    text is returned as generated, up to (not including) the end token or stop string that ended it. Useful
    for the base model and for prompts built by hand. Several prompts run as one batch.

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
        for delta in engine.stream(prompt, self._params(stop, self.stop_tokens, kwargs)):
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
