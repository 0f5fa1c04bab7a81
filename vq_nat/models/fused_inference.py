"""Inference-only execution of fairseq's transformer layers with fewer, fused PyTorch ops.

At decoding time the Latent Transformer runs tiny matrix products (one sentence, a handful of positions), where
fairseq's layer code spends most of its time in Python and in small ops: ``MultiheadAttention``'s incremental-state
dictionaries and shape checks, one linear per projection, (T, B, C) <-> (B, T, C) transposes (measured at batch
1: 0.8 ms per latent-predictor step, 0.25 ms per encoder layer). This module runs the *same* fairseq layers —
their parameters, their LayerNorm and activation modules — as

- q, k, v (and the source's k, v) as one GEMM over concatenated weights, cached until a parameter changes;
- attention by ``F.scaled_dot_product_attention`` in batch-first layout;
- the latent predictor's self-attention cache as preallocated (B, heads, L, d) tensors written in place, and
  the source keys/values of encoder-decoder attention computed once per batch instead of once per step.

It applies in eval mode without autograd (``usable``), to the layer configurations it implements: fairseq's
transformer layers, pre- or post-norm, any activation, without the NormFormer/quant-noise/bias-kv extras; a
model with anything else decodes through fairseq's own forward. ``tests/test_fused_inference.py`` checks each
path against fairseq's layers.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# attributes of fairseq's layers that this module does not implement: any of them set -> fairseq's forward
_EXTRAS = ("c_attn", "attn_ln", "ffn_layernorm", "w_resid")


def _attention_supported(attn) -> bool:
    return (
        attn is not None
        and getattr(attn, "bias_k", None) is None
        and not getattr(attn, "add_zero_attn", False)
        and getattr(attn, "qkv_same_dim", True)
        and attn.q_proj.bias is not None
        and attn.k_proj.bias is not None
        and attn.v_proj.bias is not None
        and attn.head_dim * attn.num_heads == attn.embed_dim
    )


def layer_supported(layer, cross: bool) -> bool:
    if any(getattr(layer, name, None) is not None for name in _EXTRAS):
        return False
    if getattr(layer, "cross_self_attention", False) or getattr(layer, "return_fc", False):
        return False
    if not _attention_supported(layer.self_attn):
        return False
    return not cross or _attention_supported(getattr(layer, "encoder_attn", None))


def usable(module: torch.nn.Module, layers, cross: bool) -> bool:
    """The fused path applies: eval mode, no autograd, every layer of a supported configuration."""
    if module.training or torch.is_grad_enabled():
        return False
    return all(layer_supported(layer, cross) for layer in layers)


# ---------------------------------------------------------------------------------------------- packed weights
def _packed(attn, names: Tuple[str, ...]) -> Tuple[Tensor, Tensor]:
    """Concatenated weight and bias of ``attn``'s projections ``names`` (e.g. q, k, v), cached on the module and
    rebuilt whenever one of them changes (optimizer step, load_state_dict, dtype or device move)."""
    projs = [getattr(attn, f"{n}_proj") for n in names]
    key = tuple((p.weight.data_ptr(), p.weight._version, p.bias.data_ptr(), p.bias._version) for p in projs)
    cache = attn.__dict__.setdefault("_fused_packed", {})
    hit = cache.get(names)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    weight = torch.cat([p.weight for p in projs]).detach()
    bias = torch.cat([p.bias for p in projs]).detach()
    cache[names] = (key, weight, bias)
    return weight, bias


def _split_heads(x: Tensor, parts: int, heads: int) -> Tuple[Tensor, ...]:
    """(B, T, parts * C) -> ``parts`` tensors (B, heads, T, C / heads)."""
    b, t, c = x.shape
    return tuple(x.view(b, t, parts, heads, c // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0))


def _merge_heads(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def key_padding_to_mask(padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, S) True = padding -> boolean SDPA mask (B, 1, 1, S), True = attend; None when nothing is padded."""
    if padding_mask is None or not bool(padding_mask.any()):
        return None
    return ~padding_mask[:, None, None, :]


def _sublayer(layer, norm, x: Tensor, fn) -> Tensor:
    """fairseq's residual block: x + f(x) then LayerNorm (post-norm), or x + f(LayerNorm(x)) (pre-norm)."""
    if layer.normalize_before:
        return x + fn(norm(x))
    return norm(x + fn(x))


def _ffn(layer, x: Tensor) -> Tensor:
    return layer.fc2(layer.activation_fn(layer.fc1(x)))


def _self_attention(attn, x: Tensor, mask: Optional[Tensor], causal: bool = False) -> Tensor:
    w, b = _packed(attn, ("q", "k", "v"))
    q, k, v = _split_heads(F.linear(x, w, b), 3, attn.num_heads)
    if causal and mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out_proj(_merge_heads(out))


# ---------------------------------------------------------------------------------------------- encoder
def encode(encoder, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> Dict[str, List[Tensor]]:
    """fairseq ``TransformerEncoder.forward`` (same returned dict) with fused layers; eval mode only."""
    padding_mask = src_tokens.eq(encoder.padding_idx)
    x, embedding = encoder.forward_embedding(src_tokens)  # fairseq's: scale, positions, (layernorm)
    mask = key_padding_to_mask(padding_mask)
    if mask is not None:
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    for layer in encoder.layers:  # batch-first
        x = _sublayer(layer, layer.self_attn_layer_norm, x, lambda h: _self_attention(layer.self_attn, h, mask))
        x = _sublayer(layer, layer.final_layer_norm, x, lambda h: _ffn(layer, h))
    if encoder.layer_norm is not None:
        x = encoder.layer_norm(x)
    return {
        "encoder_out": [x.transpose(0, 1)],  # T x B x C, as fairseq
        "encoder_padding_mask": [padding_mask],
        "encoder_embedding": [embedding],
        "encoder_states": [],
        "fc_results": [],
        "src_tokens": [],
        "src_lengths": [(~padding_mask).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()],
    }


# ---------------------------------------------------------------------------------------------- decoder
class FusedDecoder:
    """A stack of fairseq ``TransformerDecoderLayer`` s attending to one encoder output, for one batch.

    ``forward`` runs all positions at once (causal self-attention); ``step`` one position at a time with a
    key/value cache (``max_len`` positions, preallocated). The source keys/values are projected once here.
    """

    def __init__(self, layers, encoder_out: Tensor, encoder_padding_mask: Optional[Tensor], max_len: int = 0):
        self.layers = list(layers)
        enc = encoder_out.transpose(0, 1)  # (B, S, C)
        self.enc_mask = key_padding_to_mask(encoder_padding_mask)
        self.enc_kv = []
        for layer in self.layers:
            w, b = _packed(layer.encoder_attn, ("k", "v"))
            self.enc_kv.append(_split_heads(F.linear(enc, w, b), 2, layer.encoder_attn.num_heads))
        self.cache: List[Tuple[Tensor, Tensor]] = []
        if max_len > 0:
            bsz = enc.size(0)
            for layer in self.layers:
                a = layer.self_attn
                shape = (bsz, a.num_heads, max_len, a.head_dim)
                self.cache.append((enc.new_empty(shape), enc.new_empty(shape)))

    def _cross(self, i: int, layer, x: Tensor) -> Tensor:
        a = layer.encoder_attn
        q = _split_heads(a.q_proj(x), 1, a.num_heads)[0]
        k, v = self.enc_kv[i]
        return a.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=self.enc_mask)))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, T, C) -> (B, T, C): every position, causal self-attention; padded keys (B, T) masked."""
        mask = None
        if padding_mask is not None and bool(padding_mask.any()):
            t = x.size(1)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = causal & ~padding_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = _sublayer(layer, layer.self_attn_layer_norm, x,
                          lambda h: _self_attention(layer.self_attn, h, mask, causal=True))
            x = _sublayer(layer, layer.encoder_attn_layer_norm, x, lambda h: self._cross(i, layer, h))
            x = _sublayer(layer, layer.final_layer_norm, x, lambda h: _ffn(layer, h))
        return x

    def step(self, x: Tensor, t: int) -> Tensor:
        """(B, 1, C) input of position ``t`` -> (B, 1, C), attending to the cached positions 0..t."""
        for i, layer in enumerate(self.layers):
            x = _sublayer(layer, layer.self_attn_layer_norm, x, lambda h: self._cached_self_attention(i, layer, h, t))
            x = _sublayer(layer, layer.encoder_attn_layer_norm, x, lambda h: self._cross(i, layer, h))
            x = _sublayer(layer, layer.final_layer_norm, x, lambda h: _ffn(layer, h))
        return x

    def _cached_self_attention(self, i: int, layer, x: Tensor, t: int) -> Tensor:
        a = layer.self_attn
        w, b = _packed(a, ("q", "k", "v"))
        q, k, v = _split_heads(F.linear(x, w, b), 3, a.num_heads)
        keys, values = self.cache[i]
        keys[:, :, t : t + 1] = k
        values[:, :, t : t + 1] = v
        out = F.scaled_dot_product_attention(q, keys[:, :, : t + 1], values[:, :, : t + 1])
        return a.out_proj(_merge_heads(out))
