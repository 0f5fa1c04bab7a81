"""The parallel decoder (Kaiser et al. 2018, t2t ``transformer_nat``): latents -> every target token in one pass.

    Decompressor(z_q) --> d (n positions) --shift right, causal transformer decoder, attends h_x--> tokens

and decoding: the latent predictor's codes (or given ones) decoded in one parallel pass, the most probable token
at each position. A mixin of ``LatentDecoder``, which owns the modules it uses: ``decompressor``, ``layers``,
``layer_norm``, ``positions``, ``embed_tokens`` / ``output_projection``, ``latent_predictor``, ``bottleneck``.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent_predictor import causal_mask, unpack_encoder_out

# logits computed at once when decoding (1M fp32 = 4 MB): rows per chunk = this // vocabulary size
_CHUNK_LOGITS = 1 << 20


class ParallelDecoder:
    def decode(self, latents: Tensor, latent_pad: Tensor, encoder_out: Dict, gold: Optional[Tensor] = None,
               masking: float = 1.0, length: Optional[int] = None) -> Tensor:
        """Latents (B, L, H) -> decoder states (B, T, H) in one parallel pass (``output_layer`` gives the token
        logits), T = L * 2^nc or ``length`` if smaller.

        Each decompressed position is replaced by the gold target embedding with probability 1 - masking
        (t2t: ``mask = masking < U``), then shifted right into a causal transformer decoder. The decoder is causal,
        so positions past ``length`` (the batch's longest target, or the decoding budget) would not change the
        earlier ones: they are not computed."""
        d, pad = self.decompressor(latents.masked_fill(latent_pad.unsqueeze(-1), 0.0), latent_pad)  # pad: None if none
        if gold is not None and masking < 1.0:
            use_gold = torch.rand(d.shape[:2], device=d.device) >= masking
            d = torch.where(use_gold.unsqueeze(-1), self.embed(gold).to(d.dtype), d)
        x = torch.cat([d.new_zeros(d.size(0), 1, d.size(2)), d[:, :-1]], dim=1)  # shift right
        if length is not None and length < x.size(1):
            x = x[:, :length]
            pad = None if pad is None else pad[:, :length]
        x = self.dropout(x + self.positions[: x.size(1)].to(x.dtype).unsqueeze(0))
        enc, enc_mask = unpack_encoder_out(encoder_out)
        x = x.transpose(0, 1)
        mask = causal_mask(x.size(0), x.device)
        for layer in self.layers:
            x, _, _ = layer(x, enc, enc_mask, self_attn_mask=mask, self_attn_padding_mask=pad)
        x = x.transpose(0, 1)
        return x if self.layer_norm is None else self.layer_norm(x)

    def output_layer(self, features):
        weight = self.embed_tokens.weight if self.output_projection is None else self.output_projection.weight
        return F.linear(features, weight)

    @torch.no_grad()
    def generate(self, encoder_out: Dict, max_target_len: int, latent_budget: Optional[Tensor] = None,
                 sample: Optional[Tensor] = None, token_budget: Optional[Tensor] = None,
                 codes: Optional[Tensor] = None, latent_pad: Optional[Tensor] = None,
                 latent_lengths: Optional[Tensor] = None):
        """Predict the latents with the latent predictor (autoregressive: greedy, cached, early stop at END;
        parallel: one pass; rows flagged in ``sample`` draw their codes instead), then decode all target
        positions in one parallel pass. ``latent_lengths`` (B,): the numbers of latents to predict (a length beam
        of the parallel predictor).

        ``codes`` (B, L[, blocks]) with their ``latent_pad``: decode these latents instead of predicted ones
        (teacher-forced decoding with ``reference_codes``: the bound a perfect latent predictor would reach);
        their latent score is 0.

        Only the positions a hypothesis can use (its latents × 2^nc, at most ``token_budget``) go through the
        output projection and softmax, packed across the batch: the padded remainder of the batch's longest
        latent sequence is never projected onto the vocabulary.

        Returns token ids (B, T) (pad past each span), a per-position log-prob (B, T), the latent padding mask
        (B, L), the codes and the latent log-probabilities (B,)."""
        enc, _ = unpack_encoder_out(encoder_out)
        if codes is None:
            given = {} if latent_lengths is None else {"lengths": latent_lengths}  # a length beam's
            codes, latent_pad, latent_scores = self.latent_predictor.generate(
                encoder_out, self.bottleneck.embed_codes, self.latent_limit(max_target_len), enc.size(1),
                sample=sample, budgets=latent_budget, **given)
        else:
            if latent_pad is None or latent_pad.shape != codes.shape[:2]:
                raise ValueError("generate(codes=...) needs their latent padding mask (B, L)")
            latent_scores = torch.zeros(codes.size(0), device=codes.device)
        if latent_budget is not None:  # per-sentence budgets, applied before decoding (batching invariance)
            positions = torch.arange(latent_pad.size(1), device=latent_pad.device).unsqueeze(0)
            latent_pad = latent_pad | (positions >= latent_budget.unsqueeze(1))
        latents = self.bottleneck.embed_codes(codes).to(enc.dtype)
        span = (~latent_pad).sum(1) * self.factor
        if token_budget is not None:
            span = torch.minimum(span, token_budget)
        spans = span.tolist()
        length = max(spans)
        features = self.decode(latents, latent_pad, encoder_out, length=length)
        if min(spans) == length:  # every row uses every position (always at batch 1): no packing
            best, best_tokens = self.best_tokens(features.reshape(-1, features.size(-1)))
            return best_tokens.view(features.shape[:2]), best.view(features.shape[:2]), latent_pad, codes, \
                latent_scores
        used = torch.arange(length, device=span.device).unsqueeze(0) < span.unsqueeze(1)
        best, best_tokens = self.best_tokens(features[used])
        tokens = torch.full(used.shape, self.padding_idx, dtype=torch.long, device=features.device)
        scores = torch.zeros(used.shape, device=features.device)
        tokens[used] = best_tokens
        scores[used] = best
        return tokens, scores, latent_pad, codes, latent_scores

    def latent_limit(self, max_target_len: int) -> int:
        """The most latents a decoding of at most ``max_target_len`` tokens predicts (≥ 1, within the model)."""
        return max(1, min((max_target_len + self.factor - 1) // self.factor, self.latent_predictor.max_latents))

    def best_tokens(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        """Decoder states (R, H) -> the most probable token of each (never <pad> or <s>) and its log-probability
        (fp32), the softmax normalised over the other tokens.

        In chunks of rows whose (rows x V) logits fit in cache, each projected, normalised and reduced before
        the next, instead of one (R x V) matrix whose passes go to memory.
        """
        r = features.size(0)
        best = torch.empty(r, device=features.device)
        tokens = torch.empty(r, dtype=torch.long, device=features.device)
        special = torch.tensor([self.padding_idx, self.dictionary.bos()], device=features.device)
        step = max(16, _CHUNK_LOGITS // len(self.dictionary))
        for i in range(0, r, step):
            logits = self.output_layer(features[i : i + step]).index_fill_(1, special, float("-inf"))
            lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
            torch.max(lprobs, dim=-1, out=(best[i : i + step], tokens[i : i + step]))
        return best, tokens
