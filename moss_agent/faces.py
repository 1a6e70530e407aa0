"""The settings every MOSS face shares (ChatMoss, MossLLM), checked when the face is built, and its engine.

A face never loads anything when it is constructed. Its engine is, in order: the ``engine=`` it was given; the
engine of its slot in :mod:`moss_agent.registry` (one per checkpoint, precision, device map and adapter in the
process), loaded on first use. Copies, pickles and the instances LangChain builds for ``configurable_fields``
all find the same slot, so the weights are read once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.language_models.base import LangSmithParams
from langchain_core.utils import secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from moss_agent import settings
from moss_agent.engines.base import Engine, SamplingParams
from moss_agent.protocol import format as fmt
from moss_agent.registry import EngineSlot, engine_for_token, engine_key, engine_slot, token_for_engine

__all__ = ["MossRequestError", "MossSettings", "check_token_limits"]


class MossRequestError(ModelInvalidRequestError, ValueError):
    """A call MOSS cannot answer as asked (bad messages, options or content); LangChain's invalid request."""


# Names people bring from other LangChain integrations, and what to use instead.
_INSTEAD = {
    "model_id": "model (a MOSS checkpoint directory or hub id)",
    "model_name": "model (a MOSS checkpoint directory or hub id)",
    "model_path": "model (a MOSS checkpoint directory or hub id)",
    "repo_id": "model (a MOSS checkpoint directory or hub id)",
    "device": "device_map (for example device_map='cuda:0' or 'cpu')",
    "num_ctx": f"nothing: MOSS's context window is fixed at {settings.CONTEXT_WINDOW} tokens; "
    "set truncate='left' to drop the oldest turns when a conversation outgrows it",
    "n_ctx": f"nothing: MOSS's context window is fixed at {settings.CONTEXT_WINDOW} tokens",
    "max_length": "max_new_tokens (the tokens generated per pass)",
    "num_predict": "max_new_tokens (the tokens generated per pass)",
    "model_kwargs": "the sampling fields themselves (temperature=, top_p=, top_k=, repetition_penalty=, seed=)",
    "generation_config": "the sampling fields themselves (temperature=, top_p=, top_k=, repetition_penalty=)",
    "openai_api_key": "api_key (or $MOSS_AGENT_API_KEY)",
    "openai_api_base": "base_url",
    "api_base": "base_url",
    "load_in_8bit": "precision='int8'",
    "load_in_4bit": "precision='int4'",
    "torch_dtype": "precision ('fp32', 'bf16', 'fp16', 'int8', 'int4' or 'auto')",
    "dtype": "precision ('fp32', 'bf16', 'fp16', 'int8', 'int4' or 'auto')",
}


def check_token_limits(values: Mapping[str, Any], where: str) -> None:
    """Refuse ``max_tokens`` and ``max_new_tokens`` given together with different values.

    Raises:
        ValueError: Naming both values.
    """
    if "max_tokens" in values and "max_new_tokens" in values and values["max_tokens"] != values["max_new_tokens"]:
        raise MossRequestError(
            f"{where}: max_tokens={values['max_tokens']!r} and max_new_tokens={values['max_new_tokens']!r} "
            "are the same setting (tokens generated per pass); give one of them"
        )


class MossSettings(BaseModel):
    """Fields and engine handling shared by the MOSS faces (ChatMoss, MossLLM)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, extra="forbid")

    model: str | None = None
    """A MOSS checkpoint: local directory or hub id (``fnlp/moss-moon-003-sft-plugin``)."""
    engine: Any = Field(default=None, exclude=True)
    """A ready :class:`~moss_agent.engines.base.Engine` to use instead of loading ``model`` (it wins)."""
    precision: str = "auto"
    """``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``int4`` (aliases such as ``float16`` accepted)."""
    device_map: Any = "auto"
    """Where the layers go: ``auto``, ``cpu``, ``cuda:0`` or an explicit accelerate device map."""
    max_memory: dict[Any, Any] | None = None
    """Per-device memory limits for the device map, e.g. ``{0: "20GiB", "cpu": "30GiB"}``."""
    offload_folder: str | None = None
    """Folder for weights that fit nowhere else."""
    adapter: str | None = None
    """A LoRA adapter directory from ``moss-agent finetune``, merged into the weights when they load."""
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
    truncate: Literal["error", "left"] = "error"
    """When a prompt outgrows the context window: ``error`` raises ``ContextOverflowError``; ``left`` drops whole
    oldest turns (never the system text or the turn being answered) until it fits."""
    switch_style: fmt.SwitchStyle = "trained"
    """Form of the switch block: ``trained``, ``readme``, ``production`` or ``none``."""
    base_url: str | None = None
    """An OpenAI-compatible server (``http://host:8000/v1``: vLLM, ``transformers serve``) that serves ``model``
    (see ``moss-agent convert``); generation then happens there instead of loading weights here."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("MOSS_AGENT_API_KEY", default=None))
    """With ``base_url``: the server's API key (default: ``$MOSS_AGENT_API_KEY``, read at construction)."""
    dialect: Literal["openai", "vllm", "transformers"] = "openai"
    """The server's kind, which tells how it reports the stop token that ended a generation."""
    tokenizer: str | None = None
    """A local MOSS tokenizer directory for exact token counts with ``base_url`` (default: ``model`` when it is
    a local directory)."""
    timeout: float = 120.0
    """With ``base_url``: seconds to wait for the server's next bytes."""
    max_retries: int = 3
    """With ``base_url``: retries of a request that could not connect or was turned away before any output."""

    _slot: EngineSlot | None = PrivateAttr(default=None)
    _engine_token: str | None = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)

    # ------------------------------------------------------------------ validation

    @model_validator(mode="before")
    @classmethod
    def _check_arguments(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        for name in data:
            if name in known:
                continue
            hint = _INSTEAD.get(name) or next(iter(difflib.get_close_matches(name, sorted(known), 1, 0.75)), None)
            raise ValueError(
                f"{cls.__name__} has no setting {name!r}" + (f"; use {hint}" if hint else "") + f" (settings: "
                f"{', '.join(sorted(n for n in cls.model_fields if not n.startswith('_')))})"
            )
        check_token_limits(data, cls.__name__)
        return data

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        return settings.normalize_precision(value)

    @field_validator("max_new_tokens")
    @classmethod
    def _check_max_new_tokens(cls, value: int) -> int:
        if not 1 <= value < settings.CONTEXT_WINDOW:
            raise ValueError(
                f"max_new_tokens must be between 1 and {settings.CONTEXT_WINDOW - 1} (MOSS's context window is "
                f"{settings.CONTEXT_WINDOW} tokens, prompt included), got {value}"
            )
        return value

    def model_post_init(self, context: Any, /) -> None:
        """Take the engine slot now (cheap: nothing loads until the first call)."""
        super().model_post_init(context)
        if self.engine is None and self.model:
            self._slot = self._find_slot()

    # ------------------------------------------------------------------ the engine

    def _find_slot(self) -> EngineSlot:
        assert self.model
        model = self.model
        if self.base_url:
            key = engine_key(model, remote=self.base_url, dialect=self.dialect, tokenizer=self.tokenizer)
        else:
            key = engine_key(model, **self._load_kwargs())

        def build() -> Engine:
            if self.base_url:
                from moss_agent.engines.remote import RemoteEngine

                local = self.tokenizer or (model if Path(model).is_dir() else None)
                return RemoteEngine(
                    self.base_url,
                    model=model,
                    api_key=self.api_key.get_secret_value() if self.api_key else None,
                    dialect=self.dialect,
                    tokenizer=local,
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                )
            from moss_agent.engines.transformers import TransformersEngine

            return TransformersEngine.from_pretrained(model, **self._load_kwargs())

        return engine_slot(key, build)

    def get_engine(self) -> Engine:
        """The engine: the one given, else this checkpoint's shared engine, loaded on first use.

        Raises:
            ValueError: When neither ``model`` nor ``engine`` is set (or a pickled face's ``engine`` is gone).
        """
        if self.engine is not None:
            return self.engine  # type: ignore[no-any-return]
        given = engine_for_token(self._engine_token)
        if given is not None:  # a copy or unpickled face whose engine= was not carried along
            self.engine = given
            return given  # type: ignore[no-any-return]
        if not self.model:
            gone = " (the engine= of the pickled object is not in this process)" if self._engine_token else ""
            raise ValueError(
                f"{type(self).__name__} needs a model (a MOSS checkpoint directory or hub id) or an engine{gone}"
            )
        if self._slot is None or self._slot.key != self._find_slot().key:  # unpickled, or settings changed
            self._slot = self._find_slot()
        return self._slot.get()

    def _engine(self) -> Engine:
        """The older private name of :meth:`get_engine`, still used by callers."""
        return self.get_engine()

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "precision": self.precision,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
        }
        if self.adapter is not None:  # passed only when set: the key of a plain checkpoint stays the same
            kwargs["adapter"] = self.adapter
        return kwargs

    # ------------------------------------------------------------------ copies and pickles

    def __getstate__(self) -> dict[Any, Any]:
        """Pickle the settings, never the engine: it comes back from the registry when next used."""
        state = super().__getstate__()
        fields = dict(state["__dict__"])
        private = dict(state.get("__pydantic_private__") or {})
        if fields.get("engine") is not None:
            private["_engine_token"] = token_for_engine(fields["engine"])
            fields["engine"] = None
        private["_slot"] = None
        private["_tokenizer"] = None
        return {**state, "__dict__": fields, "__pydantic_private__": private}

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        """A deep copy of the settings that shares the engine (a model is never copied)."""
        memo = {} if memo is None else memo
        for shared in (self.__dict__.get("engine"), self._slot, self._tokenizer):
            if shared is not None:
                memo[id(shared)] = shared
        return super().__deepcopy__(memo)

    # ------------------------------------------------------------------ sampling and tracing

    def _params(
        self, stop: Sequence[str] | None, stop_tokens: tuple[str, ...], options: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """Sampling parameters from the fields, with per-call ``options`` (see ``settings.CALL_OPTIONS``) on top.

        Raises:
            ValueError: For per-call ``max_tokens`` and ``max_new_tokens`` that disagree.
        """
        options = options or {}
        check_token_limits(options, "this call")
        values = {name: getattr(self, name) for name in set(settings.CALL_OPTIONS.values())}
        values.update({settings.CALL_OPTIONS[k]: v for k, v in options.items() if k in settings.CALL_OPTIONS})
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
            raise MossRequestError(
                f"{type(self).__name__} serves one loaded model ({self._model_name}); a per-call model={asked!r} "
                "is not supported: create another instance for that model"
            )

    def _ls_params(self, params: LangSmithParams, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> None:
        params["ls_provider"] = "moss"
        params["ls_model_name"] = str(kwargs.get("model") or self._model_name)
        params["ls_max_tokens"] = int(kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_new_tokens)
        sampled = self._params(None, (), {k: v for k, v in kwargs.items() if k in settings.CALL_OPTIONS})
        params["ls_temperature"] = 0.0 if sampled.greedy else sampled.temperature
        stops = [*(self.stop or ()), *(stop or ())]
        if stops:
            params["ls_stop"] = stops

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids under the MOSS tokenizer: the engine's, or the checkpoint's tokenizer files alone.

        Before the model is loaded, only the tokenizer files are read (no weights; a hub id is fetched only
        when it is not cached and the hub is reachable).
        """
        if self.engine is not None or self.base_url or (self._slot is not None and self._slot.loaded):
            return self.get_engine().token_ids(text)
        if self._tokenizer is None:
            if not self.model:
                raise ValueError(f"{type(self).__name__} needs a model or an engine to count tokens")
            from moss_agent.checkpoints.files import load_tokenizer, resolve_checkpoint

            self._tokenizer = load_tokenizer(resolve_checkpoint(self.model, weights=False))[0]
        return list(self._tokenizer.encode(text, add_special_tokens=False))
