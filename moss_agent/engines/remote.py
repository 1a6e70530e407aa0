"""An :class:`~moss_agent.engines.base.Engine` over an OpenAI-compatible ``/v1/completions`` endpoint.

Serve a converted checkpoint (``moss-agent convert SRC DST --format gptj``) with vLLM or ``transformers serve``
and point :class:`RemoteEngine` at it: ChatMoss, MossLLM and MossAgent run as with the local engine, and the
server's prefix cache serves plugin pass 2 and the next turn.

Which end token stopped a generation: the MOSS end tokens of ``SamplingParams.stop_tokens`` and the eos ``<eom>``
go out as ``stop`` strings. Servers seldom say which one matched, so it is read (1) from the text where the server
leaves the stop string in it (``transformers serve`` keeps ``<eoh> <eot> <eoc> <eor>``, not special tokens in the
converted tokenizer; vLLM keeps them all with the ``vllm`` dialect), cutting the text there as the local engine
does; (2) from vLLM's ``stop_reason`` field; (3) ``finish_reason == "length"`` is ``"length"``; (4) otherwise the
stop string was hidden: with the ``vllm`` and ``transformers`` dialects only the eos can be, so it is ``<eom>``
(``"eos"`` when that was not a stop token); with the generic ``openai`` dialect it is the first of ``stop_tokens``
(``<eoc>`` in plugin pass 1), a documented guess that is exact whenever one stop token was asked for.

Tokens: with ``tokenizer`` (the checkpoint directory or a tokenizer object) counts and ids are exact and prompts
are fitted to the context window as locally; without it :meth:`RemoteEngine.count_tokens` estimates (one token per
CJK character, per three other characters, per end token: it errs high) and :meth:`RemoteEngine.token_ids` raises.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from moss_agent.engines.base import Delta, Generation, SamplingParams, StopCutter, fit_context
from moss_agent.engines.wire import (
    RemoteEngineError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
    error_detail,
    retry_after,
    sse_events,
    status_error,
)
from moss_agent.protocol.format import END_TOKEN_RE, EOM
from moss_agent.settings import CONTEXT_WINDOW

__all__ = [
    "Dialect",
    "RemoteEngine",
    "RemoteEngineError",
    "ServerResponseError",
    "ServerTimeoutError",
    "ServerUnavailableError",
]

Dialect = Literal["openai", "vllm", "transformers"]
"""Which request fields beyond the OpenAI API the server takes (see :class:`RemoteEngine`)."""

_RETRY_STATUS = frozenset({408, 429, 502, 503, 504})
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


class _Completion(StopCutter):
    """A completion as it streams in: text cut before the first stop string, and what the server said of its end."""

    def __init__(self, stops: Sequence[str]) -> None:
        super().__init__(stops)
        self.finish: Any = None
        self.told = False  # whether the server sends a stop_reason field (vLLM), even a null one
        self.stop_field: Any = None

    def choice(self, choice: dict[str, Any]) -> None:
        """Take one choice of a chunk."""
        text = choice.get("text")
        if not isinstance(text, str):
            raise ServerResponseError(f"a completion choice without text: {choice}")
        self.add(text)
        self.finish = choice.get("finish_reason") or self.finish
        if "stop_reason" in choice:
            self.told = True
            self.stop_field = choice["stop_reason"] if choice["stop_reason"] is not None else self.stop_field


class RemoteEngine:
    """Generation on an OpenAI-compatible completions server (vLLM, ``transformers serve``, others).

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added when the URL has no path).
        model: The served model name; None lets the server choose (a server that serves one model) and takes
            the name from its first answer.
        api_key: Sent as ``Authorization: Bearer``; by default ``$MOSS_AGENT_API_KEY`` if set.
        dialect: ``openai`` sends only standard fields (temperature, top_p, stop, seed; ``top_k`` and
            ``repetition_penalty`` are then the server's defaults, which a converted checkpoint's
            ``generation_config.json`` sets to the release's); ``vllm`` adds ``top_k``, ``repetition_penalty`` and
            keeps stop strings in the output; ``transformers`` sends them in ``transformers serve``'s
            ``generation_config`` field. The latter two reproduce the local engine's sampling exactly.
        tokenizer: The checkpoint directory (or a tokenizer object) for exact token counts and context fitting.
        context_window: Prompt plus generated tokens the served model takes (2048 for MOSS).
        timeout: Seconds to wait for the server's next bytes (a whole answer when not streaming).
        connect_timeout: Seconds to wait for a connection.
        max_retries: Retries of a request that could not connect or got 408/429/502/503/504, before any output.
        backoff: First retry delay in seconds, doubled at each retry (a ``Retry-After`` header wins).
        max_concurrency: Requests in flight for :meth:`generate_batch`.
        eos_token: The served model's end-of-sequence token (``<eom>`` for converted MOSS checkpoints).

    Attributes:
        batches_concurrent_calls: True: the server batches concurrent requests itself, so callers (the
            server's :class:`~moss_agent.server.batching.BatchingEngine`) send them side by side.
    """

    batches_concurrent_calls: ClassVar[bool] = True

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        dialect: Dialect = "openai",
        tokenizer: str | os.PathLike[str] | Any | None = None,
        context_window: int = CONTEXT_WINDOW,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        eos_token: str = EOM,
    ) -> None:
        if dialect not in ("openai", "vllm", "transformers"):
            raise ValueError(f"dialect must be 'openai', 'vllm' or 'transformers', got {dialect!r}")
        url = base_url.rstrip("/")
        if not re.match(r"https?://", url):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = url if re.match(r"https?://[^/]+/.", url) else url + "/v1"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("MOSS_AGENT_API_KEY")
        self.dialect: Dialect = dialect
        self.context_window: int = context_window
        self.timeout, self.connect_timeout, self.max_retries, self.backoff = (
            timeout,
            connect_timeout,
            max_retries,
            backoff,
        )
        self.max_concurrency, self.eos_token = max_concurrency, eos_token
        self._tokenizer_source = tokenizer
        self._tokenizer: Any = None if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """The served model's name (the base URL until the server has named it)."""
        return self.model or self.base_url

    # ------------------------------------------------------------ tokens

    @property
    def tokenizer(self) -> Any:
        """The tokenizer given, loaded on first use; None without one."""
        if self._tokenizer is None and isinstance(self._tokenizer_source, (str, os.PathLike)):
            from moss_agent.checkpoints.loading import load_tokenizer, resolve_checkpoint

            with self._lock:
                if self._tokenizer is None:
                    path = resolve_checkpoint(self._tokenizer_source, weights=False)
                    self._tokenizer = load_tokenizer(Path(path))[0]
        return self._tokenizer

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the checkpoint's tokenizer.

        Raises:
            ValueError: Without a tokenizer (ids cannot be estimated).
        """
        if self.tokenizer is None:
            raise ValueError(
                "RemoteEngine has no tokenizer to give token ids: pass tokenizer=<the checkpoint directory>"
            )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``: exact with a tokenizer, else an estimate that errs high (see the module)."""
        if self.tokenizer is not None:
            return len(self.token_ids(text))
        ends = len(END_TOKEN_RE.findall(text))
        rest = END_TOKEN_RE.sub("", text)
        cjk = len(_CJK.findall(rest))
        return ends + cjk + math.ceil((len(rest) - cjk) / 3)

    # ------------------------------------------------------------ HTTP

    def _http(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                timeout = httpx.Timeout(self.timeout, connect=self.connect_timeout)
                self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
            return self._client

    def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send with retries; returns an open streaming response with a 2xx status (the caller closes it)."""
        import httpx

        client, url = self._http(), f"{self.base_url}{path}"
        why = ""
        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2**attempt
            try:
                response = client.send(client.build_request(method, path, json=body), stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                why = f"cannot connect ({err})"
            except httpx.TimeoutException as err:
                raise ServerTimeoutError(
                    f"{url} sent nothing for {self.timeout} s ({type(err).__name__}): raise timeout= or check the "
                    "server"
                ) from err
            else:
                if response.status_code < 400:
                    return response
                detail = error_detail(response)
                if response.status_code not in _RETRY_STATUS:
                    hint = " (check the API key)" if response.status_code in (401, 403) else ""
                    raise status_error(response.status_code)(f"{url} answered {response.status_code}{hint}: {detail}")
                why = f"{response.status_code}: {detail}"
                delay = retry_after(response, delay)
            if attempt < self.max_retries:
                time.sleep(delay)
        raise ServerUnavailableError(
            f"{url}: {why} after {self.max_retries + 1} attempt(s); is the server running? Start it with e.g. "
            "`vllm serve DIR` or `transformers serve DIR` and pass its address as base_url"
        )

    def models(self) -> list[str]:
        """The names of the models the server serves (``GET /v1/models``)."""
        response = self._send("GET", "/models")
        try:
            response.read()
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ServerResponseError(f"{self.base_url}/models did not answer a model list: {err}") from err
        finally:
            response.close()

    # ------------------------------------------------------------ requests

    def _prepare(self, prompt: str, params: SamplingParams) -> tuple[str, int | None]:
        """The prompt fitted to the context window (with a tokenizer) and its token count when known."""
        if self.tokenizer is None:  # the local engine's errors for an empty prompt or a bad max_new_tokens
            fit_context([0] if prompt else [], params, self.context_window)
            return prompt, None
        ids = self.token_ids(prompt)
        kept = fit_context(ids, params, self.context_window)
        if len(kept) < len(ids):
            prompt = str(self.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return prompt, len(kept)

    def _stops(self, params: SamplingParams) -> list[str]:
        return list(dict.fromkeys([*params.stop_tokens, *params.stop, self.eos_token]))

    def _body(self, prompt: str, params: SamplingParams, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": params.max_new_tokens, "stop": self._stops(params)}
        if self.model is not None:
            body["model"] = self.model
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None and not params.greedy:
            sampling["seed"] = params.seed
        if self.dialect == "transformers":  # its generation_config field replaces the model's defaults
            config = {"do_sample": not params.greedy, "repetition_penalty": params.repetition_penalty}
            if not params.greedy:
                config.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            body["generation_config"] = json.dumps(config)
            body.update({k: v for k, v in sampling.items() if k == "seed"})
            return body
        body.update(sampling if sampling else {"temperature": 0.0})
        if self.dialect == "vllm":
            body.update(repetition_penalty=params.repetition_penalty, include_stop_str_in_output=True)
            body.update(skip_special_tokens=False, spaces_between_special_tokens=False)
            if not params.greedy:
                body["top_k"] = params.top_k
        return body

    def _reason(self, done: _Completion, params: SamplingParams) -> str:
        """Why generation ended (see the module for the order of the clues)."""

        def named(stop: str) -> str:
            return stop if stop in params.stop_tokens or stop in params.stop else "eos"

        if done.stop is not None:
            return named(done.stop)
        if isinstance(done.stop_field, str) and done.stop_field in done.stops:
            return named(done.stop_field)
        if done.finish == "length":
            return "length"
        if self.dialect != "openai" or done.told or not params.stop_tokens:
            return named(self.eos_token)
        return params.stop_tokens[0]

    def _events(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """One completion as deltas (streamed from the server), the last one carrying the Generation."""
        prompt, prompt_tokens = self._prepare(prompt, params)
        done = _Completion(self._stops(params))
        usage: dict[str, Any] = {}
        response = self._send("POST", "/completions", self._body(prompt, params, stream=True))
        try:
            for data in sse_events(response, self.base_url):
                if data.get("model") and self.model is None:
                    self.model = str(data["model"])
                usage = data.get("usage") or usage
                for choice in data.get("choices") or ():
                    done.choice(choice)
                if piece := done.ready():
                    yield Delta(piece)
        finally:
            response.close()
        if done.finish is None and done.stop is None:
            raise ServerResponseError(f"{self.base_url}/completions: the stream ended without a finish_reason")
        reason = self._reason(done, params)
        completion = usage.get("completion_tokens") or self.count_tokens(done.text) + (reason != "length")
        generation = Generation(
            done.text,
            reason,
            prompt_tokens=int(usage.get("prompt_tokens") or prompt_tokens or self.count_tokens(prompt)),
            completion_tokens=int(completion),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        )
        yield Delta(done.ready(final=True), generation)

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Generate, yielding text deltas (never part of a stop string); the last one carries the Generation.

        Errors are raised at the first ``next()``.

        Raises:
            ServerUnavailableError: When the server cannot be reached or stays overloaded.
            ServerResponseError: When it refuses the request or answers something else than a completion.
            ContextWindowExceededError: With a tokenizer, as the local engine does.
        """
        return self._events(prompt, params)

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Generate a continuation of ``prompt`` (streamed underneath: timeouts apply per token); as :meth:`stream`."""
        *_, last = self._events(prompt, params)
        assert last.generation is not None, "a completion ends with its Generation"
        return last.generation

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Generate for several prompts, ``max_concurrency`` requests at a time (the server batches them).

        Every prompt is checked against the context window first, so nothing is sent for a batch that fails.
        """
        for prompt in prompts:
            self._prepare(prompt, params)
        if not prompts:
            return []
        workers = max(1, min(self.max_concurrency, len(prompts)))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="moss-remote") as pool:
            return list(pool.map(lambda p: self.generate(p, params), prompts))
