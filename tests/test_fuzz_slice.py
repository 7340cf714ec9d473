"""A fixed-seed slice of the ingestion fuzz (tools/fuzz/run.py runs the full 10,000 cases): every
hostile input ends read or refused with a one-line message, within the time limit."""

from __future__ import annotations

import time

from tools.fuzz.run import run_ingest

# Seed and cases fixed: the same 300 inputs every run. The biggest inputs are scaled down (scale
# 0.1: 300-page PDFs, 5 MB lines) so the slice stays under a minute on a busy two-core machine.
SEED, CASES, SCALE, LIMIT_S = 1, 300, 0.1, 30.0


def test_fuzz_slice_has_no_crash_and_no_hang():
    t0 = time.perf_counter()
    figures = run_ingest(SEED, CASES, 0, LIMIT_S, quiet=True, scale=SCALE)
    assert figures["failures"] == [] and figures["crashes"] == 0 and figures["hangs"] == 0
    assert figures["read"] + figures["refused"] == CASES
    assert figures["read"] > 50 and figures["refused"] > 50  # the slice exercises both endings
    # every family of hostile input is in the slice
    assert {"pdf-truncate", "pdf-flip", "pdf-xref", "pdf-encrypt", "tree", "fifo", "binary"} <= set(figures["kinds"])
    assert time.perf_counter() - t0 < 240
