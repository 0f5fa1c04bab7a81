"""Inference-only execution of fairseq's transformer layers with fewer, fused PyTorch ops.

At decoding time the Latent Transformer runs tiny matrix products (one sentence, a handful of positions), where
fairseq's layer code spends most of its time in Python and in small ops: ``MultiheadAttention``'s incremental-state
dictionaries and shape checks, one linear per projection, (T, B, C) <-> (B, T, C) transposes (measured at batch
1: 0.8 ms per latent-predictor step, 0.25 ms per encoder layer). This module runs the *same* fairseq layers —
their parameters, LayerNorms and activation functions — as

- plain tensor functions: each layer is resolved once into its parameters (``_Layer``), cached until a module or
  parameter is reassigned anywhere, so decoding steps make no ``nn.Module`` calls;
- q, k, v (and the source's k, v) as one GEMM over concatenated weights, cached until a parameter changes;
- attention by ``F.scaled_dot_product_attention`` in batch-first layout;
- the latent predictor's self-attention cache as preallocated (B, heads, L, d) tensors written in place, and
  the source keys/values of encoder-decoder attention computed once per batch (all layers in one product)
  instead of once per step;
- on CPU in fp32, the larger matrix products (rows x outputs >= ``_PACKED_MIN``: batched decoding, the
  vocabulary projection) through oneDNN with the weight reordered once into its blocked layout and cached
  (``linear``; the ReLU of the feed-forward block fused in), and attention over many query rows as two batched
  matrix products around a softmax (``attend``), where ``scaled_dot_product_attention``'s CPU kernel is slower.
  The same fp32 arithmetic, summed in another order: results agree to rounding.

It applies in eval mode without autograd (``usable``), to the layer configurations it implements: fairseq's
transformer layers, pre- or post-norm, any activation, without the NormFormer/quant-noise/bias-kv extras; a
model with anything else decodes through fairseq's own forward. ``tests/test_fused_inference.py`` checks each
path against fairseq's layers.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modules.weight_state import derived, reuse, state_key

# attributes of fairseq's layers that this module does not implement: any of them set -> fairseq's forward
_EXTRAS = ("c_attn", "attn_ln", "ffn_layernorm", "w_resid")


def _get(module, name: str, default=None):
    """``getattr(module, name, default)`` without ``nn.Module.__getattr__`` (which raises, and is slow, for a
    missing name): ``usable`` runs for every batch, ``_Layer`` resolves every layer once per batch."""
    d = module.__dict__
    for store in ("_parameters", "_modules", "_buffers"):
        if name in d[store]:
            return d[store][name]
    return d.get(name, default)


def _linear_supported(proj) -> bool:
    """A plain ``Linear`` whose weight and bias are parameters (not e.g. computed by a weight-norm hook)."""
    return proj is not None and _get(proj, "weight") is not None and _get(proj, "bias") is not None


def _attention_supported(attn) -> bool:
    return (
        attn is not None
        and _get(attn, "bias_k") is None
        and not _get(attn, "add_zero_attn", False)
        and _get(attn, "qkv_same_dim", True)
        and all(_linear_supported(_get(attn, f"{n}_proj")) for n in "qkv")
        and _get(attn, "head_dim") * _get(attn, "num_heads") == _get(attn, "embed_dim")
    )


def layer_supported(layer, cross: bool) -> bool:
    if any(_get(layer, name) is not None for name in _EXTRAS):
        return False
    if _get(layer, "cross_self_attention", False) or _get(layer, "return_fc", False):
        return False
    if not _attention_supported(_get(layer, "self_attn")):
        return False
    return not cross or _attention_supported(_get(layer, "encoder_attn"))


# Bumped whenever any module or parameter is assigned or registered anywhere (torch's global registration hooks):
# what ``usable`` and ``resolve`` derive from a layer's structure is cached per layer and rebuilt only then. In-place
# changes of parameters (optimizer steps, ``load_state_dict``, ``.to()``) keep the same Parameter objects, which
# the cached structures hold; the weights derived from them (packed q/k/v, blocked GEMM weights) are checked
# against their versions on every use.
_structure_generation = 0


def _structure_changed(*_args):
    global _structure_generation
    _structure_generation += 1


torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)


def _cached(module, slot: str, build):
    """``build()``, cached on ``module`` until the next module or parameter (re)assignment anywhere."""
    return reuse(derived(module), slot, _structure_generation, build)


def usable(module: torch.nn.Module, layers, cross: bool) -> bool:
    """The fused path applies: eval mode, no autograd, every layer of a supported configuration."""
    if module.training or torch.is_grad_enabled():
        return False
    supported = lambda: all(layer_supported(layer, cross) for layer in layers)  # noqa: E731
    if not isinstance(layers, torch.nn.Module):
        return supported()
    # one cached answer per stack (a ModuleList), rebuilt when a module or parameter is reassigned anywhere
    return _cached(layers, "_fused_usable_cross" if cross else "_fused_usable", supported)


# ---------------------------------------------------------------------------------------------- packed weights
# rows x output features from which a CPU fp32 product runs through oneDNN's prepacked GEMM (measured on the
# 2-core EPYC, 2 threads: a 16 x 128 -> 6,040 vocabulary projection 233 -> 146 us, 64 x 6,040 902 -> 508 us,
# 1,024 x 128 -> 384 580 -> 490 us; below about 64 x 384 the plain GEMM's lower fixed cost wins)
_PACKED_MIN = 32768
_MKLDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None
# batch x query positions from which attention runs as bmm + softmax + bmm on CPU instead of SDPA (64 x 4 heads
# x 16 x 16: 537 -> 163 us; one sentence: SDPA 13 us, bmm 19 us)
_BMM_ATTENTION_MIN = 64


def linear(owner, name: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool = False,
           key: Optional[Tuple] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (then ReLU if ``relu``). Large CPU fp32 products run through oneDNN with
    ``weight`` reordered once into its blocked layout, cached on ``owner`` under ``name`` and rebuilt whenever
    ``weight`` changes (or ``key``, for a weight derived from parameters); everything else (GPU, fp16/bf16,
    small products) is ``F.linear``."""
    rows = x.numel() // max(1, x.size(-1))
    if (
        _MKLDNN_LINEAR is None or x.device.type != "cpu" or x.dtype != torch.float32
        or weight.dtype != torch.float32 or rows * weight.size(0) < _PACKED_MIN
    ):
        out = F.linear(x, weight, bias)
        return F.relu(out) if relu else out
    key = (state_key(weight), weight.shape) if key is None else key
    # the batch-size hint only picks the blocked layout; the packed weight serves any number of rows
    blocked = reuse(derived(owner).setdefault("_fused_mkldnn", {}), name, key,
                    lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64))
    return _MKLDNN_LINEAR(x, blocked, bias, "relu" if relu else "none", [], "")


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) [masked]) v for (B, heads, T, d) inputs; ``mask`` boolean, True = attend,
    broadcastable to (B, heads, Tq, Tk); ``causal`` (used when ``mask`` is None): query i sees keys <= i."""
    b, _, tq, d = q.shape
    if q.device.type != "cpu" or b * tq < _BMM_ATTENTION_MIN:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(d**-0.5)
    if mask is None and causal:
        mask = torch.ones(tq, k.size(2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _block_width(n: int) -> int:
    """A divisor of ``n`` in [32, 256] (the closest to 64), or 0."""
    widths = [w for w in range(32, 257) if n % w == 0]
    return min(widths, key=lambda w: abs(w - 64)) if widths else 0


_ROW_MAX_MIN_ROWS = 32


def row_max(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.max(x, dim=-1)`` of a (rows, n) matrix: the maximum of each row and the first index holding it.

    On CPU, ``max`` with indices walks each row one element at a time while ``amax`` is vectorised (a 173 x 6,040
    matrix: 448 vs 35 us). So in two levels: ``amax`` over blocks of w columns, the first block holding the
    row's maximum, then the first maximum inside that block (173 x 6,040 after ``log_softmax``: 1,175 -> 745 us).
    The same values and indices, first occurrence on ties included. Below ``_ROW_MAX_MIN_ROWS`` rows the second
    level's fixed cost outweighs the saving (20 x 6,040: ``max`` 58 us, two levels 74 us; 60 rows: 160 vs 128 us).
    """
    rows, n = x.shape
    w = _block_width(n)
    if x.device.type != "cpu" or rows < _ROW_MAX_MIN_ROWS or w == 0:
        return torch.max(x, dim=-1)
    blocks = x.view(rows, n // w, w)
    best, block = torch.max(torch.amax(blocks, dim=-1), dim=-1)
    _, inner = torch.max(blocks[torch.arange(rows, device=x.device), block], dim=-1)
    return best, block * w + inner


def _packed(attn, names: Tuple[str, ...]) -> Tuple[Tensor, Tensor, Tuple]:
    """Concatenated weight and bias of ``attn``'s projections ``names`` (e.g. q, k, v), cached on the module and
    rebuilt whenever one of them changes (optimizer step, load_state_dict, dtype or device move); and the key
    that identifies the parameters' state (``state_key``)."""
    params = _proj_params(attn, names)
    key = state_key(*params)
    n = len(names)
    weight, bias = reuse(derived(attn).setdefault("_fused_packed", {}), names, key,
                         lambda: (torch.cat(params[:n]).detach(), torch.cat(params[n:]).detach()))
    return weight, bias, key


def _proj_params(attn, names: Tuple[str, ...]) -> List[Tensor]:
    """The weights, then the biases, of ``attn``'s projections ``names``."""
    params = [_sub(attn, f"{n}_proj")._parameters for n in names]
    return [p["weight"] for p in params] + [p["bias"] for p in params]


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


# ---------------------------------------------------------------------------------------------- resolved layers
class _Proj:
    """One projection (a ``Linear``, or several packed into one) with its weights looked up once per batch;
    ``__call__`` is ``linear`` with the small-product test first (the common case at batch 1)."""

    __slots__ = ("owner", "name", "names", "params", "weight", "bias", "key", "out_features")

    def __init__(self, owner, name: str, weight: Tensor, bias: Optional[Tensor], key: Optional[Tuple] = None):
        self.owner, self.name, self.weight, self.bias, self.key = owner, name, weight, bias, key
        self.out_features = weight.size(0)

    @classmethod
    def of(cls, module: torch.nn.Linear) -> "_Proj":
        params = module._parameters
        return cls(module, "weight", params["weight"], params["bias"])

    @classmethod
    def packed(cls, attn, names: Tuple[str, ...]) -> "_Proj":
        proj = cls(attn, "".join(names), *_packed(attn, names))
        proj.names = names
        # the Parameter objects, in _packed's key order: the same objects as long as this resolved form is (a
        # reassignment rebuilds it), so their state alone tells whether to re-pack
        proj.params = _proj_params(attn, names)
        return proj

    def refresh(self):
        """Re-pack the weights of a packed projection if one of its parameters changed (in place or moved)."""
        if state_key(*self.params) != self.key:
            self.weight, self.bias, self.key = _packed(self.owner, self.names)

    def __call__(self, x: Tensor, relu: bool = False) -> Tensor:
        if x.numel() // x.shape[-1] * self.out_features < _PACKED_MIN:
            out = F.linear(x, self.weight, self.bias)
            return torch.relu_(out) if relu else out
        return linear(self.owner, self.name, x, self.weight, self.bias, relu, key=self.key)


class _LayerNormFn:
    """``torch.nn.LayerNorm`` as a plain call on its parameters. An object, not a closure: ``copy.deepcopy`` of a
    model (fairseq's EMA, user code) maps its parameters to the copy's, which it cannot do inside a lambda."""

    __slots__ = ("shape", "weight", "bias", "eps")

    def __init__(self, module: torch.nn.LayerNorm):
        params = module._parameters
        self.shape, self.weight, self.bias, self.eps = module.normalized_shape, params["weight"], params["bias"], \
            module.eps

    def __call__(self, x: Tensor) -> Tensor:
        return torch.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def _norm(module):
    """A LayerNorm as a plain function call (``torch.nn.LayerNorm``: ``F.layer_norm`` on its parameters)."""
    return _LayerNormFn(module) if type(module) is torch.nn.LayerNorm else module


def _sub(module, name: str):
    return module._modules[name]


class _Layer:
    """A fairseq transformer encoder or decoder layer's parameters, resolved once (``resolve``): decoding steps
    then call functions on tensors, not modules (whose ``__call__`` costs more than the op at batch 1)."""

    @classmethod
    def resolve(cls, layer, cross: bool) -> "_Layer":
        """The layer's resolved form, cached until a module or parameter is reassigned; its packed q/k/v (and
        source k/v) weights are re-checked against the parameters' versions here, once per batch."""
        resolved = _cached(layer, "_fused_layer_cross" if cross else "_fused_layer", lambda: cls(layer, cross))
        resolved.qkv.refresh()
        if cross:
            resolved.cross_kv.refresh()
        return resolved

    def __init__(self, layer, cross: bool):
        sa = _sub(layer, "self_attn")
        self.pre_norm = layer.normalize_before
        self.heads = sa.num_heads
        self.qkv, self.self_out = _Proj.packed(sa, ("q", "k", "v")), _Proj.of(_sub(sa, "out_proj"))
        self.self_norm = _norm(_sub(layer, "self_attn_layer_norm"))
        if cross:
            ea = _sub(layer, "encoder_attn")
            self.cross_heads = ea.num_heads
            self.cross_q, self.cross_kv = _Proj.of(_sub(ea, "q_proj")), _Proj.packed(ea, ("k", "v"))
            self.cross_out = _Proj.of(_sub(ea, "out_proj"))
            self.cross_norm = _norm(_sub(layer, "encoder_attn_layer_norm"))
        self.fc1, self.fc2 = _Proj.of(_sub(layer, "fc1")), _Proj.of(_sub(layer, "fc2"))
        self.ffn_norm = _norm(_sub(layer, "final_layer_norm"))
        self.activation = None if layer.activation_fn is F.relu else layer.activation_fn  # None: ReLU, fused

    def sublayer(self, norm, x: Tensor, fn, *args) -> Tensor:
        """fairseq's residual block: x + f(x) then LayerNorm (post-norm), or x + f(LayerNorm(x)) (pre-norm)."""
        if self.pre_norm:
            return x + fn(norm(x), *args)
        return norm(x + fn(x, *args))

    def self_attention(self, x: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        q, k, v = _split_heads(self.qkv(x), 3, self.heads)
        return self.self_out(_merge_heads(attend(q, k, v, mask, causal)))

    def ffn(self, x: Tensor) -> Tensor:
        if self.activation is None:
            return self.fc2(self.fc1(x, relu=True))
        return self.fc2(self.activation(self.fc1(x)))


# ---------------------------------------------------------------------------------------------- encoder
def encode(encoder, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> Dict[str, List[Tensor]]:
    """fairseq ``TransformerEncoder.forward`` (same returned dict) with fused layers; eval mode only."""
    padding_mask = src_tokens.eq(encoder.padding_idx)
    x, embedding = encoder.forward_embedding(src_tokens)  # fairseq's: scale, positions, (layernorm)
    mask = key_padding_to_mask(padding_mask)
    if mask is not None:
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    for layer in encoder.layers:  # batch-first
        r = _Layer.resolve(layer, cross=False)
        x = r.sublayer(r.self_norm, x, r.self_attention, mask, False)
        x = r.sublayer(r.ffn_norm, x, r.ffn)
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


def run_encoder(encoder, src_tokens: Tensor, src_lengths: Tensor, fused: bool = True) -> Dict[str, List[Tensor]]:
    """A fairseq transformer encoder's output dict: through ``encode`` where the fused path is usable (same
    result, fewer ops), else the encoder's own forward."""
    if fused and usable(encoder, encoder.layers, cross=False):
        return encode(encoder, src_tokens, src_lengths)
    return encoder(src_tokens, src_lengths=src_lengths)


# ---------------------------------------------------------------------------------------------- decoder
def decoder_features(decoder, prev_output_tokens: Tensor, encoder_out: Dict[str, List[Tensor]]) -> Tensor:
    """fairseq ``TransformerDecoder.extract_features(prev_output_tokens, encoder_out)[0]`` (teacher forcing: every
    position at once, causal) with fused layers; eval mode, a decoder without ``cross_self_attention``. Used to
    score candidate translations with an autoregressive teacher (noisy parallel decoding)."""
    x = decoder.embed_scale * decoder.embed_tokens(prev_output_tokens)
    if decoder.project_in_dim is not None:
        x = decoder.project_in_dim(x)
    if decoder.embed_positions is not None:
        x = x + decoder.embed_positions(prev_output_tokens)
    if decoder.layernorm_embedding is not None:
        x = decoder.layernorm_embedding(x)
    enc_mask = encoder_out["encoder_padding_mask"]
    fused = FusedDecoder(decoder.layers, encoder_out["encoder_out"][0], enc_mask[0] if len(enc_mask) else None)
    x = fused.forward(x, prev_output_tokens.eq(decoder.padding_idx))
    if decoder.layer_norm is not None:
        x = decoder.layer_norm(x)
    if decoder.project_out_dim is not None:
        x = decoder.project_out_dim(x)
    return x


def _stacked_source_kv(owner, resolved: List[_Layer]) -> _Proj:
    """The encoder-attention k/v projections of all ``resolved`` layers as one projection, cached on ``owner``
    (the layers' container) while every layer's packed k/v weights are unchanged."""
    key = tuple(r.cross_kv.key for r in resolved)

    def build():
        weight = torch.cat([r.cross_kv.weight for r in resolved])
        bias = torch.cat([r.cross_kv.bias for r in resolved])
        return _Proj(owner, "source_kv", weight, bias, key)

    return reuse(derived(owner), "_fused_source_kv", key, build) if isinstance(owner, torch.nn.Module) else build()


class FusedDecoder:
    """A stack of fairseq ``TransformerDecoderLayer`` s attending to one encoder output, for one batch.

    ``forward`` runs all positions at once (causal self-attention); ``step`` one position at a time with a
    key/value cache (``max_len`` positions, preallocated). The source keys/values of every layer are projected
    here, once, in one product (the layers' k/v weights stacked: one sentence, 3 layers: 75 -> 30 us).
    """

    def __init__(self, layers, encoder_out: Tensor, encoder_padding_mask: Optional[Tensor], max_len: int = 0):
        self.layers = [_Layer.resolve(layer, cross=True) for layer in layers]
        enc = encoder_out.transpose(0, 1)  # (B, S, C)
        self.enc_mask = key_padding_to_mask(encoder_padding_mask)
        kv = _stacked_source_kv(layers, self.layers)(enc)
        width = kv.size(-1) // len(self.layers)
        self.enc_kv = [_split_heads(kv[..., i * width : (i + 1) * width], 2, r.cross_heads)
                       for i, r in enumerate(self.layers)]
        self.cache: List[Tuple[Tensor, Tensor]] = []
        if max_len > 0:
            bsz = enc.size(0)
            for layer in layers:
                a = layer.self_attn
                shape = (bsz, a.num_heads, max_len, a.head_dim)
                self.cache.append((enc.new_empty(shape), enc.new_empty(shape)))

    def _cross(self, x: Tensor, i: int) -> Tensor:
        r = self.layers[i]
        q = _split_heads(r.cross_q(x), 1, r.cross_heads)[0]
        k, v = self.enc_kv[i]
        return r.cross_out(_merge_heads(attend(q, k, v, self.enc_mask)))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, T, C) -> (B, T, C): every position, causal self-attention; padded keys (B, T) masked."""
        mask = None
        if padding_mask is not None and bool(padding_mask.any()):
            t = x.size(1)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = causal & ~padding_mask[:, None, None, :]
        for i, r in enumerate(self.layers):
            x = r.sublayer(r.self_norm, x, r.self_attention, mask, True)
            x = r.sublayer(r.cross_norm, x, self._cross, i)
            x = r.sublayer(r.ffn_norm, x, r.ffn)
        return x

    def step(self, x: Tensor, t: int) -> Tensor:
        """(B, 1, C) input of position ``t`` -> (B, 1, C), attending to the cached positions 0..t."""
        for i, r in enumerate(self.layers):
            x = r.sublayer(r.self_norm, x, self._cached_self_attention, i, t)
            x = r.sublayer(r.cross_norm, x, self._cross, i)
            x = r.sublayer(r.ffn_norm, x, r.ffn)
        return x

    def _cached_self_attention(self, x: Tensor, i: int, t: int) -> Tensor:
        r = self.layers[i]
        q, k, v = _split_heads(r.qkv(x), 3, r.heads)
        keys, values = self.cache[i]
        keys[:, :, t : t + 1] = k
        values[:, :, t : t + 1] = v
        if t == 0:  # one key: softmax weight exactly 1, the attention output is its value
            return r.self_out(_merge_heads(v))
        return r.self_out(_merge_heads(attend(q, keys[:, :, : t + 1], values[:, :, : t + 1])))
