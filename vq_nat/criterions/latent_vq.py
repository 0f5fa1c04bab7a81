"""Criterion ``latent_vq``: reconstruction + commitment/codebook + latent-predictor losses (t2t transformer_nat).

    loss = CE(y | decoder(z_q))  +  bottleneck loss (beta * commitment, eq.2 [+ eq.3])  +  w * g(t) * CE_lp
           [+ w * g(t) * a * CE_length]          (with --latent-length-prediction; a = --length-loss-factor)

each term a mean (per target token, per latent scalar, per latent position, per sentence), as tensor2tensor sums its
"training", "extra" and "latent_pred" losses; g(t) is the latent-loss gate (0 until ``--latent-loss-start``).
The returned loss is that mean times ``sample_size`` (= target tokens), fairseq's convention. Every term is
logged through fairseq's metrics (cross-entropies in base 2), with the code perplexity ``code_ppl``, the fraction of codes
used ``codes_used``, the E-step posterior's entropy ``post_ent`` (nats; VQ bottlenecks), the information a latent
carries about its position ``code_info`` (nats, H(batch mean posterior) - post_ent; VQ bottlenecks) and, for soft EM, the
number of distinct codes among each latent's m samples ``sample_codes`` (1.0: soft EM behaves as hard EM).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import FairseqDataclass

from ..modules import distinct_samples


class SoftmaxNLL(torch.autograd.Function):
    """sum_i -log softmax(logits_i)[t_i] (fp32), whose backward writes the gradient softmax - onehot in place
    over the saved log-probabilities: one pass over the (N, V) matrix instead of a zero-filled (N, V) gradient of
    ``nll_loss`` followed by ``log_softmax``'s backward (measured: 30 ms of zero-filling per update at Multi30k
    batch size on CPU)."""

    @staticmethod
    def forward(ctx, logits, target):
        lprobs = F.log_softmax(logits.float(), dim=-1)
        ctx.save_for_backward(lprobs, target)
        ctx.dtype = logits.dtype
        return -lprobs.gather(1, target.unsqueeze(1)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        lprobs, target = ctx.saved_tensors
        g = lprobs.exp_()  # softmax (the saved log-probabilities are not needed again)
        g.scatter_add_(1, target.unsqueeze(1), g.new_full((g.size(0), 1), -1.0))
        return g.mul_(grad).to(ctx.dtype), None


@dataclass
class LatentVQCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the reconstruction loss"})
    latent_loss_weight: float = field(default=1.0, metadata={"help": "weight of the latent-predictor loss"})
    length_loss_factor: float = field(default=0.1, metadata={
        "help": "weight of the latent-length classifier's loss relative to the latent-predictor loss (models "
                "with --latent-length-prediction; fairseq NAT's --length-loss-factor)"})


@register_criterion("latent_vq", dataclass=LatentVQCriterionConfig)
class LatentVQCriterion(FairseqCriterion):
    def __init__(self, task, label_smoothing=0.0, latent_loss_weight=1.0, length_loss_factor=0.1):
        super().__init__(task)
        self.eps = label_smoothing
        self.latent_loss_weight = latent_loss_weight
        self.length_loss_factor = length_loss_factor

    def forward(self, model, sample, reduce=True):
        target = sample["target"]
        net_input = sample["net_input"]
        out = model(
            net_input["src_tokens"], net_input["src_lengths"], target=target, ae_input=sample.get("ae_input")
        )
        ntokens = sample["ntokens"]
        sample_size = ntokens

        # reconstruction: only the real target positions go through the output projection and the softmax
        real = target.ne(self.padding_idx)
        logits = model.decoder.output_layer(out["features"][real])  # (ntokens, V)
        if self.eps > 0:
            lprobs = F.log_softmax(logits.float(), dim=-1)
            recon, nll = label_smoothed_nll_loss(lprobs, target[real], self.eps, ignore_index=self.padding_idx)
        else:  # plain NLL, its gradient softmax - onehot in one pass over the (ntokens, V) logits
            nll = SoftmaxNLL.apply(logits, target[real])
            recon = nll

        # latent predictor: cross-entropy against one-hot / averaged sample one-hots; autoregressive: END included,
        # (B, L + 1, blocks, K + 1); parallel: (B, L, blocks, K), glanced positions all-zero (neither loss nor
        # lp_acc counts them; diagnose.py gives the accuracy of a pass without glancing)
        lp_targets = out["latent_targets"]
        lp_lprobs = F.log_softmax(out["latent_logits"].float(), dim=-1)
        lp_valid = lp_targets.sum(-1) > 0  # (B, L + 1, blocks)
        lp_loss = -(lp_targets * lp_lprobs).sum(-1).masked_fill(~lp_valid, 0.0).sum()
        n_lp = lp_valid[..., 0].sum()
        lp_correct = ((lp_lprobs.argmax(-1) == lp_targets.argmax(-1)) & lp_valid).all(-1) & lp_valid[..., 0]

        logging_output = {}
        q = out["bottleneck"]
        latent_real = ~out["latent_padding_mask"]
        if q.posterior_entropy is not None:
            logging_output["post_ent"] = q.posterior_entropy.data * latent_real.sum()
        if q.information is not None:  # a batch statistic, averaged over batches as code_ppl
            logging_output["code_info"] = q.information.data
        if getattr(model.decoder.bottleneck, "assignment", None) == "soft":
            # distinct codes among each latent's m soft-EM samples (1 = the samples are all one code: hard EM)
            distinct = distinct_samples(q.codes)
            distinct = distinct if distinct.dim() == latent_real.dim() else distinct.mean(-1)
            logging_output["sample_codes"] = (distinct * latent_real).sum().data
        gate = self.latent_loss_weight * out["latent_loss_weight"]
        mean_loss = recon / max(ntokens, 1) + q.loss.float() + gate * lp_loss / n_lp.clamp(min=1)
        if out.get("length_logits") is not None:  # the number of latents of each sentence, from the source
            lengths = latent_real.sum(1)
            length_lprobs = F.log_softmax(out["length_logits"].float(), dim=-1)
            length_loss = -length_lprobs.gather(1, lengths.unsqueeze(1)).sum()
            mean_loss = mean_loss + gate * self.length_loss_factor * length_loss / target.size(0)
            logging_output["length_loss"] = length_loss.data
            logging_output["length_correct"] = (length_lprobs.argmax(-1) == lengths).sum().data
        loss = mean_loss * sample_size

        logging_output.update({
            "loss": loss.data,
            "nll_loss": nll.data,
            "recon_loss": recon.data,
            "vq_loss": q.loss.data * sample_size,
            "lp_loss": lp_loss.data,
            "lp_correct": lp_correct.sum().data,
            "nlatents": n_lp.data,
            "ntokens": ntokens,
            "nsentences": target.size(0),
            "sample_size": sample_size,
            "code_ppl": q.perplexity.data,
            "codes_used": q.codes_used.data,
            "masking": out["masking"],
            "nbatches": 1,
            "nreal_latents": latent_real.sum().data,
        })
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size, ntokens, nlatents = total("sample_size"), total("ntokens"), total("nlatents")
        nbatches = max(total("nbatches"), 1)
        ln2 = math.log(2)
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / ln2, sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / max(ntokens, 1) / ln2, ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        metrics.log_scalar("recon_loss", total("recon_loss") / max(ntokens, 1) / ln2, ntokens, round=3)
        metrics.log_scalar("vq_loss", total("vq_loss") / max(sample_size, 1), sample_size, round=4)
        metrics.log_scalar("lp_loss", total("lp_loss") / max(nlatents, 1) / ln2, nlatents, round=3)
        metrics.log_scalar("lp_acc", total("lp_correct") / max(nlatents, 1), nlatents, round=3)
        metrics.log_scalar("code_ppl", total("code_ppl") / nbatches, nbatches, round=1)
        metrics.log_scalar("codes_used", total("codes_used") / nbatches, nbatches, round=3)
        nreal = total("nreal_latents")
        if any("post_ent" in log for log in logging_outputs):
            metrics.log_scalar("post_ent", total("post_ent") / max(nreal, 1), nreal, round=3)
        if any("code_info" in log for log in logging_outputs):
            metrics.log_scalar("code_info", total("code_info") / nbatches, nbatches, round=3)
        if any("sample_codes" in log for log in logging_outputs):
            metrics.log_scalar("sample_codes", total("sample_codes") / max(nreal, 1), nreal, round=2)
        metrics.log_scalar("masking", total("masking") / nbatches, nbatches, round=3)
        if any("length_loss" in log for log in logging_outputs):
            nsentences = max(total("nsentences"), 1)
            metrics.log_scalar("length_loss", total("length_loss") / nsentences / ln2, nsentences, round=3)
            metrics.log_scalar("length_acc", total("length_correct") / nsentences, nsentences, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
