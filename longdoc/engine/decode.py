"""Decoding as a generator of token ids (one forward per token against the KV store)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from longdoc.config import GenerationConfig
from longdoc.engine.kvcache import KVCache
from longdoc.engine.longmodel import LongModel
from longdoc.engine.sampling import sample
from longdoc.models.decoder import Attend


class DecodePolicy:
    """Chooses the attention of each decode step. Plain decoding attends to the whole cache;
    recycled decoding (``longdoc.engine.recycled``) overrides ``attend_for``."""

    def attend_for(self, model: LongModel, kv: KVCache, step: int, pos: int) -> Attend | None:
        """The attention for decode step ``step`` (0 = the first after prefill), whose token is at ``pos``."""
        return None


def decode_one_token(model: LongModel, token: int, pos: int, kv: KVCache, attend: Attend | None) -> torch.Tensor:
    ids = torch.tensor([[token]], device=model.device)
    return model.forward(ids, pos, kv, attend)


def generate(
    model: LongModel,
    first_logits: torch.Tensor,
    pos: int,
    kv: KVCache,
    gen: GenerationConfig,
    stop_ids: set[int],
    policy: DecodePolicy | None = None,
) -> Iterator[int]:
    """Yield tokens after a prefill that ended at position ``pos``-1 with logits ``first_logits`` (1, V).

    Stops at a stop id (not yielded) or after ``gen.max_new_tokens``.
    """
    policy = policy or DecodePolicy()
    generator = None
    if gen.seed is not None:
        generator = torch.Generator(device=first_logits.device).manual_seed(gen.seed)
    logits = first_logits
    for step in range(gen.max_new_tokens):
        token = sample(logits[0], gen.temperature, gen.top_p, generator)
        if token in stop_ids:
            return
        yield token
        if step + 1 == gen.max_new_tokens:
            return
        logits = decode_one_token(model, token, pos, kv, policy.attend_for(model, kv, step, pos))
        pos += 1
