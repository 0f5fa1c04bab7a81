"""Smoke test of scripts/bench_quantizer.py: it runs and prints every target ratio as a finite number.

Timings are not asserted: they depend on the machine and on whatever else runs on it.
"""
import math
import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_quantizer.py")
RATIOS = ("speedup_hard_vs_vqp", "hard_vs_matmul_bound", "soft_vs_hard")


def test_bench_quantizer_quick():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "machine:" in out and "torch=" in out
    for name in RATIOS:
        m = re.search(rf"^RATIO {name} = (\S+) ", out, re.MULTILINE)
        assert m, f"no {name} line in:\n{out}"
        assert math.isfinite(float(m.group(1))), m.group(0)
    # every method got a row; and a peak-memory figure where the kernel lets us reset the RSS high-water mark
    memory_measurable = os.access("/proc/self/clear_refs", os.W_OK)
    for label in ("matmul bound", "ours hard EM", "ours soft EM", "vector-quantize-pytorch"):
        row = next((ln for ln in out.splitlines() if ln.startswith(label)), None)
        assert row is not None, f"no {label!r} row in:\n{out}"
        if memory_measurable:
            assert "n/a" not in row, row
