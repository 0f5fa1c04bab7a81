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
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models.nat.nonautoregressive_transformer import _mean_pooling
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
        super().__init__(args, num_layers, num_codes, num_blocks, max_latents, num_codes)
        self.glancing_ratio = glancing_ratio
        dim = args.decoder_embed_dim
        self.length_output = nn.Linear(dim, max_latents + 1)  # classes 0..max_latents (0: never a target)
        self.remaining = nn.Embedding(max_latents + 1, dim)  # L - j for input position j = 0..L
        nn.init.normal_(self.remaining.weight, std=dim**-0.5)

    def length_logits(self, encoder_out: Dict) -> Tensor:
        """(B, max_latents + 1) logits of the number of latents, from the mean of the source encoding over its
        real positions (fairseq NAT's ``forward_length``)."""
        return self.length_output(_mean_pooling(*unpack_encoder_out(encoder_out)))

    def length_lprobs(self, encoder_out: Dict) -> Tensor:
        """log p(L | x), (B, max_latents + 1), in fp32."""
        return F.log_softmax(self.length_logits(encoder_out).float(), dim=-1)

    def top_lengths(self, encoder_out: Dict, max_latents: int, budgets: Optional[Tensor] = None,
                    beam: int = 1) -> Tuple[Tensor, Tensor]:
        """The ``beam`` most probable numbers of latents in 1..``max_latents`` (each ≤ its sentence's ``budgets``
        (B,), so that a sentence's latents do not depend on the batch) and their log-probabilities, (B, beam)
        each, best first. Where fewer lengths are allowed than ``beam``, the surplus has log-probability -inf."""
        lprobs = self.length_lprobs(encoder_out)[:, 1 : max_latents + 1]
        if budgets is not None:
            allowed = torch.arange(1, lprobs.size(1) + 1, device=lprobs.device).unsqueeze(0) <= \
                budgets.clamp(min=1).unsqueeze(1)
            lprobs = lprobs.masked_fill(~allowed, float("-inf"))
        if beam > lprobs.size(1):
            lprobs = F.pad(lprobs, (0, beam - lprobs.size(1)), value=float("-inf"))
        best, lengths = lprobs.topk(beam, dim=-1)
        return (lengths + 1).clamp(max=max_latents), best

    def _embed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Positions plus the embedding of L - j, the number of latents still to come (a length-aware position,
        Takase & Okazaki 2019)."""
        j = torch.arange(x.size(1), device=lengths.device).unsqueeze(0)
        remaining = self.remaining((lengths.unsqueeze(1) - j).clamp(0, self.max_latents))
        return self.dropout(self._positioned(x) + remaining.to(x.dtype))

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
        x = self._embed(x, lengths).transpose(0, 1)
        enc, enc_mask = unpack_encoder_out(encoder_out)
        for layer in self.layers:
            x, _, _ = layer(x, enc, enc_mask, self_attn_padding_mask=latent_padding_mask)
        return self._logits(x.transpose(0, 1))

    def forward(self, latents: Tensor, latent_padding_mask: Tensor, encoder_out: Dict,
                reference: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits (B, L, num_blocks, K) of every latent position in one pass, and the (B, L) mask of the glanced
        positions (no loss there). ``latents`` (B, L, H): the reference latents, fed only at glanced positions;
        ``reference`` (B, L, num_blocks): their codes, to count wrong predictions. Glancing happens in training
        mode with a ratio > 0 and ``reference`` given; otherwise nothing is glanced."""
        lengths = (~latent_padding_mask).sum(1)
        x = self._inputs(encoder_out, lengths, latents.size(1)).to(latents.dtype)
        glanced = torch.zeros_like(latent_padding_mask)
        if self.training and self.glancing_ratio > 0 and reference is not None:
            with torch.no_grad():
                guess = self._pass(x, latent_padding_mask, lengths, encoder_out).argmax(-1)
                wrong = (guess != reference).any(-1) & ~latent_padding_mask
                glanced = random_positions(~latent_padding_mask, glancing_count(wrong, self.glancing_ratio))
            x = torch.where(glanced.unsqueeze(-1), latents, x)
        return self._pass(x, latent_padding_mask, lengths, encoder_out), glanced

    @torch.no_grad()
    def generate(self, encoder_out: Dict, embed_codes, max_latents: int, batch_size: int,
                 sample: Optional[Tensor] = None, budgets: Optional[Tensor] = None, lengths: Optional[Tensor] = None):
        """One pass: the length classifier's number of latents (at most ``budgets`` (B,); or ``lengths`` (B,) where
        given, a length beam), then every code at once -- the most probable, or for the rows where ``sample`` (B,)
        is True drawn from the softmax (noisy parallel decoding). Returns, as ``LatentPredictor.generate``: codes,
        latent padding mask, and the model's own log-probability of the length plus the codes."""
        if lengths is None:
            lengths, length_lp = (t[:, 0] for t in self.top_lengths(encoder_out, max_latents, budgets))
        else:
            length_lp = self.length_lprobs(encoder_out).gather(1, lengths[:, None])[:, 0]
        width = int(lengths.max())
        pad = torch.arange(width, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)
        x = self._inputs(encoder_out, lengths, width)
        lprobs = F.log_softmax(self._pass(x, pad, lengths, encoder_out).float(), dim=-1)  # (B, L, blocks, K)
        codes = lprobs.argmax(-1)
        if sample is not None:
            drawn = torch.multinomial(F.softmax(lprobs.flatten(0, 2), dim=-1), 1).view_as(codes)
            codes = torch.where(sample.view(-1, 1, 1), drawn, codes)
        chosen = lprobs.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B, L)
        scores = chosen.masked_fill(pad, 0.0).sum(1) + length_lp
        codes = codes.masked_fill(pad.unsqueeze(-1), 0)
        return (codes[..., 0] if self.num_blocks == 1 else codes), pad, scores
