"""vq-nat: Latent Transformer with VQ-VAE / EM bottlenecks (Roy et al. 2018) as a fairseq plugin.

``vq_nat.modules`` is plain PyTorch (no fairseq).  Importing ``vq_nat`` itself also registers the fairseq
task, model, criterion and generator when fairseq is installed, so both ``--user-dir vq_nat`` and
``import vq_nat`` work.
"""
__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # plain-torch users (image_ae, vq_nat.modules) do not need fairseq
    fairseq = None

if fairseq is not None:
    from . import checkpoint_compat  # noqa: F401  (torch>=2.6 weights-only loading of fairseq checkpoints)
    from . import fairseq_compat  # noqa: F401  (no batch dropped by fairseq-fixed's batch_by_size)
    from . import criterions, models, tasks  # noqa: F401
