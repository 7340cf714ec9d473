"""Planning before any model work: DCA switching, context ceilings, memory refusal."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from longdoc import native
from longdoc.config import DCAConfig, GenerationConfig, RecycleConfig, RunConfig
from longdoc.errors import DoesNotFitError
from longdoc.runtime.plan import decodes_natively, make_plan

from .helpers import info


def cfg(**kw) -> RunConfig:
    dca = DCAConfig(**{k: kw.pop(k) for k in ("enabled", "chunk_size", "local_window", "temperature") if k in kw})
    return RunConfig(dca=dca, generation=GenerationConfig(max_new_tokens=kw.pop("new", 512)), **kw)


def test_dca_switches_on_past_the_window():
    assert make_plan(cfg(), info(), 30_000).layout is None
    plan = make_plan(cfg(), info(), 40_000)
    assert plan.layout is not None
    assert (plan.layout.chunk_size, plan.layout.local_window) == (24576, 4096)  # 3W/4, W/8
    assert make_plan(cfg(enabled=True), info(), 100).layout is not None
    assert make_plan(cfg(enabled=True, chunk_size=2048, local_window=256), info(), 100).layout.chunk_len == 1792


def test_recycling_starts_later_where_decode_steps_run_natively(monkeypatch):
    """Recycled decoding turns on from 8,192 prompt tokens, and from 16,384 where a q8 decode step runs
    in one native call (full attention is faster there up to that); --recycle/--no-recycle decide alone."""
    plain, q8 = info(), replace(info(), quantize="q8")
    assert not decodes_natively(plain)
    assert decodes_natively(q8) == all(native.likely_available(n) for n in ("q8", "attn16", "step"))
    monkeypatch.setattr(native, "likely_available", lambda name: True)
    assert decodes_natively(q8) and not decodes_natively(replace(q8, dtype=torch.float16))
    for tokens, want_plain, want_q8 in ((8191, False, False), (8192, True, False), (16384, True, True)):
        assert make_plan(cfg(), plain, tokens).recycle is want_plain
        assert make_plan(cfg(), q8, tokens).recycle is want_q8
    assert make_plan(cfg(recycle=RecycleConfig(enabled=True)), q8, 100).recycle
    assert not make_plan(cfg(recycle=RecycleConfig(enabled=False)), plain, 20_000).recycle
    monkeypatch.setattr(native, "likely_available", lambda name: name != "step")  # no compiler for it
    assert not decodes_natively(q8) and make_plan(cfg(), q8, 8192).recycle


def test_context_ceiling_and_refusal_message():
    with pytest.raises(DoesNotFitError, match="by 512 tokens"):
        make_plan(cfg(enabled=False), info(), 32_768)
    assert make_plan(cfg(), info(), 4 * 32768 - 512).max_context == 4 * 32768
    with pytest.raises(DoesNotFitError, match="exceeds the context limit of 131,072"):
        make_plan(cfg(), info(), 4 * 32768)
    with pytest.raises(DoesNotFitError, match="limit of 1,000"):
        make_plan(cfg(max_context=1000), info(), 600)


def test_memory_refusal_names_what_would_fit():
    with pytest.raises(DoesNotFitError, match="tokens would fit"):
        make_plan(cfg(max_context=10**9), info(weight_bytes=10**15), 1000)


def test_kv_bytes_follow_the_model_shape():
    plan = make_plan(cfg(new=0), info(), 1000)
    assert plan.kv_bytes == 1000 * 2 * 24 * 2 * 64 * 2


def test_attention_temperature_only_beyond_the_window():
    import math

    c = cfg(temperature=True, new=0)
    assert make_plan(c, info(), 30_000).logit_scale == 1.0
    plan = make_plan(c, info(), 65_536)
    assert plan.logit_scale == pytest.approx((0.1 * math.log(2) + 1) ** 2)
    assert make_plan(cfg(new=0), info(), 65_536).logit_scale == 1.0  # off by default
