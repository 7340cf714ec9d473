"""A fixed slice of the serve load-and-fault harness (tools/fuzz/serve_faults.py runs it whole): 40 seeded
malformed requests, clients that queue and leave, and 10 MB bodies refused while a small request is
timed, against a real server process on 127.0.0.1."""

from __future__ import annotations

import time

from tools.fuzz import serve_faults


def test_serve_fault_slice_has_no_5xx_no_leak_and_no_restart(monkeypatch):
    monkeypatch.setattr(serve_faults, "MALFORMED", 40)
    monkeypatch.setattr(serve_faults, "ROUNDS_10MB", 3)
    t0 = time.perf_counter()
    figures = serve_faults.run_serve(seed=1, scenarios=("malformed", "queued_gone", "oversized"))
    assert figures["problems"] == [] and figures["server_bug_lines"] == [], figures
    assert figures["server_errors_5xx"] == 0 and figures["slots_leaked"] == 0 and figures["restarts_needed"] == 0
    oversized = figures["scenarios"]["oversized"]
    assert oversized["small_answered"] == 3 and oversized["small_p99_s"] < 1.0
    assert set(oversized["refusals"]) == {"413", "200MB announced: 413", "chunked past the cap: 413"}
    assert figures["scenarios"]["queued_gone"]["still_admitted_after_leaving"] == 0
    assert time.perf_counter() - t0 < 120
