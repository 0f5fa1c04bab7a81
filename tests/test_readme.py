"""README.md's fenced commands run as written: the quantizer snippet here, "Translate your own text" in
test_translate.py on a tiny trained model, install / quickstart / test through CI and test_scripts."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(section, path="README.md"):
    """The fenced code blocks of ``## section``: [(language, code)]."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    assert f"\n## {section}\n" in text, f"{path} has no section {section!r}"
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    parts = body.split("```")
    return [(p.split("\n", 1)[0].strip(), p.split("\n", 1)[1]) for p in parts[1::2]]


def test_readme_quantizer_snippet_runs_and_shows_what_it_says():
    (lang, code), = readme_blocks("The quantizer API (`vq_nat.modules`, plain PyTorch, no fairseq)")
    assert lang == "python"
    code += "\nassert out.quantized.shape == z_e.shape and out.codes.shape == (8, 20, 10)\n" \
            "assert 'fairseq' not in __import__('sys').modules\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def test_readme_is_a_guide_of_at_most_200_lines_and_so_are_the_examples():
    for path in ("README.md", "examples/multi30k/README.md", "examples/image_ae/README.md"):
        n = len(open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines())
        assert n <= 200, f"{path}: {n} lines"
