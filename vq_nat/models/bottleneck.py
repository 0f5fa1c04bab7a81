"""The Latent Transformer's discrete bottleneck: built from the command-line options, its codes as the latent
predictor's sparse targets, and its logged statistics (one helper for the criterion and ``scripts/diagnose.py``)."""
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..modules import GumbelSoftmaxQuantizer, SemanticHashingQuantizer, VectorQuantizer, distinct_samples

BOTTLENECKS = ("vq", "em", "gumbel", "semhash")
# the options of --bottleneck vq / em: command-line name -> VectorQuantizer argument
QUANTIZER_OPTIONS = {
    "num_codes": "num_codes", "num_samples": "num_samples", "codebook_update": "update", "codebook_decay": "decay",
    "codebook_epsilon": "epsilon", "commitment_beta": "beta", "num_blocks": "num_blocks",
    "soft_em_temperature": "temperature", "soft_em_anneal_updates": "anneal_updates",
    "kmeans_init": "kmeans_init", "dead_code_threshold": "dead_code_threshold",
}


def build_bottleneck(args, dim: int) -> nn.Module:
    """The ``--bottleneck`` module (its options are checked by ``check_args`` first)."""
    kind = args.bottleneck
    if kind in ("vq", "em"):
        return VectorQuantizer.for_bottleneck(kind, dim, **{arg: getattr(args, option)
                                                            for option, arg in QUANTIZER_OPTIONS.items()})
    if kind == "gumbel":
        return GumbelSoftmaxQuantizer(num_codes=args.num_codes, dim=dim)
    return SemanticHashingQuantizer(num_bits=int(round(math.log2(args.num_codes))), dim=dim)


def is_soft(bottleneck: nn.Module) -> bool:
    """Soft EM: every latent has m sampled codes (the others have one code per latent)."""
    return getattr(bottleneck, "assignment", None) == "soft"


def sampled_codes(codes: Tensor, latent_pad: Tensor, num_blocks: int) -> Tensor:
    """``QuantizerOutput.codes`` of a (B, L) latent sequence as (B, L, blocks, m) long: the m soft-EM samples
    of every latent and block (m = 1 for the other bottlenecks). The latent predictor's target for a latent is
    the average of their one-hots (the paper's §3.2 label smoothing), without ever building that (B, L, K)
    distribution: the loss reads the m log-probabilities of the sampled codes."""
    return codes.reshape(*latent_pad.shape, num_blocks, -1)


def mode_codes(samples: Tensor) -> Tensor:
    """The most frequent of the m codes of every (..., m) row, ties to the smallest code: the argmax of the
    averaged one-hots the samples stand for."""
    if samples.size(-1) == 1:
        return samples[..., 0]
    count = (samples.unsqueeze(-1) == samples.unsqueeze(-2)).sum(-1)  # (..., m) occurrences of each sample
    key = count * (int(samples.max()) + 2) - samples  # most frequent first, then the smallest code
    return samples.gather(-1, key.argmax(-1, keepdim=True)).squeeze(-1)


def autoregressive_targets(samples: Tensor, latent_pad: Tensor, end: int) -> Tuple[Tensor, Tensor]:
    """(B, L, blocks, m) sampled codes -> the autoregressive predictor's targets (B, L + 1, blocks, m), with END
    (``end`` = K, every block and sample) right after each sentence's last latent, and the mask (B, L + 1) of
    the positions that are a target (the latents and END; not what follows END)."""
    b, length = latent_pad.shape
    lengths = (~latent_pad).sum(1)
    targets = torch.cat([samples.masked_fill(latent_pad.view(b, length, 1, 1), 0), samples[:, :1]], dim=1)
    targets[torch.arange(b, device=targets.device), lengths] = end
    valid = torch.arange(length + 1, device=lengths.device).unsqueeze(0) <= lengths.unsqueeze(1)
    return targets, valid


def bottleneck_stats(bottleneck: nn.Module, q, latent_pad: Tensor) -> Dict[str, Tensor]:
    """The bottleneck's statistics of one batch, as summable numbers (fairseq logging outputs):

    code_ppl, codes_used   the batch's code perplexity and fraction of codes used (averaged over batches);
    post_ent               the E-step posterior's entropy (nats) summed over the real latents (VQ bottlenecks);
    code_info              H(batch mean posterior) - mean posterior entropy (nats; VQ bottlenecks; per batch);
    sample_codes           distinct codes among each real latent's m soft-EM samples, summed (1 per latent:
                           soft EM behaves as hard EM);
    nreal_latents          the number of real latents (the denominator of post_ent and sample_codes).
    """
    real = ~latent_pad
    n_real = real.sum()
    stats = {"code_ppl": q.perplexity.data, "codes_used": q.codes_used.data, "nreal_latents": n_real.data}
    if q.posterior_entropy is not None:
        stats["post_ent"] = q.posterior_entropy.data * n_real
    if q.information is not None:
        stats["code_info"] = q.information.data
    if is_soft(bottleneck):
        distinct = distinct_samples(q.codes)
        distinct = distinct if distinct.dim() == real.dim() else distinct.mean(-1)
        stats["sample_codes"] = (distinct * real).sum().data
    return stats
