"""vq-nat: Latent Transformer with VQ-VAE / EM bottlenecks (Roy et al. 2018) as a fairseq plugin.

``vq_nat.modules`` is plain PyTorch: importing it (or ``vq_nat``) never imports fairseq. The fairseq task, model,
criterion and generator are registered by :func:`register`, which runs on import when fairseq is already loaded
-- as it is for ``fairseq-train/-generate --user-dir vq_nat`` and for ``import fairseq; import vq_nat``. Call
``vq_nat.register()`` yourself if you import vq_nat before fairseq.
"""
import sys

__version__ = "0.2.0"


def register():
    """Register the fairseq parts (idempotent): the ``latent_translation`` task, ``latent_transformer`` models,
    the ``latent_vq`` criterion; plus the fixes for the fairseq build (weights-only checkpoint loading under
    torch >= 2.6, no batch dropped by fairseq-fixed's ``batch_by_size``)."""
    from . import checkpoint_compat

    checkpoint_compat.install()
    from . import fairseq_compat  # noqa: F401
    from . import criterions, models, tasks  # noqa: F401


if "fairseq" in sys.modules:
    register()
