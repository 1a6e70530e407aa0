"""Batches of encoded conversations in a seeded order that a resumed run reproduces."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from moss_agent.finetune.spans import IGNORE, Encoded

__all__ = ["batch_order", "collate", "count_tokens"]


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle cut into ``batch_size`` pieces (the last may be short)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def iter_batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[int, list[int]]]:
    """Endless ``(epoch, indices)`` batches, epoch after epoch, from step ``start_step`` on."""
    per_epoch = len(batch_order(n, batch_size, seed, 0))
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        for batch in batch_order(n, batch_size, seed, epoch)[offset:]:
            yield epoch, batch
        epoch, offset = epoch + 1, 0


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors (padding gets no loss)."""
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, enc in enumerate(items):
        n = len(enc.input_ids)
        ids[row, :n] = torch.tensor(enc.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(enc.labels())
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(predicted ids with loss, predicted ids without loss) of a batch; padding counts as neither."""
    targets = batch["labels"][:, 1:]
    real = batch["attention_mask"][:, 1:].bool()
    trained = int((targets != IGNORE).sum())
    return trained, int(real.sum()) - trained
