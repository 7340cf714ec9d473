"""Building a model straight into its run dtype: the module tree on the meta device, then each
safetensors tensor read once (plain reads, no memory map), converted, and assigned.

``from_pretrained`` converting the bfloat16 cache to float32 held both copies and the mapped file at
once (peak RSS about twice the float32 weights, benchmarks/RESULTS.md "CPU paths"); here the peak is
the weights in their run dtype plus one tensor of scratch. For a float32 run of a bfloat16 checkpoint
whose embedding table is not the LM head, the table stays bfloat16 and widens the rows it looks up:
the same values (bfloat16 widens exactly) for half its memory; where quantized layers replace the
linears (the LM head included), it stays in the file and only the rows looked up are read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# safetensors dtype names -> torch
_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS. glibc raises its mmap threshold as large blocks are freed,
    so the stored-dtype weights freed while packing stay in this process's heap unless trimmed
    (benchmarks/RESULTS.md, "Peak memory of each CPU path"); a no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class WideningEmbedding(nn.Embedding):
    """An embedding table kept in its stored dtype whose looked-up rows come out in ``out_dtype``."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight, _freeze=True)
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


class FileEmbedding(nn.Module):
    """An embedding table left in its safetensors file: the rows looked up are read from it (positioned
    reads, each distinct id once) and come out in ``out_dtype``, so the table takes none of this
    process's memory. (Mapped, each row looked up brought the kernel's fault-around pages with it, 64 KiB
    or more: 123 MiB of a 2K-token prompt's peak RSS with the 0.5B model.) The file must not change
    while the module lives (the model cache's files never do)."""

    def __init__(self, path: Path, name: str, out_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        header, start = read_header(path)
        entry = header[name]
        if len(entry["shape"]) != 2:
            raise ValueError(f"{path.name}: the embedding table {name} is not a matrix")
        self.num_embeddings, self.embedding_dim = (int(n) for n in entry["shape"])
        self.padding_idx = padding_idx
        self.stored_dtype = _DTYPES[entry["dtype"]]
        self.out_dtype = out_dtype
        self._offset = start + entry["data_offsets"][0]
        self._row_bytes = self.embedding_dim * self.stored_dtype.itemsize
        self._file = path.open("rb", buffering=0)
        self._name = path.name

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < self.num_embeddings:
            raise IndexError(f"token ids out of the embedding table's range (0..{self.num_embeddings - 1})")
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty(unique.numel(), self.embedding_dim, dtype=self.stored_dtype)
        buffers = rows.view(torch.uint8).numpy()
        fd = self._file.fileno()
        for i, token in enumerate(unique.tolist()):
            if os.preadv(fd, [buffers[i]], self._offset + token * self._row_bytes) != self._row_bytes:
                raise ValueError(f"{self._name} ends inside the embedding table")
        return rows[inverse].view(*ids.shape, self.embedding_dim).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in {self._name} as {self.stored_dtype}"


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensor table and where its data starts; refuses a table that does not
    describe the file (offsets past its end, sizes that disagree with the shapes)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path.name} has a header of {length} bytes, which the file cannot hold")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        dtype = _DTYPES.get(entry.get("dtype"))
        a, b = entry.get("data_offsets", (0, -1))
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} has an unsupported dtype {entry.get('dtype')!r}")
        need = math.prod(entry["shape"]) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= a <= b or b - a != need or start + b > size:
            raise ValueError(f"{path.name}: tensor {name}'s offsets do not match its shape or the file")
    return header, start


# bytes read per step: tensors are filled slice by slice through this much scratch, so a large one (the
# embedding table) needs no second copy of itself in its stored dtype
_CHUNK = 16 << 20


class SafetensorsReader:
    """One safetensors file whose tensors are read one at a time when asked for, with plain reads (the
    page cache is not this process's memory) converted slice by slice through ``_CHUNK`` bytes of
    scratch."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.start = read_header(path)
        self._file = path.open("rb", buffering=0)
        self._scratch: torch.Tensor | None = None

    def names(self) -> list[str]:
        """The tensors' names, in the order of their bytes in the file."""
        return sorted(self.header, key=lambda name: self.header[name]["data_offsets"][0])

    def stored_dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.header[name]["dtype"]]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` in ``dtype`` (its stored one by default). KeyError for a name not in the file."""
        entry = self.header[name]
        stored = _DTYPES[entry["dtype"]]
        size = stored.itemsize
        tensor = torch.empty(entry["shape"], dtype=dtype or stored)
        flat = tensor.view(-1)
        if self._scratch is None:
            self._scratch = torch.empty(_CHUNK, dtype=torch.uint8)
        scratch = self._scratch
        view = scratch.numpy().data
        self._file.seek(self.start + entry["data_offsets"][0])
        done = 0  # elements
        per_chunk = _CHUNK // size
        while done < flat.numel():
            n = min(per_chunk, flat.numel() - done)
            got = 0
            while got < n * size:
                read = self._file.readinto(view[got : n * size])
                if not read:
                    raise ValueError(f"{self.path.name} ends inside tensor {name}")
                got += read
            flat[done : done + n].copy_(scratch[: n * size].view(stored))
            done += n
        return tensor

    def close(self) -> None:
        self._file.close()
        self._scratch = None


def read_tensors(
    path: Path,
    dtype_for: Callable[[str, torch.dtype], torch.dtype],
    skip: set[str] | frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file but those in ``skip``, in the dtype ``dtype_for(name, stored
    dtype)`` gives (``SafetensorsReader.read``): beyond the tensors themselves this holds ``_CHUNK``
    bytes."""
    reader = SafetensorsReader(path)
    try:
        return {
            name: reader.read(name, dtype_for(name, reader.stored_dtype(name)))
            for name in reader.names()
            if name not in skip
        }
    finally:
        reader.close()


def build_model(
    folder: Path, dtype: torch.dtype, device: torch.device, narrow_linears: bool = False, skip_linears: bool = False
) -> Any:
    """The folder's causal LM (transformers, SDPA attention, no remote code) with its weights in
    ``dtype`` on ``device``, in eval mode with gradients off. With ``narrow_linears`` the Linear
    weights stay in their stored dtype for ``pack_linears(model, dtype)`` to widen one at a time (the
    model can't run before that). With ``skip_linears`` they are not read at all and stay on the meta
    device, for quantized layers that hold the only copy to replace them
    (``longdoc.quant.schemes.quantize_linears`` with ``keep_dense=False``); a float32 CPU model's
    embedding table then stays in the file even where the LM head is tied to it (``FileEmbedding``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed_name = "model.embed_tokens.weight"
    # the table keeps its stored dtype where widening it on lookup gives the same rows for less memory
    keep_embedding = (skip_linears or not tied) and device.type == "cpu" and dtype == torch.float32

    all_linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linears = all_linears if narrow_linears else set()
    skipped = all_linears if skip_linears else set()  # the weights only: the quantized layers take the biases
    # with the linears quantized, the table stays in the file and the rows looked up are read from it
    # (in whatever dtype the run has: FileEmbedding converts the rows it reads)
    in_file = skip_linears and device.type == "cpu"

    def dtype_for(name: str, stored: torch.dtype) -> torch.dtype:
        if name == embed_name and keep_embedding and stored in (torch.bfloat16, torch.float16):
            return stored
        if name in linears and stored.is_floating_point:
            return stored
        return dtype if stored.is_floating_point else stored

    files = sorted(folder.glob("*.safetensors"))
    skip = skipped | {embed_name} if in_file else skipped
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update({k: t.to(device) for k, t in read_tensors(path, dtype_for, skip).items()})
    table = None
    if in_file:
        holder = next((p for p in files if embed_name in read_header(p)[0]), None)
        padding_idx = model.model.embed_tokens.padding_idx
        table = None if holder is None else FileEmbedding(holder, embed_name, dtype, padding_idx)
    if tied:
        state.pop("lm_head.weight", None)
    embedding = state.get(embed_name)
    widen = embedding is not None and embedding.dtype != dtype
    if widen:
        del state[embed_name]  # set below as a module of its own
    result = model.load_state_dict(state, strict=False, assign=True)
    allowed = ({"lm_head.weight"} if tied else set()) | skipped
    if widen or table is not None:
        allowed.add(embed_name)
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        extra = result.unexpected_keys[:3]
        raise ValueError(f"weights do not match the config (missing {missing[:3]}, unexpected {extra})")
    expected = model.model.embed_tokens
    if table is not None:
        if (table.num_embeddings, table.embedding_dim) != (expected.num_embeddings, expected.embedding_dim):
            raise ValueError(f"weights do not match the config (the shape of {embed_name})")
        model.model.embed_tokens = table
    if widen:
        assert embedding is not None
        model.model.embed_tokens = WideningEmbedding(embedding, dtype, expected.padding_idx)
    if tied and not skip_linears:
        model.tie_weights()
    # non-persistent buffers (RoPE frequencies) were made on the meta device: make them again for real
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    left = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.device.type == "meta" and n not in skipped
    ]
    if left:
        raise ValueError(f"no weights for {', '.join(left[:3])}")
    model.eval()
    model.requires_grad_(False)
    return model


def linear_weight(model: nn.Module) -> torch.Tensor:
    """A linear layer's weight, packed or not: its dtype is the run's once packed (the embedding table
    may be kept narrower, and unpacked weights may wait in their stored dtype). A packed layer
    (``longdoc.quant.packing.PackedLinear``) holds it as ``packed``."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module.weight
        packed = getattr(module, "packed", None)
        if isinstance(packed, torch.Tensor):
            return packed
    return next(model.parameters())
