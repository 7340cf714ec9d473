"""Sparse prefill against the float64 DCA reference restricted to the keys it kept."""

from __future__ import annotations

import pytest
import torch

from longdoc.attention.dca import ChunkLayout, chunk_steps, key_positions
from longdoc.attention.kernels import attend_cpu, attend_reference
from longdoc.attention.reference import naive_dca
from longdoc.attention.sparse import SparseConfig, SparseStats, block_scores, sparse_chunked_attention
from longdoc.models.rope import RopeTable

from .helpers import THETA, query_index, run_chunked


def run_sparse(q, k, v, layout, cfg, kernel, step, stats):
    """q (H, L, D), k/v (Hkv, L, D) float64 -> sparse prefill output through the production path."""
    d, n = q.shape[-1], q.shape[1]
    table = RopeTable(1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d), dtype=torch.float64)
    kc = table.rotate(k[None], key_positions(torch.arange(n), layout))
    parts = [
        sparse_chunked_attention(q[None, :, a:b], kc, v[None], a, table.rotate, layout, kernel, d**-0.5, cfg, stats)
        for a, b in chunk_steps(0, n, step, layout)
    ]
    return torch.cat(parts, dim=2)[0]


def kept_mask(n, hkv, layout, cfg, step, stats):
    """(Hkv, L, L): what each query may see by the rules (diagonal block, sinks, band) plus the
    recorded selections."""
    block = cfg.block_for(layout)
    keep = torch.zeros(hkv, n, n, dtype=torch.bool)
    for a, b in chunk_steps(0, n, step, layout):
        band_lo = max(block, (a - cfg.band) // block * block)
        for i in range(a, b):
            keep[:, i, a : i + 1] = True
            keep[:, i, :block] = True
            keep[:, i, band_lo:a] = True
    for a, b, idx in stats.picks:
        for h in range(hkv):
            keep[h, a:b, idx[h]] = True
    return keep.tril()


def random_qkv(seed, n, h=4, hkv=2, d=8):
    torch.manual_seed(seed)
    q = torch.randn(h, n, d, dtype=torch.float64)
    return q, torch.randn(hkv, n, d, dtype=torch.float64), torch.randn(hkv, n, d, dtype=torch.float64)


@pytest.mark.parametrize("kernel", [attend_reference, attend_cpu])
@pytest.mark.parametrize("layout", [None, ChunkLayout(40, 8), ChunkLayout(36, 4)])
def test_sparse_equals_reference_on_the_keys_it_kept(kernel, layout):
    """GQA, several DCA chunks (regions rotated three ways), groups of queries that choose different
    blocks, a band cut at block boundaries: exact attention over exactly the kept keys."""
    n, step = 120, 24
    q, k, v = random_qkv(5, n)
    cfg = SparseConfig(budget=8, band=10, block=4, query_block=8)
    stats = SparseStats(record=True)
    got = run_sparse(q, k, v, layout, cfg, kernel, step, stats)
    assert stats.picks, "the case must exercise selection"
    assert 0.2 < stats.kept_fraction < 0.95
    keep = kept_mask(n, 2, layout, cfg, step, stats)
    torch.testing.assert_close(got, naive_dca(q, k, v, layout, THETA, keep), atol=1e-10, rtol=0)


def expected_selection(q, k, layout, cfg, step):
    """The selection rule from its definition, in float64: {(first query, end query): per KV head the
    set of selected key positions}. Per group of queries and KV head, a block scores its mean key
    against the group's mean query rotated as DCA rotates it for that block's keys, maximized over the
    head's query heads; each head's ``budget // block`` best blocks over all regions are counted per
    region, and every head takes, in each region, as many of its own best blocks there as the head
    that wants most. Also checks the promise that follows: each head keeps all of its own best blocks."""
    h, n, d = q.shape
    hkv = k.shape[0]
    block = cfg.block_for(layout)
    table = RopeTable(1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d), dtype=torch.float64)
    keys = table.rotate(k[None], key_positions(torch.arange(n), layout))[0]
    picks = {}
    for a, b in chunk_steps(0, n, step, layout):
        band_lo = max(block, (a - cfg.band) // block * block)
        if b - a == 1 or band_lo <= block:
            continue
        starts = list(range(block, band_lo, block))  # the selectable blocks, between the sinks and the band
        region = [0 if layout is None else min(2, a // layout.chunk_len - j // layout.chunk_len) for j in starts]
        mean_keys = torch.stack([keys[:, j : j + block].mean(1) for j in starts], 1)  # (Hkv, blocks, D)
        for ga in range(a, b, cfg.query_block):
            gb = min(b, ga + cfg.query_block)
            scores = torch.empty(h, len(starts), dtype=torch.float64)
            for i, j in enumerate(starts):
                rot = torch.tensor([query_index(p, j, layout) for p in range(ga, gb)])
                mean_query = table.rotate(q[None, :, ga:gb], rot)[0].mean(1)  # (H, D)
                scores[:, i] = (mean_query * mean_keys[:, i].repeat_interleave(h // hkv, 0)).sum(-1)
            scores = scores.view(hkv, h // hkv, -1).amax(1)  # (Hkv, blocks)
            best = scores.topk(min(len(starts), cfg.budget // block), dim=-1).indices.tolist()
            counts = [max(sum(region[i] == r for i in head) for head in best) for r in range(3)]
            chosen = []
            for head in range(hkv):
                mine = set()
                for r in range(3):
                    ranked = sorted((i for i in range(len(starts)) if region[i] == r), key=lambda i: -scores[head, i])
                    mine |= set(ranked[: counts[r]])
                assert set(best[head]) <= mine  # never fewer than the head's own best
                chosen.append({p for i in mine for p in range(starts[i], starts[i] + block)})
            if any(chosen):
                picks[(ga, gb)] = chosen
    return picks


@pytest.mark.parametrize("layout", [None, ChunkLayout(40, 8), ChunkLayout(36, 4), ChunkLayout(24, 12)])
def test_sparse_selection_follows_its_definition(layout):
    """The recorded picks are the rule's, each region scored at its own query rotation (scoring all at
    the own-chunk one would give 40/8 and 36/4, which share c = 32, the same picks; 24/12 has w >= c).
    Every KV head keeps at least its own best blocks (the kernel takes one count per region, the
    largest). The exactness test above builds its mask from the picks, so it passes any selection."""
    n, step = 120, 24
    q, k, v = random_qkv(5, n)
    cfg = SparseConfig(budget=8, band=10, block=4, query_block=8)
    stats = SparseStats(record=True)
    run_sparse(q, k, v, layout, cfg, attend_cpu, step, stats)
    got: dict[tuple[int, int], list[set[int]]] = {}
    for a, b, idx in stats.picks:
        held = got.setdefault((a, b), [set() for _ in range(idx.shape[0])])
        for head, keys in enumerate(idx.tolist()):
            held[head] |= set(keys)
    assert got == expected_selection(q, k, layout, cfg, step)


@pytest.mark.parametrize("layout", [None, ChunkLayout(40, 8)])
def test_sparse_equals_exact_when_the_budget_covers_every_block(layout):
    n, step = 96, 16
    q, k, v = random_qkv(6, n)
    stats = SparseStats()
    got = run_sparse(
        q, k, v, layout, SparseConfig(budget=10_000, band=8, block=4, query_block=4), attend_cpu, step, stats
    )
    torch.testing.assert_close(got, run_chunked(q, k, v, layout, THETA, attend_cpu, step), atol=1e-10, rtol=0)
    assert stats.kept >= stats.total


def test_selection_finds_the_block_the_queries_point_at():
    """A far block whose keys align with every query is chosen over random ones."""
    torch.manual_seed(7)
    q = torch.randn(4, 16, 8, dtype=torch.float64)
    keys = torch.randn(2, 40, 8, dtype=torch.float64)
    keys[1, 20:24] = q[2:4].mean((0, 1)) * 5  # block 5 of KV head 1 (query heads 2 and 3)
    scores = block_scores(q, keys, block=4, query_block=8)
    assert scores.shape == (2, 2, 10)
    assert scores[1].argmax(-1).tolist() == [5, 5]


def test_decode_steps_and_short_prefixes_stay_exact():
    """One query, or nothing beyond the band to select from: the exact path, counted as all kept."""
    n = 40
    q, k, v = random_qkv(8, n)
    stats = SparseStats(record=True)
    cfg = SparseConfig(budget=4, band=64, block=4, query_block=4)
    got = run_sparse(q, k, v, None, cfg, attend_cpu, 1, stats)
    torch.testing.assert_close(got, run_chunked(q, k, v, None, THETA, attend_cpu, 1), atol=1e-10, rtol=0)
    assert not stats.picks and stats.kept == stats.total


def test_block_shrinks_to_divide_the_chunk_length():
    assert SparseConfig(block=64).block_for(ChunkLayout(24576, 4096)) == 64  # c = 20,480
    assert SparseConfig(block=64).block_for(ChunkLayout(100, 4)) == 32  # c = 96
    assert SparseConfig(block=64).block_for(ChunkLayout(100, 1)) == 0  # c = 99: no block fits
    assert SparseConfig(block=64).block_for(None) == 64


# ---- the prefill clock, the plan's choice, and the CLI ---------------------------------------------


def test_prefill_clock_models_the_quadratic_cost():
    """Steps whose cost grows with their position: after a few steps the ETA is the true time left,
    where tokens-left / tokens-per-second-so-far would promise far less."""
    from longdoc.engine.prefill import PrefillClock, step_pairs

    steps = [(a, a + 2048) for a in range(0, 32768, 2048)]
    shape = [(b - a, step_pairs(a, b, None)) for a, b in steps]
    cost = [1e-3 * t + 3e-7 * p for t, p in shape]
    clock = PrefillClock(shape, prior=1.0)  # a bad prior: the fit must take over
    for i, seconds in enumerate(cost[:8]):
        left = clock.record(seconds * (3 if i == 0 else 1))  # the first step pays one-time costs
    assert left == pytest.approx(sum(cost[8:]), rel=1e-6)
    naive = sum(cost[:8]) / 8 * 8  # the rate so far, over the tokens left
    assert naive < 0.5 * left


def test_sparse_pairs_are_capped_by_the_budget():
    from longdoc.engine.prefill import step_pairs

    cfg = SparseConfig(budget=2048, band=1024, block=64)
    assert step_pairs(0, 100, cfg) == step_pairs(0, 100, None) == 5050
    assert step_pairs(60000, 62048, cfg) == 2048 * (1024 + 64 + 2048) + 2048 * 2049 // 2


def test_auto_prefill_turns_sparse_from_the_threshold():
    from longdoc.config import PrefillConfig, RunConfig
    from longdoc.runtime.plan import make_plan

    from .helpers import info

    def plan(tokens, **kw):
        return make_plan(RunConfig(prefill=PrefillConfig(**kw)), info(), tokens)

    d = PrefillConfig()
    threshold, long = d.auto_min_tokens, d.long_min_tokens
    assert threshold < long and d.budget is None
    assert plan(threshold - 1).sparse is None
    # the budget follows the length: the one within the quality gate, then the fast one
    assert plan(threshold).sparse == SparseConfig(budget=d.budget_default)
    assert plan(long - 1).sparse == SparseConfig(budget=d.budget_default)
    assert plan(long).sparse == SparseConfig(budget=d.budget_long) != SparseConfig(budget=d.budget_default)
    assert plan(100, mode="sparse").sparse == SparseConfig(budget=d.budget_default)
    # a budget given is used at any length
    assert plan(100, mode="sparse", budget=512).sparse == SparseConfig(budget=512)
    assert plan(long, budget=512).sparse == SparseConfig(budget=512)
    assert plan(100_000, mode="exact").sparse is None


def test_cli_sparse_prefill_reports_what_it_kept(tmp_path, monkeypatch):
    """A tiny model over a ~6.5K-token prompt: sparse prefill keeps part of the pairs and says so; with a
    budget covering every block it answers exactly as exact prefill does (same machine; in float32: the
    two split the sums differently, which a bfloat16 run's greedy pick can feel on a random model); the
    document cache keeps the two modes apart."""
    import json

    from .helpers import invoke, save_tiny_qwen2

    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "cache"))
    save_tiny_qwen2(tmp_path / "tiny", window=4096)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"line {i} holds the value {i * 7 % 1000}." for i in range(250)))

    def ask(*extra):
        args = (
            "ask",
            str(doc),
            "What does line 5 hold?",
            "--model",
            str(tmp_path / "tiny"),
            "--json",
            "--dtype",
            "float32",
        )
        result = invoke(*args, "--max-new-tokens", "8", *extra)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    exact = ask("--prefill", "exact")
    assert exact["prefill"] == {"mode": "exact", "budget": None, "kept_fraction": 1.0}
    sparse = ask("--prefill", "sparse", "--prefill-budget", "256")
    assert sparse["prefill"]["mode"] == "sparse" and sparse["prefill"]["budget"] == 256
    assert 0.2 < sparse["prefill"]["kept_fraction"] < 0.9
    assert not sparse["cache"]["hit"]
    whole = ask("--prefill", "sparse", "--prefill-budget", "100000")
    assert whole["prefill"]["kept_fraction"] == 1.0 and not whole["cache"]["hit"]
    assert whole["answer"] == exact["answer"]
    assert ask("--prefill", "sparse", "--prefill-budget", "256")["cache"]["hit"]
    bad = invoke("ask", str(doc), "?", "--prefill", "fast")
    assert bad.exit_code == 2 and "--prefill accepts auto, exact, sparse" in bad.stderr


def test_the_prompt_tail_is_prefilled_exactly():
    """The question and the position that predicts the first answer token never see a selection."""
    from longdoc.engine.longmodel import AttentionSettings, LongModel
    from longdoc.engine.prefill import prefill

    from .helpers import tiny_model

    cfg = SparseConfig(budget=8, band=8, block=4, query_block=4, exact_tail=20)
    pm = LongModel(tiny_model(), AttentionSettings(None, attend_cpu, sparse=cfg))
    pm.settings.sparse_stats.record = True
    ids = torch.randint(0, 256, (1, 150))
    kv = pm.new_cache(150)
    prefill(pm, ids, kv, step=16)
    stats = pm.settings.sparse_stats
    assert stats.picks and max(b for _, b, _ in stats.picks) == 130
    # the exact tail counts too: the kept fraction is over every pair of the prefill, in all 3 layers
    assert stats.total == 3 * 150 * 151 // 2 and stats.kept < stats.total
