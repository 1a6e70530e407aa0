"""One loaded model per process, on a tiny checkpoint in the released layout: the weight shards are read once."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import ConfigurableField

from moss_agent.chat_model import ChatMoss
from moss_agent.llm import MossLLM
from moss_agent.protocol import format as fmt

torch = pytest.importorskip("torch")


@pytest.fixture
def shard_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[str]]:
    """A fresh tiny checkpoint, and the names of its weight shards each time one is read from disk."""
    from moss_agent.testing.checkpoints import tiny_moss_checkpoint

    path = tiny_moss_checkpoint(tmp_path / "tiny")
    reads: list[str] = []
    real_load = torch.load

    def counting_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, str | Path) and Path(f).parent == path:
            reads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    torch.set_num_threads(1)
    return path, reads


def test_faces_copies_pickles_and_configurable_fields_read_the_weights_once(
    shard_reads: tuple[Path, list[str]],
) -> None:
    path, reads = shard_reads
    chat = ChatMoss(model=str(path), do_sample=False, max_tokens=4, device_map="cpu")
    chat.invoke("Hello")
    shards = sorted(reads)
    assert shards == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]  # really read

    MossLLM(model=str(path), max_tokens=4, device_map="cpu").invoke(fmt.chat_prompt(fmt.system_prompt(), [], "Hi"))
    ChatMoss(model=str(path) + "/", temperature=0.2, max_tokens=4, device_map="cpu").invoke("Hello")
    chat.model_copy(update={"max_new_tokens": 3}).invoke("Hello")
    pickle.loads(pickle.dumps(chat)).invoke("Hello")
    copy.deepcopy(chat).invoke("Hello")
    tuned = chat.configurable_fields(temperature=ConfigurableField(id="temperature"))
    tuned.invoke("Hello", config={"configurable": {"temperature": 0.3}})
    assert sorted(reads) == shards  # the faces above read nothing more
    engine = chat.get_engine()
    assert MossLLM(model=str(path), device_map="cpu").get_engine() is engine

    fp32 = ChatMoss(model=str(path), precision="fp32", device_map="cpu")  # another load setting: its own engine
    assert fp32.get_engine() is not engine and len(reads) == 2 * len(shards)
