"""vq-nat: VQ-VAE / EM discrete-latent non-autoregressive translation as a fairseq plugin.

Install with ``bash scripts/install.sh`` (see README): fairseq must be built with
``--no-deps --no-build-isolation`` on Python 3.11, which a plain ``pip install -e .`` cannot express.
``python setup.py --print-deps`` prints the dependencies that the install script installs from PyPI
(everything except torch/torchvision and fairseq, which it installs in their own steps).
"""
import sys

from setuptools import find_packages, setup

# Installed first, in their own step (pip takes them from this machine's local wheel store).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# fairseq 0.12.2 does not import on Python 3.11; this fork does (built --no-deps --no-build-isolation).
FAIRSEQ = ["fairseq-fixed==0.12.3.1"]
# fairseq's own runtime dependencies, pinned to what works on 3.11 (omegaconf 2.3 / hydra 1.3), plus ours.
RUNTIME = [
    "numpy",
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "bitarray",
    "cffi",
    "cython",
    "regex",
    "packaging",
    "scikit-learn",  # `import fairseq` imports it
    "tqdm",
    "sacrebleu>=2.0",
    "sacremoses",
    "subword-nmt",
    "matplotlib",
    "tensorboardX",
]
EXTRAS = {
    "test": ["pytest", "pytest-timeout"],
    "bench": ["vector-quantize-pytorch"],
    "tensorboard": ["tensorboard"],  # the viewer for fairseq-train --tensorboard-logdir
}

if "--print-deps" in sys.argv:
    for dep in RUNTIME + EXTRAS["test"] + EXTRAS["bench"]:
        print(dep)
    sys.exit(0)

setup(
    name="vq-nat",
    version="0.2.0",
    description="Discrete-latent non-autoregressive translation (VQ-VAE, hard/soft EM) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=["License :: OSI Approved :: MIT License", "Programming Language :: Python :: 3"],
    python_requires=">=3.9",
    packages=find_packages(include=["vq_nat", "vq_nat.*", "image_ae", "image_ae.*"]),
    install_requires=TORCH + FAIRSEQ + RUNTIME,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "vq-image-ae=image_ae.train:cli_main",
        ],
    },
)
