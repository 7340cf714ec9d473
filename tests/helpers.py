"""Plain helpers shared by the test modules: paths, tiny random-weight models, the production DCA path
on bare tensors, and a CLI runner. Fixtures live in conftest.py, the serve helpers in serve_helpers.py.

Kept light on purpose: subprocess scripts of the tests and the tools under tools/ import this module,
so the CLI and the runtime are imported only by the functions that need them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from longdoc.attention.dca import ChunkLayout, chunk_steps, chunked_attention, key_positions
from longdoc.attention.kernels import Kernel
from longdoc.engine.kvcache import KVCache
from longdoc.models.rope import RopeTable

if TYPE_CHECKING:
    from longdoc.runtime.local import ModelInfo

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_docs"
# The papers beside the checkout (../shared/corpus): absent in a plain clone, where the tests that read
# them skip (``corpus_file``) and nothing else depends on them.
CORPUS = REPO.parent / "shared" / "corpus"
# float64 DCA test vectors, vendored from shared/testdata so a clone without shared/ still passes
TESTDATA = REPO / "tests" / "data"
THETA = 10000.0  # the RoPE base of the tiny models and of the attention tests' tensors
# Qwen2's template in miniature: the tiny tokenizer has none, and a server renders with the model's own.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_file(name: str) -> Path:
    """A paper of the shared corpus; the calling test skips, saying why, where the corpus is absent."""
    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"the shared corpus is not beside this checkout ({path} is missing)")
    return path


# --------------------------------------------------------------------------------------------------
# tiny models


def query_index(pos: int, key: int, layout: ChunkLayout | None) -> int:
    """The rotation index of a query at ``pos`` against a key at ``key`` (DCA by its definition)."""
    if layout is None:
        return pos
    c, s = layout.chunk_len, layout.chunk_size
    gap = pos // c - key // c
    return pos % c if gap == 0 else (min(pos % c + c, s) if gap == 1 else min(2 * c - 1, s))


FAMILIES = ("qwen2", "llama", "mistral")


def tiny_model(
    family: str = "qwen2", dtype: torch.dtype = torch.float64, seed: int = 0, hidden: int = 64, mlp: int = 128
) -> torch.nn.Module:
    """3 layers, 4 query heads over 2 KV heads (GQA), random weights large enough that greedy
    decoding does not collapse onto one token. ``hidden`` and ``mlp``: the widths."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    config = config_cls(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval().to(dtype)


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer of 300 tokens, trained here in a moment."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["The capital of France is Paris.", "hello world"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def save_tiny_qwen2(
    folder: Path, *, window: int = 256, seed: int = 0, hidden: int = 32, mlp: int = 64
) -> tuple[Any, Any]:
    """A random-weight two-layer Qwen2 with a tokenizer, saved like a Hugging Face model folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
    )
    model = Qwen2ForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def save_chat_model(folder: Path) -> str:
    """The tiny model (window 4096) with a ChatML template (a server renders chat messages with it)."""
    _, tokenizer = save_tiny_qwen2(folder, window=4096)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_gguf_header(path: Path, arch: str, extra: bytes = b"") -> Path:
    """A GGUF v3 file holding only metadata: a string array first (to be skipped), then the architecture."""

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = [
        string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bc"),
        string("general.alignment") + struct.pack("<II", 4, 32),
        string("general.architecture") + struct.pack("<I", 8) + string(arch),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs) + extra)
    return path


def info(window: int = 32768, weight_bytes: int = 1_000_000_000) -> ModelInfo:
    """The facts of a 24-layer model in bfloat16, as a plan reads them (no weights behind them)."""
    from longdoc import models
    from longdoc.runtime.local import ModelInfo

    return ModelInfo(
        name="tiny",
        source=models.ModelSource(kind="folder", name="tiny", path=Path(".")),
        folder=Path("."),
        tokenizer=None,
        window=window,
        n_layers=24,
        n_kv_heads=2,
        head_dim=64,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        weight_bytes=weight_bytes,
        stop_ids=set(),
    )


def random_store(tokens: int, seed: int = 0) -> tuple[KVCache, list[int]]:
    """A 4-layer bfloat16 KV cache holding ``tokens`` random keys and values, and their token ids."""
    kv = KVCache(4, 2, 64, tokens + 8, torch.bfloat16, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for layer in range(4):
        kv.update(layer, 0, *(torch.randn(2, 1, 2, tokens, 64, generator=gen).to(torch.bfloat16)))
    return kv, list(range(tokens))


# --------------------------------------------------------------------------------------------------
# attention on bare tensors


def run_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ChunkLayout | None,
    theta: float,
    kernel: Kernel,
    step: int,
) -> torch.Tensor:
    """q (H, L, D), k/v (Hkv, L, D) float64 -> DCA output via the production path in prefill steps."""
    d, n = q.shape[-1], q.shape[1]
    table = RopeTable(1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d), dtype=torch.float64)
    kc = table.rotate(k[None], key_positions(torch.arange(n), layout))
    parts = [
        chunked_attention(q[None, :, a:b], kc, v[None], a, table.rotate, layout, kernel, d**-0.5)
        for a, b in chunk_steps(0, n, step, layout)
    ]
    return torch.cat(parts, dim=2)[0]


def load_vectors() -> tuple[Any, list[dict[str, Any]]]:
    """The vendored float64 DCA vectors (tests/data/README.md): (the open file, its cases). The
    independent reference is part of the contract: missing vectors fail, never skip."""
    import safetensors

    path = TESTDATA / "dca_vectors.safetensors"
    assert path.exists(), f"shared DCA test vectors missing at {path}"
    f = safetensors.safe_open(str(path), "pt")
    return f, json.loads(f.metadata()["cases"])


# --------------------------------------------------------------------------------------------------
# the CLI in process


def invoke(*args: str, input: str | bytes | None = None) -> Any:
    """``longdoc ARGS`` through typer's CliRunner (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from longdoc.cli import app

    return CliRunner().invoke(app, list(args), input=input)


def program(name: str, needed_in_ci: bool = False) -> str:
    """The path of ``name`` (a compiler, qemu); else the test skips, or fails under CI where CI must have it
    (.ci/run installs it), so a lost ARM build shows there."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        if needed_in_ci and os.environ.get("CI"):
            pytest.fail(f"{name} is not on PATH under CI (.ci/run installs it)")
        pytest.skip(f"{name} is not on PATH")
    return path


def build_driver(cc: list[str], flags: list[str], driver: Path, source: Path, out: Path) -> Path:
    """A kernel's C test driver (tests/data/*_driver.c) built with its source by ``cc`` into ``out``."""
    import subprocess

    build = subprocess.run(
        [*cc, "-O3", "-std=c11", *flags, str(driver), str(source), "-o", str(out), "-lm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    return out


def driver_report(proc: Any) -> tuple[dict[int, tuple[int, int]], int, str]:
    """A driver's output (a finished subprocess): cases and mismatches per path, the best path, the
    checksum."""
    assert proc.returncode == 0, proc.stderr
    paths, best, checksum = {}, -1, ""
    for line in proc.stdout.splitlines():
        word, *rest = line.split()
        if word == "path":
            paths[int(rest[0])] = (int(rest[1]), int(rest[2]))
        elif word == "best":
            best = int(rest[0])
        elif word == "checksum":
            checksum = rest[0]
    return paths, best, checksum
