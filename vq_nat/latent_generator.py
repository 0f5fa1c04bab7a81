"""Non-autoregressive generator of the Latent Transformer, returned by ``latent_translation.build_generator``.

encode x -> predict the latents autoregressively (greedy, cached incremental decoding, early stop per
sentence at the end-of-latents symbol) -> one parallel decoder pass over the decompressed span -> cut at the
first EOS. Returns fairseq hypothesis dicts, so ``fairseq-generate`` prints its usual S/T/H/D/P lines and
``--scoring sacrebleu``, ``--remove-bpe``, ``--batch-size`` and ``fairseq-interactive`` behave as usual.

Noisy parallel decoding (NPD, Gu et al. 2018; the paper's Table 1 NPD rows), ``npd_candidates`` = k > 1: every
sentence gets k latent sequences -- the greedy one plus k - 1 drawn from the latent predictor -- which are
decoded together in the same parallel pass (a batch of B·k); the autoregressive ``npd_teacher`` scores all B·k
candidates in one teacher-forced pass and the candidate with the best mean token log-probability under the
teacher is returned. k = 1 is plain greedy decoding.
"""
import logging
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)


class LatentGenerator:
    def __init__(self, tgt_dict, max_len_a: float = 0.0, max_len_b: int = 200, npd_candidates: int = 1,
                 npd_teacher=None, fused: bool = True):
        if npd_candidates < 1:
            raise ValueError(f"--npd-candidates must be >= 1, got {npd_candidates}")
        if npd_candidates > 1 and npd_teacher is None:
            raise ValueError("noisy parallel decoding (--npd-candidates > 1) needs --npd-teacher PATH: an "
                             "autoregressive fairseq model with the same dictionaries that rescores the candidates")
        self.npd_candidates = npd_candidates
        self.fused = fused  # fused_inference: same results as fairseq's layer code, fewer ops
        self.teacher = npd_teacher
        self.tgt_dict = tgt_dict
        self.eos = tgt_dict.eos()
        self.pad = tgt_dict.pad()
        self.max_len_a = max_len_a
        self.max_len_b = max_len_b
        self.symbols_to_strip_from_output = {self.eos}

    def cuda(self):
        return self

    @torch.no_grad()
    def generate(self, models, sample: Dict, **kwargs) -> List[List[Dict]]:
        if len(models) > 1:
            logger.warning("LatentGenerator decodes with the first model only (no ensembling)")
        model = models[0]
        if model.training:  # fairseq-generate/-interactive already did this; eval() walks every module (1.7 ms)
            model.eval()
        if kwargs.get("prefix_tokens") is not None:
            raise ValueError("the latent transformer decodes in parallel: --prefix-size is not supported")
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        encoder_out = model.encode_source(src_tokens, src_lengths, fused=self.fused)
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
        tokens, scores, latent_pad, codes, latent_scores = model.decoder.generate(
            encoder_out, int(limits.max()), latent_budget=budget, sample=sample_rows, token_budget=limits,
            fused=self.fused,
        )
        latent_len = (~latent_pad).sum(1).tolist()
        # each hypothesis ends at its first EOS (kept), else at the end of its span (EOS appended)
        spans = tokens.ne(self.pad).sum(1)  # the decoder fills each span (latents x 2^nc, <= limit)
        is_eos = tokens.eq(self.eos)
        with_eos = is_eos.any(1)
        ends = torch.where(with_eos, is_eos.int().argmax(1) + 1, spans).tolist()
        with_eos = with_eos.tolist()
        hypos = []
        for i in range(tokens.size(0)):
            end = ends[i]
            toks, pos_scores = tokens[i, :end], scores[i, :end]
            if not with_eos[i]:
                toks = torch.cat([toks, toks.new_tensor([self.eos])])
                pos_scores = torch.cat([pos_scores, pos_scores.new_zeros(1)])
            hypos.append(
                {
                    "tokens": toks,
                    "score": pos_scores.mean(),
                    "positional_scores": pos_scores,
                    "alignment": None,
                    "attention": None,
                    "latents": codes[i, : latent_len[i]],
                    "latent_score": latent_scores[i],
                }
            )
        if k == 1:
            return [[h] for h in hypos]
        teacher_scores = self.rescore(src_tokens, src_lengths, hypos, k)
        best = teacher_scores.view(-1, k).argmax(1)
        out = []
        for i, j in enumerate(best.tolist()):
            h = hypos[i * k + j]
            h["teacher_score"] = teacher_scores[i * k + j]
            h["npd_candidate"] = j
            out.append([h])
        return out

    def rescore(self, src_tokens, src_lengths, hypos, k):
        """Mean token log-probability of every candidate under the teacher, one teacher-forced pass (B·k)."""
        teacher = self.teacher
        param = next(teacher.parameters())
        if param.device != src_tokens.device:
            teacher.to(src_tokens.device)
        teacher.eval()
        order = torch.arange(src_tokens.size(0), device=src_tokens.device).repeat_interleave(k)
        lengths = torch.tensor([len(h["tokens"]) for h in hypos], device=src_tokens.device)
        target = src_tokens.new_full((len(hypos), int(lengths.max())), self.pad)
        for i, h in enumerate(hypos):
            target[i, : len(h["tokens"])] = h["tokens"]
        prev = torch.roll(target, 1, dims=1)  # fairseq's shifted target: <eos> w1 ... wn
        prev[:, 0] = self.eos
        prev = prev.masked_fill(target.eq(self.pad), self.pad)
        net_output = teacher(src_tokens[order], src_lengths[order], prev)
        lprobs = teacher.get_normalized_probs(net_output, log_probs=True).float()
        token_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(target.eq(self.pad), 0.0)
        return token_lp.sum(1) / lengths
