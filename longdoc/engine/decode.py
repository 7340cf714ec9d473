"""Decoding as a generator of token ids (one forward per token against the KV store)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from longdoc.attention.kvstore import KVStore
from longdoc.attention.patch import Attend, PatchedModel
from longdoc.config import GenerationConfig
from longdoc.engine.sampling import sample


class DecodePolicy:
    """Chooses the attention of each decode step. Plain decoding attends to the whole cache;
    recycled decoding (``longdoc.engine.recycled``) overrides ``attend_for``."""

    def attend_for(self, model: PatchedModel, kv: KVStore, step: int, pos: int) -> Attend | None:
        """The attention for decode step ``step`` (0 = the first after prefill), whose token is at ``pos``."""
        return None


def decode_one_token(model: PatchedModel, token: int, pos: int, kv: KVStore, attend: Attend | None) -> torch.Tensor:
    ids = torch.tensor([[token]], device=model.device)
    return model.forward(ids, pos, kv, attend)


def generate(
    model: PatchedModel,
    first_logits: torch.Tensor,
    pos: int,
    kv: KVStore,
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
