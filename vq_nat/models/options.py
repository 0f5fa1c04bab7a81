"""Every ``latent_transformer`` option checked once, when the model is built (``check_args``): a value out of its
range is a ``ValueError`` naming the option and the range; an option that does nothing in the chosen
configuration is a warning saying why (only when it differs from the architecture's default, so that a preset's
own values never warn)."""
import argparse
import logging
import math

from ..modules.checks import check_float, check_int
from ..modules.vector_quantizer import MIN_TEMPERATURE

logger = logging.getLogger(__name__)


def _preset(arch: str) -> argparse.Namespace:
    """The values the architecture ``arch`` gives every option that is not set on the command line."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    defaults = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](defaults)
    return defaults


# options removed because the measured results showed no gain, that change the weights of a model trained with them
REMOVED = ("latent_length_prediction", "no_decoder_source_attention")


def check_args(args) -> None:
    """Ranges and interactions of the Latent Transformer's options (after the architecture's defaults)."""
    for name in REMOVED:
        if getattr(args, name, False):
            raise ValueError(f"this latent_transformer checkpoint was trained with --{name.replace('_', '-')}, an "
                             f"option of vq-nat 0.1 removed since: decode it with that version")
    kind = args.bottleneck
    if args.soft_em_temperature is None or not MIN_TEMPERATURE <= args.soft_em_temperature < float("inf"):
        # T <= 0 would assign every latent to its farthest code; below MIN_TEMPERATURE the scores overflow
        raise ValueError(f"--soft-em-temperature must be a finite number >= {MIN_TEMPERATURE:g} (T -> 0 is "
                         f"--bottleneck vq), got {args.soft_em_temperature}")
    owner = "latent_transformer"
    check_int(owner, "--num-compress-steps", args.num_compress_steps, 0, 16)
    check_int(owner, "--num-codes", args.num_codes, 2, 2 ** 24)
    check_int(owner, "--num-samples", args.num_samples, 1)
    check_int(owner, "--num-blocks", args.num_blocks, 1)
    check_float(owner, "--codebook-decay", args.codebook_decay, 0.0, 1.0, high_open=True)
    check_float(owner, "--codebook-epsilon", args.codebook_epsilon, 0.0)
    check_float(owner, "--commitment-beta", args.commitment_beta, 0.0)
    check_float(owner, "--dead-code-threshold", args.dead_code_threshold, 0.0)
    check_int(owner, "--soft-em-anneal-updates", args.soft_em_anneal_updates, 0)
    check_int(owner, "--mask-startup-steps", args.mask_startup_steps, 0)
    if args.latent_layers is not None:
        check_int(owner, "--latent-layers", args.latent_layers, 1)
    if args.latent_loss_start is not None:
        check_int(owner, "--latent-loss-start", args.latent_loss_start, -1)
    if args.latent_glancing_ratio is not None:
        check_float(owner, "--latent-glancing-ratio", args.latent_glancing_ratio, 0.0, 1.0)
        if args.latent_predictor != "parallel":
            raise ValueError("--latent-glancing-ratio applies to --latent-predictor parallel only")
    if args.decoder_embed_dim % args.num_blocks != 0:
        raise ValueError(f"--num-blocks {args.num_blocks} must divide --decoder-embed-dim {args.decoder_embed_dim}")
    if kind in ("gumbel", "semhash") and args.num_blocks != 1:
        raise ValueError(f"--num-blocks applies to --bottleneck vq/em only, not {kind}")
    if kind == "semhash" and (2 ** int(round(math.log2(args.num_codes))) != args.num_codes or args.num_codes > 2**30):
        raise ValueError(f"--bottleneck semhash needs --num-codes a power of 2 (at most 2^30), got {args.num_codes}")
    if args.soft_em_anneal_updates > 0 and kind != "em":
        raise ValueError(f"--soft-em-anneal-updates applies to --bottleneck em only, not {kind}")
    if args.soft_em_anneal_updates > 0 and args.soft_em_temperature == 1.0:
        logger.warning("--soft-em-anneal-updates %d has no effect: it anneals --soft-em-temperature towards 1, "
                       "and that is 1 already", args.soft_em_anneal_updates)

    preset = _preset(args.arch)

    def ignored(names, why):
        for name in names:
            if getattr(args, name) != getattr(preset, name, None):
                logger.warning("--%s %s has no effect: %s", name.replace("_", "-"), getattr(args, name), why)

    if kind != "em":
        ignored(["num_samples"], f"soft EM's samples per latent; --bottleneck {kind} assigns one code per latent")
    if kind not in ("vq", "em"):
        ignored(["codebook_update", "codebook_decay", "codebook_epsilon", "commitment_beta", "kmeans_init",
                 "dead_code_threshold"], f"a VQ codebook option; --bottleneck {kind} has none")
    elif args.codebook_update == "grad":
        ignored(["codebook_decay", "codebook_epsilon", "dead_code_threshold"],
                "the codebook EMA (M-step) options do nothing under --codebook-update grad")
    if kind in ("vq", "gumbel", "semhash"):
        ignored(["soft_em_temperature"], f"the soft-EM posterior's temperature; --bottleneck {kind} does not sample "
                                         f"(only the logged post_ent / code_info of a VQ codebook are computed at it)")
    length_factor = getattr(args, "length_loss_factor", None)  # the criterion's, where fairseq merged the options
    if length_factor is not None and args.latent_predictor != "parallel" and length_factor != 0.1:
        logger.warning("--length-loss-factor %s has no effect: the model has no length classifier (pass "
                       "--latent-predictor parallel)", length_factor)
