"""The benchmark script runs end to end on its tiniest setting, and its harness catches differing outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("langchain_huggingface")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: found from the repository root only
    sys.path.insert(0, str(ROOT))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.comparisons import PUBLISHED_GB, plan_estimates  # noqa: E402
from benchmarks.harness import Case, interleave  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_threads() -> Any:
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tiniest_run_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench_run.main(["--tiniest", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    printed = capsys.readouterr().out

    assert set(report["headline"]) == set(bench_run.TARGETS)
    ct2 = importlib.util.find_spec("ctranslate2") is not None
    skipped = {"serve_concurrent_speedup_8"} | (set() if ct2 else {"vs_ctranslate2_speedup"})
    for key, figure in report["headline"].items():
        if key in skipped:  # the tiniest setting does not start the server
            assert figure["value"] is None and figure["skipped"] and f"SKIP  {key}" in printed
            continue
        assert isinstance(figure["value"], float | int) and figure["value"] == figure["value"], key
        assert f"{key} = {figure['value']}" in printed
    assert report["machine"]["torch_threads"] == 1 and report["settings"]["name"] == "tiniest"
    rows = len(report["settings"]["contexts"]) + 6 + (2 if ct2 else 0)
    assert printed.count("\n| ") == 1 + rows  # header + rows
    if ct2:
        ct = report["vs_ctranslate2"]
        assert ct["generations"] == report["vs_langchain_huggingface"]["generations"]
        assert ct["ctranslate2_ms"] > 0 and ct["moss_agent_on_ctranslate2_int8_ms"] > 0

    pc = report["prefix_cache"]
    for ctx in report["settings"]["contexts"]:
        assert 0 < pc[f"pass2_cached_tokens_{ctx}"] < pc[f"pass2_prompt_tokens_{ctx}"] <= 2048
    assert pc["pass2_prompt_tokens_1900"] > 1800
    hf = report["vs_langchain_huggingface"]
    assert hf["generations"] == 2 * hf["turns"]  # pass 1 and pass 2 of every turn
    assert 0 < hf["moss_agent_prefilled_tokens"] < hf["langchain_huggingface_prefilled_tokens"]
    st = report["streaming"]
    assert 0 < st["stream_first_token_ms"] <= st["stream_full_reply_ms"]


def test_interleave_alternates_order_and_drops_warmup() -> None:
    calls: list[str] = []

    def runner(name: str) -> Any:
        return lambda: calls.append(name)

    cases = {name: Case(run=runner(name)) for name in "ab"}
    timings = interleave(cases, reps=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(timings.runs[n]) for n in "ab"] == [3, 3]
    assert timings.ratio("a", "b") > 0


def test_interleave_fails_when_an_output_differs() -> None:
    outputs = iter([(1, 2, 3), (1, 2, 3), (1, 2)])  # the third run "does less work"

    def check(got: tuple[int, ...]) -> None:
        assert got == (1, 2, 3), "outputs differ"

    with pytest.raises(AssertionError, match="outputs differ"):
        interleave({"a": Case(run=lambda: next(outputs), check=check)}, reps=2, warmup=1)


def test_plan_figures_cover_the_published_table() -> None:
    figures = plan_estimates()
    pairs = [figures[f"{p}_{w}_gib"] for p in PUBLISHED_GB for w in ("load", "turn", "full")]
    assert [published for _, published in pairs] == [x for row in PUBLISHED_GB.values() for x in row]
    worst = max(abs(got / published - 1) * 100 for got, published in pairs)
    assert figures["plan_estimate_max_error_pct"] == round(worst, 1)


def test_realism_row_replays_the_agents_prompts_token_for_token() -> None:
    from benchmarks.harness import SETTINGS, Settings, build_bench
    from benchmarks.peers import realism

    bench = build_bench(Settings(**{**vars(SETTINGS["tiniest"]), "reps": 1}))
    row = realism(bench)  # asserts equal tokens on every pass before timing
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert row["realism_generations"] >= row["realism_questions"] == 4
    assert 0 < row["realism_moss_agent_prefilled_tokens"] < row["realism_langchain_huggingface_prefilled_tokens"]
    assert row["realism_generated_tokens"] > 0 and row["realism_speedup"] > 0
