"""Model sizes as named presets: the one definition of "tiny" and "base" shared by the Latent Transformer archs, the
autoregressive teachers and the scripts (``scripts/train-teacher.sh --size``, ``scripts/experiments.py``,
``scripts/bench_train.py``).

    tiny  d=128, ffn 256, 4 heads, 3+3 layers   (Multi30k on a CPU; the size of fairseq's transformer_tiny recipe)
    base  d=512, ffn 2048, 8 heads, 6+6 layers  (the paper's Table 1 model: the transformer base of Vaswani et al.)

The sizes are plain Python (no fairseq needed to read them: ``size_flags("base")``; scripts/experiments.py reads
this file without importing fairseq). When fairseq is loaded, the module also registers autoregressive teacher
archs of fairseq's ``transformer`` model with these sizes:

    transformer_teacher_tiny       the tiny size
    transformer_teacher_tiny_e6d1  the tiny width with 6 encoder and 1 decoder layers (deep encoder, shallow
                                   decoder: the fastest AR of that width, Kasai et al. 2021)
    transformer_teacher_base       the base size (fairseq's ``transformer`` defaults, written out here)

Flags given on the command line win over an arch's sizes, as for every fairseq arch. Share the embeddings with
``--share-all-embeddings`` (a joined dictionary), as the scripts do.
"""
import sys
from typing import Dict, List, Optional

SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(embed_dim=128, ffn_embed_dim=256, attention_heads=4, encoder_layers=3, decoder_layers=3),
    "base": dict(embed_dim=512, ffn_embed_dim=2048, attention_heads=8, encoder_layers=6, decoder_layers=6),
}

# teacher arch name -> (size, encoder layers, decoder layers); None = the size's own
TEACHER_ARCHS = {
    "transformer_teacher_tiny": ("tiny", None, None),
    "transformer_teacher_tiny_e6d1": ("tiny", 6, 1),
    "transformer_teacher_base": ("base", None, None),
}


def size(name: str) -> Dict[str, int]:
    """The dimensions of preset ``name``; a clear error for an unknown name."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose from {sorted(SIZES)}")
    return dict(SIZES[name])


def model_dims(name: str, encoder_layers: Optional[int] = None, decoder_layers: Optional[int] = None) -> Dict[str, int]:
    """fairseq's transformer option names (``encoder_embed_dim`` ...) -> values of preset ``name``."""
    s = size(name)
    return {
        "encoder_embed_dim": s["embed_dim"], "decoder_embed_dim": s["embed_dim"],
        "encoder_ffn_embed_dim": s["ffn_embed_dim"], "decoder_ffn_embed_dim": s["ffn_embed_dim"],
        "encoder_attention_heads": s["attention_heads"], "decoder_attention_heads": s["attention_heads"],
        "encoder_layers": encoder_layers or s["encoder_layers"], "decoder_layers": decoder_layers or s["decoder_layers"],
    }


def size_flags(name: str, encoder_layers: Optional[int] = None, decoder_layers: Optional[int] = None) -> List[str]:
    """The same as fairseq command-line flags: ``["--encoder-embed-dim", "128", ...]``."""
    out = []
    for key, value in model_dims(name, encoder_layers, decoder_layers).items():
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


def set_unset(args, **values) -> None:
    """The one default idiom of the archs: set each option that the command line left unset (None)."""
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def apply_size(args, name: str, encoder_layers: Optional[int] = None, decoder_layers: Optional[int] = None) -> None:
    """Inside a fairseq arch function: set each dimension of preset ``name`` that the command line left unset."""
    set_unset(args, **model_dims(name, encoder_layers, decoder_layers))


def register_teacher_archs() -> None:
    """Register :data:`TEACHER_ARCHS` for fairseq's ``transformer`` model (idempotent)."""
    from fairseq.models import ARCH_MODEL_REGISTRY, register_model_architecture
    from fairseq.models.transformer import base_architecture

    for arch, (name, enc, dec) in TEACHER_ARCHS.items():
        if arch in ARCH_MODEL_REGISTRY:
            continue

        def arch_fn(args, name=name, enc=enc, dec=dec):
            apply_size(args, name, enc, dec)
            base_architecture(args)

        arch_fn.__doc__ = f"Autoregressive transformer of the {name!r} size preset" + (
            f" with {enc} encoder and {dec} decoder layers" if enc else "") + " (vq_nat.models.presets)."
        register_model_architecture("transformer", arch)(arch_fn)


if "fairseq" in sys.modules:  # as vq_nat/__init__.py: the fairseq parts register when fairseq is loaded
    register_teacher_archs()

