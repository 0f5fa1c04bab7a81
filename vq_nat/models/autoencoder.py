"""The target autoencoder's encoder half (Roy et al. §2.1): target tokens -> compressed vectors z_e -> the
bottleneck's codes.

    target y --embed--> Compressor (residual convs + nc stride-2 convs) [--attend h_x: --ae-attend-source] --> z_e

A mixin of ``LatentDecoder``, which owns the modules it uses: ``embed_tokens``, ``compressor``, ``ae_attention``,
``bottleneck`` (and ``factor`` = 2^nc, ``padding_idx``, ``embed_scale``, ``dropout``).
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent_predictor import unpack_encoder_out


class TargetAutoencoder:
    def pad_to_multiple(self, tokens: Tensor) -> Tensor:
        rem = (-tokens.size(1)) % self.factor
        return F.pad(tokens, (0, rem), value=self.padding_idx) if rem else tokens

    def embed(self, tokens: Tensor) -> Tensor:
        return self.embed_scale * self.embed_tokens(tokens)

    def encode_target(self, tokens: Tensor, encoder_out: Dict):
        """Target tokens (B, T'), T' a multiple of 2^nc -> z_e (B, T'/2^nc, H) and its padding mask."""
        pad = tokens.eq(self.padding_idx)
        z_e, latent_pad = self.compressor(self.dropout(self.embed(tokens)), pad)
        if self.ae_attention is not None:
            enc, enc_mask = unpack_encoder_out(encoder_out)
            z, _, _ = self.ae_attention(z_e.transpose(0, 1), enc, enc_mask, self_attn_padding_mask=latent_pad)
            z_e = z.transpose(0, 1).masked_fill(latent_pad.unsqueeze(-1), 0.0)
        return z_e, latent_pad

    @torch.no_grad()
    def reference_codes(self, target: Tensor, encoder_out: Dict) -> Tuple[Tensor, Tensor]:
        """The autoencoder's own codes of a reference ``target`` (B, T): the latents a perfect latent predictor
        would emit. VQ bottlenecks: the nearest code of every compressed position (eq.1; for soft EM the mode of
        the E-step posterior); the others: their evaluation-mode codes. Returns codes (B, L[, blocks]) and the
        latent padding mask (B, L)."""
        z_e, latent_pad = self.encode_target(self.pad_to_multiple(target), encoder_out)
        nearest = getattr(self.bottleneck, "nearest_codes", None)
        codes = nearest(z_e) if nearest is not None else self.bottleneck(z_e, padding_mask=latent_pad).codes
        return codes, latent_pad
