"""Non-autoregressive generator of the Latent Transformer, returned by ``latent_translation.build_generator``.

encode x -> predict the latents autoregressively (greedy, cached incremental decoding, early stop per
sentence at the end-of-latents symbol) -> one parallel decoder pass over the decompressed span -> cut at the
first EOS. Returns fairseq hypothesis dicts, so ``fairseq-generate`` prints its usual S/T/H/D/P lines and
``--scoring sacrebleu``, ``--remove-bpe``, ``--batch-size`` and ``fairseq-interactive`` behave as usual.
"""
import logging
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)


class LatentGenerator:
    def __init__(self, tgt_dict, max_len_a: float = 0.0, max_len_b: int = 200):
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
        model.eval()
        if kwargs.get("prefix_tokens") is not None:
            raise ValueError("the latent transformer decodes in parallel: --prefix-size is not supported")
        net_input = sample["net_input"]
        src_tokens, src_lengths = net_input["src_tokens"], net_input["src_lengths"]
        encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
        # per-sentence length budget (a * |x| + b), capped by the model; the latent loop runs to the batch max
        limits = (self.max_len_a * src_lengths.float() + self.max_len_b).long().clamp(min=1)
        limits = limits.clamp(max=model.decoder.max_positions())
        factor = model.decoder.factor
        budget = (limits + factor - 1) // factor
        tokens, scores, latent_pad, codes, latent_scores = model.decoder.generate(
            encoder_out, int(limits.max()), latent_budget=budget
        )
        latent_len = (~latent_pad).sum(1)
        hypos = []
        for i in range(tokens.size(0)):
            span = min(int(latent_len[i]) * factor, int(limits[i]))
            toks, pos_scores = tokens[i, :span], scores[i, :span]
            eos_at = (toks == self.eos).nonzero()
            if len(eos_at) > 0:
                end = int(eos_at[0]) + 1
                toks, pos_scores = toks[:end], pos_scores[:end]
            else:
                toks = torch.cat([toks, toks.new_tensor([self.eos])])
                pos_scores = torch.cat([pos_scores, pos_scores.new_zeros(1)])
            hypos.append(
                [
                    {
                        "tokens": toks,
                        "score": pos_scores.mean(),
                        "positional_scores": pos_scores,
                        "alignment": None,
                        "attention": None,
                        "latents": codes[i, : int(latent_len[i])],
                        "latent_score": latent_scores[i],
                    }
                ]
            )
        return hypos
