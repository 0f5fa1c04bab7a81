from . import latent_transformer  # noqa: F401  (registers model "latent_transformer" and its architectures)
