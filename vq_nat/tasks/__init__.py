from . import latent_translation  # noqa: F401  (registers task "latent_translation")
