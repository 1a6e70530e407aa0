"""The six comparisons. Each returns a flat dict of figures (JSON-ready); times are medians in milliseconds.

Every comparison first runs both paths once untimed and asserts that they produced the same token ids; the
timed rounds then check that each output equals that first one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.harness import Bench, Case, RecordingEngine, hf_id_recorder, interleave, plugin_pass1, questions
from moss_agent.engines.base import Generation, SamplingParams
from moss_agent.protocol import format as fmt

__all__ = ["batching", "plan_estimates", "prefix_cache", "streaming", "vs_langchain_huggingface", "wrapper_overhead"]

PUBLISHED_GB = {"fp16": (31.0, 42.0, 81.0), "int8": (16.0, 24.0, 46.0), "int4": (7.8, 12.0, 26.0)}
"""The release's GPU memory table (MOSS_FORMAT.md §2): load / one turn / full 2048 context, batch 1."""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]},
        },
    }
    for name, arg, description in (
        ("Search", "query", "Search the web."),
        ("Calculate", "expression", "Evaluate an arithmetic expression."),
    )
]
"""MOSS's Search and Calculate plugins as OpenAI tool schemas (recognised by name, shown with trained switches)."""

_SEARCH_RESULTS = fmt.results_body(
    [
        'Search("river city bridge history") =>\n'
        "<|1|>: 'The old bridge over the river was built in the summer of 1889 by the city engineers.'\n"
        "<|2|>: 'A museum near the market tells the story of the bridge and of the village around it.'\n"
    ]
)
PASS2_SUFFIX = (
    f"{fmt.EOT}\n"
    + fmt.segment(fmt.COMMANDS, 'Search("river city bridge history")')
    + fmt.segment(fmt.RESULTS, _SEARCH_RESULTS)
    + fmt.MOSS
    + ":"
)
"""What follows pass 1's thoughts in pass 2: the command, two search hits and the reply tag."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _same(want: Any, what: str) -> Callable[[Any], None]:
    def check(got: Any) -> None:
        assert got == want, f"{what}: the compared paths' outputs differ"

    return check


def _ids(gens: Sequence[Generation]) -> list[tuple[int, ...]]:
    return [g.token_ids for g in gens]


def _chat(engine: Any, bench: Bench, **fields: Any) -> Any:
    from moss_agent.chat_model import ChatMoss

    return ChatMoss(engine=engine, do_sample=False, max_tokens=bench.settings.new_tokens, **fields)


def _recorded(bench: Bench, work: Callable[[Any], Any]) -> tuple[Any, list[tuple[str, SamplingParams, Generation]]]:
    """Run ``work(engine)`` once on a recording engine over a fresh engine: its result and the engine calls."""
    recorder = RecordingEngine(bench.engine())
    return work(recorder), recorder.calls


# ---------------------------------------------------------------- 1. prefix cache on plugin pass 2


def prefix_cache(bench: Bench) -> dict[str, Any]:
    """Plugin pass 2 continuing pass 1's KV cache vs the same pass 2 prefilled from scratch.

    Before every cached run, pass 1 runs again untimed (after dropping the cache), leaving exactly what
    ChatMoss's pass 1 leaves. Timed twice over: the whole pass 2 (``new_tokens`` tokens, the headline) and its
    first token alone (the prefill the cache saves, whatever the reply length).
    """
    out: dict[str, Any] = {"pass2_new_tokens": bench.settings.new_tokens}
    cached, fresh = bench.engine(), bench.engine(prefix_cache=False)
    for ctx in bench.settings.contexts:
        out |= {f"{key}_{ctx}": value for key, value in _pass2_at(bench, cached, fresh, ctx).items()}
    return out


def _pass2_at(bench: Bench, cached: Any, fresh: Any, ctx: int) -> dict[str, Any]:
    """The prefix-cache comparison for a pass-2 prompt of about ``ctx`` tokens."""
    s = bench.settings
    system = fmt.system_prompt(["Search", "Calculate"])
    p1, p2 = bench.greedy((fmt.EOC, fmt.EOM)), bench.greedy((fmt.EOM,))
    one = p2.with_(max_new_tokens=1)
    budget = ctx - s.new_tokens - fresh.count_tokens(PASS2_SUFFIX)
    pass1 = plugin_pass1(fresh.count_tokens, system, budget, seed=ctx)
    pass2 = pass1 + fresh.generate(pass1, p1).text + PASS2_SUFFIX
    want = fresh.generate(pass2, p2).token_ids
    prompt_tokens = fresh.count_tokens(pass2)
    assert prompt_tokens + s.new_tokens <= fresh.context_window, "the benchmark prompt is too long"
    reused: list[int] = []

    def prime() -> None:  # what ChatMoss's pass 1 leaves behind
        cached.reset_cache()
        cached.generate(pass1, p1)

    def run(engine: Any, params: SamplingParams) -> Callable[[], tuple[int, ...]]:
        def go() -> tuple[int, ...]:
            got: Generation = engine.generate(pass2, params)
            if engine is cached:
                assert got.cached_tokens > 0, "pass 2 reused nothing"
                reused.append(got.cached_tokens)
            return got.token_ids

        return go

    what = f"prefix cache at {ctx} tokens"
    t = interleave(
        {
            "cached": Case(run(cached, p2), _same(want, what), prime),
            "full": Case(run(fresh, p2), _same(want, what)),
            "cached_first": Case(run(cached, one), _same(want[:1], what), prime),
            "full_first": Case(run(fresh, one), _same(want[:1], what)),
        },
        s.reps,
        s.warmup,
    )
    return {
        "pass2_prompt_tokens": prompt_tokens,
        "pass2_cached_tokens": statistics.median(reused),
        "pass2_cached_ms": _ms(t.median("cached")),
        "pass2_full_prefill_ms": _ms(t.median("full")),
        "pass2_first_token_cached_ms": _ms(t.median("cached_first")),
        "pass2_first_token_full_prefill_ms": _ms(t.median("full_first")),
        "prefix_cache_speedup": round(t.ratio("full", "cached"), 2),
        "prefix_cache_first_token_speedup": round(t.ratio("full_first", "cached_first"), 2),
        "runs_ms": t.ms(),
    }


# ---------------------------------------------------------------- 2. against langchain-huggingface


def converse(engine: Any, bench: Bench, asked: Sequence[str], **fields: Any) -> list[Any]:
    """The plugin conversation: ChatMoss with Search and Calculate bound, one turn per question; its AIMessages.

    ``fields`` are further ChatMoss settings (e.g. ``repetition_penalty``).
    """
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

    chat = _chat(engine, bench, **fields).bind_tools(TOOLS)
    messages: list[BaseMessage] = []
    for question in asked:
        messages.append(HumanMessage(question))
        messages.append(chat.invoke(messages))
    return [m for m in messages if isinstance(m, AIMessage)]


def replies(messages: list[Any]) -> list[tuple[Any, ...]]:
    """What a conversation's replies say: content, reasoning and tool calls."""
    return [(m.content, m.additional_kwargs.get("reasoning_content"), m.tool_calls) for m in messages]


def _hf_kwargs(bench: Bench, params: SamplingParams, streamer: Any = None) -> dict[str, Any]:
    """Generation settings for transformers' pipeline equal to ChatMoss's ``params`` (greedy, same stops)."""
    kwargs = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": False,
        "repetition_penalty": params.repetition_penalty,
        "eos_token_id": [bench.end_ids[t] for t in params.stop_tokens],
        "pad_token_id": bench.end_ids[fmt.EOM],
        "return_full_text": False,
    }
    return kwargs | ({"streamer": streamer} if streamer is not None else {})


def vs_langchain_huggingface(bench: Bench) -> dict[str, Any]:
    """A plugin conversation through ChatMoss vs the same prompts through langchain-huggingface.

    ChatMoss runs MOSS's two passes per turn (the random weights write no command, so every turn is pass 1,
    ``Results: None``, pass 2) and reuses its KV cache between passes and turns. The langchain-huggingface
    side is ``HuggingFacePipeline`` over a transformers text-generation pipeline on the same model object: it
    gets the exact prompt strings ChatMoss sent its engine (recorded in an untimed run, so building them costs
    it nothing) with the same greedy settings and stop tokens, and prefills every prompt in full, as each call
    is independent. ``ChatHuggingFace`` cannot take part: it needs a chat template (MOSS's tokenizer has none)
    and insists that the last message be a ``HumanMessage``, so it cannot send pass 2, which continues pass 1.
    """
    from langchain_huggingface import HuggingFacePipeline
    from transformers import pipeline

    s = bench.settings
    asked = questions(s.turns, seed=1)
    first, calls = _recorded(bench, lambda engine: converse(engine, bench, asked))
    llm = HuggingFacePipeline(pipeline=pipeline("text-generation", model=bench.model, tokenizer=bench.tokenizer))
    engine = bench.engine()
    hf_texts = []
    for prompt, params, generation in calls:  # token-for-token check of every generation
        ids = hf_id_recorder()
        hf_texts.append(llm.invoke(prompt, pipeline_kwargs=_hf_kwargs(bench, params, ids)))
        assert ids.prompt == engine.token_ids(prompt), "the pipeline tokenised a prompt differently"
        assert tuple(ids.generated) == generation.token_ids, "langchain-huggingface and ChatMoss outputs differ"
    jobs = [(prompt, _hf_kwargs(bench, params)) for prompt, params, _ in calls]

    usage: list[Any] = []

    def same_replies(got: list[Any]) -> None:
        assert replies(got) == replies(first), "ChatMoss: the conversation differs from its first run"
        usage[:] = [m.usage_metadata or {} for m in got]

    # No warm-up round: the untimed runs above (ChatMoss recorded, every pipeline call checked) warmed both.
    t = interleave(
        {
            "moss_agent": Case(lambda: converse(engine, bench, asked), same_replies, engine.reset_cache),
            "langchain_huggingface": Case(
                lambda: [llm.invoke(p, pipeline_kwargs=kw) for p, kw in jobs], _same(hf_texts, "HuggingFacePipeline")
            ),
        },
        s.reps,
        warmup=0,
    )
    prefilled = sum(u["input_tokens"] - u.get("input_token_details", {}).get("cache_read", 0) for u in usage)
    return {
        "turns": s.turns,
        "generations": len(calls),
        "new_tokens_per_generation": s.new_tokens,
        "moss_agent_ms": _ms(t.median("moss_agent")),
        "langchain_huggingface_ms": _ms(t.median("langchain_huggingface")),
        "moss_agent_prefilled_tokens": prefilled,
        "langchain_huggingface_prefilled_tokens": sum(g.prompt_tokens for _, _, g in calls),
        "vs_langchain_huggingface_speedup": round(t.ratio("langchain_huggingface", "moss_agent"), 2),
        "runs_ms": t.ms(),
    }


# ---------------------------------------------------------------- 3. batching


def batching(bench: Bench) -> dict[str, Any]:
    """``ChatMoss.batch`` of ``batch`` chat prompts vs as many sequential invokes, and ``engine.generate_batch``."""
    s = bench.settings
    asked = questions(s.batch, seed=2)
    first, calls = _recorded(bench, lambda engine: [_chat(engine, bench).invoke(q) for q in asked])
    contents = [m.content for m in first]
    prompts, params = [prompt for prompt, _, _ in calls], calls[0][1]
    engine = bench.engine()
    chat = _chat(engine, bench)

    def texts(messages: list[Any]) -> list[Any]:
        return [m.content for m in messages]

    t = interleave(
        {
            "sequential": Case(
                lambda: texts([chat.invoke(q) for q in asked]), _same(contents, "sequential"), engine.reset_cache
            ),
            "chatmoss_batch": Case(
                lambda: texts(chat.batch(asked)), _same(contents, "ChatMoss.batch"), engine.reset_cache
            ),
            "engine_batch": Case(
                lambda: _ids(engine.generate_batch(prompts, params)),
                _same(_ids([g for _, _, g in calls]), "engine.generate_batch"),
                engine.reset_cache,
            ),
        },
        s.reps,
        s.warmup,
    )
    return {
        "prompts": s.batch,
        "prompt_tokens": sum(g.prompt_tokens for _, _, g in calls),
        "sequential_ms": _ms(t.median("sequential")),
        "chatmoss_batch_ms": _ms(t.median("chatmoss_batch")),
        "engine_generate_batch_ms": _ms(t.median("engine_batch")),
        f"batch_speedup_{s.batch}": round(t.ratio("sequential", "chatmoss_batch"), 2),
        f"engine_batch_speedup_{s.batch}": round(t.ratio("sequential", "engine_batch"), 2),
        "runs_ms": t.ms(),
    }


# ---------------------------------------------------------------- 4. wrapper overhead


def wrapper_overhead(bench: Bench) -> dict[str, Any]:
    """``ChatMoss.invoke`` vs ``model.generate`` (and the bare engine) for the same prompt and tokens.

    The KV cache is dropped before each ChatMoss and engine call so that every path prefills the whole prompt.
    """
    import torch

    s = bench.settings
    question = questions(1, seed=3)[0]
    first, calls = _recorded(bench, lambda engine: _chat(engine, bench).invoke(question))
    ((prompt, params, generation),) = calls
    engine = bench.engine()
    chat = _chat(engine, bench)
    ids = torch.tensor([engine.token_ids(prompt)])
    eos = [bench.end_ids[tok] for tok in params.stop_tokens]

    def raw() -> tuple[int, ...]:
        out = bench.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
        return tuple(out[0, ids.shape[1] :].tolist())

    assert raw() == generation.token_ids, "model.generate and ChatMoss outputs differ"
    t = interleave(
        {
            "chatmoss": Case(
                lambda: chat.invoke(question).content, _same(first.content, "ChatMoss"), engine.reset_cache
            ),
            "engine": Case(
                lambda: engine.generate(prompt, params).token_ids,
                _same(generation.token_ids, "engine"),
                engine.reset_cache,
            ),
            "generate": Case(raw, _same(generation.token_ids, "model.generate")),
        },
        3 * s.reps,
        s.warmup,
    )
    return {
        "prompt_tokens": generation.prompt_tokens,
        "new_tokens": len(generation.token_ids),
        "chatmoss_invoke_ms": _ms(t.median("chatmoss")),
        "engine_generate_ms": _ms(t.median("engine")),
        "model_generate_ms": _ms(t.median("generate")),
        "wrapper_overhead_pct": round((t.ratio("chatmoss", "generate") - 1) * 100, 1),
        "langchain_layer_overhead_pct": round((t.ratio("chatmoss", "engine") - 1) * 100, 1),
        "runs_ms": t.ms(),
    }


# ---------------------------------------------------------------- 5. streaming


def streaming(bench: Bench) -> dict[str, Any]:
    """Time to the first streamed reply text vs the whole streamed reply, and vs ``invoke``."""
    s = bench.settings
    question = questions(1, seed=4)[0]
    engine = bench.engine()
    chat = _chat(engine, bench)
    want = chat.invoke(question).content
    firsts: list[float] = []

    def stream() -> str:
        start, parts = time.perf_counter(), list[str]()
        for chunk in chat.stream(question):
            if chunk.content and not any(parts):
                firsts.append(time.perf_counter() - start)
            parts.append(str(chunk.content))
        return "".join(parts)

    t = interleave(
        {
            "stream": Case(stream, _same(want, "ChatMoss.stream"), engine.reset_cache),
            "invoke": Case(lambda: chat.invoke(question).content, _same(want, "ChatMoss.invoke"), engine.reset_cache),
        },
        3 * s.reps,
        s.warmup,
    )
    first = statistics.median(firsts[s.warmup :])
    return {
        "new_tokens": s.new_tokens,
        "stream_first_token_ms": _ms(first),
        "stream_full_reply_ms": _ms(t.median("stream")),
        "invoke_full_reply_ms": _ms(t.median("invoke")),
        "first_token_fraction_of_reply": round(first / t.median("stream"), 3),
        "runs_ms": t.ms(),
    }


# ---------------------------------------------------------------- 6. load plan estimates


def plan_estimates() -> dict[str, Any]:
    """The load plan's memory estimates for the 16B checkpoints vs the release's published table.

    The plan treats the published "GB" as GiB (bytes / 1024**3), as its calibration does.
    """
    from moss_agent.checkpoints.hardware import Hardware
    from moss_agent.checkpoints.plan import plan_load

    plan = plan_load("fnlp/moss-moon-003-sft-plugin", Hardware.simulated(gpu_gib=(80.0,)), "fp16")
    estimates = dict(plan.alternatives)
    out: dict[str, Any] = {}
    errors = []
    for precision, published in PUBLISHED_GB.items():
        got = estimates[precision].gib()
        for what, g, p in zip(("load", "turn", "full"), got, published, strict=True):
            out[f"{precision}_{what}_gib"] = [round(g, 2), p]
            errors.append(abs(g / p - 1) * 100)
    out["plan_estimate_max_error_pct"] = round(max(errors), 1)
    return out
