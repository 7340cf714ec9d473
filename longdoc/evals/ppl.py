"""Perplexity of a text at given context lengths, through the same prefill path as answering.

Logits are formed a slice of positions at a time, so no (L x vocab) buffer is ever held.

With ``--quantize`` every position runs through the quantized weights (``schemes.every_row``), not only
the decode-sized steps that use them in a real run (prefill keeps the unquantized layers): the
perplexity is then that of the model each decoded token is predicted by, which is what the quantized
default must be judged on. It is slower than an unquantized measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from longdoc.attention.dca import chunk_steps
from longdoc.config import GenerationConfig
from longdoc.evals.common import Settings
from longdoc.quant import schemes
from longdoc.runtime.local import LocalBackend
from longdoc.runtime.plan import make_plan
from longdoc.runtime.result import json_of, omitted

LOGIT_SLICE = 512  # positions per lm_head call: 512 x 151,936 float32 = 311 MB at most


def nll_sum(session: LocalBackend, ids: list[int]) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over ids[1:], and their count."""
    cfg = replace(session.cfg, generation=GenerationConfig(max_new_tokens=1))  # the session's settings stay
    plan = make_plan(cfg, session.info, len(ids))
    model = session.long_model(plan)
    kv = model.new_cache(len(ids))
    tokens = torch.tensor([ids], device=session.info.device)
    total, count = 0.0, 0
    with schemes.every_row(model.model):
        for a, b in chunk_steps(0, len(ids), cfg.prefill_step, plan.layout):
            hidden = model.hidden_states(tokens[:, a:b], a, kv)
            for s in range(0, b - a, LOGIT_SLICE):
                e = min(b - a, s + LOGIT_SLICE)
                targets = tokens[0, a + s + 1 : a + e + 1]
                logits = model.logits(hidden[0, s : s + len(targets)])
                if len(targets):
                    total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
                    count += len(targets)
    return total, count


@dataclass(frozen=True)
class PplRow:
    """Perplexity over the first ``length`` tokens (of ``tokens`` predicted), or why it could not run."""

    length: int
    ppl: float | None = omitted()
    tokens: int | None = omitted()
    error: str | None = omitted()


@dataclass
class PplReport:
    results: list[PplRow]
    settings: Settings | None = omitted()
    task: str = "ppl"

    def to_json(self) -> dict[str, Any]:
        return dict(json_of(self))


def run(session: LocalBackend, text: str, lengths: list[int]) -> PplReport:
    ids = session.encode(text)
    results = []
    for length in lengths:
        if length > len(ids):
            results.append(PplRow(length, error=f"text has only {len(ids)} tokens"))
            continue
        total, count = nll_sum(session, ids[:length])
        results.append(PplRow(length, ppl=round(math.exp(total / count), 4), tokens=count))
    return PplReport(results=results)
