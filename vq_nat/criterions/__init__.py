from . import latent_vq  # noqa: F401  (registers criterion "latent_vq")
