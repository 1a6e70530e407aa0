"""The release's own ``SFTDataset`` (``../shared/moss_release/finetune_moss.py``) as the oracle of the spans.

Its code runs here unchanged on the shared MOSS conversations with the tokenizer ``load_moss`` returns (the release's
tokenization). Everything must agree: the ids (meta instruction and each segment encoded alone), where a long
conversation stops (whole turns up to 2048 ids), which are dropped, and the end of every no-loss span. The one
difference is the start of a results span: the release adds 5, the ids of ``<|Results|>:`` in its vocabulary; here
that is counted on the tokenizer at hand.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from moss_agent.checkpoints.files import load_tokenizer
from moss_agent.finetune import encode_samples, load_samples
from moss_agent.testing.checkpoints import tiny_moss_tokenizer_dir

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
RELEASE = SHARED / "moss_release" / "finetune_moss.py"
DATA = SHARED / "moss_data" / "conversations"

pytestmark = pytest.mark.skipif(
    not (RELEASE.is_file() and DATA.is_dir()), reason="the release's code or the shared MOSS data (../shared) is absent"
)


@pytest.fixture(scope="module")
def release(monkeypatch_module: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    pytest.importorskip("accelerate")
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = object  # type: ignore[attr-defined]  # only its training loop writes logs
    monkeypatch_module.setitem(sys.modules, "torch.utils.tensorboard", board)
    spec = importlib.util.spec_from_file_location("finetune_moss_release", RELEASE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_spans_agree_with_the_release(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(tiny_moss_tokenizer_dir())[0]
    files = sorted(DATA.rglob("*.json"))[::20]  # 45 conversations of every kind
    records = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    oracle = release.SFTDataset(str(tmp_path), tokenizer)

    samples, problems = load_samples(tmp_path / "train.jsonl")
    encoded, stats = encode_samples(samples, tokenizer, max_length=2048)
    assert not problems and len(oracle.data) == len(encoded) == stats.conversations
    assert stats.truncated > 0  # the tiny vocabulary makes some conversations longer than 2048 ids
    head = len(tokenizer.encode("<|Results|>:", add_special_tokens=False))
    for ids, spans, ours in zip(oracle.data, oracle.no_loss_spans, encoded, strict=True):
        assert ours.input_ids == ids
        expected = [spans[0]] + [(start - 5 + head, end) for start, end in spans[1:]]
        assert ours.no_loss == expected
