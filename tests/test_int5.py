"""The int5 kernel (longdoc/native/int5.c through longdoc.native.int5) and --quantize int5."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from longdoc import native
from longdoc.attention.kernels import get_kernel
from longdoc.config import GenerationConfig
from longdoc.engine.decode import generate
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import prefill
from longdoc.native import int5
from longdoc.quant import schemes

from .helpers import tiny_model

# judged without building (collection must not write a cache): the tests themselves build the kernel;
# CPU flags that cannot be read (an unknown OS) skip
needs_int5 = pytest.mark.skipif(
    not native.likely_available("int5"), reason="no C compiler, CPU flags or AVX-512 VNNI here"
)


def emulated(
    x: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the kernel computes, in float64: each group of 32 input channels quantized to int16 with the
    step max|x| / 32767 (round half to even, as lrintf), times the group's 5-bit values and step; plus
    each group's minimum times the group's exact sum of inputs."""
    values = schemes.unpack_int5(bits).double()
    n, k = values.shape
    step, lo = scales[..., 0].double(), scales[..., 1].double()  # (n, k/32)
    rows = x.reshape(-1, k).float()
    groups = rows.view(-1, k // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    # the kernel's float32 reciprocal, correctly rounded (torch's float32 division of a scalar is not)
    inv = torch.where(amax > 0, (32767 / amax.double()).float(), torch.zeros_like(amax))
    codes = torch.round(groups * inv).clamp(-32767, 32767).double()
    dots = torch.einsum("mgj,ngj->mng", codes, values.view(n, k // 32, 32))
    out = (dots * step[None] * (amax.double() / 32767).float().double().transpose(1, 2)).sum(-1)
    out += groups.double().sum(-1) @ lo.T
    if bias is not None:
        out += bias.double()
    return out.view(*x.shape[:-1], n)


def test_int5_packing_round_trips_and_grid_weights_come_back_exactly():
    """Values survive pack/unpack; weights that lie on a 5-bit grid of 32 levels per group (as the
    GGUF's Q5_0 blocks dequantized) come back exactly."""
    torch.manual_seed(0)
    q = torch.randint(0, 32, (6, 256), dtype=torch.uint8)
    q[:, ::32], q[:, 1::32] = 0, 31  # every group spans its 32 levels
    assert torch.equal(schemes.unpack_int5(schemes.pack_int5_bits(q)), q.to(torch.int32))
    step = (torch.rand(6, 8, 1) * 1e-2 + 1e-3).half().float()
    lo = (-16 * step).half().float()
    w = (q.view(6, 8, 32).float() * step + lo).view(6, 256)
    bits, scales = schemes.quantize_int5(w)
    assert bits.shape == (6, 256 * 80 // 128) and scales.shape == (6, 8, 2)
    assert torch.equal(schemes.dequantize("int5", bits, scales), w.double())
    # off the grid: within half a step of each weight
    w2 = torch.randn(6, 256)
    err = (schemes.dequantize("int5", *schemes.quantize_int5(w2)) - w2.double()).abs()
    steps = (w2.view(6, 8, 32).amax(-1) - w2.view(6, 8, 32).amin(-1)) / 31
    assert err.max() > 0 and (err.view(6, 8, 32) <= steps[..., None] * 0.51 + 1e-3).all()


@needs_int5
@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("k", [128, 384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int5_kernel_matches_its_float64_emulation(n, k, dtype, bias):
    """Rows of every quad position (n not a multiple of 4 pads), several super-blocks, one and three
    input rows, bfloat16 and float32, against the float64 emulation; inputs have a large channel."""
    torch.manual_seed(n * k)
    w = torch.randn(n, k) * 0.05
    bits, scales = schemes.quantize_int5(w)
    b = torch.randn(n) if bias else None
    mm = int5.Int5Matmul(int5.layout(bits, scales), k, n, b)
    for m in (1, 3):
        x = torch.randn(m, k)
        x[:, 3] *= 30
        x = x.to(dtype)
        out = mm(x, dtype)
        assert out.shape == (m, n) and out.dtype == dtype
        want = emulated(x, bits, scales, b)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        else:  # rounded to the nearest bfloat16: off only where float32 and float64 straddle a midpoint
            assert (out != want.to(dtype)).float().mean() < 0.02
    # against the unquantized inputs the error is 16-bit activations': at most 9e-5 of the products'
    # magnitude (|x| @ |W|.T) here; 8-bit ones, as llama.cpp's, would be at least 2.2e-3
    x = torch.randn(1, k)
    x[0, 3] = 100.0
    weight = schemes.dequantize("int5", bits, scales)
    exact = x.double() @ weight.T + (b.double() if bias else 0)
    magnitude = (x.double().abs() @ weight.abs().T).max()
    assert (mm(x, torch.float32).double() - exact).abs().max() < 5e-4 * magnitude


@needs_int5
@pytest.mark.parametrize("layout", [None, "dca"])
def test_int5_linears_share_matmuls_and_every_call_matches_its_emulation(layout):
    """A tiny model (widths 128/256) with every linear int5, prefilled and greedily decoded (plain and
    DCA): q/k/v and gate/up share one kernel call each, and every linear's output, on the input it was
    given, is its float64 emulation's. (Whole-model tokens are not compared with an emulated model:
    a 1e-7 difference upstream flips an activation's int8 rounding downstream, by design of the
    quantization, and the two decodes drift apart.)"""
    from longdoc.attention.dca import ChunkLayout

    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32, hidden=128, mlp=256)
    names = schemes.quantized_names(model)
    tensors = {}
    for name in names:
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = schemes.quantize(
            "int5", model.get_submodule(name).weight
        )
    assert schemes.quantize_linears(model, "int5", tensors) == len(names)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.gemm is attn.k_proj.gemm is attn.v_proj.gemm and mlp.gate_proj.gemm is mlp.up_proj.gemm
    assert attn.q_proj.gemm.kind == "int5" and attn.o_proj.gemm is not attn.q_proj.gemm
    assert mlp.down_proj.gemm.kind == model.lm_head.gemm.kind == "int5"

    errors: list[float] = []
    rows: list[int] = []

    def check(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            want = emulated(inputs[0], tensors[f"{name}.qweight"], tensors[f"{name}.scales"], module.dense.bias)
            errors.append(float((out.double() - want).abs().max() / want.abs().max()))
            rows.append(inputs[0].numel() // inputs[0].shape[-1])

        return hook

    for name in names:
        model.get_submodule(name).register_forward_hook(check(name))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    pm = LongModel(
        model, AttentionSettings(ChunkLayout(24, 4) if layout else None, get_kernel("cpu", torch.device("cpu")))
    )
    kv = pm.new_cache(80)
    with schemes.every_row(model):
        logits = prefill(pm, ids, kv, 16)
        tokens = list(generate(pm, logits, 40, kv, GenerationConfig(max_new_tokens=24), set()))
    assert len(tokens) == 24 and len(set(tokens)) > 3
    assert max(errors) < 1e-5
    assert rows.count(1) >= 23 * len(names) and max(rows) == 16  # decode steps and prefill steps


@pytest.mark.parametrize("name", sorted(native.SOURCES))
def test_native_library_builds_once_verifies_and_rebuilds_a_damaged_file(tmp_path, monkeypatch, name):
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        lib = native.library(name)
        if lib is None:
            pytest.skip(f"no {name} kernel here: {native.why_unavailable(name)}")
        built = list((tmp_path / "native").glob(f"{name}-*.so"))
        assert len(built) == 1 and built[0].with_suffix(".sha256").read_text() == native._sha256(built[0])
        assert not [p for p in (tmp_path / "native").iterdir() if p.name.endswith(".tmp")]
        mtime = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library(name) is not None and built[0].stat().st_mtime_ns == mtime  # verified, not rebuilt
        # damaged as a crash or a disk would leave it: a new file (this process keeps its mapping of the old)
        garbage = built[0].with_name("garbage")
        garbage.write_bytes(b"not a library")
        os.replace(garbage, built[0])
        native.library.cache_clear()
        assert native.library(name) is not None  # the checksum fails: rebuilt
        assert built[0].with_suffix(".sha256").read_text() == native._sha256(built[0])
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"LONGDOC_NATIVE": "0"}, "LONGDOC_NATIVE=0"),
        ({"CC": "/nonexistent/cc"}, "could not build the int5 kernel"),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "ATEN_CPU_CAPABILITY=avx2 caps the CPU below AVX-512"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2 caps the CPU below AVX-512"),
    ],
)
def test_int5_is_unavailable_without_its_kernel_and_auto_falls_back(tmp_path, monkeypatch, env, reason):
    from longdoc.quant import choose

    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path))
    for key in ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):  # a cap around the run: this one only
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    native.library.cache_clear()
    try:
        assert native.library("int5") is None and reason in (native.why_unavailable("int5") or "")
        cpu, config = torch.device("cpu"), {"hidden_size": 896, "num_attention_heads": 14, "intermediate_size": 4864}
        why = choose.quant_unavailable("int5", cpu, torch.bfloat16, config)
        assert why is not None and reason in why
        # q8 where its kernel has a SIMD loop under the same settings (AVX2 is below the caps), else int8
        fallback = "int8" if schemes.int8_gemm_available() else "none"
        assert choose.default_quantize(cpu, torch.bfloat16, config) == ("q8" if choose.q8_simd() else fallback)
    finally:
        native.library.cache_clear()


@needs_int5
def test_auto_leaves_int5_to_whoever_asks_and_int5_refuses_widths_it_cannot_take():
    """Where int5 runs, ``auto`` still picks q8 (one copy of the weights, decoding as fast: RESULTS.md's
    AVX-512 headline); int5 itself runs only on widths that are multiples of 128."""
    from longdoc.quant import choose

    cpu = torch.device("cpu")
    fits = {"hidden_size": 896, "num_attention_heads": 14, "intermediate_size": 4864}
    assert choose.quant_unavailable("int5", cpu, torch.bfloat16, fits) is None
    for dtype in (torch.bfloat16, torch.float32):
        assert choose.default_quantize(cpu, dtype, fits) == "q8"
    odd = {**fits, "intermediate_size": 4800}
    assert "multiples of 128" in (choose.quant_unavailable("int5", cpu, torch.bfloat16, odd) or "")
    assert choose.default_quantize(cpu, torch.bfloat16, odd) != "int5"


@needs_int5
def test_ask_with_int5_end_to_end(tmp_path):
    """The CLI on tiny local models: int5 weights are made once into the verified cache and reused; a
    model whose widths int5 can't take runs unquantized, with a one-line warning."""
    import json

    from typer.testing import CliRunner

    from longdoc import store
    from longdoc.cli import app
    from longdoc.quant import cache as mq

    from .helpers import REPO, save_tiny_qwen2

    save_tiny_qwen2(tmp_path / "wide", window=4096, hidden=128, mlp=256)
    save_tiny_qwen2(tmp_path / "narrow", window=4096)
    doc = str(REPO / "sample_docs" / "notes.md")
    opts = ["--json", "--max-new-tokens", "4", "--dtype", "bfloat16", "--quantize", "int5", "--no-cache"]
    first = CliRunner().invoke(app, ["ask", doc, "Which port?", "--model", str(tmp_path / "wide"), *opts])
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["quantize"] == "int5" and "quantizing wide to int5" in first.stderr
    made = mq.quantized_path(tmp_path / "wide", "int5")
    assert mq.check_quantized(made, tmp_path / "wide", "int5") is None
    assert store.read_manifest(made)["source"]["quantize"] == "int5"
    again = CliRunner().invoke(app, ["ask", doc, "Which port?", "--model", str(tmp_path / "wide"), *opts])
    assert again.exit_code == 0 and "quantizing" not in again.stderr
    assert json.loads(again.stdout)["answer"] == json.loads(first.stdout)["answer"]
    narrow = CliRunner().invoke(app, ["ask", doc, "Which port?", "--model", str(tmp_path / "narrow"), *opts])
    assert narrow.exit_code == 0, narrow.stderr
    assert json.loads(narrow.stdout)["quantize"] == "none"
    assert "--quantize int5: int5 needs the model's layer widths (32, 32, 64) to be multiples of 128" in narrow.stderr
