"""The latent predictor: an autoregressive transformer over the latent codes, conditioned on the source.

Trained with cross-entropy against the bottleneck's codes (one-hot for hard EM, the average of the m sampled
one-hots for soft EM: the paper's label smoothing, §3.2; given as the m codes, ``bottleneck.sampled_codes``).
Its vocabulary is the K codes plus one **end-of-latents** symbol (index K): the latent sequence of a target
of n tokens (EOS included) has ceil(n / 2^nc) codes followed by END, so at inference the predictor decides the
latent length itself and stops early per sentence. With product quantization it predicts the ``num_blocks``
codes of a position with one softmax each (END is read from block 0). Its base class holds what the one-pass
``ParallelLatentPredictor`` shares.

Inputs at training time are the straight-through quantized latents, shifted right behind a learned start
vector (tensor2tensor feeds ``latents_dense`` to its "extra" decoder the same way); at inference the embedding
of the previous predicted code. Built from fairseq's ``TransformerDecoderLayer`` with incremental state.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules import LayerNorm, SinusoidalPositionalEmbedding, TransformerDecoderLayer
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor


def causal_mask(length: int, device) -> Tensor:
    return torch.triu(torch.full((length, length), float("-inf"), device=device), 1)


def end_policy(lprobs: Tensor, t: int, end: int, max_latents: int, budgets: Optional[Tensor] = None) -> Tensor:
    """The one set of rules for where END may stand in a latent sequence, for greedy decoding, sampling and beam
    search alike. ``lprobs`` (R, K + 1): the model's log-probabilities of block 0 at step ``t``; returns the
    scores the choice is made by (a new tensor; the model's own log-probabilities are what is scored):
    no END at t = 0 (every target has a token, so a latent); END only at t = ``max_latents`` or t >= a row's own
    ``budgets`` (R,) (so a sentence's latents never depend on the other sentences of its batch)."""
    choose = lprobs.clone()
    if t == 0:
        choose[:, end] = float("-inf")
    forced = torch.full_like(choose[:, end], t >= max_latents, dtype=torch.bool)
    if budgets is not None:
        forced |= t >= budgets.clamp(min=1)
    choose[:, end] = torch.where(forced, lprobs[:, end], choose[:, end])
    choose[:, :end] = choose[:, :end].masked_fill(forced.unsqueeze(1), float("-inf"))
    return choose


class LatentPredictorBase(nn.Module):
    """What the autoregressive and the parallel latent predictor share: ``num_layers`` fairseq
    ``TransformerDecoderLayer``s attending to the source, sinusoidal positions and an output layer of
    ``num_blocks`` softmaxes over ``num_symbols`` each; with ``start``, the learned start vector of autoregressive
    decoding (created first, so that parameter order and initialisation are those of the model before the parallel
    predictor existed)."""

    def __init__(self, args, num_layers: int, num_codes: int, num_blocks: int, max_latents: int,
                 num_symbols: int, start: bool = False):
        super().__init__()
        dim = args.decoder_embed_dim
        if start:
            self.start = nn.Parameter(torch.zeros(dim))
            nn.init.normal_(self.start, std=dim**-0.5)
        self.max_latents = max_latents
        self.num_codes = num_codes
        self.num_blocks = num_blocks
        self.num_symbols = num_symbols
        self.register_buffer(
            "positions", SinusoidalPositionalEmbedding.get_embedding(max_latents + 2, dim, None), persistent=False
        )
        self.dropout = FairseqDropout(args.dropout, module_name=self.__class__.__name__)
        self.layers = nn.ModuleList(TransformerDecoderLayer(args) for _ in range(num_layers))
        self.layer_norm = LayerNorm(dim) if args.decoder_normalize_before else None
        self.output = nn.Linear(dim, num_blocks * num_symbols)

    def _positioned(self, x: Tensor, offset: int = 0) -> Tensor:
        return x + self.positions[offset : offset + x.size(1)].to(x.dtype).unsqueeze(0)

    def _logits(self, x: Tensor) -> Tensor:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        logits = F.linear(x, self.output.weight, self.output.bias)
        return logits.view(*x.shape[:-1], self.num_blocks, self.num_symbols)


class LatentPredictor(LatentPredictorBase):
    """The autoregressive latent predictor (the paper's): K codes plus END per position (see module docstring)."""

    parallel = False

    def __init__(self, args, num_layers: int, num_codes: int, num_blocks: int, max_latents: int):
        super().__init__(args, num_layers, num_codes, num_blocks, max_latents, num_codes + 1, start=True)
        self.end = num_codes  # the end-of-latents symbol

    def forward(self, latents: Tensor, latent_padding_mask: Tensor, encoder_out: Dict) -> Tensor:
        """Teacher-forced logits. ``latents`` (B, L, H) quantized; returns (B, L + 1, num_blocks, K + 1):
        position j predicts latent j from latents < j, and position L_i predicts END."""
        b, length, _ = latents.shape
        x = torch.cat([self.start.to(latents.dtype).expand(b, 1, -1), latents], dim=1)
        x = self.dropout(self._positioned(x))
        # position j reads inputs 0..j; inputs past a sentence's END position are padding
        pad = torch.cat([latent_padding_mask.new_zeros(b, 1), latent_padding_mask], dim=1)
        enc, enc_mask = unpack_encoder_out(encoder_out)
        x = x.transpose(0, 1)
        mask = causal_mask(length + 1, x.device)
        for layer in self.layers:
            x, _, _ = layer(x, enc, enc_mask, self_attn_mask=mask, self_attn_padding_mask=pad)
        return self._logits(x.transpose(0, 1))

    def step(self, prev: Tensor, position: int, encoder_out: Dict, incremental_state: Dict) -> Tensor:
        """One cached decoding step: ``prev`` (B, H) previous latent embedding -> (B, num_blocks, K + 1)."""
        x = self.dropout(self._positioned(prev.unsqueeze(1), offset=position)).transpose(0, 1)
        enc, enc_mask = unpack_encoder_out(encoder_out)
        for layer in self.layers:
            x, _, _ = layer(x, enc, enc_mask, incremental_state=incremental_state)
        return self._logits(x.transpose(0, 1))[:, 0]

    @torch.no_grad()
    def generate(self, encoder_out: Dict, embed_codes, max_latents: int, batch_size: int,
                 sample: Optional[Tensor] = None, budgets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Decoding with fairseq's incremental state until every sentence has emitted END (or ``max_latents``
        codes): greedy, or for the rows where ``sample`` (B,) is True, ancestral sampling from the choice scores
        (the candidates of noisy parallel decoding). Where END may stand is ``end_policy``'s rule (each row's
        ``budgets`` (B,)).

        Returns codes (B, L) [or (B, L, num_blocks)], latent padding mask (B, L), and the model's own summed
        log-probability of each sentence's codes and END (END: block 0 only).
        """
        device = self.start.device
        incremental_state: Dict[str, Dict[str, Optional[Tensor]]] = {}
        prev = self.start.expand(batch_size, -1)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        picked, picked_lp = [], []  # per step: (B, num_blocks) symbols and their log-probabilities
        for t in range(max_latents + 1):
            lprobs = F.log_softmax(self.step(prev, t, encoder_out, incremental_state).float(), dim=-1)
            choose = lprobs.clone()
            choose[:, 0] = end_policy(lprobs[:, 0], t, self.end, max_latents, budgets)
            choose[:, 1:, self.end] = float("-inf")  # END is block 0's symbol: the other blocks pick codes
            idx = choose.argmax(-1)  # (B, num_blocks)
            if sample is not None and t < max_latents:  # at the budget END is forced: nothing to draw
                drawn = torch.multinomial(F.softmax(choose.flatten(0, 1), dim=-1), 1).view_as(idx)
                idx = torch.where(sample.unsqueeze(1), drawn, idx)
            best = lprobs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
            ends = idx[:, 0] == self.end
            if self.num_blocks > 1:  # END is block 0's: the other blocks of an END step are not scored
                best[:, 1:] = best[:, 1:].masked_fill(ends.unsqueeze(1), 0.0)
            picked.append(idx)
            picked_lp.append(best)
            finished |= ends
            if bool(finished.all()):
                break
            prev = embed_codes(idx.clamp(max=self.num_codes - 1) if self.num_blocks > 1
                               else idx[:, 0].clamp(max=self.num_codes - 1)).to(prev.dtype)
        # each sentence's latents end at its first END: length = its position, score = sum up to and with it
        symbols = torch.stack(picked, dim=1)  # (B, T, num_blocks)
        num = (symbols[:, :, 0] == self.end).int().argmax(1)  # every row has an END (forced at max_latents)
        steps = torch.arange(symbols.size(1), device=device).unsqueeze(0)
        scores = torch.stack(picked_lp, dim=1).sum(-1).masked_fill(steps > num.unsqueeze(1), 0.0).sum(1)
        codes = symbols[:, :-1].clamp(max=self.num_codes - 1) if symbols.size(1) > 1 else \
            torch.zeros(batch_size, 1, self.num_blocks, dtype=torch.long, device=device)
        if self.num_blocks == 1:
            codes = codes[..., 0]
        padding_mask = torch.arange(codes.size(1), device=device).unsqueeze(0) >= num.unsqueeze(1)
        return codes, padding_mask, scores

    @torch.no_grad()
    def beam_search(self, encoder_out: Dict, embed_codes, max_latents: int, batch_size: int, beam: int,
                    budgets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """The ``beam`` best latent sequences of every sentence (beam search, one code per position, END ends a
        sequence), searched and ranked by the mean log-probability of their codes and END (fairseq's length
        penalty 1), where END may stand being ``end_policy``'s rule, as in ``generate``.

        Each step re-runs the teacher-forced ``forward`` on the prefixes (latent sequences are a few positions
        long). Returns codes (B * beam, L), their padding mask and the model's own summed log-probabilities
        (B * beam,), sentence-major with each sentence's best sequence first. ``beam`` = 1 is ``generate``.
        """
        if self.num_blocks != 1:
            raise ValueError("--latent-beam needs --num-blocks 1 (a beam over product codes is not implemented)")
        device = self.start.device
        k, n_sym = beam, self.num_codes + 1
        rows = batch_size * k
        order = torch.arange(batch_size, device=device).repeat_interleave(k)
        enc = _reorder(encoder_out, order)
        row_budgets = None if budgets is None else budgets[order]
        codes = torch.zeros(rows, 0, dtype=torch.long, device=device)
        search = torch.zeros(batch_size, k, device=device)  # summed choice scores: what the beam ranks by
        search[:, 1:] = float("-inf")  # all beams start equal: only the first one is expanded at step 0
        model = torch.zeros(rows, device=device)  # summed log-probabilities of the model
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)  # latents before END (final when done)
        for t in range(max_latents + 1):
            pad = torch.zeros(rows, t, dtype=torch.bool, device=device)
            latents = embed_codes(codes.clamp(max=self.num_codes - 1)).to(self.start.dtype)
            logits = self.forward(latents, pad, enc)[:, t, 0]  # (rows, K + 1): the next symbol
            lprobs = F.log_softmax(logits.float(), dim=-1)
            choose = end_policy(lprobs, t, self.end, max_latents, row_budgets)
            # finished sequences continue with END only, at no cost
            choose = torch.where(done.unsqueeze(1), torch.full_like(choose, float("-inf")), choose)
            choose[done, self.end] = 0.0
            lprobs = lprobs.masked_fill(done.unsqueeze(1), 0.0)
            total = (search.view(-1, 1) + choose).view(batch_size, k * n_sym)
            search, flat = total.topk(k, dim=1)  # (B, k)
            src = (flat // n_sym + torch.arange(batch_size, device=device).unsqueeze(1) * k).view(-1)
            sym = (flat % n_sym).view(-1)
            model = model[src] + lprobs[src, sym]
            codes = torch.cat([codes[src], sym.unsqueeze(1)], dim=1)
            was_done = done[src]
            lengths = torch.where(was_done, lengths[src], lengths[src] + (sym != self.end).long())
            done = was_done | (sym == self.end)
            if bool(done.all()):
                break
        # rank by mean choice score per symbol (codes + END)
        mean = (search.view(-1) / (lengths + 1).float()).view(batch_size, k)
        mean, rank = mean.sort(dim=1, descending=True)
        pick = (rank + torch.arange(batch_size, device=device).unsqueeze(1) * k).view(-1)
        codes, lengths = codes[pick], lengths[pick]
        width = max(1, int(lengths.max()))
        codes = codes[:, :width].clamp(max=self.num_codes - 1)  # every step appended a column: >= width
        padding_mask = torch.arange(width, device=device).unsqueeze(0) >= lengths.unsqueeze(1)
        return codes.masked_fill(padding_mask, 0), padding_mask, model[pick]


def _reorder(encoder_out: Dict, order: Tensor) -> Dict:
    enc, mask = unpack_encoder_out(encoder_out)
    return {"encoder_out": [enc.index_select(1, order)],
            "encoder_padding_mask": [] if mask is None else [mask.index_select(0, order)]}


def unpack_encoder_out(encoder_out: Dict) -> Tuple[Tensor, Optional[Tensor]]:
    enc = encoder_out["encoder_out"][0]
    masks = encoder_out.get("encoder_padding_mask", [])
    return enc, (masks[0] if len(masks) > 0 else None)
