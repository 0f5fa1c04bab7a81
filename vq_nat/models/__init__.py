from . import latent_transformer  # noqa: F401  (registers model "latent_transformer" and its architectures)
from . import presets  # noqa: F401  (registers the transformer_teacher_* archs of fairseq's "transformer")
