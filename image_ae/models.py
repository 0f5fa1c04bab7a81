"""Convolutional encoder / decoder around ``vq_nat.modules.VectorQuantizer`` (hard EM = VQ-VAE, soft EM).

Two presets (``--arch``):

``paper`` (Roy et al. 2018, Appendix A):
    encoder: 4 conv layers 5x5 + ReLU, 2 residual layers, a dense layer to the latent field;
    decoder: a dense layer, 2 residual layers, 4 transposed-conv layers 5x5.
    The dense layer is applied per grid position (a 1x1 convolution, like ``tf.layers.dense`` on the last axis
    in tensor2tensor) and maps the ``hidden_dim`` features of each of the 8x8 positions to
    ``latents_per_position`` (10) latents of ``code_dim`` (512) each: the paper's "field of 8 x 8 x 10
    latents", 640 latents per 32x32 image, one shared codebook of 2^8 = 256 codes of 512 dimensions.
    Deviation: the paper says all 4 conv layers have stride 2, which turns 32x32 into 2x2, not into the 8x8
    field it reports (and a dense layer from 2x2 features to 640 x 512 outputs would need ~0.7 G weights).
    We use stride 2 in the first ``num_downsample`` layers (auto: 2 for 32x32 -> 8x8) and stride 1 in the
    others, so the reported latent field comes out.

``vqvae`` (conventional VQ-VAE of van den Oord et al. 2017 / its DeepMind reference implementation):
    encoder: ``num_downsample`` (2) conv 4x4 stride 2 + ReLU, conv 3x3, 2 residual blocks
    (ReLU, conv 3x3, ReLU, conv 1x1), ReLU, 1x1 conv to ``code_dim``: one latent per position of an 8x8 grid;
    decoder: conv 3x3, 2 residual blocks, ReLU, transposed conv 4x4 stride 2 (x ``num_downsample``).
    Defaults: hidden 128, residual hidden 32, 512 codes of dimension 64.

Images enter in [0, 1] (centred to [-0.5, 0.5] inside); the decoder predicts the image in [0, 1] (trained with MSE).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from vq_nat.modules import VectorQuantizer

PRESETS: Dict[str, Dict[str, Optional[int]]] = {
    "paper": dict(hidden_dim=512, res_hidden_dim=None, num_codes=256, code_dim=512, latents_per_position=10),
    "vqvae": dict(hidden_dim=128, res_hidden_dim=32, num_codes=512, code_dim=64, latents_per_position=1),
}
# the ModelConfig fields that are VectorQuantizer arguments of the same name
QUANTIZER_SETTINGS = ("num_codes", "num_samples", "update", "decay", "epsilon", "beta", "temperature", "kmeans_init",
                      "dead_code_threshold")
LATENT_GRID = 8  # both presets put the latents on an 8x8 grid for 32x32 images


def auto_num_downsample(image_size: int, arch: str) -> int:
    """Stride-2 layers that bring image_size closest to the 8x8 latent grid (>= 1 for vqvae, <= 4 for paper)."""
    n = max(0, round(math.log2(max(image_size, 1) / LATENT_GRID)))
    return min(max(n, 1 if arch == "vqvae" else 0), 4 if arch == "paper" else 8)


@dataclass
class ModelConfig:
    arch: str = "paper"
    channels: int = 3
    image_size: int = 32
    hidden_dim: int = 512
    res_hidden_dim: int = 512
    num_codes: int = 256
    code_dim: int = 512
    latents_per_position: int = 10
    num_downsample: int = 2
    num_residual: int = 2
    bottleneck: str = "vq"  # vq -> hard assignment (VQ-VAE / hard EM), em -> soft EM
    num_samples: int = 10
    update: str = "ema"
    decay: float = 0.999
    epsilon: float = 1e-5
    beta: float = 0.25
    temperature: float = 1.0
    kmeans_init: bool = False
    dead_code_threshold: float = 0.0
    latent_norm: str = "none"  # "layer": z_e layer-normalised over code_dim, as the translation model's z_e

    def validate(self) -> None:
        if self.arch not in PRESETS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {sorted(PRESETS)}")
        if self.bottleneck not in ("vq", "em"):
            raise ValueError(f"bottleneck must be 'vq' or 'em', got {self.bottleneck!r}")
        if self.latent_norm not in ("none", "layer"):
            raise ValueError(f"latent_norm must be 'none' or 'layer', got {self.latent_norm!r}")
        if self.arch == "paper" and not 0 <= self.num_downsample <= 4:
            raise ValueError("the paper preset has 4 conv layers: --num-downsample must be in 0..4")
        if self.arch == "vqvae" and self.num_downsample < 1:
            raise ValueError("the vqvae preset needs --num-downsample >= 1")
        if self.image_size % (2 ** self.num_downsample):
            raise ValueError(
                f"--image-size {self.image_size} is not divisible by 2^{self.num_downsample} "
                f"(--num-downsample {self.num_downsample}); pick a multiple of {2 ** self.num_downsample}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // (2 ** self.num_downsample)

    @property
    def num_latents(self) -> int:
        return self.grid * self.grid * self.latents_per_position


class ResidualLayer(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x))))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(dim, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _paper_encoder(c: ModelConfig) -> nn.Sequential:
    layers, cin = [], c.channels
    for i in range(4):
        stride = 2 if i < c.num_downsample else 1
        layers += [nn.Conv2d(cin, c.hidden_dim, 5, stride=stride, padding=2), nn.ReLU()]
        cin = c.hidden_dim
    layers += [ResidualLayer(c.hidden_dim, c.res_hidden_dim) for _ in range(c.num_residual)]
    layers += [nn.ReLU(), nn.Conv2d(c.hidden_dim, c.latents_per_position * c.code_dim, 1)]  # dense layer
    return nn.Sequential(*layers)


def _paper_decoder(c: ModelConfig) -> nn.Sequential:
    layers = [nn.Conv2d(c.latents_per_position * c.code_dim, c.hidden_dim, 1)]  # dense layer
    layers += [ResidualLayer(c.hidden_dim, c.res_hidden_dim) for _ in range(c.num_residual)]
    layers += [nn.ReLU()]
    for i in range(4):
        stride = 2 if i >= 4 - c.num_downsample else 1
        cout = c.channels if i == 3 else c.hidden_dim
        layers.append(nn.ConvTranspose2d(c.hidden_dim, cout, 5, stride=stride, padding=2, output_padding=stride - 1))
        if i < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _vqvae_encoder(c: ModelConfig) -> nn.Sequential:
    layers, cin = [], c.channels
    for i in range(c.num_downsample):
        cout = c.hidden_dim if i == c.num_downsample - 1 else c.hidden_dim // 2
        layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        cin = cout
    layers.append(nn.Conv2d(c.hidden_dim, c.hidden_dim, 3, padding=1))
    layers += [ResidualLayer(c.hidden_dim, c.res_hidden_dim) for _ in range(c.num_residual)]
    layers += [nn.ReLU(), nn.Conv2d(c.hidden_dim, c.latents_per_position * c.code_dim, 1)]
    return nn.Sequential(*layers)


def _vqvae_decoder(c: ModelConfig) -> nn.Sequential:
    layers = [nn.Conv2d(c.latents_per_position * c.code_dim, c.hidden_dim, 3, padding=1)]
    layers += [ResidualLayer(c.hidden_dim, c.res_hidden_dim) for _ in range(c.num_residual)]
    layers.append(nn.ReLU())
    cin = c.hidden_dim
    for i in range(c.num_downsample):
        last = i == c.num_downsample - 1
        cout = c.channels if last else c.hidden_dim // 2
        layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        cin = cout
    return nn.Sequential(*layers)


class ImageAutoencoder(nn.Module):
    """encoder -> latent field (B, h, w, L, code_dim) -> VectorQuantizer -> decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        build = {"paper": (_paper_encoder, _paper_decoder), "vqvae": (_vqvae_encoder, _vqvae_decoder)}[config.arch]
        self.encoder = build[0](config)
        self.decoder = build[1](config)
        self.quantizer = VectorQuantizer.for_bottleneck(
            config.bottleneck, config.code_dim, **{k: getattr(config, k) for k in QUANTIZER_SETTINGS})
        # The quantizer's codes start as e_j ~ N(0, I), on the scale of a layer-normalised z_e (unit variance
        # per coordinate: the translation model's z_e). A raw conv output starts far smaller, so every latent
        # is nearest the one code closest to the origin, and the E-step posterior is one-hot (soft EM = hard
        # EM). "layer" puts z_e on the codes' scale (no learned gain, so it stays there).
        self.latent_norm = (nn.LayerNorm(config.code_dim, elementwise_affine=False) if config.latent_norm == "layer"
                            else nn.Identity())

    def check_images(self, x: torch.Tensor) -> None:
        """``x`` is a float batch (B, C, S, S) of this model's channels and size, with pixels in [0, 1]."""
        c = self.config
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"ImageAutoencoder: images must be a floating-point tensor with pixels in [0, 1], got "
                            f"{getattr(x, 'dtype', type(x).__name__)}; pass uint8 images as x.float() / 255")
        want = (c.channels, c.image_size, c.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"ImageAutoencoder: images must have shape (B, {', '.join(map(str, want))}), got "
                             f"{tuple(x.shape)}")
        device = next(self.parameters()).device
        if x.device != device:
            raise ValueError(f"ImageAutoencoder: images are on {x.device} but the model is on {device}; move them "
                             f"with x.to({str(device)!r})")
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"ImageAutoencoder: pixels must be in [0, 1], got values in [{float(x.min()):g}, "
                             f"{float(x.max()):g}]; divide 0-255 images by 255")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> z_e (B, h, w, L, code_dim)."""
        self.check_images(x)
        h = self.encoder(x - 0.5)
        b, _, gh, gw = h.shape
        c = self.config
        return self.latent_norm(h.view(b, c.latents_per_position, c.code_dim, gh, gw).permute(0, 3, 4, 1, 2))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, h, w, L, code_dim) -> images (B, C, S, S), unclamped."""
        b, gh, gw, latents, d = z_q.shape
        h = z_q.permute(0, 3, 4, 1, 2).reshape(b, latents * d, gh, gw)
        return self.decoder(h) + 0.5

    def forward(self, x: torch.Tensor):
        z_e = self.encode(x)
        out = self.quantizer(z_e)
        recon = self.decode(out.quantized)
        if recon.shape[-2:] != x.shape[-2:]:  # cannot happen when validate() passed; guard anyway
            raise RuntimeError(f"decoder output {tuple(recon.shape)} does not match input {tuple(x.shape)}")
        return recon, out, z_e

    @torch.no_grad()
    def nearest_codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest-code index of every latent (the mode of the E-step, for both bottlenecks), flattened."""
        return self.quantizer.nearest_codes(z_e).reshape(-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_config(arch: str, channels: int, image_size: int, overrides: Optional[dict] = None) -> ModelConfig:
    """Preset values, then every non-None override (from the command line)."""
    values = dict(PRESETS[arch])
    values.update(arch=arch, channels=channels, image_size=image_size,
                  num_downsample=auto_num_downsample(image_size, arch))
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    if values.get("res_hidden_dim") is None:  # paper preset: residual layers as wide as the conv layers
        values["res_hidden_dim"] = values["hidden_dim"]
    names = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{k: v for k, v in values.items() if k in names})
