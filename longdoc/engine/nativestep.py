"""Which decoders take the native decode step (``native.step``), and their weights as it reads them.

A decoder does where each layer's linears are q8 (``QuantLinear``s of kind "q8": q/k/v sharing one gemm,
gate/up sharing another, the output projection and down each their own), its norms are RMSNorms (a
weight and ``variance_epsilon``) and its MLP's activation is silu. ``LongModel`` asks once per model
and adds, per step, the KV cache and attention conditions (``LongModel.native_step``)."""

from __future__ import annotations

from typing import Any

import torch

from longdoc.models.decoder import Decoder
from longdoc.native.q8 import Q8Matmul
from longdoc.native.step import LayerWeights
from longdoc.quant.schemes import QuantLinear


def _stacked(*linears: Any) -> Q8Matmul | None:
    """The q8 kernel of ``linears`` where they are the parts 0, 1, ... of one q8 gemm, in order, and
    nothing else is in it; else None."""
    if not all(isinstance(linear, QuantLinear) for linear in linears):
        return None
    gemm = linears[0].gemm
    if (
        gemm.kind != "q8"
        or len(gemm.sizes) != len(linears)
        or any(linear.gemm is not gemm or linear.part != i for i, linear in enumerate(linears))
    ):
        return None
    kernel: Q8Matmul = gemm.q8
    return kernel


def _norm(norm: Any) -> tuple[torch.Tensor, float] | None:
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or eps is None:
        return None
    return weight.detach().to(torch.float32).contiguous(), float(eps)


def layer_weights(decoder: Decoder) -> list[LayerWeights] | None:
    """Each layer's weights for ``native.step.StepLayers`` where ``decoder`` takes the native step (the
    module docstring), else None."""
    if not decoder.silu or decoder.device.type != "cpu" or decoder.dtype not in (torch.float32, torch.bfloat16):
        return None
    weights = []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        products = (
            _stacked(attn.q_proj, attn.k_proj, attn.v_proj),
            _stacked(attn.o_proj),
            _stacked(mlp.gate_proj, mlp.up_proj),
            _stacked(mlp.down_proj),
        )
        norms = (_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm))
        qkv, o, gate_up, down = products
        if qkv is None or o is None or gate_up is None or down is None or norms[0] is None or norms[1] is None:
            return None
        weights.append(LayerWeights(*norms[0], *norms[1], qkv, o, gate_up, down))
    return weights
