"""Criterion ``latent_vq``: the sum of the model's named loss terms (t2t transformer_nat's "training", "extra" and
"latent_pred" losses), one generic loop as fairseq's ``nat_loss``.

The model's training forward returns ``{"losses": {name: term}, "stats": {...}}``. A term is either a
classification, ``{"out": logits (..., C), "tgt": (...) class indices or (..., m) sampled classes, "mask": (...)
bool (optional), "factor": f, "ls": bool, "acc": bool, "nll_loss": bool}``, whose loss is the mean over the
(masked) rows of -log p(tgt) (with m samples: -(1/m) sum_s log p(tgt_s), the cross-entropy against the average
of their one-hots, summed over any dimensions between the rows and the classes), or a ready mean
``{"loss": scalar, "factor": f}``. Then

    loss = sum_terms  w_name * factor * mean_term,        w_lp = --latent-loss-weight, w_length = w_lp * a

(a = --length-loss-factor; the model's factor is the latent-loss gate, 0 until ``--latent-loss-start``),
returned times ``sample_size`` (= target tokens), fairseq's convention. ``ls`` terms (the token reconstruction)
take ``--label-smoothing``. Logged per term: ``{name}_loss`` (cross-entropies in bits per row), ``{name}_acc``
where ``acc``; and the model's statistics: the code perplexity ``code_ppl``, the fraction of codes used
``codes_used``, the E-step posterior's entropy ``post_ent`` (nats; VQ bottlenecks), the information a latent
carries about its position ``code_info`` (nats; VQ bottlenecks), for soft EM the number of distinct codes among
each latent's m samples ``sample_codes`` (1.0: soft EM behaves as hard EM), and the decoder-input ``masking``.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import FairseqDataclass

from ..models.bottleneck import mode_codes
from ..modules.checks import check_float

# statistics averaged over batches (the others over the real latents, ``nreal_latents``)
_PER_BATCH = {"code_ppl": 1, "codes_used": 3, "code_info": 3, "masking": 3}
_PER_LATENT = {"post_ent": 3, "sample_codes": 2}


class SoftmaxNLL(torch.autograd.Function):
    """sum_i -log softmax(logits_i)[t_i] (fp32), whose backward writes the gradient softmax - onehot in place
    over the saved log-probabilities: one pass over the (N, V) matrix instead of a zero-filled (N, V) gradient of
    ``nll_loss`` followed by ``log_softmax``'s backward."""

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
        "help": "weight of the latent-length classifier's loss relative to the latent-predictor loss "
                "(--latent-predictor parallel; fairseq NAT's --length-loss-factor)"})


@register_criterion("latent_vq", dataclass=LatentVQCriterionConfig)
class LatentVQCriterion(FairseqCriterion):
    def __init__(self, task, label_smoothing=0.0, latent_loss_weight=1.0, length_loss_factor=0.1):
        super().__init__(task)
        check_float("latent_vq", "--label-smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        check_float("latent_vq", "--latent-loss-weight", latent_loss_weight, 0.0)
        check_float("latent_vq", "--length-loss-factor", length_loss_factor, 0.0)
        self.eps = label_smoothing
        self.latent_loss_weight = latent_loss_weight
        self.length_loss_factor = length_loss_factor

    def weight(self, name: str) -> float:
        """The criterion's own weight of a loss term (the model's ``factor`` is its gate)."""
        if name == "lp":
            return self.latent_loss_weight
        if name == "length":
            return self.latent_loss_weight * self.length_loss_factor
        return 1.0

    def classification(self, term):
        """(summed loss, summed NLL, number of rows, number of rows right or None) of a classification term."""
        out, tgt, mask = term["out"], term["tgt"], term.get("mask")
        if mask is not None:
            out, tgt = out[mask], tgt[mask]
        count = out.size(0)
        eps = self.eps if term.get("ls", False) else 0.0
        correct = None
        if tgt.dim() == out.dim() - 1 and term.get("ls", False) and eps == 0.0:
            # token reconstruction: its gradient softmax - onehot in one pass over the (N, V) logits
            nll = loss = SoftmaxNLL.apply(out.reshape(-1, out.size(-1)), tgt.reshape(-1))
        else:
            lprobs = F.log_softmax(out.float(), dim=-1)
            if tgt.dim() == out.dim() - 1:  # class indices
                if eps > 0:
                    loss, nll = label_smoothed_nll_loss(lprobs.reshape(-1, lprobs.size(-1)), tgt.reshape(-1), eps,
                                                        ignore_index=self.padding_idx)
                else:
                    nll = loss = -lprobs.gather(-1, tgt.unsqueeze(-1)).sum()
                gold = tgt
            else:  # m sampled classes per row: the mean of their log-probabilities
                nll = loss = -lprobs.gather(-1, tgt).mean(-1).sum()
                gold = mode_codes(tgt)
            if term.get("acc", False):
                correct = (lprobs.argmax(-1) == gold).reshape(count, -1).all(-1).sum()
        return loss, nll, count, correct

    def forward(self, model, sample, reduce=True):
        target = sample["target"]
        net_input = sample["net_input"]
        out = model(
            net_input["src_tokens"], net_input["src_lengths"], target=target, ae_input=sample.get("ae_input")
        )
        sample_size = sample["ntokens"]
        logging_output = {}
        mean_loss, nll_loss = 0.0, None
        for name, term in out["losses"].items():
            scale = self.weight(name) * term.get("factor", 1.0)
            if "loss" in term:  # a ready mean
                mean_loss = mean_loss + scale * term["loss"].float()
                logging_output[f"{name}_loss"] = term["loss"].data * sample_size
                continue
            loss, nll, count, correct = self.classification(term)
            mean_loss = mean_loss + scale * loss / max(count, 1)
            logging_output[f"{name}_loss"] = loss.data
            logging_output[f"{name}_count"] = count
            if correct is not None:
                logging_output[f"{name}_correct"] = correct.data
            if term.get("nll_loss", False):
                nll_loss = nll.data
        loss = mean_loss * sample_size
        logging_output.update({k: (v.data if torch.is_tensor(v) else v) for k, v in out["stats"].items()})
        logging_output.update({
            "loss": loss.data,
            "nll_loss": nll_loss if nll_loss is not None else loss.new_zeros(()),
            "ntokens": sample["ntokens"],
            "nsentences": target.size(0),
            "sample_size": sample_size,
            "nbatches": 1,
        })
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        keys = dict.fromkeys(k for log in logging_outputs for k in log)
        sample_size, ntokens = total("sample_size"), total("ntokens")
        nbatches = max(total("nbatches"), 1)
        ln2 = math.log(2)
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / ln2, sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / max(ntokens, 1) / ln2, ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        for key in keys:
            if not key.endswith("_loss") or key in ("loss", "nll_loss"):
                continue
            name = key[: -len("_loss")]
            if f"{name}_count" in keys:  # a cross-entropy: bits per row
                count = total(f"{name}_count")
                metrics.log_scalar(key, total(key) / max(count, 1) / ln2, count, round=3)
                if f"{name}_correct" in keys:
                    metrics.log_scalar(f"{name}_acc", total(f"{name}_correct") / max(count, 1), count, round=3)
            else:  # a ready mean, logged as it is
                metrics.log_scalar(key, total(key) / max(sample_size, 1), sample_size, round=4)
        nreal = total("nreal_latents")
        for key in keys:
            if key in _PER_BATCH:
                metrics.log_scalar(key, total(key) / nbatches, nbatches, round=_PER_BATCH[key])
            elif key in _PER_LATENT:
                metrics.log_scalar(key, total(key) / max(nreal, 1), nreal, round=_PER_LATENT[key])

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
