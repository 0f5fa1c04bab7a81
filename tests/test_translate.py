"""Translating raw text with a trained model, the three ways the README gives: fairseq-interactive with the
tokenizer and BPE options, the Python hub interface (``vq_nat.hub.from_pretrained``), and (in test_scripts) the
quickstart's own sample translations. Raw text in, detokenized text out: no ``@@``, no Moses escapes."""
import os
import random
import subprocess
import sys

import pytest

from fairseq_helpers import train
from test_readme import readme_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
       "OMP_NUM_THREADS": "1"}
# words that Moses escapes (apostrophes, ampersands) and that 20 BPE merges leave split
WORDS = ["o'clock", "rock'n'roll", "aujourd'hui", "Tom's", "AT&T", "d'accord", "the", "a", "red", "dog", "runs",
         "fast"]
SENTENCES = ["The dog runs at o'clock.", "Tom's red dog runs fast.", "AT&T is rock'n'roll, d'accord?"]


def raw_pairs(n, rng):
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    raw, out = root / "raw", root / "data"
    raw.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 200), ("valid", 10), ("test", 10)):
        lines = raw_pairs(n, rng)
        for lang in ("en", "de"):
            (raw / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines))
    p = subprocess.run(["bash", "scripts/prepare-data.sh", str(raw), str(out), "--merges", "20", "--workers", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    save = root / "checkpoints"
    train(str(out / "bin"), str(save), ["--max-update", "40", "--share-all-embeddings", "--lr", "0.005"])
    assert (save / "checkpoint_last.pt").is_file()
    return out, save


def interactive(out, save, lines):
    cmd = ["fairseq-interactive", str(out / "bin"), "--user-dir", "vq_nat", "--task", "latent_translation",
           "--path", str(save / "checkpoint_last.pt"), "--source-lang", "en", "--target-lang", "de",
           "--tokenizer", "moses", "--bpe", "subword_nmt", "--bpe-codes", str(out / "bpe" / "codes"),
           "--beam", "1", "--buffer-size", "8", "--batch-size", "8", "--cpu"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, input="".join(line + "\n" for line in lines), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    hyp, detok = {}, {}
    for line in p.stdout.splitlines():
        fields = line.split("\t")
        if line.startswith("H-"):
            hyp[int(fields[0][2:])] = fields[2]
        elif line.startswith("D-"):
            detok[int(fields[0][2:])] = fields[2]
    return [hyp[i] for i in range(len(lines))], [detok[i] for i in range(len(lines))]


def test_fairseq_interactive_and_the_hub_translate_raw_text_to_detokenized_text(trained):
    out, save = trained
    hyps, detok = interactive(out, save, SENTENCES)
    # the model's own output is BPE-segmented and Moses-escaped, so detokenization has work to do
    assert any("@@" in h or "&apos;" in h or "&amp;" in h for h in hyps), hyps
    assert all(d.strip() for d in detok), detok
    for d in detok:
        assert "@@" not in d and "&apos;" not in d and "&amp;" not in d, d
    # a single sentence gives the same translation as in a batch
    assert interactive(out, save, SENTENCES[1:2])[1] == detok[1:2]

    from vq_nat.hub import from_pretrained

    lt = from_pretrained(str(save), "checkpoint_last.pt", data=str(out / "bin"), bpe_codes=str(out / "bpe" / "codes"))
    assert lt.translate(SENTENCES) == detok
    assert lt.translate(SENTENCES[0]) == detok[0]


def test_hub_errors_name_the_missing_piece(trained, tmp_path):
    out, save = trained
    from vq_nat.hub import from_pretrained

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        from_pretrained(str(save), "nope.pt", data=str(out / "bin"))
    with pytest.raises(FileNotFoundError, match="no fairseq dictionaries"):
        from_pretrained(str(save), "checkpoint_last.pt", data=str(tmp_path))
    lt = from_pretrained(str(save), "checkpoint_last.pt", data=str(out / "bin"), bpe_codes=str(out / "bpe" / "codes"))
    with pytest.raises(TypeError, match="a str or a list of str, got bytes"):
        lt.translate(b"A dog runs.")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable fairseq checkpoint"):
        from_pretrained(str(tmp_path / "ckpt"), "broken.pt", data=str(out / "bin"))
    with pytest.raises(FileNotFoundError, match="BPE codes"):
        from_pretrained(str(save), "checkpoint_last.pt", data=str(out / "bin"), bpe_codes=str(tmp_path / "codes"))
    # options fairseq would drop without a word
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['latent_beem'\]"):
        from_pretrained(str(save), "checkpoint_last.pt", data=str(out / "bin"), latent_beem=3)
    with pytest.raises(ValueError, match="unknown tokenizer 'nosuch'"):
        from_pretrained(str(save), "checkpoint_last.pt", data=str(out / "bin"), tokenizer="nosuch")
    with pytest.raises(TypeError, match=r"\['latent_beam'\] are the model's decoding options: pass them to "
                                        r"from_pretrained"):
        lt.translate("A dog runs.", latent_beam=2)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['no_such_option'\]"):
        lt.translate("A dog runs.", no_such_option=3)
    # a truncated checkpoint (torch raises OSError for some cuts) is named
    data = open(os.path.join(save, "checkpoint_last.pt"), "rb").read()
    for cut in (5000, 20000):
        (tmp_path / "ckpt" / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.pt: not a readable fairseq checkpoint"):
            from_pretrained(str(tmp_path / "ckpt"), "cut.pt", data=str(out / "bin"))


def test_the_readme_translate_commands_run_as_written_on_the_quickstart_layout(trained, tmp_path):
    """README "Translate your own text", verbatim, in a checkout whose runs/quickstart holds a tiny model."""
    out, save = trained
    for name in ("vq_nat", "scripts"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    os.symlink(out, tmp_path / "runs" / "quickstart" / "data")
    os.symlink(save, tmp_path / "runs" / "quickstart" / "checkpoints")
    blocks = readme_blocks("Translate your own text")
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    shell = subprocess.run(["bash", "-c", "set -eo pipefail\n" + blocks[0][1]], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True)
    assert shell.returncode == 0, shell.stderr[-3000:]
    detok = [line.split("\t")[2] for line in shell.stdout.splitlines() if line.startswith("D-")]
    assert len(detok) == 1 and "@@" not in detok[0], shell.stdout
    py = subprocess.run([sys.executable, "-c", blocks[1][1]], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert py.returncode == 0, py.stderr[-3000:]
    one, batch = py.stdout.strip().splitlines()[-2:]
    assert one == detok[0]  # the hub and fairseq-interactive agree
    assert batch.startswith("[") and len(eval(batch)) == 2  # noqa: S307 (our own printed list of str)
