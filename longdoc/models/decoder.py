"""The decoder's layer walk: a transformers causal LM (Llama, Qwen2, Mistral families) run layer by
layer, with attention left to the caller.

transformers 5.x rotates q and k at absolute positions before its attention functions see them, and
DCA needs other rotations (keys at p mod c, queries three ways). So longdoc does not go through the
model's forward at all: ``Decoder.run_layers`` walks the decoder layers itself, calling each attention
module's own projections, rotating the keys by the angles it is given, writing keys and values into
the caller's cache and handing the queries to the caller's ``attend``; norms, MLP and LM head are the
model's own modules. Nothing in transformers is modified, so a config feature that this loop does not
implement (a sliding window, say) must be refused up front (``unsupported_features``) rather than
silently dropped. Which keys each query sees is ``longdoc.engine.longmodel``'s business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from longdoc.models.rope import RopeTable

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies are fixed at load (``inv_freq`` and ``attention_scaling`` say all);
# "dynamic" and "longrope" change them with the sequence length, which the layer loop does not do.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Rows of a prefill step whose MLP runs at once: bounds its intermediates (3 x 1024 x 4864 float32, 60 MB
# for the embedded model) well below a 2048-token step's, at matmul sizes that stay as fast (peak RSS:
# benchmarks/RESULTS.md, the AVX2 headline).
MLP_ROWS = 1024

# attend(layer, q, start) -> (B, H, Lq, D): attention of un-rotated queries at start.. against the
# cache. The default is DCA's ``chunked_attention``; recycled decoding substitutes its own.
Attend = Callable[[int, torch.Tensor, int], torch.Tensor]


class KeyWriter(Protocol):
    """Where the layer walk puts each layer's rotated keys and values (``longdoc.engine.kvcache``)."""

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


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


@dataclass(frozen=True)
class NormedRows:
    """An RMSNorm not yet applied: hidden states ``x`` (1, L, hidden) and the model's norm module. A decode
    step hands it, in place of the normalized tensor, to the linears that normalize as they read
    (``takes_normed``: the Q8_0 kernel does it in the call that quantizes the row, one call where the
    norm alone took several tensor operations); ``value()`` is the normalized tensor."""

    x: torch.Tensor
    norm: Any

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def value(self) -> torch.Tensor:
        return rms_norm(self.norm, self.x)


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """What the model's RMSNorm module returns (Llama, Qwen2 and Mistral alike: normalized in float32,
    rounded to x's dtype, times the weight), normalized by torch's op: 4 tensor operations instead of
    the module's 8, twice per layer and step. ``norm``: the model's RMSNorm module."""
    eps = float(norm.variance_epsilon)
    return norm.weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(x.dtype)


class Decoder:
    """A causal LM's layers, walked by longdoc (``run_layers``) with the caller's keys and attention."""

    def __init__(self, model: Any, logit_scale: float = 1.0):
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
        self.layers: list[Any] = list(model.model.layers)
        first = self.layers[0].self_attn
        self.head_dim: int = first.head_dim
        # ``logit_scale`` multiplies the softmax scale: the DCA attention temperature beyond the window
        self.scale: float = first.scaling * logit_scale
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = config.num_key_value_heads
        # the MLP's activation is silu (what a fused gate computes: ``feed_forward``)
        self.silu: bool = getattr(config, "hidden_act", None) == "silu"
        # the run's dtype and device: the final norm's (linears may be packed, quantized or left
        # weightless on the meta device, the embedding table narrower)
        param = model.model.norm.weight
        self.dtype, self.device = param.dtype, param.device
        rotary = model.model.rotary_emb
        self.rope = RopeTable(rotary.inv_freq.to(self.device), float(rotary.attention_scaling))

    @torch.inference_mode()
    def run_layers(
        self, ids: torch.Tensor, start: int, kv: KeyWriter, attend: Attend, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Run tokens ``ids`` (1, L) at positions start..start+L-1: their keys, rotated by ``cos``/``sin``
        (L, D), go into ``kv``; each layer's queries go to ``attend``. Returns the hidden states (1, L,
        hidden) after the final norm."""
        return rms_norm(self.model.model.norm, self.walk_layers(ids, start, kv, attend, cos, sin))

    @torch.inference_mode()
    def walk_layers(
        self, ids: torch.Tensor, start: int, kv: KeyWriter, attend: Attend, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``run_layers`` without the final norm: the hidden states (1, L, hidden) after the last layer.

        Per layer: the model's own modules, one rotation of the keys, the cache write and the attention
        call; a single token (a decode step) in fewer tensor operations (``walk_row``).
        """
        h = self.model.model.embed_tokens(ids)
        walk = self.walk_row if ids.shape[1] == 1 else self.walk_rows
        return walk(h, start, kv, attend, cos, sin)

    def walk_rows(
        self, h: torch.Tensor, start: int, kv: KeyWriter, attend: Attend, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``walk_layers``'s loop for tokens embedded as h (1, L, hidden), any L."""
        length = h.shape[1]
        shape = (1, length, -1, self.head_dim)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self.norm_for(layer.input_layernorm, h, attn.q_proj)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            kv.update(i, start, RopeTable.apply(k, cos, sin), v)
            o = attend(i, q, start)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, length, -1))
            x = self.norm_for(layer.post_attention_layernorm, h, mlp.gate_proj)
            h = h + self.feed_forward(mlp, x, self.silu)
        return h

    def walk_row(
        self, h: torch.Tensor, start: int, kv: KeyWriter, attend: Attend, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``walk_rows`` for one token, embedded as h (1, 1, hidden): the same module calls and numbers with
        less dispatch around them (a decode step makes ~35 tensor operations and ~15 submodule lookups
        per layer, each a microsecond or more on a 2-core CPU): the projections viewed straight as heads
        (one row needs no transpose), the attention output as one row, the submodules read from their
        parents' ``_modules`` (what ``nn.Module.__getattr__`` reads, without its call), the MLP in
        one piece."""
        q_shape = (1, self.n_heads, 1, self.head_dim)
        kv_shape = (1, self.n_kv_heads, 1, self.head_dim)
        norm_for, apply = self.norm_for, RopeTable.apply
        for i, layer in enumerate(self.layers):
            parts = layer._modules
            proj = parts["self_attn"]._modules
            q_proj = proj["q_proj"]
            x = norm_for(parts["input_layernorm"], h, q_proj)
            q = q_proj(x).view(q_shape)
            k = proj["k_proj"](x).view(kv_shape)
            kv.update(i, start, apply(k, cos, sin), proj["v_proj"](x).view(kv_shape))
            h = h + proj["o_proj"](attend(i, q, start).reshape(1, 1, -1))
            mlp = parts["mlp"]._modules
            gate = mlp["gate_proj"]
            x = norm_for(parts["post_attention_layernorm"], h, gate)
            h = h + mlp["down_proj"](mlp["act_fn"](gate(x)) * mlp["up_proj"](x))
        return h

    @staticmethod
    def norm_for(norm: Any, h: torch.Tensor, first: Any) -> Any:
        """What the linears after ``norm`` get: a decode step's ``NormedRows`` where ``first`` (and so its
        siblings, which share its input) normalizes as it reads, else the normalized tensor."""
        if h.shape[1] == 1 and getattr(first, "takes_normed", False):
            return NormedRows(h, norm)
        return rms_norm(norm, h)

    @staticmethod
    def feed_forward(mlp: Any, x: Any, silu: bool = False) -> torch.Tensor:
        """The MLP of x (1, L, hidden) (or a decode step's ``NormedRows``), ``MLP_ROWS`` rows at a time: its
        intermediates are ~11 times the hidden state (gate, up and their product), the largest buffers
        of a prefill step. With ``silu`` (the model's activation), a gate that fuses silu(gate) * up into
        its kernel call (q8's ``glu_with``) takes the many rows of a prefill step: then only the product
        is ever stored. Linears that unpack their quantized weights for large inputs unpack them once
        for all the parts (``holding_unpacked``)."""
        if x.shape[1] <= MLP_ROWS:
            gate, up = mlp.gate_proj, mlp.up_proj
            fused = gate.glu_with(up, x) if silu and hasattr(gate, "glu_with") else None
            out: torch.Tensor = mlp.down_proj(fused if fused is not None else mlp.act_fn(gate(x)) * up(x))
            return out
        with contextlib.ExitStack() as stack:
            # linears that unpack their weights for a dense matmul unpack them once for all the parts
            for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if hasattr(linear, "holding_unpacked"):
                    stack.enter_context(linear.holding_unpacked())
            return torch.cat([Decoder.feed_forward(mlp, part, silu) for part in x.split(MLP_ROWS, dim=1)], dim=1)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor | NormedRows) -> torch.Tensor:
        """hidden (..., hidden) -> logits (..., V) in float32 (float64 stays float64)."""
        out = self.model.lm_head(hidden)
        return out if out.dtype == torch.float64 else out.float()

    @torch.inference_mode()
    def last_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) float32 of the last position of h (1, L, hidden), hidden states before the final
        norm (``walk_layers``): the norm runs in the LM head's kernel where it takes ``NormedRows``."""
        return self.logits(self.norm_for(self.model.model.norm, h[:, -1:], self.model.lm_head))[:, -1]
