"""The parallel latent predictor (``--latent-predictor parallel``; beyond the paper, after latent-GLAT, Bao et al.
2022): the number of latents L from the length classifier, then all L codes in one non-causal pass.

    input_j = h_x[round(j * (S - 1) / (L - 1))] + pos_j + remaining(L - j)      (uniform copy of the source
                                                                                 encoding, fairseq NAT's copy)
    p(c_j | x, L) = softmax(W h_j),  h = non-causal TransformerDecoderLayers(input) attending to h_x

Trained with **glancing** on the latents (Qian et al. 2021, eq.5-6, on latent codes as latent-GLAT does): a first
pass without gradient predicts every code; for a sentence with d(c, c_hat) wrong codes, N = ceil(R * d) of its
latent positions chosen uniformly at random get the reference latent (the bottleneck's quantized vector) as
input instead of the copy, and the second pass is trained on the other positions only. At inference nothing is
glanced: encode, predict the length, one latent pass, one decoder pass. Its output layer has the K codes only:
there is no END symbol, the length classifier decides the number of latents.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent_predictor import LatentPredictorBase, unpack_encoder_out


def random_positions(real: Tensor, n: Tensor) -> Tensor:
    """A uniformly random subset of ``n[b]`` (B,) of the True positions of each row of ``real`` (B, T): the n
    smallest of i.i.d. uniform scores over the real positions (all of them where n exceeds their number)."""
    scores = torch.rand(real.shape, device=real.device).masked_fill(~real, 2.0)
    rank = scores.argsort(1).argsort(1)
    return (rank < n.unsqueeze(1)) & real


def glancing_count(wrong: Tensor, ratio: float) -> Tensor:
    """N = ceil(R * d) per row, d the number of True entries of ``wrong`` (B, T) (GLAT eq.6, adaptive)."""
    return torch.ceil(ratio * wrong.sum(1).float()).long()


class ParallelLatentPredictor(LatentPredictorBase):
    parallel = True

    def __init__(self, args, num_layers: int, num_codes: int, num_blocks: int, max_latents: int,
                 glancing_ratio: float = 0.5):
        super().__init__(args, num_layers, num_codes, num_blocks, max_latents, num_codes, predict_length=True)
        if not 0.0 <= glancing_ratio <= 1.0 or math.isnan(glancing_ratio):
            raise ValueError(f"--latent-glancing-ratio must be in [0, 1], got {glancing_ratio}")
        self.glancing_ratio = glancing_ratio

    def _inputs(self, encoder_out: Dict, lengths: Tensor, width: int) -> Tensor:
        """(B, width, H): the source encoding copied uniformly onto each sentence's ``lengths`` latent positions
        (positions past a sentence's length repeat its last source position)."""
        enc, enc_mask = unpack_encoder_out(encoder_out)  # (S, B, H)
        src_lengths = enc.new_full((enc.size(1),), enc.size(0), dtype=torch.long) if enc_mask is None \
            else (~enc_mask).sum(1)
        j = torch.arange(width, device=enc.device).unsqueeze(0).float()
        step = (src_lengths - 1).float() / (lengths - 1).clamp(min=1).float()
        index = torch.round(j * step.unsqueeze(1)).long().clamp(max=enc.size(0) - 1)
        index = torch.minimum(index, (src_lengths - 1).unsqueeze(1))
        if enc_mask is not None:  # fairseq pads the source on the left or the right: index its real positions
            index = index + enc_mask.int().argmin(1).unsqueeze(1)  # the first real position
        batch = torch.arange(enc.size(1), device=enc.device).unsqueeze(1)
        return enc[index, batch]

    def _pass(self, x: Tensor, latent_padding_mask: Tensor, lengths: Tensor, encoder_out: Dict) -> Tensor:
        x = self._embed(x, lengths=lengths).transpose(0, 1)
        enc, enc_mask = unpack_encoder_out(encoder_out)
        for layer in self.layers:
            x, _, _ = layer(x, enc, enc_mask, self_attn_padding_mask=latent_padding_mask)
        return self._logits(x.transpose(0, 1))

    def forward(self, latents: Tensor, latent_padding_mask: Tensor, encoder_out: Dict,
                reference: Optional[Tensor] = None, guess: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits (B, L, num_blocks, K) of every latent position in one pass, and the (B, L) mask of the glanced
        positions (no loss there). ``latents`` (B, L, H): the reference latents, fed only at glanced positions;
        ``reference`` (B, L, num_blocks): their codes, to count wrong predictions; ``guess``: the first pass's
        codes where already computed (``guess``). Glancing happens in training
        mode with a ratio > 0 and ``reference`` given; otherwise nothing is glanced."""
        lengths = (~latent_padding_mask).sum(1)
        x = self._inputs(encoder_out, lengths, latents.size(1)).to(latents.dtype)
        glanced = torch.zeros_like(latent_padding_mask)
        if self.training and self.glancing_ratio > 0 and reference is not None:
            with torch.no_grad():
                guess = self._pass(x, latent_padding_mask, lengths, encoder_out).argmax(-1) if guess is None \
                    else guess
                wrong = (guess != reference).any(-1) & ~latent_padding_mask
                glanced = random_positions(~latent_padding_mask, glancing_count(wrong, self.glancing_ratio))
            x = torch.where(glanced.unsqueeze(-1), latents, x)
        return self._pass(x, latent_padding_mask, lengths, encoder_out), glanced

    @torch.no_grad()
    def guess(self, latent_padding_mask: Tensor, encoder_out: Dict) -> Tensor:
        """(B, L, num_blocks): the most probable code of every latent position given the reference number of
        latents, nothing glanced (the first pass of glancing; in training mode, with dropout)."""
        lengths = (~latent_padding_mask).sum(1)
        x = self._inputs(encoder_out, lengths, latent_padding_mask.size(1))
        return self._pass(x, latent_padding_mask, lengths, encoder_out).argmax(-1)

    @torch.no_grad()
    def generate(
        self, encoder_out: Dict, embed_codes, max_latents: int, batch_size: int,
        sample: Optional[Tensor] = None, temperature: float = 1.0, end_penalty: float = 0.0,
        budgets: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """One pass: the length classifier's number of latents (at most ``budgets`` (B,); or ``lengths`` (B,) where
        given, a length beam), then every code at once -- the most probable, or for the rows where ``sample`` (B,)
        is True drawn from softmax(logits / temperature) (noisy parallel decoding). Same signature and returns as
        ``LatentPredictor.generate``: codes, latent padding mask, and the model's own log-probability of the
        length plus the codes."""
        lengths, length_lp = self._lengths(encoder_out, max_latents, end_penalty, budgets, lengths)
        width = int(lengths.max())
        pad = torch.arange(width, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)
        x = self._inputs(encoder_out, lengths, width)
        lprobs = F.log_softmax(self._pass(x, pad, lengths, encoder_out).float(), dim=-1)  # (B, L, blocks, K)
        codes = lprobs.argmax(-1)
        if sample is not None:
            drawn = torch.multinomial(F.softmax(lprobs.flatten(0, 2) / temperature, dim=-1), 1).view_as(codes)
            codes = torch.where(sample.view(-1, 1, 1), drawn, codes)
        chosen = lprobs.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B, L)
        scores = chosen.masked_fill(pad, 0.0).sum(1) + length_lp
        codes = codes.masked_fill(pad.unsqueeze(-1), 0)
        return (codes[..., 0] if self.num_blocks == 1 else codes), pad, scores
