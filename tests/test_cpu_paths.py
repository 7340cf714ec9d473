"""The CPU classes (issue 23): flags and the ISA cap, what each class gets, and the float32 load that
holds the weights once (read, widened and packed one tensor at a time)."""

from __future__ import annotations

import gc
import json
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from longdoc import cpu
from longdoc.models import weights
from longdoc.models.weights import WideningEmbedding, build_model, read_header
from longdoc.quant import choose, packing, schemes
from longdoc.runtime import machine

from .helpers import REPO

AVX2 = frozenset({"sse2", "avx", "avx2", "fma", "f16c"})
ZEN4 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16"}
SAPPHIRE = ZEN4 | {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given flags (read from the OS); clears the ISA variables."""
    for name in ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu, "arch", lambda: "x86_64")

    def set_flags(found: frozenset[str], known: bool = True) -> None:
        monkeypatch.setattr(cpu, "_raw_flags", lambda: (found, known))

    return set_flags


@pytest.mark.parametrize(
    "found, klass",
    [
        (AVX2, "avx2"),
        (AVX2 | {"avx_vnni"}, "avx2-vnni"),
        (ZEN4, "avx512bf16"),
        (SAPPHIRE, "amx"),
        (frozenset(), "x86-64"),
    ],
)
def test_cpu_class_follows_the_flags(flags, found, klass):
    flags(found)
    assert cpu.cpu_class() == klass


@pytest.mark.parametrize(
    "cap, klass, kept, dropped",
    [
        ("avx2", "avx2", {"avx2", "fma"}, {"avx512f", "avx512_fp16", "amx_tile"}),
        ("avx512", "avx512", {"avx512f", "avx512bw"}, {"avx512_vnni", "avx512_bf16", "amx_bf16"}),
        ("avx512vnni", "avx512vnni", {"avx512_vnni"}, {"avx512_bf16", "amx_bf16"}),
        ("avx512bf16", "avx512bf16", {"avx512_bf16", "avx512_fp16"}, {"amx_bf16", "amx_int8"}),
        ("none", "x86-64", set(), {"avx2", "fma", "avx512f"}),
        ("amx", "amx", {"amx_bf16", "avx512_bf16"}, set()),
    ],
)
def test_the_isa_cap_drops_the_flags_above_it(flags, monkeypatch, cap, klass, kept, dropped):
    flags(SAPPHIRE)
    monkeypatch.setenv("LONGDOC_ISA", cap)
    assert cpu.isa_cap() == cap and cpu.cpu_class() == klass
    assert kept <= cpu.flags() and not (dropped & cpu.flags())


def test_torch_variables_cap_longdoc_too_and_the_lowest_cap_wins(flags, monkeypatch):
    flags(SAPPHIRE)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert cpu.isa_cap() == "avx512vnni"
    monkeypatch.setenv("LONGDOC_ISA", "avx512bf16")
    assert cpu.isa_cap() == "avx512vnni"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu.isa_cap() == "avx2" and cpu.cpu_class() == "avx2"


def test_a_bad_cap_is_a_usage_error(flags, monkeypatch):
    monkeypatch.setenv("LONGDOC_ISA", "avx9")
    with pytest.raises(cpu.IsaCapError, match="LONGDOC_ISA accepts none, avx2"):
        cpu.flags()


def test_the_cap_reaches_torch_unless_its_own_variables_are_set(monkeypatch):
    monkeypatch.setenv("LONGDOC_ISA", "avx2")
    # set, then removed: monkeypatch then restores its absence after apply_torch_cap has set it (a
    # plain delenv of an absent variable records nothing, and the cap leaked into later tests)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    cpu.apply_torch_cap()
    assert (cpu.os.environ["ATEN_CPU_CAPABILITY"], cpu.os.environ["ONEDNN_MAX_CPU_ISA"]) == ("avx2", "SSE41")


def test_torch_runs_capped_in_a_fresh_process():
    """The CLI's package import passes the cap on before torch loads (torch reads it once)."""
    env = {k: v for k, v in cpu.os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    code = "import longdoc, torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "LONGDOC_ISA": "none"}, capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DEFAULT"


def test_what_an_avx2_cpu_gets(flags, monkeypatch):
    flags(AVX2)
    monkeypatch.setattr(machine, "onednn_packs", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(packing, "onednn_packs", lambda dtype: dtype == torch.float32)
    cpu_dev = torch.device("cpu")
    paths = machine.paths(cpu_dev, torch.float32, "none")
    from longdoc.native import flash16

    assert (paths.cpu_class, paths.dtype, paths.packed, paths.quantize, paths.attention) == (
        "avx2",
        "float32",
        True,
        "none",
        # prefill attention on int16 products where flash16.c's AVX2 loop runs (this CPU's, under the cap)
        "flash16.c" if flash16.fast() else "torch-cpu",
    )
    assert set(paths.why) == {"model", "dtype", "packed", "quantize", "attention"}
    assert paths.why["model"] == "asked for"  # what auto decided, where it did (runtime.plan.model_info)
    hint = machine.slow_path_hint(paths)
    assert hint is not None and "\n" not in hint and "avx2" in hint
    # a q8 run multiplies prefill on int16 activations where the q8 gemm's AVX2 loop runs
    from longdoc.native import q8

    q8_hint = machine.slow_path_hint(machine.paths(cpu_dev, torch.float32, "q8"))
    assert q8_hint is not None and ("int16 activations" in q8_hint) == q8.gemm_fast()
    # a bfloat16 run asked for on it is told why it is slow; no hint where bfloat16 is native
    assert "no native bfloat16" in machine.paths(cpu_dev, torch.bfloat16, "none").why["dtype"]
    flags(ZEN4)
    assert machine.slow_path_hint(machine.paths(cpu_dev, torch.bfloat16, "int5")) is None


def test_explicit_quantization_that_is_slower_here_says_so(monkeypatch):

    cpu_dev = torch.device("cpu")
    monkeypatch.setattr(schemes, "int8_gemm_available", lambda: False)
    monkeypatch.setattr(choose, "onednn_packs", lambda dtype: dtype == torch.float32)
    assert "slower than unquantized" in (choose.quant_slower("int8", cpu_dev, torch.float32) or "")
    assert "far slower" in (choose.quant_slower("int4", cpu_dev, torch.float32) or "")
    assert choose.quant_slower("none", cpu_dev, torch.float32) is None
    assert choose.quant_slower("int5", cpu_dev, torch.bfloat16) is None
    monkeypatch.setattr(schemes, "int8_gemm_available", lambda: True)
    assert choose.quant_slower("int8", cpu_dev, torch.float32) is None


def test_auto_picks_q8_wherever_its_simd_loop_runs(flags, monkeypatch):
    """--quantize auto: q8 where the Q8_0 kernel has a SIMD loop (an AVX2 CPU, float32 or bfloat16), int5's
    CPUs included (one copy of the weights, decoding as fast); not on an x86-64 CPU without AVX2 (its
    scalar loop only)."""
    from longdoc import native
    from longdoc.native import q8

    lib = native.library("q8")
    if lib is None or not int(lib.longdoc_q8_paths()) >> q8.AVX2 & 1:
        pytest.skip("the Q8_0 kernel's AVX2 loop does not run on this machine")
    cpu_dev, config = torch.device("cpu"), {"hidden_size": 896, "num_attention_heads": 14, "intermediate_size": 4864}
    real = choose.quant_unavailable
    monkeypatch.setattr(schemes, "int8_gemm_available", lambda: False)
    flags(AVX2)
    monkeypatch.setattr(choose, "quant_unavailable", lambda s, *a: "no int5 here" if s == "int5" else real(s, *a))
    assert choose.default_quantize(cpu_dev, torch.float32, config) == "q8"
    assert choose.default_quantize(cpu_dev, torch.bfloat16, config) == "q8"
    paths = machine.paths(cpu_dev, torch.float32, "q8")
    assert "AVX2" in paths.why["quantize"] and choose.quant_slower("q8", cpu_dev, torch.float32) is None
    monkeypatch.setattr(choose, "quant_unavailable", lambda s, *a: None if s == "int5" else real(s, *a))
    assert choose.default_quantize(cpu_dev, torch.bfloat16, config) == "q8"
    assert choose.default_quantize(cpu_dev, torch.float32, config) == "q8"
    flags(AVX2 - {"avx2"})  # an x86-64 CPU without AVX2
    assert q8.paths() == [q8.SCALAR]
    assert choose.default_quantize(cpu_dev, torch.float32, config) == "none"
    assert "scalar" in (choose.quant_slower("q8", cpu_dev, torch.float32) or "")
    odd = {**config, "intermediate_size": 4850}
    flags(AVX2)
    assert choose.default_quantize(cpu_dev, torch.float32, odd) == "none"


# --- the float32 load ------------------------------------------------------------------------------


def _bf16_checkpoint(folder: Path, tie: bool = False) -> nn.Module:
    """A tiny Qwen2 saved in bfloat16 (as longdoc's converted cache is); returns its weights widened
    into a float32 model (whose RoPE frequencies are float32, as a load computes them)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(config).eval().to(torch.bfloat16)
    model.save_pretrained(folder)
    reference = Qwen2ForCausalLM(config).eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return reference


@pytest.mark.parametrize("tie", [False, True])
def test_float32_load_equals_the_checkpoint_widened(tmp_path, tie):
    reference = _bf16_checkpoint(tmp_path, tie)
    model = build_model(tmp_path, torch.float32, torch.device("cpu"))
    embed = model.model.embed_tokens
    if tie:  # the table is the LM head: it must be float32, and the one tensor
        assert embed.weight.dtype == torch.float32 and model.lm_head.weight is embed.weight
    else:  # kept in its stored dtype, widened on lookup
        assert isinstance(embed, WideningEmbedding) and embed.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 77, 299, 3]])
    with torch.inference_mode():
        got, want = model(ids).logits, reference(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_narrow_linears_widen_as_they_are_packed(tmp_path):
    reference = _bf16_checkpoint(tmp_path)
    model = build_model(tmp_path, torch.float32, torch.device("cpu"), narrow_linears=True)
    assert model.lm_head.weight.dtype == torch.bfloat16  # waits, narrow, for the packing
    if not packing.can_pack(model, torch.float32):
        pytest.skip("oneDNN does not pack float32 here")
    assert packing.pack_linears(model, torch.float32) == 2 * 7 + 1
    assert weights.linear_weight(model).dtype == torch.float32
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_packing_frees_each_original_as_it_goes(tmp_path):
    """The replaced layers die one by one, not all at the end (which held every weight twice)."""
    model = build_model(_bf16_folder(tmp_path), torch.float32, torch.device("cpu"))
    if not packing.can_pack(model):
        pytest.skip("oneDNN does not pack float32 here")
    originals = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]
    alive_after_each = []

    def count() -> None:
        gc.collect()
        alive_after_each.append(sum(r() is not None for r in originals))

    packing.pack_linears(model, after_each=count)
    assert alive_after_each == list(range(len(originals) - 1, -1, -1))


def _bf16_folder(tmp_path: Path) -> Path:
    _bf16_checkpoint(tmp_path)
    return tmp_path


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "offsets"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, "offsets"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", "unsupported dtype"),
    ],
)
def test_a_damaged_weights_file_is_refused_before_reading(tmp_path, header, data, message):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, header, data)
    with pytest.raises(ValueError, match=message):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="header"):
        read_header(path)


def test_tensors_larger_than_the_read_chunk_arrive_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_CHUNK", 64)  # bytes: every tensor below takes several reads
    values = torch.arange(1000, dtype=torch.float32).to(torch.bfloat16)
    raw = values.view(torch.int16).numpy().tobytes()
    header = {"a": {"dtype": "BF16", "shape": [10, 100], "data_offsets": [0, len(raw)]}}
    _write_safetensors(tmp_path / "m.safetensors", header, raw)
    got = weights.read_tensors(tmp_path / "m.safetensors", lambda name, stored: torch.float32)["a"]
    assert got.dtype == torch.float32 and torch.equal(got.view(-1), values.float())
