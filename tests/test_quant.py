"""Weight-only quantized linears (longdoc.quant.schemes) and their cache (longdoc.quant.cache)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from longdoc import native, store
from longdoc.attention.kernels import get_kernel
from longdoc.config import GenerationConfig
from longdoc.engine.decode import decode_one_token, generate
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import prefill
from longdoc.models.weights import FileEmbedding
from longdoc.native import q8
from longdoc.quant import cache as mq
from longdoc.quant import schemes
from longdoc.quant.packing import pack_linears

from .helpers import REPO, tiny_model

SCHEMES = ["int8", "int4"]


def quantized_tensors(model: nn.Module, scheme: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in schemes.quantized_names(model):
        q, s = schemes.quantize(scheme, model.get_submodule(name).weight)
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q, s
    return tensors


needs_int8_gemm = pytest.mark.skipif(not schemes.int8_gemm_available(), reason="no x86 int8 GEMM with VNNI here")


@pytest.fixture
def weight_only_int8(monkeypatch):
    """int8 as on CPUs without the int8 GEMM: the weight-only kernel."""
    monkeypatch.setattr(schemes, "int8_gemm_available", lambda: False)


# each quantized kernel: int8 through the int8 GEMM (where it runs), int8 and int4 weight-only
KERNEL_PATHS = [pytest.param("int8", "gemm", marks=needs_int8_gemm), ("int8", "weight-only"), ("int4", "weight-only")]


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block: int, bias=None) -> torch.Tensor:
    """What the int8 GEMM path computes, in float64: each row's blocks divided by their largest
    magnitude and spread over the rows of a block-diagonal matrix; that matrix quantized to 8 bits
    with one step and zero point; its product with the int8 weight; the rows' products, times their
    block maxima, summed."""
    k = x.shape[-1]
    weight = schemes.dequantize("int8", q, s)
    out = []
    for row in x.reshape(-1, k).double():
        blocks = row.view(-1, block)
        amax = blocks.abs().amax(-1, keepdim=True)
        spread = torch.block_diag(*(blocks / amax))
        # fbgemm's choice: a float32 step over [min(x, 0), max(x, 0)], inputs times its float32 inverse
        lo, hi = min(float(spread.min()), 0.0), max(float(spread.max()), 0.0)
        step = torch.tensor((hi - lo) / 255, dtype=torch.float32)
        zero = round(-lo / float(step))
        codes = torch.clamp(torch.round(spread.float() * (1 / step) + zero), 0, 255)
        levels = (codes.double() - zero) * float(step)
        out.append(amax.T @ (levels @ weight.T))
    result = torch.cat(out).view(*x.shape[:-1], -1)
    return result if bias is None else result + bias.double()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_matches_a_float64_reference(scheme, bias, weight_only_int8):
    """Weight-only kernels: x @ (q * scale).T (+ bias) in float64, against the CPU kernel in float32."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=bias)
    q, s = schemes.quantize(scheme, dense.weight)
    layer = schemes.QuantLinear(dense, scheme, q, s, dtype=torch.float32)
    x = torch.randn(2, 1, 64)
    ref = x.double() @ schemes.dequantize(scheme, q, s).T
    if bias:
        ref += dense.bias.double()
    out = layer(x)  # 2 rows: the quantized kernel
    assert out.shape == (2, 1, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the quantized weight is close to the original one, and each scheme's error is what it should be
    err = (schemes.dequantize(scheme, q, s) - dense.weight.double()).abs().max()
    assert 0 < err < (0.01 if scheme == "int8" else 0.05)


@needs_int8_gemm
@pytest.mark.parametrize("block", [16, 0])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_matches_a_float64_reference(block, bias):
    """The int8 GEMM path (activations quantized per block of channels, or per row) against its float64
    emulation, on inputs with a few large channels (as normalized hidden states have)."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        dense.weight[:, :16] = 0  # the large channels' own products vanish: what is left is their step
    q, s = schemes.quantize("int8", dense.weight)
    layer = schemes.QuantLinear(dense, "int8", q, s, dtype=torch.float32, act_block=block)
    assert layer.gemm.kind == "gemm"
    x = torch.randn(3, 1, 64)
    x[..., 5] *= 40.0
    x[1, 0, 10] = -60.0
    ref = w8a8_reference(x, q, s, block or 64, dense.bias if bias else None)
    out = layer(x)  # 3 rows: quantized, one row at a time
    assert out.shape == (3, 1, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # quantizing the activations is visible, and blocks keep the large channels' step off the others
    exact = x.double() @ schemes.dequantize("int8", q, s).T + (dense.bias.double() if bias else 0)
    blocked_err = (ref - exact).abs().max()
    per_row_err = (w8a8_reference(x, q, s, 64, dense.bias if bias else None) - exact).abs().max()
    assert blocked_err > 0
    if block:
        assert blocked_err < per_row_err / 5


@pytest.mark.parametrize("scheme, path", KERNEL_PATHS)
def test_linears_that_share_an_input_share_one_matmul(scheme, path, request):
    """q/k/v (and gate/up) are one quantized matmul: the first call computes all of them, the others
    take theirs for the same input tensor; another input, or the first again after it, is computed
    afresh. Each gets what its own weight gives (float64 reference)."""
    if path == "weight-only":
        request.getfixturevalue("weight_only_int8")
    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    tensors = quantized_tensors(model, scheme)
    schemes.quantize_linears(model, scheme, tensors, act_block=16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.gemm is attn.k_proj.gemm is attn.v_proj.gemm is not attn.o_proj.gemm
    assert mlp.gate_proj.gemm is mlp.up_proj.gemm is not mlp.down_proj.gemm
    assert attn.q_proj.gemm.kind == ("gemm" if path == "gemm" else scheme)
    prefix = "model.layers.0.self_attn"
    x1, x2 = torch.randn(1, 1, 64), torch.randn(1, 1, 64) * 3
    for x in (x1, x2, x1):
        for name in ("q_proj", "k_proj", "v_proj"):
            layer = getattr(attn, name)
            q, s = tensors[f"{prefix}.{name}.qweight"], tensors[f"{prefix}.{name}.scales"]
            if path == "gemm":
                want = w8a8_reference(x, q, s, 16, layer.dense.bias)
            else:
                want = x.double() @ schemes.dequantize(scheme, q, s).T + layer.dense.bias.double()
            torch.testing.assert_close(layer(x).double(), want, rtol=1e-4, atol=1e-4)


def test_int8_gemm_probe_refuses_a_saturating_kernel(monkeypatch):
    """Without VNNI the x86 kernel adds pairs of uint8 x int8 products in 16 bits and saturates on
    large inputs: the probe must then say no (int8 falls back to the weight-only kernel)."""
    real = torch.ops.quantized.linear_dynamic

    def saturating(x, packed, reduce_range):
        return real(x, packed, reduce_range).clamp(max=32767.0 * x.shape[-1] / 2 / 255)

    schemes.int8_gemm_available.cache_clear()
    try:
        monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", saturating)
        assert not schemes.int8_gemm_available()
        dense = nn.Linear(64, 8)
        layer = schemes.QuantLinear(dense, "int8", *schemes.quantize("int8", dense.weight), dtype=torch.float32)
        assert layer.gemm.kind == "int8" and layer.gemm.qweight.numel() == 64 * 8
    finally:
        schemes.int8_gemm_available.cache_clear()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_inputs_run_the_unquantized_layer(scheme):
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    layer = schemes.QuantLinear(dense, scheme, *schemes.quantize(scheme, dense.weight), dtype=torch.float32, max_rows=4)
    big = torch.randn(5, 64)
    assert torch.equal(layer(big), dense(big))
    small = torch.randn(4, 64)
    assert not torch.equal(layer(small), dense(small))
    with schemes.every_row(nn.Sequential(layer)):
        assert not torch.equal(layer(big), dense(big))
    assert layer.max_rows == 4


def test_int4_packing_round_trips():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q, s = schemes.quantize_int4(w, 32)
    values = schemes.unpack_int4(q)
    assert values.shape == (8, 64) and int(values.min()) >= 0 and int(values.max()) <= 15
    groups = w.view(8, 2, 32)
    # each group's extremes are representable: the minimum exactly (q=0), the maximum to bf16 rounding
    lowest = schemes.dequantize("int4", q, s).view(8, 2, 32).amin(-1)
    torch.testing.assert_close(lowest, groups.amin(-1).double(), rtol=1e-2, atol=1e-2)


class W8A8Reference(nn.Module):
    """A linear computed as ``w8a8_reference`` says (float64, cast back)."""

    def __init__(self, linear: nn.Linear, q: torch.Tensor, s: torch.Tensor, block: int):
        super().__init__()
        self.q, self.s, self.block, self.bias = q, s, block, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_reference(x, self.q, self.s, self.block, self.bias).to(x.dtype)


@pytest.mark.parametrize("scheme, path", KERNEL_PATHS)
@pytest.mark.parametrize("layout", [None, "dca"])
def test_quantized_greedy_decode_equals_the_dequantized_reference(scheme, path, layout, request):
    """A tiny model whose linears all run quantized decodes the tokens of the same model with the
    quantized computation done in float64 in its layers: the dequantized weights in plain Linear
    layers for the weight-only kernels; for the int8 GEMM, its activation quantization too (per block
    of 16 channels on the normalized inputs, per row on o_proj and down_proj). Along the reference's
    tokens every step's logits agree to the kernel's rounding, and so do the greedy choices, but where
    the reference's two best logits are closer than that (a near tie: which one wins is the CPU's
    rounding, not the code's)."""
    from longdoc.attention.dca import ChunkLayout

    if path == "weight-only":
        request.getfixturevalue("weight_only_int8")
    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    tensors = quantized_tensors(model, scheme)
    reference = copy.deepcopy(model)
    for name in schemes.quantized_names(reference):
        linear = reference.get_submodule(name)
        q, s = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        if path == "gemm":
            parent, _, child = name.rpartition(".")
            block = 16 if child in schemes.BLOCKED_INPUTS else linear.in_features
            setattr(reference.get_submodule(parent) if parent else reference, child, W8A8Reference(linear, q, s, block))
        else:
            linear.weight.data = schemes.dequantize(scheme, q, s).float()
    assert schemes.quantize_linears(model, scheme, tensors, act_block=16) == len(schemes.quantized_names(model))
    assert all(
        (m.gemm.kind == "gemm") == (path == "gemm") for m in model.modules() if isinstance(m, schemes.QuantLinear)
    )
    dca = ChunkLayout(24, 4) if layout else None
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    gen = GenerationConfig(max_new_tokens=24)

    def long_model(m: nn.Module) -> LongModel:
        return LongModel(m, AttentionSettings(dca, get_kernel("cpu", torch.device("cpu"))))

    def steps(m: nn.Module, tokens: list[int]) -> torch.Tensor:
        """The logits (len(tokens), V) before each of ``tokens``, decoded after the prompt."""
        pm = long_model(m)
        kv = pm.new_cache(80)
        out = [prefill(pm, ids, kv, 16)]
        out += [decode_one_token(pm, t, 40 + i, kv, None) for i, t in enumerate(tokens[:-1])]
        return torch.cat(out).double()

    pm = long_model(reference)
    kv = pm.new_cache(80)
    want = list(generate(pm, prefill(pm, ids, kv, 16), 40, kv, gen, set()))
    assert len(set(want)) > 3
    expected = steps(reference, want)
    with schemes.every_row(model):
        got = steps(model, want)
    # float32 sums against float64 (weight-only); the GEMM also rounds its activations to 8 bits, where a
    # code one step off (a product on a rounding boundary, rounded another way by another CPU's kernel)
    # moves the logits by a part in a few hundred (seen: 1.5%)
    tol = (3e-2 if path == "gemm" else 2e-4) * float(expected.abs().max())
    assert float((got - expected).abs().max()) <= tol
    top2 = expected.topk(2).values
    ties = (top2[:, 0] - top2[:, 1]) <= 2 * tol
    assert ((got.argmax(-1) == expected.argmax(-1)) | ties).all()


def test_quantized_layers_pack_their_unquantized_path():
    """pack_linears after quantize_linears packs the wrapped layer (prefill's path) and nothing else."""
    from longdoc.quant.packing import PackedLinear, can_pack

    model = tiny_model("qwen2", dtype=torch.float32)
    if not can_pack(model):
        pytest.skip("oneDNN cannot pack here")
    x = torch.randn(1, 20, 64)
    before = model.model.layers[0].mlp.down_proj(torch.randn(1, 20, 128))
    del before
    n = schemes.quantize_linears(model, "int8", quantized_tensors(model, "int8"))
    assert pack_linears(model) == n
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, schemes.QuantLinear) and isinstance(layer.dense, PackedLinear)
    assert layer(x).shape == (1, 20, 64)


def test_quantize_linears_refuses_another_models_weights():
    model = tiny_model("qwen2", dtype=torch.float32)
    other = tiny_model("llama", dtype=torch.float32)
    tensors = quantized_tensors(model, "int8")
    other.model.layers[0].mlp.up_proj = nn.Linear(64, 96)
    with pytest.raises(ValueError, match="shape"):
        schemes.quantize_linears(other, "int8", tensors)
    del tensors["lm_head.qweight"]
    with pytest.raises(ValueError, match="lm_head"):
        schemes.quantize_linears(model, "int8", tensors)


# ---------------------------------------------------------------------------------------------------
# the cache


@pytest.fixture
def base(tmp_path):
    from .helpers import save_tiny_qwen2

    folder = store.models_dir() / "tiny-0123456789ab"
    model, _ = save_tiny_qwen2(folder)
    store.write_manifest(folder, {"kind": "test", "name": "tiny"})
    return folder, model


@pytest.mark.parametrize("scheme", [*SCHEMES, "q8"])
def test_quantized_cache_round_trip(base, scheme):
    folder, model = base
    made = mq.ensure_quantized(folder, scheme, "tiny")
    assert made == folder.parent / f"{folder.name}-{scheme}"
    manifest = store.read_manifest(made)
    assert manifest["source"]["quantize"] == scheme and mq.QUANT_FILE in manifest["files"]
    assert mq.check_quantized(made, folder, scheme) is None
    tensors = mq.load_quantized(made)
    for name in schemes.quantized_names(model):  # the tied or untied LM head included
        q, s = schemes.quantize(scheme, model.get_submodule(name).weight, head=name == "lm_head")
        assert torch.equal(tensors[f"{name}.qweight"], q) and torch.equal(tensors[f"{name}.scales"], s)
    if scheme == "q8":  # the LM head in 5 bits; the random weights, on no 5-bit grid, in 8
        assert q8.fits_five(tensors["lm_head.qweight"])
        assert not q8.fits_five(tensors["model.layers.0.mlp.down_proj.qweight"])
    assert mq.ensure_quantized(folder, scheme, "tiny") == made  # verified, not rebuilt
    assert mq.check_quantized(made, folder, "int4" if scheme == "int8" else "int8") is not None


def test_tied_lm_head_is_quantized_from_the_embedding(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "tied"
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder)
    tensors = mq.load_quantized(mq.ensure_quantized(folder, "int8", "tied"))
    q, _ = schemes.quantize_int8(model.model.embed_tokens.weight)
    assert torch.equal(tensors["lm_head.qweight"], q)
    assert mq.quantized_path(folder, "int8").parent == store.models_dir()  # never inside the user's folder


def test_damaged_or_stale_quantized_cache_is_rebuilt(base):
    folder, _ = base
    made = mq.ensure_quantized(folder, "int8", "tiny")
    data = bytearray((made / mq.QUANT_FILE).read_bytes())
    data[-10] ^= 0xFF
    (made / mq.QUANT_FILE).write_bytes(bytes(data))
    assert "sha256" in (mq.check_quantized(made, folder, "int8") or "")
    warnings: list[str] = []
    assert mq.ensure_quantized(folder, "int8", "tiny", warn=warnings.append) == made
    assert len(warnings) == 1 and "sha256" in warnings[0] and "rebuilding" in warnings[0]
    assert mq.check_quantized(made, folder, "int8") is None
    # the base weights changed (a rebuilt conversion): the quantized copy no longer belongs to them
    manifest = json.loads((folder / store.MANIFEST_NAME).read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
    (folder / store.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "other weights" in (mq.check_quantized(made, folder, "int8") or "")


# ---------------------------------------------------------------------------------------------------
# the run path


def test_session_runs_quantized_and_falls_back_where_the_kernel_is_missing(tmp_path, monkeypatch):
    from longdoc.config import RunConfig
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    from .helpers import save_tiny_qwen2

    save_tiny_qwen2(tmp_path / "tiny", window=512)
    warnings: list[str] = []
    reporter = Reporter(quiet=True)
    monkeypatch.setattr(reporter, "warn", warnings.append)
    cfg = RunConfig(model=str(tmp_path / "tiny"), dtype="float32", quantize="int8")
    session = LocalBackend(cfg, reporter)
    assert session.info.quantize == "int8" and session.info.quant_folder is not None
    assert session.info.numerics == "float32+int8"
    assert isinstance(session.loaded().model.lm_head, schemes.QuantLinear)
    if schemes.int8_gemm_available():
        assert warnings == []
    else:  # without VNNI the explicit choice runs, and says once that it is slower here
        assert len(warnings) == 1 and "slower than unquantized here" in warnings[0] and "\n" not in warnings[0]
    warnings.clear()

    monkeypatch.setattr(schemes, "kernel_available", lambda scheme, dtype=None: False)
    fallback = LocalBackend(cfg, reporter)
    assert fallback.info.quantize == "none" and fallback.info.quant_folder is None
    unquantized = [w for w in warnings if "running unquantized" in w]
    assert len(unquantized) == 1 and unquantized[0].startswith("--quantize int8:") and "\n" not in unquantized[0]
    assert not any(isinstance(m, schemes.QuantLinear) for m in fallback.loaded().model.modules())


def test_kernel_probe_says_no_when_the_op_fails(monkeypatch, weight_only_int8):
    """A build whose op is missing or refuses the dtype: the probe says so (and is cached per dtype)."""

    def missing(*args):
        raise RuntimeError("Could not run '_weight_int8pack_mm' with arguments from the 'CPU' backend")

    schemes.kernel_available.cache_clear()
    try:
        assert schemes.kernel_available("int8", torch.float32)
        schemes.kernel_available.cache_clear()
        monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", missing)
        assert not schemes.kernel_available("int8", torch.float32)
        assert schemes.kernel_available("int4", torch.float32)
    finally:
        schemes.kernel_available.cache_clear()


def test_ask_with_quantize_end_to_end(tmp_path):
    """The CLI path on a tiny local model: the quantized weights are made once, then reused."""
    from typer.testing import CliRunner

    from longdoc.cli import app

    from .helpers import save_tiny_qwen2

    save_tiny_qwen2(tmp_path / "tiny", window=4096)
    args = ["ask", str(REPO / "sample_docs" / "notes.md"), "Which port?", "--model", str(tmp_path / "tiny")]
    args += ["--json", "--max-new-tokens", "4", "--dtype", "float32", "--quantize", "int4", "--no-cache"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["quantize"] == "int4" and "quantizing tiny to int4" in first.stderr
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "quantizing" not in again.stderr
    assert json.loads(again.stdout)["answer"] == json.loads(first.stdout)["answer"]


# ---------------------------------------------------------------------------------------------------
# q8: longdoc's Q8_0 kernel (longdoc.native.q8) as a scheme

needs_q8 = pytest.mark.skipif(not native.likely_available("q8"), reason="no C compiler here")


class Q8Reference(nn.Module):
    """A linear computed as the Q8_0 kernel promises (``q8.reference_q8_matmul``: activations quantized
    per block of 32, exact block sums, float64), cast back."""

    def __init__(self, linear: nn.Linear, q: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.q, self.s, self.bias = q, s, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = q8.reference_q8_matmul(x.reshape(-1, x.shape[-1]), self.q, self.s, self.bias)
        return out.view(*x.shape[:-1], -1).to(x.dtype)


def q8_reference_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    reference = copy.deepcopy(model)
    for name in schemes.quantized_names(reference):
        parent, _, child = name.rpartition(".")
        ref = Q8Reference(reference.get_submodule(name), tensors[f"{name}.qweight"], tensors[f"{name}.scales"])
        setattr(reference.get_submodule(parent) if parent else reference, child, ref)
    return reference


@needs_q8
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_linear_matches_the_float64_reference_of_its_arithmetic(bias, dtype):
    """A q8 QuantLinear is the Q8_0 kernel: its float64 reference (activations quantized per block of
    32) within float32 accumulation, and its weight within half a step of the original."""
    torch.manual_seed(0)
    dense = nn.Linear(96, 40, bias=bias)
    q, s = schemes.quantize("q8", dense.weight)
    layer = schemes.QuantLinear(dense, "q8", q, s, dtype=dtype)
    assert layer.gemm.kind == "q8" and layer.in_features == 96 and layer.gemm.nbytes == 5 * 3 * 272
    x = torch.randn(3, 1, 96).to(dtype)
    out = layer(x)  # 3 rows: the quantized kernel
    assert out.shape == (3, 1, 40) and out.dtype == dtype
    want = q8.reference_q8_matmul(x.reshape(3, 96), q, s, dense.bias if bias else None).view(3, 1, 40)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    err = (schemes.dequantize("q8", q, s) - dense.weight.double()).abs()
    step = s.double().repeat_interleave(32, dim=1)
    assert err.max() > 0 and bool((err <= step / 2 * (1 + 1e-3)).all())


@needs_q8
def test_q8_stacked_linears_equal_each_linear_on_its_own():
    """q/k/v and gate/up are one Q8_0 call; each output channel is bit for bit what a call of its own
    weight gives (the kernel computes each row of the weight alone), the LM head quantized too."""
    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    tensors = quantized_tensors(model, "q8")
    alone = copy.deepcopy(model)
    schemes.quantize_linears(model, "q8", tensors)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.gemm is attn.k_proj.gemm is attn.v_proj.gemm is not attn.o_proj.gemm
    assert mlp.gate_proj.gemm is mlp.up_proj.gemm and isinstance(model.lm_head, schemes.QuantLinear)
    assert {m.gemm.kind for m in model.modules() if isinstance(m, schemes.QuantLinear)} == {"q8"}
    x = torch.randn(1, 1, 64)
    for parent, children in (
        ("model.layers.0.self_attn", ("q_proj", "k_proj", "v_proj")),
        ("model.layers.0.mlp", ("gate_proj", "up_proj")),
    ):
        for child in children:
            name = f"{parent}.{child}"
            own = schemes.QuantLinear(
                alone.get_submodule(name), "q8", tensors[f"{name}.qweight"], tensors[f"{name}.scales"], torch.float32
            )
            assert torch.equal(model.get_submodule(name)(x), own(x)), name


@needs_q8
def test_q8_model_logits_and_greedy_decode_equal_the_float64_reference():
    """A tiny model whose linears all run through the Q8_0 kernel: its logits over a prompt are those of
    the same model with each linear computed by the kernel's float64 reference, and greedy decoding
    gives the same tokens."""
    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    tensors = quantized_tensors(model, "q8")
    reference = q8_reference_model(model, tensors)
    assert schemes.quantize_linears(model, "q8", tensors) == len(schemes.quantized_names(model))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), schemes.every_row(model):
        got = model(ids).logits
    want = reference(ids).logits
    # Each linear is exact against its reference (test_q8_linear_...), but the models feed the next layer
    # float32 sums against float64 ones: an activation an ulp from a rounding boundary can quantize one
    # code apart, which moves the logits it reaches. How often depends on torch's other kernels (the
    # ATEN_CPU_CAPABILITY=default build rounds differently from the AVX2 one), so: nearly every logit
    # within 1e-4, and a flip's reach bounded.
    off = (got - want).abs() > 1e-4 + 1e-4 * want.abs()
    assert off.float().mean() < 0.05 and (got - want).abs().max() < 0.1
    gen = GenerationConfig(max_new_tokens=24)

    def decode(m: nn.Module) -> list[int]:
        pm = LongModel(m, AttentionSettings(None, get_kernel("cpu", torch.device("cpu"))))
        kv = pm.new_cache(80)
        logits = prefill(pm, ids, kv, 16)
        return list(generate(pm, logits, 40, kv, gen, set()))

    with schemes.every_row(model):
        tokens = decode(model)
    assert tokens == decode(reference) and len(set(tokens)) > 3


@needs_q8
def test_q8_runs_its_scalar_loop_under_the_isa_cap_none(monkeypatch):
    """LONGDOC_ISA=none: q8 still runs, on the kernel's scalar loop, and gives the same numbers; auto
    does not pick it there, and an explicit --quantize q8 is told why."""
    from longdoc.quant import choose

    for var in ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
    dense = nn.Linear(64, 24)
    q, s = schemes.quantize("q8", dense.weight)
    x = torch.randn(1, 64)
    best = schemes.QuantLinear(dense, "q8", q, s, dtype=torch.float32)
    monkeypatch.setenv("LONGDOC_ISA", "none")
    cpu_dev = torch.device("cpu")
    config = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    assert choose.quant_unavailable("q8", cpu_dev, torch.float32, config) is None
    scalar = schemes.QuantLinear(dense, "q8", q, s, dtype=torch.float32)
    assert scalar.gemm.q8.level == q8.SCALAR
    assert torch.equal(scalar(x), best(x))  # the SIMD loops equal the scalar one bit for bit
    assert choose.default_quantize(cpu_dev, torch.float32, config) == "none"
    assert "scalar" in (choose.quant_slower("q8", cpu_dev, torch.float32) or "")


def test_q8_needs_widths_that_are_multiples_of_32():
    from longdoc.quant import choose

    odd = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 120}
    why = choose.quant_unavailable("q8", torch.device("cpu"), torch.float32, odd)
    assert why is not None and ("multiples of 32" in why or "can't run here" in why)
    with pytest.raises(ValueError, match="multiple of 32"):
        schemes.quantize("q8", torch.randn(8, 40))


def weight_only_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The model with each linear's weight replaced by its Q8_0 weight dequantized (float32, exact)."""
    reference = copy.deepcopy(model)
    for name in schemes.quantized_names(reference):
        weight = schemes.dequantize("q8", tensors[f"{name}.qweight"], tensors[f"{name}.scales"])
        reference.get_submodule(name).weight.data = weight.float()
    return reference


@needs_q8
@pytest.mark.parametrize("gemm", [False, True], ids=["unpacked", "gemm"])
def test_q8_without_its_dense_layers_prefills_through_the_unpacked_weights(monkeypatch, gemm):
    """``keep_dense=False``: no linear is left; inputs of many rows run the weight-only quantized model,
    through the Q8_0 weights unpacked for the call (activations not quantized: equal to it up to float32
    rounding) or, where its AVX2 loop runs, the kernel's gemm (activations rounded to 16 bits per block
    of 32, about 2^-16 of each block's largest: within 1e-4 of the logits' scale over the tiny model's 3
    layers); a decode step's few rows the kernel. Schemes that can't unpack refuse it."""
    if gemm and not q8.gemm_fast():
        pytest.skip("the gemm's AVX2 loop does not run here")
    monkeypatch.setattr(q8.Q8Matmul, "gemm_fast", property(lambda self: gemm and self.level == q8.AVX2))
    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    for module in model.modules():  # q/k/v's biases (initialized to zero)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.normal_()
    tensors = quantized_tensors(model, "q8")
    reference = weight_only_model(model, tensors)
    schemes.quantize_linears(model, "q8", tensors, keep_dense=False)
    layers = [m for m in model.modules() if isinstance(m, schemes.QuantLinear)]
    assert layers and all(m.dense is None for m in layers)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    tol = 3e-4 * float(want.abs().max()) if gemm else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # q/k/v's and gate/up's shared outputs are dropped once each has been taken (a prefill step's are
    # hundreds of MB over the layers)
    assert all(m.gemm._last is None for m in layers)
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 1, down.in_features)
    assert torch.equal(down(x), down.quantized(x))
    with pytest.raises(ValueError, match="must be kept"):
        schemes.quantize_linears(tiny_model("qwen2", dtype=torch.float32), "int8", tensors, keep_dense=False)


@needs_q8
def test_a_prefill_steps_mlp_unpacks_each_weight_once_for_all_its_slices(monkeypatch):
    """Where prefill unpacks the q8 weights for dense matmuls, a step whose MLP runs in slices of rows
    (``MLP_ROWS``) unpacks gate/up and down once per layer, not once per slice, gives what one slice of
    every row gives, and keeps nothing unpacked afterwards."""
    from longdoc.models import decoder

    from .test_engine import patched

    monkeypatch.setattr(q8.Q8Matmul, "gemm_fast", property(lambda self: False))
    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    schemes.quantize_linears(model, "q8", quantized_tensors(model, "q8"), keep_dense=False)
    pm = patched(model)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    whole = pm.hidden_states(ids, 0, pm.new_cache(40))
    unpacked: list[int] = []
    real = q8.Q8Matmul.rows

    def counted(self, ids=None, dtype=torch.float32):
        unpacked.append(self.n)
        return real(self, ids, dtype)

    monkeypatch.setattr(q8.Q8Matmul, "rows", counted)
    monkeypatch.setattr(decoder, "MLP_ROWS", 16)  # 40 rows: three slices
    sliced = pm.hidden_states(ids, 0, pm.new_cache(40))
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    # per layer: q/k/v, o, gate/up, down, each once
    assert len(unpacked) == 4 * len(pm.layers)
    assert all(
        m.gemm._held is None and not m.gemm._holders for m in model.modules() if isinstance(m, schemes.QuantLinear)
    )


@needs_q8
@pytest.mark.parametrize("native_bf16", [False, True])
def test_bfloat16_prefill_unpacks_the_weights_where_bfloat16_matmuls_are_native(monkeypatch, native_bf16):
    """A bfloat16 run's many-row q8 products: where bfloat16 matmuls are native (faster than the int16
    gemm there) through the weight unpacked to bfloat16, exactly a bfloat16 dense matmul on it, and no
    glu fusion; elsewhere through the gemm wherever its AVX2 loop runs."""
    monkeypatch.setattr(schemes, "cpu_has_fast_bf16", lambda: native_bf16)
    g = torch.Generator().manual_seed(8)
    qs, scales = q8.quantize_q8(torch.randn(32, 64, generator=g) * 0.1)
    bias = torch.randn(32, generator=g)
    gemm = schemes.QuantGemm(
        "q8", [qs[:16], qs[16:]], [scales[:16], scales[16:]], [bias[:16], bias[16:]], torch.bfloat16
    )
    assert gemm.gemm_prefill == (q8.gemm_fast() and not native_bf16)
    assert gemm.fuses_glu == gemm.gemm_prefill
    x = torch.randn(5, 64, generator=g).bfloat16()
    got = gemm.unpacked_matmul(x)
    if not gemm.gemm_prefill:
        weight = q8.dequantize_q8(qs, scales).bfloat16()
        assert torch.equal(got, nn.functional.linear(x, weight, bias.bfloat16()))


@needs_q8
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_q8_session_holds_one_copy_of_the_weights(tmp_path, dtype):
    """A q8 run never reads the linears' dense weights: every linear is the Q8_0 weight alone, nothing is
    left on the meta device, the embedding table stays in the file (rows read as looked up, in the run's
    dtype), the plan counts the quantized bytes only, and prefill is the weight-only quantized model's."""
    from longdoc.config import RunConfig
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    from .helpers import save_tiny_qwen2

    dense, _ = save_tiny_qwen2(tmp_path / "tiny", window=512)
    session = LocalBackend(RunConfig(model=str(tmp_path / "tiny"), dtype=dtype, quantize="q8"), Reporter(quiet=True))
    model = session.loaded().model
    assert session.info.quant_folder is not None and not session.packed
    assert all(m.dense is None for m in model.modules() if isinstance(m, schemes.QuantLinear))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    embed = model.model.embed_tokens
    assert isinstance(embed, FileEmbedding) and not list(embed.parameters()) and not list(embed.buffers())
    every = torch.tensor([[5, 0, 5], [embed.num_embeddings - 1, 7, 0]])
    run_dtype = getattr(torch, dtype)
    assert torch.equal(embed(every), dense.model.embed_tokens(every).to(run_dtype))
    assert torch.equal(embed(torch.arange(embed.num_embeddings)), dense.model.embed_tokens.weight.to(run_dtype))
    with pytest.raises(IndexError):
        embed(torch.tensor([embed.num_embeddings]))
    quant_bytes = (session.info.quant_folder / mq.QUANT_FILE).stat().st_size
    assert session.info.weight_bytes == quant_bytes
    if dtype == "bfloat16":
        return  # the weight-only model's numbers: float32 (bfloat16's prefill: test_bfloat16_prefill_...)
    tensors = dict(mq.load_quantized(session.info.quant_folder))
    reference = weight_only_model(dense.float(), tensors)
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(2))
    # torch's attention kernel: the weights are what this compares (flash16.c's int16 attention: test_flash16)
    pm = LongModel(model, AttentionSettings(None, get_kernel("cpu-torch", torch.device("cpu"))))
    hidden = pm.hidden_states(ids, 0, pm.new_cache(40))  # (the LM head's one row would run the kernel)
    with torch.no_grad():
        torch.testing.assert_close(hidden, reference.model(ids).last_hidden_state, rtol=1e-4, atol=1e-4)


@needs_q8
def test_q8_decode_steps_normalize_in_the_kernel_as_the_model_does(monkeypatch):
    """A float32 q8 model's decode steps hand the norms' inputs to the Q8_0 kernel (``NormedRows``), which
    normalizes as it quantizes: the logits are those of the norms run apart, and the tokens the same."""
    from longdoc.models import decoder

    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    schemes.quantize_linears(model, "q8", quantized_tensors(model, "q8"), keep_dense=False)
    assert model.model.layers[0].self_attn.q_proj.takes_normed
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    gen = GenerationConfig(max_new_tokens=16)
    seen = []
    real = decoder.Decoder.norm_for

    def counted(norm, h, first):
        out = real(norm, h, first)
        seen.append(isinstance(out, decoder.NormedRows))
        return out

    def run() -> tuple[torch.Tensor, list[int]]:
        pm = LongModel(model, AttentionSettings(None, get_kernel("cpu", torch.device("cpu"))))
        kv = pm.new_cache(40)
        logits = prefill(pm, ids, kv, 20)
        step = pm.forward(torch.tensor([[int(logits.argmax())]]), 20, kv)
        return step, list(generate(pm, logits, 20, kv, gen, set()))

    monkeypatch.setattr(decoder.Decoder, "norm_for", staticmethod(counted))
    fused, fused_tokens = run()
    assert any(seen) and not all(seen)  # decode steps fused, the prefill not
    monkeypatch.setattr(schemes.QuantLinear, "takes_normed", property(lambda self: False))
    seen.clear()
    apart, apart_tokens = run()
    assert not any(seen)
    torch.testing.assert_close(fused, apart, rtol=1e-4, atol=1e-4)
    assert fused_tokens == apart_tokens and len(set(fused_tokens)) > 3
