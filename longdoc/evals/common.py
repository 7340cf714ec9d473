"""Shared pieces of the built-in evaluations: filler text of a target token length, one greedy answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from longdoc.config import GenerationConfig
from longdoc.engine.baselines import SlidingWindow
from longdoc.engine.decode import DecodePolicy, generate
from longdoc.engine.prefill import prefill
from longdoc.errors import UsageError
from longdoc.runtime.local import LocalBackend
from longdoc.runtime.plan import make_plan


@dataclass(frozen=True)
class DecodeStats:
    """One greedy answer's figures: the shared prefill, its own decoding, tokens, whether DCA ran."""

    prefill_s: float
    decode_s: float
    generated: int
    dca: bool


@dataclass(frozen=True)
class Settings:
    """What an evaluation ran with (the report's ``settings``)."""

    model: str
    dtype: str
    quantize: str
    dca: bool | None
    chunk_size: int
    local_window: int
    dca_temperature: bool


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def filler_ids(session: LocalBackend, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` tokens of repeated filler (cut at a token boundary)."""
    unit = session.encode(FILLER)
    reps = n_tokens // len(unit) + 1
    return (unit * reps)[:n_tokens]


WINDOW_PREFILL_STEP = 256  # keeps the sliding window's band close to its nominal width


def answers(
    session: LocalBackend,
    ids: list[int],
    max_new_tokens: int,
    policies: list[DecodePolicy | None],
    window: SlidingWindow | None = None,
) -> list[tuple[str, DecodeStats]]:
    """Greedy completions of raw token ids, one per decode policy, sharing one prefill.

    Decoding only writes KV positions after the prompt, so each policy starts from the same cache.
    With ``window`` the prefill and decoding use the sliding-window baseline instead.
    """
    # a local copy: the session's own settings stay as the user gave them
    cfg = replace(session.cfg, generation=GenerationConfig(max_new_tokens=max_new_tokens))
    plan = make_plan(cfg, session.info, len(ids))
    model = session.long_model(plan)
    kv = model.new_cache(len(ids) + max_new_tokens)
    t0 = time.perf_counter()
    tokens = torch.tensor([ids], device=session.info.device)
    if window is not None:
        if plan.layout is not None:
            raise UsageError("the sliding-window baseline runs without DCA: add --no-dca")
        logits = prefill(model, tokens, kv, WINDOW_PREFILL_STEP, attend=window.attend(model, kv))
        policies = [window]
    else:
        logits = prefill(model, tokens, kv, cfg.prefill_step)
    prefill_s = time.perf_counter() - t0
    outputs = []
    for policy in policies:
        t1 = time.perf_counter()
        out = list(generate(model, logits, len(ids), kv, cfg.generation, session.info.stop_ids, policy))
        decode_s = time.perf_counter() - t1
        text = session.tokenizer.decode(out, skip_special_tokens=True)
        stats = DecodeStats(round(prefill_s, 3), round(decode_s, 3), len(out), plan.layout is not None)
        outputs.append((text, stats))
    return outputs
