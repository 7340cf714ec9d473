"""Run a transformers decoder (Llama, Qwen2, Mistral families) with longdoc's attention.

transformers 5.x rotates q and k at absolute positions before its attention functions see them, and
DCA needs other rotations (keys at p mod c, queries three ways). So longdoc does not go through the
model's forward at all: ``PatchedModel.forward`` walks the decoder layers itself, calling each
attention module's own projections, the model's RoPE frequencies and scaling, rotating as DCA
prescribes, writing keys and values into a preallocated ``KVStore`` and attending with a chosen
kernel; norms, MLP and LM head are the model's own modules. Nothing in transformers is modified, so
a config feature that this loop does not implement (a sliding window, say) must be refused up front
(``unsupported_features``) rather than silently dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from longdoc.attention.dca import ChunkLayout, chunked_attention, key_positions, query_positions, region_bounds
from longdoc.attention.kernels import Kernel, merge_partials
from longdoc.attention.kvstore import KVStore
from longdoc.attention.rope import RopeTable
from longdoc.attention.sparse import SparseConfig, SparseStats, sparse_chunked_attention

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies are fixed at load (``inv_freq`` and ``attention_scaling`` say all);
# "dynamic" and "longrope" change them with the sequence length, which the layer loop does not do.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# attend(layer, q, start) -> (B, H, Lq, D): attention of un-rotated queries at start.. against the
# store. The default is ``chunked_attention``; recycled decoding substitutes its own.
Attend = Callable[[int, torch.Tensor, int], torch.Tensor]


def unsupported_features(config: dict[str, Any]) -> list[str]:
    """What in a model's config.json the patched layer loop would silently drop; empty if none.

    Only features that change attention within the trained window count: a sliding window at least
    as long as the window never masks anything there (beyond it DCA takes over).
    """
    found = []
    window = int(config.get("max_position_embeddings") or 0)
    layer_types = config.get("layer_types") or []
    if config.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        found.append("sliding-window attention layers")
    elif config.get("model_type") != "qwen2":  # Qwen2 ignores sliding_window unless use_sliding_window
        sliding = config.get("sliding_window")
        if sliding is not None and int(sliding) < window:
            found.append(f"a sliding window of {int(sliding):,} tokens (shorter than the {window:,}-token window)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in STATIC_ROPE_TYPES:
        found.append(f"{rope_type!r} RoPE scaling")
    return found


@dataclass
class AttentionSettings:
    layout: ChunkLayout | None  # None = plain causal attention
    kernel: Kernel
    # Multiplies the softmax scale: the DCA attention temperature for lengths beyond the window.
    logit_scale: float = 1.0
    # Sparse prefill (None = exact); what it kept is counted in ``sparse_stats``.
    sparse: SparseConfig | None = None
    sparse_stats: SparseStats = field(default_factory=SparseStats)


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """What the model's RMSNorm module returns (Llama, Qwen2 and Mistral alike: normalized in float32,
    rounded to x's dtype, times the weight), normalized by torch's op: 4 tensor operations instead of
    the module's 8, twice per layer and step. ``norm``: the model's RMSNorm module."""
    eps = float(norm.variance_epsilon)
    return norm.weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(x.dtype)


class PatchedModel:
    """A causal LM whose attention runs through longdoc (DCA or plain) over a ``KVStore``."""

    def __init__(self, model: Any, settings: AttentionSettings):
        # a transformers *ForCausalLM; typed Any because its submodules are resolved dynamically
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model type {config.model_type!r}")
        dropped = unsupported_features(config.to_dict())
        if dropped:
            raise ValueError(f"longdoc cannot run a model with {', '.join(dropped)}")
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
        param = linear_weight(model)  # the run's dtype (the embedding table may be kept narrower)
        self.dtype, self.device = param.dtype, param.device
        rotary = model.model.rotary_emb
        self.rope = RopeTable(rotary.inv_freq.to(self.device), float(rotary.attention_scaling))

    def new_store(self, capacity: int) -> KVStore:
        return KVStore(len(self.layers), self.n_kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def default_attend(self, kv: KVStore, exact: bool = False) -> Attend:
        """Attention of prefill steps: sparse when the settings say so, unless ``exact``."""
        layout, kernel, stats = self.settings.layout, self.settings.kernel, self.settings.sparse_stats
        sparse = None if exact else self.settings.sparse
        count = self.settings.sparse is not None  # an exact step of a sparse prefill counts as all kept

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            end = start + q.shape[2]
            k, v = kv.k[layer][:, :, :end], kv.v[layer][:, :, :end]
            if sparse is not None:
                return sparse_chunked_attention(
                    q, k, v, start, self.rope.rotate, layout, kernel, self.scale, sparse, stats
                )
            if count:
                stats.count_exact(q.shape[2], start)
            return chunked_attention(q, k, v, start, self.rope.rotate, layout, kernel, self.scale)

        return attend

    def query_rotations(self, pos: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin rows (R, D) of one query at ``pos``, for the key regions in the order
        intra, successive, inter (R = 1 without DCA, 3 with), in ``dtype`` (the model's by default;
        recycled decoding also scores in float32): computed once per decode step for all layers
        (``chunked_attention`` would index the table again in every layer)."""
        layout = self.settings.layout
        p = torch.tensor([pos], device=self.device)
        rows = p if layout is None else torch.cat(query_positions(p, layout))
        top = pos + 1 if layout is None else layout.chunk_size + 1
        cos, sin = self.rope.angles(rows, top=top)
        dtype = dtype or self.dtype
        return cos.to(dtype), sin.to(dtype)

    def step_attend(self, kv: KVStore, pos: int) -> Attend:
        """Full attention of the one query of a decode step at ``pos``: the kernel calls, and their
        merge order, of ``chunked_attention`` for a single query, with the query rotations and the key
        regions worked out once for all layers. No host reads, nothing allocated beyond the outputs."""
        layout, kernel, scale = self.settings.layout, self.settings.kernel, self.scale
        cos, sin = self.query_rotations(pos)
        rots = [(cos[r : r + 1], sin[r : r + 1]) for r in range(cos.shape[0])]
        prev, chunk_start = region_bounds(pos, layout)
        # (rotation, first key, end key) per region, as chunked_attention orders them
        regions = [(0, chunk_start, pos + 1)]
        if chunk_start > 0:
            regions.append((1, prev, chunk_start))
        if prev > 0:
            regions.append((2, 0, prev))
        apply = RopeTable.apply

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            k, v = kv.k[layer], kv.v[layer]
            parts = [kernel(apply(q, *rots[r]), k[:, :, a:b], v[:, :, a:b], False, scale) for r, a, b in regions]
            return parts[0][0] if len(parts) == 1 else merge_partials(parts)[0]

        return attend

    @torch.inference_mode()
    def forward(
        self, ids: torch.Tensor, start: int, kv: KVStore, attend: Attend | None = None, all_logits: bool = False
    ) -> torch.Tensor:
        """Run tokens ``ids`` (1, L) at positions start..start+L-1, appending their K/V to ``kv``.

        Returns logits (1, V) for the last position only (a full (L, V) buffer costs GBs at 8K), or
        hidden states (1, L, hidden) after the final norm when ``all_logits`` (the caller projects
        them in slices, e.g. for perplexity).

        The key rotation is looked up once for all layers, and a single token (a decode step) attends
        through ``step_attend``; per layer there remain the model's own modules, one rotation of the
        keys, the cache write and the attention call.
        """
        length = ids.shape[1]
        if attend is None:
            attend = self.step_attend(kv, start) if length == 1 else self.default_attend(kv)
        layout = self.settings.layout
        key_pos = key_positions(torch.arange(start, start + length, device=self.device), layout)
        cos, sin = self.rope.angles(key_pos, top=start + length if layout is None else layout.chunk_len)
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        shape = (1, length, -1, self.head_dim)
        h = self.model.model.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(layer.input_layernorm, h)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            kv.update(i, start, RopeTable.apply(k, cos, sin), v)
            o = attend(i, q, start)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, length, -1))
            x = rms_norm(layer.post_attention_layernorm, h)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = rms_norm(self.model.model.norm, h)
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

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        """``dtype``: the run's, where the weight is still in its stored (narrower) dtype; it is widened
        here, one layer at a time, so a float32 model never holds a float32 copy beside its packing."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        dtype = dtype or linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype))
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN will pack a CPU weight of this dtype. A bfloat16 pack raises on CPUs without
    AVX-512 (or with oneDNN capped below it, ``ONEDNN_MAX_CPU_ISA=AVX2``): probing one small weight
    lets those runs fall back to plain matmuls instead of crashing mid-load."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def packing_pays(dtype: torch.dtype) -> bool:
    """Whether ``pack_linears`` makes a CPU model of this dtype faster here: wherever oneDNN packs it.
    bfloat16 decode steps run 3x faster packed where its matmuls are native; float32 ones about 1.3x on
    AVX2 (LM head and MLP alike; RESULTS.md, "CPU paths")."""
    return onednn_packs(dtype)


def linear_weight(model: nn.Module) -> torch.Tensor:
    """A linear layer's weight, packed or not: its dtype is the run's once packed (the embedding table
    may be kept narrower, and unpacked weights may wait in their stored dtype, ``longdoc.models.weights``)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module.weight
        if isinstance(module, PackedLinear):
            return module.packed
    return next(model.parameters())


def can_pack(model: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """Whether ``pack_linears`` runs on this model (in ``dtype``, by default its linears')."""
    weight = linear_weight(model)
    dtype = dtype or weight.dtype
    return weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and onednn_packs(dtype)


def pack_linears(
    model: nn.Module, dtype: torch.dtype | None = None, after_each: Callable[[], object] | None = None
) -> int:
    """Replace the decoder's and LM head's Linear layers by ``PackedLinear`` in place, widened to
    ``dtype`` where given; returns how many.

    Only on CPU with bfloat16/float32 weights; the model then serves longdoc's engine (its outputs are
    unchanged, only faster). ``after_each`` runs after every replacement, e.g. to drop the pages of a
    memory-mapped weights file that packing just read (so peak memory is not weights twice).
    """
    if not can_pack(model, dtype):
        return 0
    # (parent, name) pairs, not the layers: holding every original Linear until the loop ends kept a
    # second copy of all the weights alive while packing (peak RSS 4.76 against 2.89 GB, float32).
    # Largest first: the LM head's transient copy then comes while the rest is still narrow.
    slots = [(p, n) for p in model.modules() for n, c in p.named_children() if isinstance(c, nn.Linear)]
    slots.sort(key=lambda slot: -getattr(*slot).weight.numel())
    for parent, name in slots:
        setattr(parent, name, PackedLinear(getattr(parent, name), dtype))
        if after_each is not None:
            after_each()
    return len(slots)
