"""Companion image VQ-VAE (Roy et al. 2018, Appendix A): hard-EM (VQ-VAE) vs soft-EM bottlenecks on images.

Plain torch + torchvision (no fairseq); the bottleneck is ``vq_nat.modules.VectorQuantizer``.

* ``python -m image_ae.train`` / ``vq-image-ae``: train, evaluate, resume (:mod:`image_ae.train`)
* ``python -m image_ae.robustness``: N seeds x {vq, em} -> table + figure (the paper's Figure 5 claim)
* ``python -m image_ae.prepare_cifar10``: extract the CIFAR-10 JPEG tarballs into an ImageFolder tree
"""
