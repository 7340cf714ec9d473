"""Building a model straight into its run dtype: the module tree on the meta device, then each
safetensors tensor read once (plain reads, no memory map), converted, and assigned.

``from_pretrained`` converting the bfloat16 cache to float32 held both copies and the mapped file at
once (peak RSS about twice the float32 weights, benchmarks/RESULTS.md "CPU paths"); here the peak is
the weights in their run dtype plus one tensor of scratch. For a float32 run of a bfloat16 checkpoint
whose embedding table is not the LM head, the table stays bfloat16 and widens the rows it looks up:
the same values (bfloat16 widens exactly) for half its memory.
"""

from __future__ import annotations

import json
import math
import struct
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


class WideningEmbedding(nn.Embedding):
    """An embedding table kept in its stored dtype whose looked-up rows come out in ``out_dtype``."""

    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight, _freeze=True)
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


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


def read_tensors(path: Path, convert: Any) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, read with plain reads (the page cache is not this
    process's memory), each passed through ``convert(name, tensor)`` before the next is read."""
    header, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    largest = max((e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()), default=0)
    scratch = torch.empty(largest, dtype=torch.uint8)
    with path.open("rb", buffering=0) as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = entry["data_offsets"]
            buf = scratch[: b - a]
            f.seek(start + a)
            view = buf.numpy().data
            got = 0
            while got < b - a:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path.name} ends inside tensor {name}")
                got += n
            tensor = buf.view(_DTYPES[entry["dtype"]]).view(entry["shape"])
            out[name] = convert(name, tensor)
    return out


def build_model(folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The folder's causal LM (transformers, SDPA attention, no remote code) with its weights in
    ``dtype`` on ``device``, in eval mode with gradients off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed_name = "model.embed_tokens.weight"
    # the table keeps its stored dtype where widening it on lookup gives the same rows for less memory
    keep_embedding = not tied and device.type == "cpu" and dtype == torch.float32

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == embed_name and keep_embedding and tensor.dtype in (torch.bfloat16, torch.float16):
            return tensor.clone()
        if tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype, copy=True)
        return tensor.to(device=device, copy=True)

    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(read_tensors(path, convert))
    if tied:
        state.pop("lm_head.weight", None)
    embedding = state.get(embed_name)
    widen = embedding is not None and embedding.dtype != dtype
    if widen:
        del state[embed_name]  # set below as a module of its own
    result = model.load_state_dict(state, strict=False, assign=True)
    allowed = {"lm_head.weight"} if tied else set()
    if widen:
        allowed.add(embed_name)
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        extra = result.unexpected_keys[:3]
        raise ValueError(f"weights do not match the config (missing {missing[:3]}, unexpected {extra})")
    if widen:
        assert embedding is not None
        model.model.embed_tokens = WideningEmbedding(embedding, dtype, model.model.embed_tokens.padding_idx)
    if tied:
        model.tie_weights()
    # non-persistent buffers (RoPE frequencies) were made on the meta device: make them again for real
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"no weights for {', '.join(left[:3])}")
    model.eval()
    model.requires_grad_(False)
    return model
