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
    for path in ("README.md", "examples/multi30k/README.md", "examples/image_ae/README.md", "examples/wmt14/README.md"):
        n = len(open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines())
        assert n <= 200, f"{path}: {n} lines"


def test_readme_train_on_your_data_runs_as_written_on_tiny_data(tmp_path):
    """README "Train on your data", verbatim but for the placeholders (RAW, OUT) and the budgets."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fairseq_helpers import make_copy_task

    raw = tmp_path / "raw"
    make_copy_task(str(raw), n_train=60, n_valid=8, n_test=8, reverse=True)
    for split in ("train", "valid", "test"):
        for old, new in (("src", "en"), ("tgt", "de")):
            os.rename(raw / f"{split}.{old}", raw / f"{split}.{new}")
    for name in ("vq_nat", "scripts"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (lang, code), = readme_blocks("Train on your data")
    assert lang == "bash"
    for old, new in (("--max-update 6000", "--max-update 3"), ("runs/teacher          #", "runs/teacher --max-update 3 #"),
                     ("--merges 6000", "--merges 20 --workers 1")):
        assert old in code, old
        code = code.replace(old, new)
    code = code.replace("RAW", str(raw)).replace("OUT", str(tmp_path / "out"))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", "-c", "set -eo pipefail\n" + code], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "BLEU" in p.stdout and (tmp_path / "runs" / "lt" / "checkpoint_last.pt").is_file(), p.stdout[-2000:]
