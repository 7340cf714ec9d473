"""Prefill: run the prompt through the model in steps, filling the KV store."""

from __future__ import annotations

from collections.abc import Callable

import torch

from longdoc.attention.dca import chunk_steps
from longdoc.attention.kvstore import KVStore
from longdoc.attention.patch import Attend, PatchedModel

# progress(done_tokens, total_tokens)
Progress = Callable[[int, int], None]


def prefill(
    model: PatchedModel,
    ids: torch.Tensor,
    kv: KVStore,
    step: int,
    start: int = 0,
    progress: Progress | None = None,
    attend: Attend | None = None,
) -> torch.Tensor:
    """Feed ids (1, L) at positions start.. into ``kv``; returns the last position's logits (1, V).

    Steps never cross a DCA chunk boundary, so each one attends to at most three key sets and the
    working memory is bounded by ``step`` tokens of activations.
    """
    total = ids.shape[1]
    logits = None
    for a, b in chunk_steps(start, start + total, step, model.settings.layout):
        logits = model.forward(ids[:, a - start : b - start], a, kv, attend)
        if progress is not None:
            progress(b - start, total)
    if logits is None:
        raise ValueError("prefill needs at least one token")
    return logits
