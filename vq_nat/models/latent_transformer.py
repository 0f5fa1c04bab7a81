"""The Latent Transformer (Kaiser et al. 2018) with the VQ-VAE / EM bottleneck of Roy et al. 2018 (§2.1, §5.1).

    source x --TransformerEncoder--> h_x
    target y --embed--> Compressor (residual convs + nc stride-2 convs) --> z_e (n / 2^nc positions)
             --bottleneck (VQ hard EM / soft EM / Gumbel / semhash)--> z_q, codes
    LatentPredictor(h_x, codes<j) --> p(code_j)              (autoregressive, trained on ``targets``)
      or ParallelLatentPredictor(h_x, L) --> p(code_j), j < L  (--latent-predictor parallel: one pass)
    Decompressor(z_q) --> d (n positions) --causal transformer decoder, attends h_x--> all tokens in one pass

Follows tensor2tensor ``transformer_nat``: the decoder is fed the decompressed latents shifted right, with causal
self-attention (no token feedback, so decoding is still one parallel pass); during the first
``--mask-startup-steps`` updates a growing fraction of its inputs are the gold target embeddings instead
(``masking`` schedule below); the latent-predictor loss counts only after ``--latent-loss-start`` updates.
Deliberate differences (documented in the README): padded positions are masked everywhere (t2t counts them in
the commitment loss, the EMA and the prior loss); the latent length is decided by an END symbol of the latent
predictor instead of being fixed at 2x the source length; the decoder emits EOS within the decompressed span.
"""
import logging
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models import (
    FairseqDecoder,
    FairseqEncoderDecoderModel,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerEncoder, TransformerModel
from fairseq.models.transformer import base_architecture as transformer_base_architecture
from fairseq.modules import LayerNorm, SinusoidalPositionalEmbedding, TransformerDecoderLayer
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor

from ..modules import GumbelSoftmaxQuantizer, SemanticHashingQuantizer, VectorQuantizer
from ..modules.compression import Compressor, Decompressor
from ..modules.schedules import inverse_exp_decay, inverse_lin_decay
from .latent_predictor import LatentPredictor, causal_mask, unpack_encoder_out
from .parallel_latent_predictor import ParallelLatentPredictor, glancing_count, random_positions

logger = logging.getLogger(__name__)

BOTTLENECKS = ("vq", "em", "gumbel", "semhash")
LATENT_PREDICTORS = ("autoregressive", "parallel")
# logits computed at once when decoding (1M fp32 = 4 MB): rows per chunk = this // vocabulary size
_CHUNK_LOGITS = 1 << 20


def masking_probability(step: int, mask_startup_steps: int) -> float:
    """Fraction of decoder inputs taken from the latents (the rest are gold embeddings), t2t ``transformer_nat``:

    masking = clip(inverse_lin_decay(M) * inverse_exp_decay(M // 4), 0, 1), with
    inverse_lin_decay(M) = 0.01 + 0.99 * min(step / M, 1) and inverse_exp_decay(M') = 0.01 ** (max(M' - step, 0) / M').
    """
    if mask_startup_steps <= 0:
        return 1.0
    step = torch.tensor(float(step))
    masking = inverse_lin_decay(mask_startup_steps, step) * inverse_exp_decay(max(mask_startup_steps // 4, 1), step)
    return float(masking.clamp(0.0, 1.0))


def annealed_temperature(step: int, start: float, anneal_updates: int) -> float:
    """Soft EM's E-step temperature at update ``step``, annealed geometrically from ``start`` to the paper's 1:

    T(step) = start ** (1 - min(step / anneal_updates, 1)); constant ``start`` when anneal_updates <= 0.
    """
    if anneal_updates <= 0:
        return float(start)
    return float(start) ** (1.0 - min(step / anneal_updates, 1.0))


def build_bottleneck(args, dim: int) -> nn.Module:
    kind = args.bottleneck
    if kind in ("vq", "em"):
        t = args.soft_em_temperature
        if not 0.0 < t < float("inf"):  # T <= 0 would assign every latent to its farthest code
            raise ValueError(f"--soft-em-temperature must be a positive finite number, got {t}")
        return VectorQuantizer(
            num_codes=args.num_codes,
            dim=dim,
            assignment="hard" if kind == "vq" else "soft",
            num_samples=args.num_samples,
            update=args.codebook_update,
            decay=args.codebook_decay,
            epsilon=args.codebook_epsilon,
            beta=args.commitment_beta,
            num_blocks=args.num_blocks,
            temperature=args.soft_em_temperature,
            init_std=args.codebook_init_std,
            kmeans_init=args.kmeans_init,
            dead_code_threshold=args.dead_code_threshold,
        )
    if args.num_blocks != 1:
        raise ValueError(f"--num-blocks applies to --bottleneck vq/em only, not {kind}")
    if kind == "gumbel":
        return GumbelSoftmaxQuantizer(num_codes=args.num_codes, dim=dim)
    if kind == "semhash":
        bits = int(round(math.log2(args.num_codes)))
        if 2**bits != args.num_codes:
            raise ValueError(f"--bottleneck semhash needs --num-codes a power of 2, got {args.num_codes}")
        return SemanticHashingQuantizer(num_bits=bits, dim=dim)
    raise ValueError(f"unknown --bottleneck {kind!r}; choose from {BOTTLENECKS}")


@register_model("latent_transformer")
class LatentTransformerModel(FairseqEncoderDecoderModel):
    """Non-autoregressive translation through a short sequence of discrete latents (see module docstring)."""

    def __init__(self, args, encoder, decoder):
        super().__init__(encoder, decoder)
        self.args = args

    @staticmethod
    def add_args(parser):
        TransformerModel.add_args(parser)
        g = parser.add_argument_group("Latent Transformer")
        # fmt: off
        g.add_argument("--num-compress-steps", type=int, metavar="N",
                       help="nc: the target is compressed by 2^nc into latents (paper: 3)")
        g.add_argument("--bottleneck", choices=BOTTLENECKS,
                       help="vq: VQ-VAE / hard EM; em: soft EM (--num-samples); gumbel: Gumbel-softmax; "
                            "semhash: improved semantic hashing")
        g.add_argument("--num-codes", type=int, metavar="K", help="codebook size (paper: 4096 = 2^12)")
        g.add_argument("--num-samples", type=int, metavar="M", help="soft EM: samples per latent (paper: 10)")
        g.add_argument("--codebook-update", choices=("ema", "grad"),
                       help="ema: EM M-step by moving averages (eq.4-5); grad: codebook loss (eq.3)")
        g.add_argument("--codebook-decay", type=float, metavar="D",
                       help="codebook EMA decay lambda of eq.4-5 (paper: 0.999; fairseq's own --ema-decay is the "
                            "model-weight EMA)")
        g.add_argument("--codebook-epsilon", type=float, metavar="EPS", help="Laplace smoothing of counts (1e-5)")
        g.add_argument("--commitment-beta", type=float, metavar="B", help="commitment loss weight (eq.2; 0.25)")
        g.add_argument("--num-blocks", type=int, metavar="B",
                       help="product quantization: slices of the latent, each with its own codebook")
        g.add_argument("--soft-em-temperature", type=float, metavar="T",
                       help="soft EM: the E-step posterior is softmax(-||z_e - e_j||^2 / T) (paper: 1; with N(0, I) "
                            "codes of dim 128 it is one-hot at T=1 and spread over hundreds of codes at T=30)")
        g.add_argument("--soft-em-anneal-updates", type=int, metavar="N",
                       help="soft EM: anneal the temperature geometrically from --soft-em-temperature to 1 over the "
                            "first N updates (0 = constant)")
        g.add_argument("--codebook-init-std", type=float, metavar="S",
                       help="initial codes e_j ~ N(0, S^2 I); small S puts the codes near the origin, where soft "
                            "EM's posterior is spread over many codes (tensor2tensor: about 1/sqrt(K))")
        g.add_argument("--kmeans-init", action="store_true", help="k-means codebook init on the first batch")
        g.add_argument("--dead-code-threshold", type=float, metavar="C",
                       help="re-seed codes whose EMA count falls below C (0 = off, the paper)")
        g.add_argument("--ae-attend-source", action="store_true",
                       help="the autoencoder's encoder attends to the source (Kaiser et al.; the paper found it "
                            "unnecessary)")
        g.add_argument("--latent-layers", type=int, metavar="N",
                       help="transformer layers of the latent predictor (default: --decoder-layers)")
        g.add_argument("--mask-startup-steps", type=int, metavar="N",
                       help="decoder-input warm-up: gold target embeddings are replaced by decompressed "
                            "latents over the first N updates (t2t mask_startup_steps)")
        g.add_argument("--no-decoder-source-attention", action="store_true",
                       help="the parallel decoder does not attend to the source: it reconstructs the target from "
                            "the latents alone, so the latents must carry the translation (beyond the paper)")
        g.add_argument("--latent-loss-start", type=int, metavar="N",
                       help="the latent-predictor loss counts only after N updates (default: "
                            "--mask-startup-steps, as t2t)")
        g.add_argument("--latent-input-gradient", choices=("stop", "flow"),
                       help="stop: the latent-predictor loss trains the predictor only (t2t stops the gradient "
                            "at its input latents); flow: it also trains the autoencoder through the "
                            "straight-through latents")
        g.add_argument("--latent-length-prediction", action="store_true",
                       help="predict the number of latents from the source first (a length classifier, trained "
                            "with the criterion's --length-loss-factor) and condition the latent predictor on "
                            "the latents still to come; END comes at the predicted length (beyond the paper)")
        g.add_argument("--latent-predictor", choices=LATENT_PREDICTORS,
                       help="autoregressive: the paper's latent predictor, one code after the other up to END; "
                            "parallel: the length classifier chooses the number of latents and all codes come "
                            "from one non-causal pass, trained with glancing on the latents (beyond the paper, "
                            "after latent-GLAT)")
        g.add_argument("--latent-glancing-ratio", type=float, metavar="R",
                       help="--latent-predictor parallel: R x (number of wrong codes) reference latents are fed as "
                            "inputs at random positions of each sentence during training, and the loss counts on "
                            "the others (default 0.5; 0 = no glancing)")
        g.add_argument("--glancing-ratio", type=float, metavar="R",
                       help="adaptive glancing (GLAT, Qian et al. 2021) instead of the masking schedule: each "
                            "update first decodes without gold inputs, then feeds gold target embeddings at "
                            "R x (number of wrong tokens) random positions of each sentence (0 = off)")
        # fmt: on

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        if args.share_all_embeddings:
            if src_dict != tgt_dict:
                raise ValueError("--share-all-embeddings requires a joined dictionary")
            if args.encoder_embed_dim != args.decoder_embed_dim:
                raise ValueError("--share-all-embeddings requires --encoder-embed-dim == --decoder-embed-dim")
            enc_emb = TransformerModel.build_embedding(args, src_dict, args.encoder_embed_dim)
            dec_emb = enc_emb
            args.share_decoder_input_output_embed = True
        else:
            enc_emb = TransformerModel.build_embedding(args, src_dict, args.encoder_embed_dim)
            dec_emb = TransformerModel.build_embedding(args, tgt_dict, args.decoder_embed_dim)
        if args.encoder_embed_dim != args.decoder_embed_dim:
            raise ValueError("the latent transformer needs --encoder-embed-dim == --decoder-embed-dim")
        encoder = TransformerEncoder(args, src_dict, enc_emb)
        decoder = LatentDecoder(args, tgt_dict, dec_emb)
        max_update = getattr(args, "max_update", 0) or 0
        if 0 < max_update <= decoder.latent_loss_start:
            logger.warning(
                "--max-update %d ends before the latent-predictor loss starts (after update %d: "
                "--latent-loss-start, default --mask-startup-steps): the latent predictor is never trained and "
                "decoding will be poor; lower --mask-startup-steps / --latent-loss-start or train longer",
                max_update, decoder.latent_loss_start)
        return cls(args, encoder, decoder)

    def forward(self, src_tokens, src_lengths, prev_output_tokens=None, target=None, ae_input=None, **kwargs):
        """Training forward: returns the decoder's dict of outputs (token logits, bottleneck output, latent
        predictor logits and targets). ``ae_input`` is the (possibly noised) target fed to the autoencoder."""
        if target is None:
            raise ValueError("LatentTransformerModel.forward needs the target (use the latent_vq criterion)")
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths)
        return self.decoder(target, encoder_out, ae_input=ae_input, autoencode=True)

    def max_positions(self):
        return (self.encoder.max_positions(), self.decoder.max_positions())

    def encode_source(self, src_tokens, src_lengths):
        """The source encoder's output (fairseq's dict)."""
        return self.encoder(src_tokens, src_lengths=src_lengths)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        try:
            return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        except RuntimeError as e:
            raise RuntimeError(
                "checkpoint does not match this latent_transformer configuration (a checkpoint of another "
                f"architecture or other sizes?): {str(e)[:2000]}"
            ) from e


class LatentDecoder(FairseqDecoder):
    """Autoencoder (compress + bottleneck), latent predictor and parallel decoder; see the module docstring."""

    def __init__(self, args, dictionary, embed_tokens):
        super().__init__(dictionary)
        dim = args.decoder_embed_dim
        self.args = args
        self.padding_idx = dictionary.pad()
        self.eos = dictionary.eos()
        self.nc = args.num_compress_steps
        self.factor = 1 << self.nc
        self.max_target_positions = args.max_target_positions
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if args.no_scale_embedding else math.sqrt(dim)
        self.dropout = FairseqDropout(args.dropout, module_name=self.__class__.__name__)
        self.mask_startup_steps = args.mask_startup_steps
        self.latent_loss_start = (
            args.latent_loss_start if args.latent_loss_start is not None and args.latent_loss_start >= 0
            else args.mask_startup_steps
        )
        self.num_updates = 0
        self.stop_latent_gradient = getattr(args, "latent_input_gradient", "flow") == "stop"
        self.glancing_ratio = getattr(args, "glancing_ratio", 0.0) or 0.0

        self.compressor = Compressor(dim, self.nc, dropout=args.dropout)
        self.ae_attention = TransformerDecoderLayer(args) if args.ae_attend_source else None
        self.bottleneck = build_bottleneck(args, dim)
        self.anneal_updates = getattr(args, "soft_em_anneal_updates", 0) or 0
        if self.anneal_updates < 0:
            raise ValueError(f"--soft-em-anneal-updates must be >= 0, got {self.anneal_updates}")
        if self.anneal_updates > 0:
            if args.bottleneck != "em":
                raise ValueError(f"--soft-em-anneal-updates applies to --bottleneck em only, not {args.bottleneck}")
            self.start_temperature = float(args.soft_em_temperature)
            # the current temperature is saved with the model, so that a loaded checkpoint encodes with it
            self.register_buffer("soft_em_temperature", torch.tensor(self.start_temperature))
        self.num_codes = args.num_codes
        self.num_blocks = args.num_blocks if args.bottleneck in ("vq", "em") else 1
        max_latents = (args.max_target_positions + self.factor - 1) // self.factor
        layers = args.latent_layers or args.decoder_layers
        kind = getattr(args, "latent_predictor", None) or "autoregressive"
        ratio = getattr(args, "latent_glancing_ratio", None)
        if kind == "parallel":
            self.latent_predictor = ParallelLatentPredictor(
                args, layers, self.num_codes, self.num_blocks, max_latents,
                glancing_ratio=0.5 if ratio is None else ratio,
            )
        elif kind == "autoregressive":
            if ratio is not None:
                raise ValueError("--latent-glancing-ratio applies to --latent-predictor parallel only")
            self.latent_predictor = LatentPredictor(
                args, layers, self.num_codes, self.num_blocks, max_latents,
                predict_length=getattr(args, "latent_length_prediction", False),
            )
        else:
            raise ValueError(f"unknown --latent-predictor {kind!r}; choose from {LATENT_PREDICTORS}")
        self.decompressor = Decompressor(dim, self.nc, dropout=args.dropout)
        self.register_buffer(
            "positions",
            SinusoidalPositionalEmbedding.get_embedding(max_latents * self.factor + 2, dim, None),
            persistent=False,
        )
        no_source = getattr(args, "no_decoder_source_attention", False)
        self.layers = nn.ModuleList(TransformerDecoderLayer(args, no_encoder_attn=no_source)
                                    for _ in range(args.decoder_layers))
        self.layer_norm = LayerNorm(dim) if args.decoder_normalize_before else None
        if args.share_decoder_input_output_embed:
            self.output_projection = None
        else:
            self.output_projection = nn.Linear(dim, len(dictionary), bias=False)
            nn.init.normal_(self.output_projection.weight, std=dim**-0.5)

    # ---------------------------------------------------------------- schedules
    def set_num_updates(self, num_updates):
        self.num_updates = num_updates
        if self.anneal_updates > 0:
            t = annealed_temperature(num_updates, self.start_temperature, self.anneal_updates)
            self.soft_em_temperature.fill_(t)
            self.bottleneck.temperature = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.anneal_updates > 0:  # a loaded checkpoint encodes with the temperature it was saved with
            self.bottleneck.temperature = float(self.soft_em_temperature)

    def masking(self) -> float:
        if not self.training or self.glancing_ratio > 0:
            return 1.0
        return masking_probability(self.num_updates, self.mask_startup_steps)

    @torch.no_grad()
    def glancing_mask(self, latents: Tensor, latent_pad: Tensor, encoder_out: Dict, target: Tensor) -> Tensor:
        """GLAT's glancing sampler (Qian et al. 2021, eq.5-6) for the parallel decoder: decode once without gold
        inputs, count each sentence's wrong tokens d(y, y_hat), and choose N = ceil(R * d) of its real positions
        uniformly at random; returns the (B, T) mask of the positions whose gold embedding is fed."""
        real = target.ne(self.padding_idx)
        features = self.decode(latents, latent_pad, encoder_out, features_only=True,
                               length=target.size(1))
        wrong = torch.zeros_like(real)
        wrong[real] = self.output_layer(features[real]).argmax(-1) != target[real]
        return random_positions(real, glancing_count(wrong, self.glancing_ratio))

    def latent_loss_weight(self) -> float:
        """t2t gates the prior loss: it counts iff num_updates > latent_loss_start."""
        return 1.0 if self.num_updates > self.latent_loss_start else 0.0

    # ---------------------------------------------------------------- pieces
    def pad_to_multiple(self, tokens: Tensor) -> Tensor:
        rem = (-tokens.size(1)) % self.factor
        return F.pad(tokens, (0, rem), value=self.padding_idx) if rem else tokens

    def embed(self, tokens: Tensor) -> Tensor:
        return self.embed_scale * self.embed_tokens(tokens)

    def encode_target(self, tokens: Tensor, encoder_out: Dict):
        """Target tokens (B, T'), T' a multiple of 2^nc -> z_e (B, T'/2^nc, H) and its padding mask."""
        pad = tokens.eq(self.padding_idx)
        z_e, latent_pad = self.compressor(self.dropout(self.embed(tokens)), pad)
        if self.ae_attention is not None:
            enc, enc_mask = unpack_encoder_out(encoder_out)
            z, _, _ = self.ae_attention(z_e.transpose(0, 1), enc, enc_mask, self_attn_padding_mask=latent_pad)
            z_e = z.transpose(0, 1).masked_fill(latent_pad.unsqueeze(-1), 0.0)
        return z_e, latent_pad

    def decode(self, latents: Tensor, latent_pad: Tensor, encoder_out: Dict, gold: Optional[Tensor] = None,
               masking: float = 1.0, features_only: bool = False, length: Optional[int] = None,
               use_gold: Optional[Tensor] = None) -> Tensor:
        """Latents (B, L, H) -> token logits (B, T, V) in one parallel pass, T = L * 2^nc or ``length`` if
        smaller (``features_only``: the decoder states (B, T, H) before the output projection).

        Each decompressed position is replaced by the gold target embedding with probability 1 - masking
        (t2t: ``mask = masking < U``) or where ``use_gold`` (B, <= T) is True (glancing), then shifted right into
        a causal transformer decoder. The decoder is causal,
        so positions past ``length`` (the batch's longest target, or the decoding budget) would not change the
        earlier ones: they are not computed."""
        d, pad = self.decompress(latents, latent_pad)
        if gold is not None and use_gold is None and masking < 1.0:
            use_gold = torch.rand(d.shape[:2], device=d.device) >= masking
        if gold is not None and use_gold is not None:
            use_gold = F.pad(use_gold, (0, d.size(1) - use_gold.size(1)), value=False)
            d = torch.where(use_gold.unsqueeze(-1), self.embed(gold).to(d.dtype), d)
        x = torch.cat([d.new_zeros(d.size(0), 1, d.size(2)), d[:, :-1]], dim=1)  # shift right
        if length is not None and length < x.size(1):
            x = x[:, :length]
            pad = None if pad is None else pad[:, :length]
        x = self.dropout(x + self.positions[: x.size(1)].to(x.dtype).unsqueeze(0))
        enc, enc_mask = unpack_encoder_out(encoder_out)
        x = x.transpose(0, 1)
        mask = causal_mask(x.size(0), x.device)
        for layer in self.layers:
            x, _, _ = layer(x, enc, enc_mask, self_attn_mask=mask, self_attn_padding_mask=pad)
        x = x.transpose(0, 1)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x if features_only else self.output_layer(x)

    def decompress(self, latents: Tensor, latent_pad: Tensor):
        """``Decompressor`` output (B, L * 2^nc, H) and its padding mask (None: nothing padded)."""
        return self.decompressor(latents.masked_fill(latent_pad.unsqueeze(-1), 0.0), latent_pad)

    def output_layer(self, features):
        weight = self.embed_tokens.weight if self.output_projection is None else self.output_projection.weight
        return F.linear(features, weight)

    # ---------------------------------------------------------------- training forward
    def forward(self, target: Tensor, encoder_out: Dict, ae_input: Optional[Tensor] = None, autoencode: bool = False,
                **kwargs):
        if not autoencode:  # fairseq's SequenceGenerator calls decoder(prev_output_tokens, encoder_out=...)
            raise ValueError("a latent_transformer decodes through its own non-autoregressive generator: pass "
                             "--task latent_translation (and --user-dir vq_nat) to fairseq-generate / -interactive")
        tgt = self.pad_to_multiple(target)
        ae_tokens = tgt if ae_input is None else self.pad_to_multiple(ae_input)
        z_e, latent_pad = self.encode_target(ae_tokens, encoder_out)
        q = self.bottleneck(z_e, padding_mask=latent_pad)
        glance = None
        if self.training and self.glancing_ratio > 0:
            glance = self.glancing_mask(q.quantized, latent_pad, encoder_out, target)
        features = self.decode(q.quantized, latent_pad, encoder_out, gold=tgt, masking=self.masking(),
                               features_only=True, length=target.size(1), use_gold=glance)
        lp_input = q.quantized.detach() if self.stop_latent_gradient else q.quantized
        lp_input = lp_input.masked_fill(latent_pad.unsqueeze(-1), 0.0)
        latent_targets = self.latent_targets(q.targets, latent_pad)
        if self.latent_predictor.parallel:
            # the codes the glancing sampler compares with: each latent's most probable target code
            reference = latent_targets[:, :-1, :, : self.num_codes].argmax(-1)
            lp_logits, glanced = self.latent_predictor(lp_input, latent_pad, encoder_out, reference=reference)
            # K codes, no END; glanced positions are no target
            latent_targets = latent_targets[:, :-1, :, : self.num_codes].masked_fill(glanced[..., None, None], 0.0)
        else:
            lp_logits = self.latent_predictor(lp_input, latent_pad, encoder_out)
        return {
            # decoder states of the target positions (B, T, H); the criterion projects only the real tokens
            # onto the vocabulary (``output_layer``), never the padding
            "features": features[:, : target.size(1)],
            "bottleneck": q,
            "latent_padding_mask": latent_pad,
            "latent_logits": lp_logits,
            # (B, L + 1, blocks, K + 1) with END for the autoregressive predictor, (B, L, blocks, K) for the
            # parallel one; all-zero rows are no target (padding, glanced positions)
            "latent_targets": latent_targets,
            # (B, max_latents + 1) with a length classifier, else None; the target is the number of latents
            "length_logits": self.latent_predictor.length_logits(encoder_out)
            if self.latent_predictor.predict_length else None,
            "masking": self.masking() if glance is None
            else 1.0 - float(glance.sum()) / max(int(target.ne(self.padding_idx).sum()), 1),
            "latent_loss_weight": self.latent_loss_weight(),
        }

    def latent_targets(self, targets: Tensor, latent_pad: Tensor) -> Tensor:
        """(B, L, [blocks,] K) bottleneck targets -> (B, L + 1, blocks, K + 1) with END after each sentence's
        last latent; all-zero rows past END (ignored by the loss)."""
        targets = targets.reshape(*latent_pad.shape, self.num_blocks, -1)
        b, length = latent_pad.shape
        t = targets.new_zeros(b, length + 1, self.num_blocks, self.num_codes + 1)
        t[:, :length, :, : self.num_codes] = targets.masked_fill(latent_pad.view(b, length, 1, 1), 0.0)
        lengths = (~latent_pad).sum(1)
        t[torch.arange(b, device=t.device), lengths, :, self.num_codes] = 1.0
        return t

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def reference_codes(self, target: Tensor, encoder_out: Dict) -> Tuple[Tensor, Tensor]:
        """The autoencoder's own codes of a reference ``target`` (B, T): the latents a perfect latent predictor
        would emit. VQ bottlenecks: the nearest code of every compressed position (eq.1; for soft EM the mode of
        the E-step posterior); the others: their evaluation-mode codes. Returns codes (B, L[, blocks]) and the
        latent padding mask (B, L)."""
        z_e, latent_pad = self.encode_target(self.pad_to_multiple(target), encoder_out)
        nearest = getattr(self.bottleneck, "nearest_codes", None)
        codes = nearest(z_e) if nearest is not None else self.bottleneck(z_e, padding_mask=latent_pad).codes
        return codes, latent_pad

    @torch.no_grad()
    def generate(self, encoder_out: Dict, max_target_len: int, latent_budget: Optional[Tensor] = None,
                 sample: Optional[Tensor] = None, token_budget: Optional[Tensor] = None,
                 codes: Optional[Tensor] = None, latent_pad: Optional[Tensor] = None, end_penalty: float = 0.0,
                 latent_lengths: Optional[Tensor] = None):
        """Predict the latents with the latent predictor (autoregressive: greedy, cached, early stop at END;
        parallel: one pass; rows flagged in ``sample`` draw their codes instead), then decode all target
        positions in one parallel pass. ``latent_lengths`` (B,): the numbers of latents to predict (a length beam;
        models with a length classifier).

        ``codes`` (B, L[, blocks]) with their ``latent_pad``: decode these latents instead of predicted ones
        (teacher-forced decoding with ``reference_codes``: the bound a perfect latent predictor would reach);
        their latent score is 0. ``end_penalty``: see ``LatentPredictor.generate``.

        Only the positions a hypothesis can use (its latents × 2^nc, at most ``token_budget``) go through the
        output projection and softmax, packed across the batch: the padded remainder of the batch's longest
        latent sequence is never projected onto the vocabulary.

        Returns token ids (B, T) (pad past each span), a per-position log-prob (B, T), the latent padding mask
        (B, L), the codes and the latent log-probabilities (B,)."""
        enc, _ = unpack_encoder_out(encoder_out)
        if codes is None:
            codes, latent_pad, latent_scores = self.latent_predictor.generate(
                encoder_out, self.bottleneck.embed_codes, self.latent_limit(max_target_len), enc.size(1),
                sample=sample,
                end_penalty=end_penalty, budgets=latent_budget, lengths=latent_lengths,
            )
        else:
            if latent_pad is None or latent_pad.shape != codes.shape[:2]:
                raise ValueError("generate(codes=...) needs their latent padding mask (B, L)")
            latent_scores = torch.zeros(codes.size(0), device=codes.device)
        if latent_budget is not None:  # per-sentence budgets, applied before decoding (batching invariance)
            positions = torch.arange(latent_pad.size(1), device=latent_pad.device).unsqueeze(0)
            latent_pad = latent_pad | (positions >= latent_budget.unsqueeze(1))
        latents = self.bottleneck.embed_codes(codes).to(enc.dtype)
        span = (~latent_pad).sum(1) * self.factor
        if token_budget is not None:
            span = torch.minimum(span, token_budget)
        spans = span.tolist()
        length = max(spans)
        features = self.decode(latents, latent_pad, encoder_out, features_only=True, length=length)
        if min(spans) == length:  # every row uses every position (always at batch 1): no packing
            best, best_tokens = self.best_tokens(features.reshape(-1, features.size(-1)))
            return best_tokens.view(features.shape[:2]), best.view(features.shape[:2]), latent_pad, codes, \
                latent_scores
        used = torch.arange(length, device=span.device).unsqueeze(0) < span.unsqueeze(1)
        best, best_tokens = self.best_tokens(features[used])
        tokens = torch.full(used.shape, self.padding_idx, dtype=torch.long, device=features.device)
        scores = torch.zeros(used.shape, device=features.device)
        tokens[used] = best_tokens
        scores[used] = best
        return tokens, scores, latent_pad, codes, latent_scores

    def latent_limit(self, max_target_len: int) -> int:
        """The most latents a decoding of at most ``max_target_len`` tokens predicts (≥ 1, within the model)."""
        return max(1, min((max_target_len + self.factor - 1) // self.factor, self.latent_predictor.max_latents))

    def best_tokens(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        """Decoder states (R, H) -> the most probable token of each (never <pad> or <s>) and its log-probability
        (fp32), the softmax normalised over the other tokens.

        In chunks of rows whose (rows x V) logits fit in cache, each projected, normalised and reduced before
        the next: at batch 64 (1,536 rows, V = 6,040, CPU) half the time of one (R x V) matrix reduced after
        the projection, whose passes over the matrix then go to memory.
        """
        r = features.size(0)
        best = torch.empty(r, device=features.device)
        tokens = torch.empty(r, dtype=torch.long, device=features.device)
        special = torch.tensor([self.padding_idx, self.dictionary.bos()], device=features.device)
        step = max(16, _CHUNK_LOGITS // len(self.dictionary))
        for i in range(0, r, step):
            logits = self.output_layer(features[i : i + step]).index_fill_(1, special, float("-inf"))
            lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
            torch.max(lprobs, dim=-1, out=(best[i : i + step], tokens[i : i + step]))
        return best, tokens

    def max_positions(self):
        return self.max_target_positions

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        if isinstance(net_output, dict):
            logits = net_output["logits"] if "logits" in net_output else self.output_layer(net_output["features"])
        else:
            logits = net_output[0]
        return F.log_softmax(logits.float(), dim=-1) if log_probs else F.softmax(logits.float(), dim=-1)


def _latent_defaults(args, **overrides):
    for k, v in overrides.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


@register_model_architecture("latent_transformer", "latent_transformer")
def base_architecture(args):
    """Paper base (Roy et al. §5.1): d=512, 6+6 layers, 8 heads, ffn 2048, K=2^12 codes, nc=3, m=10."""
    _latent_defaults(
        args,
        num_compress_steps=3,
        bottleneck="em",
        num_codes=4096,
        num_samples=10,
        codebook_update="ema",
        codebook_decay=0.999,
        codebook_epsilon=1e-5,
        commitment_beta=0.25,
        num_blocks=1,
        soft_em_temperature=1.0,
        soft_em_anneal_updates=0,
        dead_code_threshold=0.0,
        mask_startup_steps=50000,
        latent_layers=None,
        latent_input_gradient="flow",
        glancing_ratio=0.0,
        latent_predictor="autoregressive",
    )
    args.latent_glancing_ratio = getattr(args, "latent_glancing_ratio", None)
    args.codebook_init_std = getattr(args, "codebook_init_std", 1.0)
    args.kmeans_init = getattr(args, "kmeans_init", False)
    args.ae_attend_source = getattr(args, "ae_attend_source", False)
    args.no_decoder_source_attention = getattr(args, "no_decoder_source_attention", False)
    args.latent_loss_start = getattr(args, "latent_loss_start", None)
    args.latent_length_prediction = getattr(args, "latent_length_prediction", False)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", True)
    args.max_source_positions = getattr(args, "max_source_positions", None) or 1024
    args.max_target_positions = getattr(args, "max_target_positions", None) or 1024
    transformer_base_architecture(args)


@register_model_architecture("latent_transformer", "latent_transformer_tiny")
def latent_transformer_tiny(args):
    """CPU-sized preset for Multi30k (the size of fairseq's transformer_tiny recipe): d=128, ffn 256, 4 heads,
    3+3 layers, 1-layer latent predictor (its autoregressive loop dominates decoding time; a second layer adds
    little BLEU, see examples/multi30k/README.md), K=512 codes, nc=1 (a latent per 2 tokens: at nc=3 a Multi30k
    sentence gets ~2.6 latents and the decoder learns to ignore them), m=10; set for budgets from about 1,000
    updates:
    decoder-input warm-up and latent loss from update 400, codebook EMA decay 0.99 with dead-code re-seeding
    below 0.1 (with the paper's 0.999 and no re-seeding every code but one or two dies within a few hundred
    updates at this budget)."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 256)
    args.encoder_layers = getattr(args, "encoder_layers", 3)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 3)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 256)
    _latent_defaults(args, num_codes=512, num_compress_steps=1, mask_startup_steps=400, latent_layers=1,
                     codebook_decay=0.99, dead_code_threshold=0.1)
    base_architecture(args)


@register_model_architecture("latent_transformer", "latent_transformer_tiny_onepass")
def latent_transformer_tiny_onepass(args):
    """``latent_transformer_tiny`` with the one-pass latent predictor (``--latent-predictor parallel``): a length
    classifier, then all codes in one pass of a 3-layer non-causal predictor (as deep as the decoder: one pass of it
    costs little), trained with glancing on the latents (R=0.5). K=64 codes: on Multi30k valid with greedy
    decoding K=64 was ahead of K=512 at 2,000 and 4,000 updates (examples/multi30k/README.md). Decoding has no
    sequential loop."""
    _latent_defaults(args, latent_predictor="parallel", num_codes=64, latent_layers=3)
    latent_transformer_tiny(args)
