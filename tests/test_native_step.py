"""The native decode step (``step.c`` through ``native.step.StepLayers``, chosen by
``LongModel.native_step``) against longdoc's torch path for one token (``Decoder.walk_row`` with
``LongModel.step_attend``), which test_decode_glue checks against a float64 forward: tiny random q8 models
(3 layers, GQA), float32 over a float16 cache and bfloat16 over a bfloat16 one, with and without DCA
(decode steps over one, two and three key regions); the keys and values it writes; when it is not
taken; its float16 rounding against torch's."""

from __future__ import annotations

import copy

import pytest
import torch

from longdoc import native
from longdoc.attention.dca import ChunkLayout
from longdoc.attention.kernels import get_kernel
from longdoc.config import GenerationConfig, RecycleConfig
from longdoc.engine.decode import generate
from longdoc.engine.longmodel import AttentionSettings, LongModel, NativeAttend
from longdoc.engine.prefill import prefill
from longdoc.engine.recycled import RecycledPolicy, selection_probs
from longdoc.native import step as native_step
from longdoc.quant import schemes

from .helpers import tiny_model
from .test_quant import quantized_tensors

pytestmark = pytest.mark.skipif(
    not (native.likely_available("q8") and native.likely_available("attn16") and native.likely_available("step")),
    reason="no C compiler here",
)

CPU = torch.device("cpu")
# chunk 24, local 4: c = 20; decode steps from position 50 attend over three DCA regions, and the chunk
# boundary at 60 is crossed (two regions at 60, as the query's chunk starts)
LAYOUTS = [None, ChunkLayout(24, 4)]
# run dtype -> the KV cache's (as the plan makes them on CPU)
CACHES = {torch.float32: torch.float16, torch.bfloat16: torch.bfloat16}


def q8_model(dtype: torch.dtype, layout: ChunkLayout | None, family: str = "qwen2", seed: int = 0) -> LongModel:
    torch.manual_seed(seed)
    model = tiny_model(family, dtype=dtype)
    with torch.no_grad():  # norm weights other than the initial ones (a dropped weight shows)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape) + 0.5)
    schemes.quantize_linears(model, "q8", quantized_tensors(model, "q8"))
    return LongModel(model, AttentionSettings(layout, get_kernel("cpu", CPU), kv_dtype=CACHES[dtype]))


def steps_both_ways(pm: LongModel, ids: torch.Tensor, start: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode steps of ids[start:] after a prefill of ids[:start], natively and by the torch path, each from
    the same cache before the step; the hidden states, and the native run's cache checked against the torch
    run's at every step."""
    kv = pm.new_cache(ids.shape[1] + 4)
    prefill(pm, ids[:, :start], kv, 16)
    native_h, torch_h = [], []
    for p in range(start, ids.shape[1]):
        other = copy.deepcopy(kv)
        with torch.inference_mode():
            assert pm.native_step(kv) is not None
            native_h.append(pm.layer_states(ids[:, p : p + 1], p, kv))
            torch_h.append(pm.layer_states(ids[:, p : p + 1], p, other, pm.step_attend(other, p)))
        # the first layer's K/V bit for bit (the same kernel calls on the same row); later layers' within
        # a rounding of the cache's dtype (a float32 state an ulp apart can round apart)
        for cache, theirs in ((kv.k, other.k), (kv.v, other.v)):
            assert torch.equal(cache[0][:, :, : p + 1], theirs[0][:, :, : p + 1]), p
            for layer in range(1, len(pm.layers)):
                mine, want = cache[layer][:, :, : p + 1].float(), theirs[layer][:, :, : p + 1].float()
                torch.testing.assert_close(mine, want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    return native_h, torch_h


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_native_step_gives_the_numbers_of_the_torch_path(family, layout, dtype):
    """Each decode step's hidden state and K/V from ``step.c`` are those of ``walk_row`` + ``step_attend``
    from the same cache: float32 within its arithmetic order (the norm's sum, the merge of DCA's regions,
    exp), bfloat16 with each value rounded where torch rounds it (a dropped rounding moves whole rows)."""
    pm = q8_model(dtype, layout, family)
    ids = torch.randint(0, 256, (1, 66), generator=torch.Generator().manual_seed(1))
    got, want = steps_both_ways(pm, ids, 50)
    got_all, want_all = torch.cat(got).float(), torch.cat(want).float()
    assert got_all.shape == (16, 1, pm.config.hidden_size)
    scale = want_all.abs().max()
    if dtype == torch.float32:
        torch.testing.assert_close(got_all, want_all, rtol=1e-5, atol=1e-5 * float(scale))
    else:
        # bfloat16: nearly every value the same, the rest within two of its ulps at the state's scale
        same = (got_all == want_all).float().mean()
        assert same > 0.98, float(same)
        assert (got_all - want_all).abs().max() <= 2 * float(scale) * 2**-8


def test_native_step_runs_decode_and_greedy_tokens_follow_the_torch_path(monkeypatch):
    """``generate`` takes the native step for every decode step (one ``step.c`` call each), and greedy
    decoding gives the torch path's tokens."""
    pm = q8_model(torch.float32, ChunkLayout(24, 4))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    gen = GenerationConfig(max_new_tokens=24)

    def decode() -> list[int]:
        kv = pm.new_cache(70)
        return list(generate(pm, prefill(pm, ids, kv, 16), 40, kv, gen, set()))

    calls = []
    original = native_step.StepLayers.__call__

    def counted(self, *args):
        calls.append(args[1])
        return original(self, *args)

    monkeypatch.setattr(native_step.StepLayers, "__call__", counted)
    tokens = decode()
    assert calls == list(range(40, 40 + len(tokens) - 1))  # the first token ends the prefill
    monkeypatch.setattr(LongModel, "native_step", lambda self, kv: None)
    assert decode() == tokens and len(set(tokens)) > 3


def recycled_steps_both_ways(
    pm: LongModel, ids: torch.Tensor, start: int, cfg: RecycleConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor], RecycledPolicy, list[int]]:
    """Recycled decode steps of ids[start:] after a prefill of ids[:start], each natively and by the torch
    path from the same cache and recycled sets: the hidden states, the policy (the native run's), and the
    steps the native step took (as "full", choosing the sets from its own scores, or "held", attending to
    them). After every step both chose the same sets, and those the native step wrote hold the rows the
    torch path copies from the cache."""
    kv = pm.new_cache(ids.shape[1] + 4)
    prefill(pm, ids[:, :start], kv, 16)
    policy = RecycledPolicy(cfg, len(pm.layers))
    native_h, torch_h, taken = [], [], []
    held_call, full_call = native_step.StepLayers.held, native_step.StepLayers.__call__
    for step, p in enumerate(range(start, ids.shape[1])):
        other_kv, other = copy.deepcopy(kv), copy.deepcopy(policy)
        calls = []

        def held(self, *args, calls=calls):
            calls.append("held")
            return held_call(self, *args)

        def full(self, *args, calls=calls):
            calls.append("full" if len(args) > 5 and args[5] is not None else "plain")
            return full_call(self, *args)

        with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(native_step.StepLayers, "held", held)
            patch.setattr(native_step.StepLayers, "__call__", full)
            native_h.append(pm.layer_states(ids[:, p : p + 1], p, kv, policy.attend_for(pm, kv, step, p)))
            patch.setattr(LongModel, "native_step", lambda self, kv: None)
            torch_h.append(pm.layer_states(ids[:, p : p + 1], p, other_kv, other.attend_for(pm, other_kv, step, p)))
        taken.append(calls[0] if calls else "torch")
        for mine, theirs in zip(policy.sets, other.sets, strict=True):
            assert mine is not None and theirs is not None and mine.n == theirs.n
            assert torch.equal(mine.idx[:, :, : mine.n], theirs.idx[:, :, : theirs.n]), step
        layer0, want0 = policy.sets[0], other.sets[0]
        assert layer0 is not None and want0 is not None
        assert torch.equal(layer0.keys[:, :, : layer0.n], want0.keys[:, :, : want0.n])  # bit for bit
        assert torch.equal(layer0.values[:, :, : layer0.n], want0.values[:, :, : want0.n])
        for layer in range(len(pm.layers)):  # the rows written are the cache's
            held = policy.sets[layer]
            assert held is not None
            row, pos = held.n - 1, int(held.idx[0, 0, held.n - 1])
            assert pos == p and torch.equal(held.keys[:, :, row], kv.k[layer][:, :, p])
            assert torch.equal(held.values[:, :, row], kv.v[layer][:, :, p])
    return native_h, torch_h, policy, taken


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("schedule", ["fixed", "dynamic"])
def test_recycled_steps_run_natively_with_the_torch_paths_numbers(layout, dtype, schedule):
    """Recycled decoding in one ``step.c`` call a step. A recycled step of every layer (no refresh due, no
    drift check) runs over the recycled sets: each region's rows per KV head (heads whose sets split
    differently attend one at a time), the step's K/V written to the sets as well as the cache. A full
    step of every layer attends to the cache and hands back each layer's key log-probabilities (the
    kernel's scores) and query, from which the same sets are chosen as from the torch path's float32
    probabilities. The hidden states are the torch path's from the same cache and sets (float32 within
    the arithmetic order, bfloat16 rounded alike); the dynamic schedule's checks stay on the torch path."""
    pm = q8_model(dtype, layout)
    ids = torch.randint(0, 256, (1, 72), generator=torch.Generator().manual_seed(5))
    cfg = RecycleConfig(k=6, stride=5, schedule=schedule, threshold=0.95)
    got, want, policy, taken = recycled_steps_both_ways(pm, ids, 44, cfg)
    if schedule == "fixed":
        assert taken == ["full" if step % 5 == 0 else "held" for step in range(len(got))]
    else:
        want_paths = ["full"] + ["torch" if step % 5 == 0 else "held" for step in range(1, len(got))]
        assert taken == want_paths
        assert policy.layer_refreshes > 0  # the checks refreshed some layers (on the torch path)
    if layout is not None:  # the sets' heads split differently somewhere: per-head calls were made
        assert any(len(set(held.splits)) > 1 for held in policy.sets if held is not None)
    got_all, want_all = torch.cat(got).float(), torch.cat(want).float()
    scale = float(want_all.abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(got_all, want_all, rtol=1e-5, atol=1e-5 * scale)
    else:
        same = (got_all == want_all).float().mean()
        assert same > 0.98, float(same)
        assert (got_all - want_all).abs().max() <= 2 * scale * 2**-8


class Capture(NativeAttend):
    """A full decode step through the native step, keeping what it hands back: each layer's key
    log-probabilities and query."""

    def __call__(self, layer, q, start):
        raise AssertionError("the native step was not taken")

    def run_native(self, step, inputs):
        layers = len(step.layers)
        self.select = torch.empty(layers, step.kv_heads, inputs.pos + 1)
        self.queries = torch.empty(layers, step.heads * step.head_dim)
        step(inputs.h, inputs.pos, inputs.key_rot, inputs.cache_rotations(), inputs.bounds, self.select, self.queries)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_full_step_hands_back_its_attention_log_probabilities_and_queries(layout, dtype):
    """A native full step asked for them hands back, per layer, the log of its attention's probabilities
    of keys 0..pos (the max over each KV head's query heads: ``selection_probs``' group max, from the
    kernel's own scores) and the query before its rotation (the torch path's); asking changes nothing
    it computes."""
    pm = q8_model(dtype, layout)
    ids = torch.randint(0, 256, (1, 62), generator=torch.Generator().manual_seed(7))
    kv = pm.new_cache(64)
    prefill(pm, ids[:, :61], kv, 16)
    plain_kv, torch_kv, p = copy.deepcopy(kv), copy.deepcopy(kv), 61
    capture, seen = Capture(), []
    full = pm.step_attend(torch_kv, p)

    def recording(layer, q, start):
        seen.append(q.flatten().float())
        return full(layer, q, start)

    with torch.inference_mode():
        got = pm.layer_states(ids[:, p : p + 1], p, kv, capture)
        assert torch.equal(got, pm.layer_states(ids[:, p : p + 1], p, plain_kv))
        pm.layer_states(ids[:, p : p + 1], p, torch_kv, recording)
        assert torch.equal(capture.queries[0], seen[0])  # the first layer's input is the same row
        for layer in range(len(pm.layers)):
            torch.testing.assert_close(capture.queries[layer], seen[layer], rtol=2**-7, atol=1e-5)
            q = capture.queries[layer].to(dtype).view(1, -1, 1, pm.head_dim)
            want = selection_probs(pm, q, kv, layer, p).amax(dim=2)[0]
            torch.testing.assert_close(capture.select[layer].exp(), want, rtol=1e-4, atol=1e-6)
    assert capture.select.shape == (len(pm.layers), pm.n_kv_heads, p + 1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
def test_recycled_steps_holding_every_key_give_the_full_steps_bits(layout):
    """With K above the context every set holds every key in position order, and a recycled step makes the
    kernel calls a full step makes (the same rows per region, copied): natively the same hidden state bit
    for bit, whatever the CPU's arithmetic (DESIGN.md: recycled decoding with K covering the context gives
    full attention's tokens)."""
    pm = q8_model(torch.float32, layout)
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(8))
    full_kv = pm.new_cache(72)
    prefill(pm, ids[:, :44], full_kv, 16)
    recycled_kv = copy.deepcopy(full_kv)
    policy = RecycledPolicy(RecycleConfig(k=1000, stride=4), len(pm.layers))
    with torch.inference_mode():
        for step, p in enumerate(range(44, 70)):
            attend = policy.attend_for(pm, recycled_kv, step, p)
            assert isinstance(attend, NativeAttend)
            recycled = pm.layer_states(ids[:, p : p + 1], p, recycled_kv, attend)
            assert torch.equal(recycled, pm.layer_states(ids[:, p : p + 1], p, full_kv)), step
    assert policy.recycled_steps == 19 and policy.effective_k == 68  # the last full step, at 68


def test_recycled_steps_native_through_generate():
    """``generate`` with a recycled policy takes the native step on its recycled steps and gives the torch
    path's greedy tokens; a set that fills (the dynamic schedule's room for 64 new rows) grows, and the
    native step writes to the grown buffers."""
    pm = q8_model(torch.float32, ChunkLayout(24, 4))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    gen = GenerationConfig(max_new_tokens=80)

    def decode() -> tuple[list[int], RecycledPolicy]:
        kv = pm.new_cache(130)
        # one full step, then recycled steps only: no check before step 300, none drifts below -1
        policy = RecycledPolicy(RecycleConfig(k=8, stride=300, schedule="dynamic", threshold=-1), len(pm.layers))
        return list(generate(pm, prefill(pm, ids, kv, 16), 40, kv, gen, set(), policy)), policy

    calls = []
    original = native_step.StepLayers.held

    def counted(self, *args):
        calls.append(args[1])
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native_step.StepLayers, "held", counted)
        tokens, policy = decode()
    assert len(tokens) == 80 and policy.full_steps == 1
    assert policy.recycled_steps == len(calls) == 78  # the first token ends the prefill, the next is full
    assert calls == list(range(41, 41 + 78))
    held = policy.sets[2]
    assert held is not None and held.n == 8 + 79 and held.keys.shape[2] == 2 * (8 + 64)  # grown once
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LongModel, "native_step", lambda self, kv: None)
        assert decode()[0] == tokens and len(set(tokens)) > 3


def test_native_step_follows_a_grown_cache():
    """A cache that grows (new tensors) gets a new native step over them: the next step's K/V land in the
    grown cache, and its hidden state is the torch path's."""
    pm = q8_model(torch.bfloat16, None)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    kv = pm.new_cache(30)
    prefill(pm, ids[:, :29], kv, 16)
    first = pm.native_step(kv)
    kv.grow(64)
    second = pm.native_step(kv)
    assert first is not None and second is not None and second is not first
    other = copy.deepcopy(kv)
    with torch.inference_mode():
        got = pm.layer_states(ids[:, 29:30], 29, kv)
        want = pm.layer_states(ids[:, 29:30], 29, other, pm.step_attend(other, 29))
    assert torch.equal(got, want)
    assert torch.equal(kv.k[2][:, :, :30], other.k[2][:, :, :30])
    assert pm.native_step(kv) is second  # made once per cache


def test_native_step_is_not_taken_where_its_conditions_fail():
    """Not taken: a float32 cache (attn16 reads 16-bit ones), a model whose linears are not q8, the DCA
    attention kernel not attn16's (torch's); and a full cache is refused as the torch path refuses it."""
    pm = q8_model(torch.float32, None)
    assert pm.native_step(pm.new_cache(8)) is not None
    plain = LongModel(pm.model, AttentionSettings(None, get_kernel("cpu", CPU), kv_dtype=torch.float32))
    assert plain.native_step(plain.new_cache(8)) is None
    torch.manual_seed(0)
    int8 = tiny_model("qwen2", dtype=torch.float32)
    schemes.quantize_linears(int8, "int8", quantized_tensors(int8, "int8"))
    dense = LongModel(int8, AttentionSettings(None, get_kernel("cpu", CPU), kv_dtype=torch.float16))
    assert dense.native_step(dense.new_cache(8)) is None
    other_kernel = LongModel(pm.model, AttentionSettings(None, get_kernel("cpu-torch", CPU), kv_dtype=torch.float16))
    assert other_kernel.native_step(other_kernel.new_cache(8)) is None
    kv = pm.new_cache(4)
    prefill(pm, torch.tensor([[1, 2, 3, 4]]), kv, 16)
    with pytest.raises(RuntimeError, match="KV store full"):
        pm.forward(torch.tensor([[5]]), 4, kv)


def test_step_layers_refuses_inputs_it_cannot_take():
    """Shapes or dtypes other than its own are refused before the C call."""
    pm = q8_model(torch.float32, None)
    kv = pm.new_cache(8)
    step = pm.native_step(kv)
    assert step is not None
    d = pm.head_dim
    h = torch.zeros(pm.config.hidden_size)
    rot, q_rot, bounds = torch.zeros(2, d), torch.zeros(1, 2, d), torch.tensor([[0, 1]])
    step(h.clone(), 0, rot, q_rot, bounds)
    for bad in (
        (h[:-1], 0, rot, q_rot, bounds),
        (h.double(), 0, rot, q_rot, bounds),
        (h, 0, rot[:, :-1], q_rot, bounds),
        (h, 0, rot, torch.zeros(2, 2, d), bounds),
        (h, 0, rot, q_rot, bounds.int()),
    ):
        with pytest.raises(ValueError):
            step(*bad)
    with pytest.raises(RuntimeError, match="refused"):  # a region past the position
        step(h, 0, rot, q_rot, torch.tensor([[0, 2]]))
    with pytest.raises(ValueError):  # selection scores of another shape
        step(h, 0, rot, q_rot, bounds, torch.empty(len(pm.layers), pm.n_kv_heads, 2))
    # a recycled step's keys: buffers laid out as the cache, ranges within the rows held
    buffers = torch.zeros(1, pm.n_kv_heads, 4, d, dtype=torch.float16)
    ranges = torch.tensor([[[0, 1]] * pm.n_kv_heads])

    def held(keys=buffers, row=0, span=ranges):
        return [native_step.HeldKeys(keys, keys.clone(), row, span) for _ in pm.layers]

    step.held(h.clone(), 0, rot, q_rot, held())
    for bad_sets in (held(keys=buffers.float()), held(keys=buffers[..., :-1]), held(row=4), held(span=ranges.int())):
        with pytest.raises(ValueError):
            step.held(h.clone(), 0, rot, q_rot, bad_sets)
    with pytest.raises(ValueError):  # one set short
        step.held(h.clone(), 0, rot, q_rot, held()[1:])
    for span in ([[[0, 2]] * pm.n_kv_heads], [[[1, 0]] * pm.n_kv_heads], [[[-1, 1]] * pm.n_kv_heads]):
        with pytest.raises(RuntimeError, match="refused"):  # past the step's row, reversed, negative
            step.held(h.clone(), 0, rot, q_rot, held(span=torch.tensor(span)))


def test_float16_cache_rounding_is_torchs():
    """``step.c``'s float -> float16 (the float32 run's cache write) is torch's: ties to even, subnormals,
    the largest finite value, overflow to infinity, signed zeros, infinities, NaN."""
    import ctypes

    lib = native.library("step")
    assert lib is not None
    ulp = 2.0**-24
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), float("-inf")]
    special += [ulp, ulp / 2, ulp * 0.75, ulp * 1.5, ulp * 2.5, 2.0**-14, 2.0**-14 - ulp, 1 + 2**-11, 1 + 3 * 2**-11]
    x = torch.cat(
        [
            torch.tensor(special, dtype=torch.float32),
            torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-9, 5, 4096),
        ]
    )
    out = torch.empty(x.shape, dtype=torch.int16)
    lib.longdoc_step_halves(ctypes.c_void_p(x.data_ptr()), x.numel(), ctypes.c_void_p(out.data_ptr()))
    assert torch.equal(out, x.to(torch.float16).view(torch.int16))
    nan = torch.tensor([float("nan")])
    lib.longdoc_step_halves(ctypes.c_void_p(nan.data_ptr()), 1, ctypes.c_void_p(out.data_ptr()))
    assert out[:1].view(torch.float16).isnan().all()


def test_step_c_under_qemu_aarch64_gives_the_x86_builds_numbers(tmp_path):
    """tests/data/step_driver.c with step.c and the q8 and attn16 kernels, built natively (x86 in CI) and for aarch64
    (armv8-a, run under qemu-aarch64): a random two-layer model's hidden state after 6 decode steps, in
    float32 over a float16 cache and bfloat16 over a bfloat16 one, over one region and two, and as recycled
    steps whose KV heads hold different keys, is the same on both (float32 within its arithmetic order and
    libm's exp; bfloat16 within one of its ulps), and so are a full step's key log-probabilities. The
    aarch64 build is emulated: this is correctness, not speed."""
    import subprocess

    from .helpers import REPO, program

    cross = program("aarch64-linux-gnu-gcc", needed_in_ci=True)
    qemu = program("qemu-aarch64", needed_in_ci=True)
    kernels = REPO / "longdoc" / "native"
    sources = [str(REPO / "tests" / "data" / "step_driver.c")] + [
        str(kernels / f) for f in ("q8.c", "attn16.c", "step.c")
    ]
    outputs = {}
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    here = [*cc, *([] if native._openmp(tuple(cc)) else ["-fopenmp"])]
    for name, command in (("native", here), ("aarch64", [cross, "-static", "-march=armv8-a"])):
        binary = tmp_path / name
        build = subprocess.run(
            [*command, "-O3", "-std=c11", *sources, "-o", str(binary), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert build.returncode == 0, build.stderr
        run = [qemu, "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", str(binary)] if name == "aarch64" else [str(binary)]
        proc = subprocess.run(run, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        outputs[name] = torch.tensor([float(v) for tag, _, _, v in rows if tag == "h"]).view(6, -1)
        outputs[name + " select"] = torch.tensor([float(v) for tag, _, _, v in rows if tag == "s"]).view(2, -1)
    x86, arm = outputs["native"], outputs["aarch64"]
    assert x86.shape == (6, 64) and x86.isfinite().all() and x86.abs().max() > 1
    for run in range(6):
        scale = float(x86[run].abs().max())
        tolerance = scale * (2**-7 if run % 2 else 1e-5)  # odd runs are bfloat16
        torch.testing.assert_close(arm[run], x86[run], rtol=0, atol=tolerance)
    assert not torch.equal(x86[0], x86[2])  # two regions attend otherwise than one
    assert not torch.equal(x86[2], x86[4])  # the recycled steps' second head leaves key 0 out
    x86_select, arm_select = outputs["native select"], outputs["aarch64 select"]
    assert x86_select.shape == (2, 2 * 2 * 12) and (x86_select <= 1e-6).all() and x86_select.isfinite().all()
    torch.testing.assert_close(arm_select[0], x86_select[0], rtol=0, atol=1e-4)  # float32
    torch.testing.assert_close(arm_select[1], x86_select[1], rtol=0, atol=0.05)  # bfloat16: its states an ulp apart
