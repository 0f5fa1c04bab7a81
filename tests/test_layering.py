"""vq_nat.modules (and image_ae, which uses it) is plain torch at import time: fairseq stays unloaded."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_importing_the_quantizers_leaves_fairseq_out():
    out = _fresh("import sys, torch\n"
                 "import vq_nat.modules\n"
                 "from vq_nat.modules import VectorQuantizer\n"
                 "from vq_nat.modules.compression import Compressor\n"
                 "import image_ae\n"
                 "q = VectorQuantizer(8, 4, assignment='soft', num_samples=3)\n"
                 "out = q(torch.randn(2, 5, 4))\n"
                 "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fairseq'), tuple(out.quantized.shape))")
    assert out.strip() == "[] (2, 5, 4)"


def test_vq_nat_registers_with_fairseq_loaded_first_or_on_request():
    check = ("from fairseq.models import ARCH_MODEL_REGISTRY\nfrom fairseq.tasks import TASK_REGISTRY\n"
             "from fairseq.criterions import CRITERION_REGISTRY\n"
             "print('latent_transformer_tiny' in ARCH_MODEL_REGISTRY, 'latent_translation' in TASK_REGISTRY, "
             "'latent_vq' in CRITERION_REGISTRY)")
    assert _fresh("import fairseq\nimport vq_nat\n" + check).strip() == "True True True"
    assert _fresh("import vq_nat\nvq_nat.register()\n" + check).strip() == "True True True"


def test_the_tensorboard_viewer_is_an_extra():
    """``pip install -e .[tensorboard]`` brings the viewer for fairseq-train's --tensorboard-logdir."""
    from importlib.metadata import metadata

    meta = metadata("vq-nat")
    assert "tensorboard" in (meta.get_all("Provides-Extra") or [])
    assert any(r.startswith("tensorboard") and 'extra == "tensorboard"' in r for r in meta.get_all("Requires-Dist"))
