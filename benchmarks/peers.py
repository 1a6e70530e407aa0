"""Two more comparisons: CTranslate2 on the plugin conversation, and a realism row on the demonstration model.

- :func:`vs_ctranslate2`: the bench model converted with ``moss-agent convert --format codegen`` and then with
  CTranslate2's own converter; CTranslate2 replays the exact prompts ChatMoss sent (greedy, same stops, each
  call independent, as a user of CTranslate2 would call it), token for token equal to moss-agent's. Both
  sides run without a repetition penalty (see :data:`SAME`). Also timed:
  the same conversation through ChatMoss over :class:`~moss_agent.engines.ctranslate2.CTranslate2Engine`
  (fp32, and int8 whose tokens may differ: it is checked against its own first run only).
- :func:`realism`: the demonstration model (trained weights, natural stops) in a real MossAgent plugin
  conversation with its tools, vs the same prompts through langchain-huggingface; tokens and time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.comparisons import _hf_kwargs, _ms, _recorded, _same, converse, replies
from benchmarks.harness import Bench, Case, RecordingEngine, hf_id_recorder, interleave, questions
from moss_agent.checkpoints.files import TOKENIZER_FILES_WITH_FAST, write_json
from moss_agent.engines.base import SamplingParams
from moss_agent.engines.ctranslate2 import MANIFEST
from moss_agent.settings import CONTEXT_WINDOW

__all__ = ["realism", "vs_ctranslate2"]

SAME = {"repetition_penalty": 1.0}
"""ChatMoss's setting on both sides of the CTranslate2 comparison: CTranslate2's repetition penalty covers the
generated tokens only (transformers' the prompt's too), so with the release's 1.02 two near-equal scores can part."""


def _ct2_models(bench: Bench, root: Path) -> dict[str, Path]:
    """The bench model for CTranslate2 (fp32 and int8): converted, with the bench's muting applied."""
    from ctranslate2.converters import TransformersConverter
    from safetensors.torch import load_file, save_file

    from moss_agent.checkpoints.convert import convert

    codegen = root / "codegen"
    convert(bench.path, codegen, format="codegen")
    weights = codegen / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.bias"][bench.muted] = -1e4  # as build_bench mutes the end tokens of the loaded model
    save_file(tensors, weights, metadata={"format": "pt"})
    out = {}
    for quantization in (None, "int8"):
        target = root / f"ct2-{quantization or 'fp32'}"
        TransformersConverter(str(codegen)).convert(str(target), quantization=quantization)
        for name in TOKENIZER_FILES_WITH_FAST:  # the source's tokenizer, as convert_ctranslate2 copies it
            if (bench.path / name).is_file():
                shutil.copy2(bench.path / name, target / name)
        write_json(target / MANIFEST, {"n_positions": CONTEXT_WINDOW})
        out[quantization or "fp32"] = target
    return out


def _ct2_kwargs(bench: Bench, params: SamplingParams) -> dict[str, Any]:
    """``generate_batch`` settings equal to ChatMoss's greedy ``params``."""
    return {
        "max_length": params.max_new_tokens,
        "sampling_topk": 1,
        "repetition_penalty": params.repetition_penalty,
        "end_token": [bench.end_ids[t] for t in params.stop_tokens],
        "return_end_token": True,
        "include_prompt_in_result": False,
    }


def vs_ctranslate2(bench: Bench) -> dict[str, Any]:
    """ChatMoss's plugin conversation vs CTranslate2 on the same prompts, and moss-agent on CTranslate2."""
    import ctranslate2
    import torch

    from moss_agent.engines.ctranslate2 import CTranslate2Engine

    s, threads = bench.settings, torch.get_num_threads()
    asked = questions(s.turns, seed=1)
    first, calls = _recorded(bench, lambda engine: converse(engine, bench, asked, **SAME))
    engine = bench.engine()
    with tempfile.TemporaryDirectory(prefix="moss-bench-ct2-") as tmp:
        paths = _ct2_models(bench, Path(tmp))
        generator = ctranslate2.Generator(str(paths["fp32"]), device="cpu", intra_threads=threads)
        vocab = json.loads((paths["fp32"] / "vocabulary.json").read_text(encoding="utf-8"))
        jobs = [([vocab[i] for i in engine.token_ids(p)], _ct2_kwargs(bench, params)) for p, params, _ in calls]

        def peer() -> list[tuple[int, ...]]:
            return [tuple(generator.generate_batch([toks], **kw)[0].sequences_ids[0]) for toks, kw in jobs]

        want = [g.token_ids for _, _, g in calls]
        assert peer() == want, "CTranslate2 and ChatMoss outputs differ"
        ct2 = {
            q: CTranslate2Engine.from_pretrained(p, threads=threads, model_name=f"bench-ct2-{q}")
            for q, p in paths.items()
        }

        def talk(target: Any) -> list[tuple[Any, ...]]:
            return replies(converse(target, bench, asked, **SAME))

        ours = {q: talk(e) for q, e in ct2.items()}
        assert ours["fp32"] == replies(first), "ChatMoss over CTranslate2Engine (fp32) differs from ChatMoss"
        t = interleave(
            {
                "moss_agent": Case(
                    lambda: talk(engine),
                    _same(replies(first), "ChatMoss"),
                    engine.reset_cache,
                ),
                "ctranslate2": Case(peer, _same(want, "CTranslate2")),
                "moss_agent_ct2_fp32": Case(lambda: talk(ct2["fp32"]), _same(ours["fp32"], "CTranslate2Engine")),
                "moss_agent_ct2_int8": Case(lambda: talk(ct2["int8"]), _same(ours["int8"], "CTranslate2Engine int8")),
            },
            s.reps,
            warmup=0,  # the checked runs above warmed every path
        )
        for e in ct2.values():
            e.close()
    return {
        "ctranslate2_version": ctranslate2.__version__,
        "generations": len(calls),
        "moss_agent_ms": _ms(t.median("moss_agent")),
        "ctranslate2_ms": _ms(t.median("ctranslate2")),
        "moss_agent_on_ctranslate2_fp32_ms": _ms(t.median("moss_agent_ct2_fp32")),
        "moss_agent_on_ctranslate2_int8_ms": _ms(t.median("moss_agent_ct2_int8")),
        "int8_replies_equal_fp32": ours["int8"] == ours["fp32"],
        "vs_ctranslate2_speedup": round(t.ratio("ctranslate2", "moss_agent"), 2),
        "ctranslate2_engine_int8_speedup": round(t.ratio("moss_agent", "moss_agent_ct2_int8"), 2),
        "runs_ms": t.ms(),
    }


def realism(bench: Bench) -> dict[str, Any]:
    """The demonstration model in a MossAgent plugin conversation vs the same prompts in langchain-huggingface.

    Trained weights stop where the model ends a segment (``<eoc>``, ``<eom>``); the agent runs its real tools
    (calculator, solver, the demo's search corpus) between the passes, and its time includes them. The
    langchain-huggingface side replays every prompt the agent sent, with the same greedy settings and stops,
    prefilling each in full; outputs are asserted equal token for token.
    """
    from langchain_huggingface import HuggingFacePipeline
    from transformers import pipeline

    from moss_agent.agent import MossAgent
    from moss_agent.chat_model import ChatMoss
    from moss_agent.engines.transformers import TransformersEngine
    from tools import make_tools

    try:
        from moss_agent.demo import demo_checkpoint
        from moss_agent.demo.corpus import DemoSearchBackend
        from moss_agent.demo.questions import held_out_questions

        path = demo_checkpoint()
    except (ImportError, FileNotFoundError) as exc:
        return {"skipped": f"the demonstration model is not available here: {exc}"}
    s = bench.settings
    engine = TransformersEngine.from_pretrained(path, precision="fp32", device_map="cpu")
    asked = [q.human for q in held_out_questions(1, kinds=("calculator", "solver", "search", "chat"))]

    def agent_run(target: Any) -> list[str]:
        tools = make_tools(["search", "calculator", "solver"])
        for tool in tools:
            if tool.name == "Search":
                tool.backend = DemoSearchBackend()  # type: ignore[attr-defined]
        agent = MossAgent(ChatMoss(engine=target, do_sample=False, max_tokens=128), tools=tools)
        return [agent.run_turn(q).output for q in asked]  # one conversation, as a user would have it

    recorder = RecordingEngine(engine)
    first = agent_run(recorder)
    calls = recorder.calls
    end_ids = {t: engine.token_ids(t)[0] for t in ("<eoc>", "<eom>")}
    llm = HuggingFacePipeline(pipeline=pipeline("text-generation", model=engine.model, tokenizer=engine.tokenizer))
    demo = Bench(s, engine.model, engine.tokenizer, end_ids, 0, 0.0, bench.path, [])
    jobs = [(prompt, _hf_kwargs(demo, params)) for prompt, params, _ in calls]
    hf_texts = []
    for (prompt, kw), (_, _, generation) in zip(jobs, calls, strict=True):
        ids = hf_id_recorder()
        hf_texts.append(llm.invoke(prompt, pipeline_kwargs=kw | {"streamer": ids}))
        assert tuple(ids.generated) == generation.token_ids, "langchain-huggingface and MossAgent outputs differ"
    t = interleave(
        {
            "moss_agent": Case(lambda: agent_run(engine), _same(first, "MossAgent"), engine.reset_cache),
            "langchain_huggingface": Case(
                lambda: [llm.invoke(p, pipeline_kwargs=kw) for p, kw in jobs], _same(hf_texts, "HuggingFacePipeline")
            ),
        },
        s.reps,
        warmup=0,
    )
    return {
        "realism_questions": len(asked),
        "realism_generations": len(calls),
        "realism_generated_tokens": sum(g.completion_tokens for _, _, g in calls),
        "realism_moss_agent_prefilled_tokens": sum(g.prompt_tokens - g.cached_tokens for _, _, g in calls),
        "realism_langchain_huggingface_prefilled_tokens": sum(g.prompt_tokens for _, _, g in calls),
        "realism_stops": sorted({g.stop_reason for _, _, g in calls}),
        "realism_moss_agent_ms": _ms(t.median("moss_agent")),
        "realism_langchain_huggingface_ms": _ms(t.median("langchain_huggingface")),
        "realism_speedup": round(t.ratio("langchain_huggingface", "moss_agent"), 2),
        "runs_ms": t.ms(),
    }
