"""Non-autoregressive generator of the Latent Transformer, returned by ``latent_translation.build_generator``.

encode x -> predict the latents (autoregressive predictor: greedy, cached, early stop per sentence at END;
parallel predictor: the length classifier's number of latents, then one pass) -> one parallel decoder pass over
the decompressed span -> cut at the first EOS. Returns fairseq hypothesis dicts, so ``fairseq-generate`` /
``fairseq-interactive`` and their ``--scoring``, ``--remove-bpe``, ``--batch-size`` behave as usual.

- Noisy parallel decoding (Gu et al. 2018; the paper's NPD rows), ``npd_candidates`` = k > 1: the greedy latents
  plus k - 1 sampled ones per sentence, decoded in one pass (B·k rows); the ``npd_teacher`` (autoregressive)
  keeps the candidate with its best mean token log-probability, scoring each distinct (sentence, candidate) once
  in one teacher-forced pass; without a teacher, the LT's own mean token log-probability decides.
- Latent beam search, ``latent_beam`` = k > 1 (``LatentPredictor.beam_search``): the best of the k best latent
  sequences by latent score, or with ``npd_teacher`` all k decoded in one pass and picked as for NPD.
- Length beam, ``length_beam`` = l > 1 (``--latent-predictor parallel``): the l most probable numbers of latents,
  decoded in one batch of B·l rows; the best mean token log-probability wins (fairseq NAT's
  ``--iter-decode-with-beam``).
- Teacher-forced decoding, ``oracle_latents``: the autoencoder's own codes of the reference
  (``LatentDecoder.reference_codes``); its BLEU bounds what a perfect latent predictor would reach (the y-axis of
  the paper's Figure 3).
"""
import logging
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


class LatentGenerator:
    def __init__(self, tgt_dict, max_len_a: float = 0.0, max_len_b: int = 200, npd_candidates: int = 1,
                 npd_teacher=None, oracle_latents: bool = False, latent_beam: int = 1, length_beam: int = 1):
        if npd_candidates < 1:
            raise ValueError(f"--npd-candidates must be >= 1, got {npd_candidates}")
        if oracle_latents and npd_candidates > 1:
            raise ValueError("--oracle-latents decodes the reference's own latents: it cannot be combined with "
                             "--npd-candidates")
        if latent_beam < 1:
            raise ValueError(f"--latent-beam must be >= 1, got {latent_beam}")
        if latent_beam > 1 and (npd_candidates > 1 or oracle_latents):
            raise ValueError("--latent-beam chooses the latents itself: it cannot be combined with "
                             "--npd-candidates or --oracle-latents (pass --npd-teacher alone to rescore the beam)")
        if length_beam < 1:
            raise ValueError(f"--latent-length-beam must be >= 1, got {length_beam}")
        if length_beam > 1 and (npd_candidates > 1 or oracle_latents or latent_beam > 1):
            raise ValueError("--latent-length-beam chooses among its own candidates: it cannot be combined with "
                             "--npd-candidates, --oracle-latents or --latent-beam")
        self.length_beam = length_beam
        self.npd_candidates = npd_candidates
        self.oracle_latents = oracle_latents
        self.latent_beam = latent_beam
        if not (math.isfinite(max_len_a) and max_len_a >= 0 and math.isfinite(max_len_b)) \
                or (max_len_a == 0 and max_len_b < 1):
            raise ValueError(f"--max-len-a must be a finite number >= 0 and --max-len-b a finite number (>= 1 when "
                             f"--max-len-a is 0): every hypothesis is cut to max(1, a * source length + b) tokens; "
                             f"got a={max_len_a}, b={max_len_b}")
        self.teacher = npd_teacher
        self.tgt_dict = tgt_dict
        self.eos = tgt_dict.eos()
        self.pad = tgt_dict.pad()
        self.max_len_a = max_len_a
        self.max_len_b = max_len_b
        self.symbols_to_strip_from_output = {self.eos}

    def check_model(self, model) -> None:
        """The decoding options that depend on the model, checked once when the generator is built."""
        predictor = model.decoder.latent_predictor
        if self.latent_beam > 1 and predictor.parallel:
            raise ValueError("--latent-beam searches over autoregressive latent sequences: a model with "
                             "--latent-predictor parallel takes --latent-length-beam instead")
        if self.latent_beam > 1 and predictor.num_blocks != 1:
            raise ValueError("--latent-beam needs --num-blocks 1 (a beam over product codes is not implemented)")
        if self.length_beam > 1 and not predictor.parallel:
            raise ValueError("--latent-length-beam needs a model with a length classifier (--latent-predictor "
                             "parallel)")

    @torch.no_grad()
    def generate(self, models, sample: Dict, **kwargs) -> List[List[Dict]]:
        if len(models) > 1:
            logger.warning("LatentGenerator decodes with the first model only (no ensembling)")
        model = models[0]
        self.check_model(model)
        if model.training:  # fairseq-generate/-interactive already did this; eval() walks every module
            model.eval()
        if kwargs.get("prefix_tokens") is not None:
            raise ValueError("the latent transformer decodes in parallel: --prefix-size is not supported")
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        encoder_out = model.encode_source(src_tokens, src_lengths)
        # per-sentence length budget (a * |x| + b), capped by the model; the latent loop runs to the batch max
        limits = (self.max_len_a * src_lengths.float() + self.max_len_b).long().clamp(min=1)
        limits = limits.clamp(max=model.decoder.max_positions())
        k, sample_rows = self.npd_candidates, None
        if k > 1:  # B*k rows, sentence-major: row i*k + j is candidate j of sentence i (j = 0 greedy)
            order = torch.arange(src_tokens.size(0), device=src_tokens.device).repeat_interleave(k)
            encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
            limits = limits[order]
            sample_rows = torch.arange(order.numel(), device=order.device) % k != 0
        factor = model.decoder.factor
        budget = (limits + factor - 1) // factor
        given = {}
        if self.oracle_latents:  # teacher-forced decoding: the autoencoder's codes of the reference
            if sample.get("target") is None:
                raise ValueError("--oracle-latents decodes the latents of the reference translation: the data "
                                 "must have targets (fairseq-generate on a binarized split, not -interactive)")
            codes, latent_pad = model.decoder.reference_codes(sample["target"], encoder_out)
            given = dict(codes=codes, latent_pad=latent_pad)
            budget, limits = None, None  # the reference's own length
        dec = model.decoder
        beam_scores, lengths, length_ok = None, None, None
        if self.latent_beam > 1:
            b, beam = src_tokens.size(0), self.latent_beam
            codes, latent_pad, beam_scores = dec.latent_predictor.beam_search(
                encoder_out, dec.bottleneck.embed_codes, dec.latent_limit(int(limits.max())), b, beam, budgets=budget)
            if self.teacher is None:  # chosen by latent score: each sentence's best sequence
                first = torch.arange(b, device=codes.device) * beam
                codes, latent_pad, beam_scores = codes[first], latent_pad[first], beam_scores[first]
            else:  # all of them decoded in one pass (B * beam rows), the teacher picks (as with NPD)
                k = beam
                order = torch.arange(b, device=codes.device).repeat_interleave(k)
                encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
                limits, budget = limits[order], budget[order]
            given = dict(codes=codes, latent_pad=latent_pad)
        if self.length_beam > 1:  # B * l rows: the l most probable latent lengths of each sentence
            most = dec.latent_limit(int(limits.max()))  # no more lengths to choose from than latents allowed
            b, k = src_tokens.size(0), min(self.length_beam, most)
            top, top_lp = dec.latent_predictor.top_lengths(encoder_out, most, budget, beam=k)
            lengths, length_ok = top.view(-1), torch.isfinite(top_lp.view(-1))
            order = torch.arange(b, device=top.device).repeat_interleave(k)
            encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
            limits, budget = limits[order], budget[order]
        tokens, scores, latent_pad, codes, latent_scores = dec.generate(
            encoder_out, int(limits.max()) if limits is not None else 0, latent_budget=budget,
            sample=sample_rows, token_budget=limits, latent_lengths=lengths, **given,
        )
        if beam_scores is not None:  # the beam's own scores of the latents it chose
            latent_scores = beam_scores
        # each hypothesis ends at its first EOS (kept), else at the end of its span (EOS appended)
        spans = tokens.ne(self.pad).sum(1)  # the decoder fills each span (latents x 2^nc, <= limit)
        is_eos = tokens.eq(self.eos)
        with_eos = is_eos.any(1)
        ends = torch.where(with_eos, is_eos.int().argmax(1) + 1, spans)
        teacher_scores = None
        if k == 1:
            rows = range(tokens.size(0))
        else:
            if self.teacher is not None:  # NPD / rescored latent beam: the teacher's mean token log-probability
                targets = self.candidates(tokens, ends, with_eos)
                choice = teacher_scores = self.rescore(src_tokens, src_lengths, targets, k)
            else:  # length beam, or NPD without a teacher: the model's own mean log-probability of the tokens it
                # emitted (an EOS appended to a span without one has no score of its own and does not count)
                used = torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0) < ends.unsqueeze(1)
                choice = (scores * used).sum(1) / ends.clamp(min=1).float()
                if length_ok is not None:
                    choice = choice.masked_fill(~length_ok, float("-inf"))
            best = choice.view(-1, k).argmax(1)
            rows = (torch.arange(best.numel(), device=best.device) * k + best).tolist()
        latent_len = (~latent_pad).sum(1).tolist()
        ends, with_eos = ends.tolist(), with_eos.tolist()
        out = []
        for i in rows:  # hypotheses only for the rows returned
            end = ends[i]
            toks, pos_scores = tokens[i, :end], scores[i, :end]
            if not with_eos[i]:
                toks = torch.cat([toks, toks.new_tensor([self.eos])])
                pos_scores = torch.cat([pos_scores, pos_scores.new_zeros(1)])
            hypo = {
                "tokens": toks,
                "score": pos_scores.mean(),
                "positional_scores": pos_scores,
                "alignment": None,
                "attention": None,
                "latents": codes[i, : latent_len[i]],
                "latent_score": latent_scores[i],
            }
            if teacher_scores is not None:
                hypo["teacher_score"] = teacher_scores[i]
                hypo["npd_candidate"] = i % k
            out.append([hypo])
        return out

    def candidates(self, tokens: Tensor, ends: Tensor, with_eos: Tensor) -> Tensor:
        """The hypotheses as one (N, W) tensor, right-padded: row i is ``tokens[i, :ends[i]]``, then EOS where
        the row has none -- exactly the ``tokens`` of the hypothesis dict row i would get."""
        width = int((ends + (~with_eos).long()).max())
        if tokens.size(1) < width:
            tokens = F.pad(tokens, (0, width - tokens.size(1)), value=self.pad)
        pos = torch.arange(width, device=tokens.device)
        target = torch.where(pos < ends.unsqueeze(1), tokens[:, :width], self.pad)
        return target.masked_fill((pos == ends.unsqueeze(1)) & ~with_eos.unsqueeze(1), self.eos)

    def rescore(self, src_tokens: Tensor, src_lengths: Tensor, targets: Tensor, k: int) -> Tensor:
        """Mean token log-probability under the teacher of every candidate (``targets``: (B·k, W), sentence-major,
        right-padded): the distinct (sentence, candidate) pairs only -- sampled latents often decode to the same
        tokens -- in one teacher-forced pass."""
        sentence = torch.arange(targets.size(0), device=targets.device) // k
        distinct, inverse = torch.unique(torch.cat([sentence.unsqueeze(1), targets], 1), dim=0,
                                         return_inverse=True)
        return self.teacher_scores(src_tokens, src_lengths, distinct[:, 0], distinct[:, 1:])[inverse]

    def teacher_scores(self, src_tokens: Tensor, src_lengths: Tensor, sentence: Tensor, target: Tensor) -> Tensor:
        """Mean over its tokens (EOS included) of log p_teacher(y_t | y_<t, x) for every row of ``target``
        (right-padded), row r translating source sentence ``sentence[r]``; the source is encoded once per
        sentence, the vocabulary projection runs on the real (not padded) positions only."""
        teacher = self.teacher
        if next(teacher.parameters()).device != src_tokens.device:
            teacher.to(src_tokens.device)
        if teacher.training:
            teacher.eval()
        encoder, decoder = teacher.encoder, teacher.decoder
        encoder_out = encoder(src_tokens, src_lengths=src_lengths)
        encoder_out = encoder.reorder_encoder_out(encoder_out, sentence)
        real = target.ne(self.pad)
        prev = torch.roll(target, 1, dims=1)  # fairseq's shifted target: <eos> w1 ... wn
        prev[:, 0] = self.eos
        prev = prev.masked_fill(~real, self.pad)
        lengths = real.sum(1)
        if getattr(decoder, "adaptive_softmax", None) is not None:
            lprobs = teacher.get_normalized_probs(decoder(prev, encoder_out=encoder_out), log_probs=True).float()
            token_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~real, 0.0)
            return token_lp.sum(1) / lengths
        features, _ = decoder.extract_features(prev, encoder_out=encoder_out)
        logits = decoder.output_layer(features[real]).float()
        gold = target[real]
        token_lp = logits.gather(1, gold.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, 1)
        row = torch.arange(target.size(0), device=target.device).unsqueeze(1).expand_as(target)[real]
        return token_lp.new_zeros(target.size(0)).index_add_(0, row, token_lp) / lengths
