r"""A scripted engine: replays given outputs, for tests that need a model that answers as told.

Example::

    engine = ScriptedEngine([
        ' I should search.<eot>\n<|Commands|>: Search("MOSS")<eoc>',  # plugin pass 1
        "MOSS is a chat model.<eom>",  # pass 2
    ])
    chat = ChatMoss(engine=engine)
    ...
    assert engine.calls[1].prompt.endswith("<|MOSS|>:")
"""

from __future__ import annotations

import re
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from moss_agent.engines.base import Delta, Generation, SamplingParams, cut_at_stop, fit_context
from moss_agent.engines.decoding import common_prefix
from moss_agent.protocol.format import END_TOKENS, EOM
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["ScriptExhaustedError", "ScriptedCall", "ScriptedEngine", "scripted_tokens"]

_TOKEN = re.compile("|".join(re.escape(t) for t in END_TOKENS) + r"|\s*[^\W_]+|\s*\S|\s+")


def scripted_tokens(text: str) -> list[str]:
    """The :class:`ScriptedEngine`'s tokens: they concatenate back to ``text``.

    An end token (``<eoh>`` ... ``<eom>``) is one token; otherwise a run of letters and digits, or any other
    single character, together with the whitespace before it; trailing whitespace is one token.
    """
    return _TOKEN.findall(text)


def _token_id(token: str) -> int:
    return zlib.crc32(token.encode("utf-8")) & 0x7FFFFFFF


class ScriptExhaustedError(RuntimeError):
    """A :class:`ScriptedEngine` was asked for more outputs than it was given."""


@dataclass(frozen=True)
class ScriptedCall:
    """One call a :class:`ScriptedEngine` received.

    Attributes:
        prompt: The prompt.
        params: The sampling parameters.
        method: ``generate``, ``stream`` or ``generate_batch``.
    """

    prompt: str
    params: SamplingParams
    method: str


class ScriptedEngine:
    """An :class:`~moss_agent.engines.base.Engine` that replays scripted outputs in order, one per prompt.

    A :class:`~moss_agent.engines.base.Generation` is returned as given. A string is read as model output token by
    token (see :func:`scripted_tokens`) and ends, like a real model's output, at the first of:

    * a token in ``params.stop_tokens``: ``stop_reason`` is that token, the text is what came before it;
    * ``eos_token`` (``<eom>``) when it is not a stop token: ``stop_reason`` is ``"eos"``;
    * a stop string of ``params.stop``: ``stop_reason`` is the string, the text is cut before it;
    * ``params.max_new_tokens`` tokens: ``stop_reason`` is ``"length"``;
    * the end of the string: as if the model then produced the first of ``params.stop_tokens`` (so
      ``"Paris."`` answers a chat turn with ``stop_reason="<eom>"``); ``"eos"`` when there is none.

    Token counts follow :func:`scripted_tokens`; the prompt is checked against the context window as the real
    engine does, and ``cached_tokens`` counts the prompt tokens shared with the previous prompt plus output.
    Streams yield one token per delta, so an end token is never split.

    Args:
        outputs: The outputs to replay, in order.
        model_name: Name for response metadata.
        context_window: Prompt plus generated tokens allowed.
        eos_token: The token that ends generation with ``"eos"`` when it is not a stop token.
    """

    def __init__(
        self,
        outputs: Iterable[str | Generation] = (),
        *,
        model_name: str = "scripted",
        context_window: int = CONTEXT_WINDOW,
        eos_token: str = EOM,
    ) -> None:
        self.model_name = model_name
        self.context_window = context_window
        self.eos_token = eos_token
        self.calls: list[ScriptedCall] = []
        """Every call received, in order (recorded before the output is taken)."""
        self._outputs: deque[str | Generation] = deque(outputs)
        self._given = len(self._outputs)
        self._last_ids: list[int] = []
        self._lock = threading.Lock()

    def add(self, *outputs: str | Generation) -> None:
        """Script more outputs, after those already given."""
        with self._lock:
            self._outputs.extend(outputs)
            self._given += len(outputs)

    @property
    def remaining(self) -> int:
        """Outputs not replayed yet."""
        return len(self._outputs)

    @property
    def prompts(self) -> list[str]:
        """The prompts of all calls, in order."""
        return [c.prompt for c in self.calls]

    def token_ids(self, text: str) -> list[int]:
        """Ids of :func:`scripted_tokens` (a stable hash of each token)."""
        return [_token_id(t) for t in scripted_tokens(text)]

    def count_tokens(self, text: str) -> int:
        """Number of :func:`scripted_tokens`."""
        return len(scripted_tokens(text))

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """Replay the next output for ``prompt``."""
        return self._next(prompt, params, "generate")

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Replay the next outputs, one per prompt, in order."""
        return [self._next(p, params, "generate_batch") for p in prompts]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Replay the next output, one token per delta; the last delta carries the Generation."""
        generation = self._next(prompt, params, "stream")
        for piece in scripted_tokens(generation.text):
            yield Delta(piece)
        yield Delta("", generation)

    def _next(self, prompt: str, params: SamplingParams, method: str) -> Generation:
        with self._lock:
            self.calls.append(ScriptedCall(prompt, params, method))
            ids = fit_context(self.token_ids(prompt), params, self.context_window)
            if not self._outputs:
                raise ScriptExhaustedError(
                    f"ScriptedEngine has no output left for call {len(self.calls)} ({method}; "
                    f"{self._given} outputs were scripted; the prompt ends {prompt[-60:]!r}): pass more "
                    "outputs to ScriptedEngine([...]) or call engine.add(...)"
                )
            output = self._outputs.popleft()
            if isinstance(output, Generation):
                generation = output
            else:
                cached = min(common_prefix(self._last_ids, ids), len(ids) - 1)
                generation = self._play(output, params, len(ids), cached)
            # As the real engine's cache: the prompt and all generated tokens but the last one.
            self._last_ids = ids + list(generation.token_ids[:-1])
            return generation

    def _play(self, output: str, params: SamplingParams, prompt_tokens: int, cached: int) -> Generation:
        """Read ``output`` as model tokens until something stops it."""
        text, taken, reason = "", list[str](), None
        for token in scripted_tokens(output):
            if len(taken) >= params.max_new_tokens:
                reason = "length"
                break
            taken.append(token)
            if token in params.stop_tokens or token == self.eos_token:
                reason = token if token in params.stop_tokens else "eos"
                break
            text, reason = cut_at_stop(text + token, params.stop)
            if reason is not None:
                break
        if reason is None and len(taken) >= params.max_new_tokens:
            reason = "length"
        elif reason is None:  # the script ran out: the model ends its output here
            reason = params.stop_tokens[0] if params.stop_tokens else "eos"
            taken.append(params.stop_tokens[0] if params.stop_tokens else self.eos_token)
        ids = tuple(_token_id(t) for t in taken)
        return Generation(text, reason, prompt_tokens, len(ids), cached, ids)
