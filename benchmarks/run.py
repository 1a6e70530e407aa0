"""Entry point: ``python -m benchmarks.run [--quick] [--tiniest] [--threads N] [--json PATH]``.

Builds a random CodeGen model in the MOSS checkpoint layout (no download), runs the six comparisons of
:mod:`benchmarks.comparisons` and prints a table of medians and ratios against the targets; ``--json`` writes
the same figures with the machine and the settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import comparisons, peers
from benchmarks.harness import SETTINGS, Bench, Settings, build_bench
from moss_agent.checkpoints.files import write_json

TARGETS: dict[str, tuple[str, float]] = {
    "prefix_cache_speedup_1900": (">=", 4.0),
    "vs_langchain_huggingface_speedup": (">=", 3.0),
    "batch_speedup_8": (">=", 3.0),
    "wrapper_overhead_pct": ("<=", 5.0),
    "plan_estimate_max_error_pct": ("<=", 10.0),
    "serve_concurrent_speedup_8": (">=", 3.0),
    "vs_ctranslate2_speedup": (">=", 1.0),
}
"""The issue's targets for the headline figures."""


def _optional_steps(bench: Bench, settings: Settings, threads: int) -> list[tuple[str, Callable[[], Any]]]:
    """The comparisons that need more than the core: CTranslate2, the demonstration model, the server.

    The tiniest setting (the unit test's) skips the realism row (it trains the demonstration model on first
    use) and the server (its own model and HTTP clients); a missing package skips its row, and the headline
    then marks the figure as skipped with the reason.
    """
    import importlib.util

    steps: list[tuple[str, Callable[[], Any]]] = []
    if importlib.util.find_spec("ctranslate2") is None:
        steps.append(("vs_ctranslate2", lambda: {"skipped": "ctranslate2 is not installed"}))
    else:
        steps.append(("vs_ctranslate2", lambda: peers.vs_ctranslate2(bench)))
    if settings.name != "tiniest":
        steps.append(("realism", lambda: peers.realism(bench)))
        steps.append(("serve", lambda: _serve(settings, threads)))
    return steps


def _serve(settings: Settings, threads: int) -> dict[str, Any]:
    """benchmarks.serve's figures (its own model, on loopback); it sets torch's threads, restored after."""
    import torch

    try:
        from benchmarks.serve import serve_concurrent
    except ImportError as exc:
        return {"skipped": f"benchmarks.serve cannot run: {exc}"}
    try:
        return serve_concurrent(quick=settings.name != "full")
    finally:
        torch.set_num_threads(threads)


def machine(threads: int) -> dict[str, Any]:
    """What the figures were measured on."""
    import torch
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(settings: Settings, threads: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every comparison; the figures, grouped by comparison, with the machine and the settings."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(threads), "settings": vars(settings)}
    bench = build_bench(settings)
    report["model"] = {
        "layers": settings.n_layer,
        "width": settings.n_embd,
        "heads": settings.n_head,
        "parameters": bench.n_params,
        "dtype": "float32",
        "build_and_load_s": round(bench.load_s, 1),
    }
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("prefix_cache", lambda: comparisons.prefix_cache(bench)),
        ("vs_langchain_huggingface", lambda: comparisons.vs_langchain_huggingface(bench)),
        ("batching", lambda: comparisons.batching(bench)),
        ("wrapper_overhead", lambda: comparisons.wrapper_overhead(bench)),
        ("streaming", lambda: comparisons.streaming(bench)),
        ("plan_estimates", comparisons.plan_estimates),
        *_optional_steps(bench, settings, threads),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        report[name] = step()
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    report["headline"] = headline(report)
    report["total_s"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The target figures, each with its target and whether it is met."""
    flat = {k: v for section in report.values() if isinstance(section, dict) for k, v in section.items()}
    out = {}
    skipped = {name: s["skipped"] for name, s in report.items() if isinstance(s, dict) and "skipped" in s}
    for key, (op, target) in TARGETS.items():
        if key not in flat:
            why = "; ".join(skipped.values()) or "not run in this setting"
            out[key] = {"value": None, "target": f"{op} {target:g}", "met": False, "skipped": why}
            continue
        value = flat[key]
        met = value >= target if op == ">=" else value <= target
        out[key] = {"value": value, "target": f"{op} {target:g}", "met": met}
    return out


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (medians; the ratio column is alternative / moss-agent)."""
    p, hf, b = report["prefix_cache"], report["vs_langchain_huggingface"], report["batching"]
    w, st, n = report["wrapper_overhead"], report["streaming"], report["settings"]["new_tokens"]
    rows = [("comparison", "moss-agent", "alternative", "result", "target")]
    for ctx in report["settings"]["contexts"]:
        rows.append(
            (
                f"plugin pass 2, {p[f'pass2_prompt_tokens_{ctx}']}-token prompt "
                f"({p[f'pass2_cached_tokens_{ctx}']:.0f} cached), {n} new tokens: KV-cache reuse vs full re-prefill "
                f"(first token alone: {p[f'pass2_first_token_cached_ms_{ctx}']:.0f} vs "
                f"{p[f'pass2_first_token_full_prefill_ms_{ctx}']:.0f} ms)",
                f"{p[f'pass2_cached_ms_{ctx}']:.0f} ms",
                f"{p[f'pass2_full_prefill_ms_{ctx}']:.0f} ms",
                f"{p[f'prefix_cache_speedup_{ctx}']:.2f}x (first token "
                f"{p[f'prefix_cache_first_token_speedup_{ctx}']:.1f}x)",
                ">= 4x" if ctx == 1900 else "",
            )
        )
    rows.append(
        (
            f"{hf['turns']}-turn plugin conversation ({hf['generations']} passes x {n} tokens): ChatMoss vs "
            f"langchain-huggingface HuggingFacePipeline; tokens prefilled {hf['moss_agent_prefilled_tokens']} vs "
            f"{hf['langchain_huggingface_prefilled_tokens']}",
            f"{hf['moss_agent_ms']:.0f} ms",
            f"{hf['langchain_huggingface_ms']:.0f} ms",
            f"{hf['vs_langchain_huggingface_speedup']:.2f}x",
            ">= 3x",
        )
    )
    k = b["prompts"]
    rows.append(
        (
            f"{k} chat prompts: ChatMoss.batch vs {k} sequential invokes",
            f"{b['chatmoss_batch_ms']:.0f} ms",
            f"{b['sequential_ms']:.0f} ms",
            f"{b[f'batch_speedup_{k}']:.2f}x",
            ">= 3x",
        )
    )
    rows.append(
        (
            f"{k} chat prompts: engine.generate_batch vs {k} sequential ChatMoss invokes",
            f"{b['engine_generate_batch_ms']:.0f} ms",
            f"{b['sequential_ms']:.0f} ms",
            f"{b[f'engine_batch_speedup_{k}']:.2f}x",
            "",
        )
    )
    rows.append(
        (
            f"ChatMoss.invoke vs raw model.generate, {w['prompt_tokens']}-token prompt, {w['new_tokens']} tokens "
            f"(bare engine {w['engine_generate_ms']:.0f} ms)",
            f"{w['chatmoss_invoke_ms']:.0f} ms",
            f"{w['model_generate_ms']:.0f} ms",
            f"{w['wrapper_overhead_pct']:+.1f} % overhead",
            "<= 5 %",
        )
    )
    rows.append(
        (
            f"ChatMoss.stream: first reply text vs whole reply ({n} tokens; "
            f"invoke {st['invoke_full_reply_ms']:.0f} ms)",
            f"{st['stream_first_token_ms']:.0f} ms",
            f"{st['stream_full_reply_ms']:.0f} ms",
            f"{st['first_token_fraction_of_reply']:.1%} of the reply time",
            "",
        )
    )
    rows += _peer_rows(report)
    pe = report["plan_estimates"]
    rows.append(
        (
            "load plan memory estimates for the 16B checkpoints vs the published table (9 figures)",
            "",
            "",
            f"max error {pe['plan_estimate_max_error_pct']:.1f} %",
            "<= 10 %",
        )
    )
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _peer_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows of the optional comparisons that ran."""
    rows: list[tuple[str, ...]] = []
    ct = report.get("vs_ctranslate2", {})
    if "vs_ctranslate2_speedup" in ct:
        rows.append(
            (
                f"same conversation ({ct['generations']} passes): ChatMoss vs CTranslate2 {ct['ctranslate2_version']} "
                "fp32 on the same prompts, each call independent",
                f"{ct['moss_agent_ms']:.0f} ms",
                f"{ct['ctranslate2_ms']:.0f} ms",
                f"{ct['vs_ctranslate2_speedup']:.2f}x",
                ">= 1x",
            )
        )
        rows.append(
            (
                "same conversation: ChatMoss on CTranslate2Engine int8 (fp32: "
                f"{ct['moss_agent_on_ctranslate2_fp32_ms']:.0f} ms) vs ChatMoss on TransformersEngine fp32"
                + ("" if ct["int8_replies_equal_fp32"] else "; int8 replies differ from fp32's"),
                f"{ct['moss_agent_on_ctranslate2_int8_ms']:.0f} ms",
                f"{ct['moss_agent_ms']:.0f} ms",
                f"{ct['ctranslate2_engine_int8_speedup']:.2f}x",
                "",
            )
        )
    re = report.get("realism", {})
    if "realism_speedup" in re:
        rows.append(
            (
                f"realism: demonstration model (trained, natural stops {'/'.join(re['realism_stops'])}), MossAgent "
                f"with its tools, {re['realism_questions']} questions ({re['realism_generations']} passes, "
                f"{re['realism_generated_tokens']} tokens generated) vs langchain-huggingface on the same prompts; "
                f"tokens prefilled {re['realism_moss_agent_prefilled_tokens']} vs "
                f"{re['realism_langchain_huggingface_prefilled_tokens']}",
                f"{re['realism_moss_agent_ms']:.0f} ms",
                f"{re['realism_langchain_huggingface_ms']:.0f} ms",
                f"{re['realism_speedup']:.2f}x",
                "",
            )
        )
    sv = report.get("serve", {})
    if "serve_concurrent_speedup_8" in sv:
        rows.append(
            (
                "moss-agent serve: 8 concurrent chat clients vs the same 8 one at a time (completion tokens/s)",
                "",
                "",
                f"{sv['serve_concurrent_speedup_8']:.2f}x",
                ">= 3x",
            )
        )
    return rows


def summary(report: dict[str, Any]) -> str:
    """Machine line, table and target lines."""
    m, model = report["machine"], report["model"]
    lines = [
        f"machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"transformers {m['transformers']}, load average at start {m['load_average_at_start']}, "
        f"at end {m.get('load_average_at_end')}",
        f"model: random CodeGen in the MOSS layout, {model['layers']} layers x {model['width']}, "
        f"{model['parameters'] / 1e6:.1f} M parameters, {model['dtype']}; settings '{report['settings']['name']}', "
        f"{report['settings']['reps']} timed rounds (x3 for the one-prompt rows) after "
        f"{report['settings']['warmup']} warm-up, interleaved; medians",
        "",
        table(report),
        "",
    ]
    for key, h in report["headline"].items():
        if h["value"] is None:
            lines.append(f"SKIP  {key} ({h['skipped']})")
        else:
            lines.append(f"{'met ' if h['met'] else 'MISS'}  {key} = {h['value']} (target {h['target']})")
    lines.append(f"total {report['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="moss-agent benchmarks against the alternatives"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds (make bench)")
    size.add_argument("--tiniest", action="store_true", help="the smallest setting, to test the script itself")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared CPU, contended threads run slower)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default per setting)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    settings = SETTINGS["tiniest" if args.tiniest else "quick" if args.quick else "full"]
    if args.reps is not None:
        settings = Settings(**{**vars(settings), "reps": args.reps})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"moss-agent benchmarks, setting '{settings.name}', {args.threads} torch thread(s)", flush=True)
    report = run(settings, args.threads, log=lambda line: print(line, flush=True))
    print()
    print(summary(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
