"""Run a transformers decoder (Llama, Qwen2, Mistral families) with longdoc's attention.

transformers 5.x rotates q and k at absolute positions before its attention functions see them, and
DCA needs other rotations (keys at p mod c, queries three ways). So longdoc replaces the attention
module's forward: it reuses the module's own projections, scaling and the model's RoPE frequencies,
rotates as DCA prescribes, writes keys and values into a preallocated ``KVStore``, and attends with
a chosen kernel. The rest of each decoder layer (norms, MLP, residuals) is the model's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longdoc.attention.dca import ChunkLayout, chunked_attention, key_positions
from longdoc.attention.kernels import Kernel
from longdoc.attention.rope import RopeTable
from longdoc.engine.kvstore import KVStore

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# attend(layer, q, start) -> (B, H, Lq, D): attention of un-rotated queries at start.. against the
# store. The default is ``chunked_attention``; recycled decoding substitutes its own.
Attend = Callable[[int, torch.Tensor, int], torch.Tensor]


@dataclass
class AttentionSettings:
    layout: ChunkLayout | None  # None = plain causal attention
    kernel: Kernel
    # Multiplies the softmax scale: the DCA attention temperature for lengths beyond the window.
    logit_scale: float = 1.0


class PatchedModel:
    """A causal LM whose attention runs through longdoc (DCA or plain) over a ``KVStore``."""

    def __init__(self, model: Any, settings: AttentionSettings):
        # a transformers *ForCausalLM; typed Any because its submodules are resolved dynamically
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model type {config.model_type!r}")
        model.requires_grad_(False)
        self.model = model
        self.config = config
        self.settings = settings
        self.layers: list[Any] = list(model.model.layers)
        first = self.layers[0].self_attn
        self.head_dim: int = first.head_dim
        self.scale: float = first.scaling * settings.logit_scale
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = config.num_key_value_heads
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        rotary = model.model.rotary_emb
        self.rope = RopeTable(rotary.inv_freq.to(self.device), float(rotary.attention_scaling))

    def new_store(self, capacity: int) -> KVStore:
        return KVStore(len(self.layers), self.n_kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def default_attend(self, kv: KVStore) -> Attend:
        layout, kernel = self.settings.layout, self.settings.kernel

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            end = start + q.shape[2]
            return chunked_attention(
                q, kv.k[layer][:, :, :end], kv.v[layer][:, :, :end], start, self.rope.rotate, layout, kernel, self.scale
            )

        return attend

    @torch.inference_mode()
    def forward(
        self, ids: torch.Tensor, start: int, kv: KVStore, attend: Attend | None = None, all_logits: bool = False
    ) -> torch.Tensor:
        """Run tokens ``ids`` (1, L) at positions start..start+L-1, appending their K/V to ``kv``.

        Returns logits (1, V) for the last position only (a full (L, V) buffer costs GBs at 8K), or
        hidden states (1, L, hidden) after the final norm when ``all_logits`` (the caller projects
        them in slices, e.g. for perplexity).
        """
        attend = attend or self.default_attend(kv)
        length = ids.shape[1]
        key_pos = key_positions(torch.arange(start, start + length, device=self.device), self.settings.layout)
        h = self.model.model.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (1, length, -1, self.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            kv.update(i, start, self.rope.rotate(k, key_pos), v)
            o = attend(i, q, start)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, length, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.model.norm(h)
        if all_logits:
            return h
        return self.logits(h[:, -1])

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.model.lm_head(hidden)
        return out if out.dtype == torch.float64 else out.float()


class PackedLinear(nn.Module):
    """A Linear whose weight is pre-packed for oneDNN on CPU.

    Without packing, every bfloat16 matmul re-lays out the weight for the AMX kernels; with the few
    rows of a decode step that re-layout dominates (measured 3x on q/k/v/o/MLP shapes and 3x on the
    LM head here). Packing once at load makes a decode step's linear work cheap.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linears(model: nn.Module, after_each: Callable[[], object] | None = None) -> int:
    """Replace the decoder's and LM head's Linear layers by ``PackedLinear`` in place; returns how many.

    Only on CPU with bfloat16/float32 weights; the model then serves longdoc's engine (its outputs are
    unchanged, only faster). ``after_each`` runs after every replacement, e.g. to drop the pages of a
    memory-mapped weights file that packing just read (so peak memory is not weights twice).
    """
    if not can_pack(model):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
                count += 1
                if after_each is not None:
                    after_each()
    return count
