import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:  # the fairseq parts are registered when fairseq is loaded first (vq_nat/__init__.py)
    import fairseq  # noqa: F401
except ImportError:
    pass
else:
    import vq_nat

    vq_nat.register()
