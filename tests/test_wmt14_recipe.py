"""examples/wmt14/README.md end to end on a tiny slice: every ``bash`` block of the page runs, in order, through the
same scripts, on a few hundred sentence pairs in WMT's archive layout, with tiny models and a handful of updates
(only the page's settings block is replaced)."""
import os
import random
import re
import shlex
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "examples", "wmt14", "README.md")
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

WORDS = [("the", "die"), ("house", "Haus"), ("cat", "Katze"), ("sleeps", "schläft"), ("small", "kleine"),
         ("green", "grüne"), ("council", "Rat"), ("decides", "entscheidet"), ("today", "heute"), ("we", "wir"),
         ("need", "brauchen"), ("a", "eine"), ("new", "neue"), ("e-mail", "E-Mail"), ("policy", "Politik"),
         ("and", "und"), ("water", "Wasser"), ("is", "ist"), ("cold", "kalt"), ("very", "sehr"),
         ("government", "Regierung"), ("report", "Bericht"), ("on", "über"), ("energy", "Energie")]


def sentences(rng, n):
    pairs = []
    for _ in range(n):
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        en = " ".join(e for e, _ in chosen)
        de = " ".join(d for _, d in chosen)
        pairs.append((en[0].upper() + en[1:] + " .", de[0].upper() + de[1:] + " ."))
    return pairs


def write_archives(root, rng):
    """The five statmt.org archives (the files prepare-wmt14-en-de.sh reads), with 300 / 20 / 20 pairs."""
    src = root / "src"
    corpora = {"training/europarl-v7.de-en": 150, "commoncrawl.de-en": 100, "training/news-commentary-v12.de-en": 50,
               "dev/newstest2013": 20}
    for name, n in corpora.items():
        pairs = sentences(rng, n)
        for i, lang in enumerate(("en", "de")):
            path = src / f"{name}.{lang}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(p[i] + "\n" for p in pairs))
    (src / "test-full").mkdir()
    test = sentences(rng, 20)
    for i, (lang, kind) in enumerate((("en", "src"), ("de", "ref"))):
        segs = "".join(f'<seg id="{k + 1}">{p[i]}</seg>\n' for k, p in enumerate(test))
        (src / "test-full" / f"newstest2014-deen-{kind}.{lang}.sgm").write_text(
            f'<srcset setid="newstest2014" srclang="any">\n<doc docid="d1" origlang="en">\n{segs}</doc>\n</srcset>\n')
    archives = root / "archives"
    archives.mkdir()
    members = {"training-parallel-europarl-v7.tgz": "training/europarl-v7.de-en",
               "training-parallel-commoncrawl.tgz": "commoncrawl.de-en",
               "training-parallel-nc-v12.tgz": "training/news-commentary-v12.de-en", "dev.tgz": "dev/newstest2013"}
    for archive, name in members.items():
        with tarfile.open(archives / archive, "w:gz") as t:
            for lang in ("en", "de"):
                t.add(src / f"{name}.{lang}", arcname=f"{name}.{lang}")
    with tarfile.open(archives / "test-full.tgz", "w:gz") as t:
        for f in ("newstest2014-deen-src.en.sgm", "newstest2014-deen-ref.de.sgm"):
            t.add(src / "test-full" / f, arcname=f"test-full/{f}")
    return archives, test


def bash_blocks(text):
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def test_every_step_of_the_wmt14_readme_runs_on_a_tiny_slice(tmp_path):
    archives, test = write_archives(tmp_path, random.Random(0))
    work = tmp_path / "wmt14"
    settings, *steps = bash_blocks(open(README, encoding="utf-8").read())
    tiny = {"RAW": str(archives), "WORK": str(work), "SIZE": "tiny", "LT_ARCH": "latent_transformer_tiny",
            "TEACHER_UPDATES": "3", "LT_UPDATES": "5", "MAX_TOKENS": "600", "UPDATE_FREQ": "1", "DEVICE_OPTS": "--cpu",
            "SAVE_EVERY": "1", "BENCH_SENTENCES": "6"}
    # the page's settings are exactly the ones replaced here: a new setting must get a tiny value too
    assert re.findall(r"^([A-Z_]+)=", settings, re.M) == list(tiny), settings
    assert len(steps) == 8, "prepare, teacher, distill, LT, averaging, sacreBLEU, tokenized BLEU, speed"
    script = "set -euo pipefail\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in tiny.items()) + "\n".join(steps)
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    out = p.stdout

    import torch

    # 1. prepared from the archives: every corpus, SGML stripped from the test set
    assert "train: 300 sentence pairs" in out and "valid: 20 sentence pairs" in out and "test: 20 sentence pairs" in out
    assert (work / "data" / "raw" / "test.de").read_text().splitlines() == [de for _, de in test]
    # 2. the teacher has the preset's size (tiny here, base in the page)
    cfg = torch.load(work / "teacher" / "checkpoint_best.pt", map_location="cpu", weights_only=False)["cfg"]["model"]
    assert cfg.arch == "transformer_teacher_tiny"
    assert (cfg.encoder_embed_dim, cfg.encoder_layers, cfg.decoder_layers, cfg.share_all_embeddings) == (128, 3, 3, True)
    # 3. distilled: the teacher's beam output for every training sentence
    assert "300 distilled pairs" in out
    assert sum(1 for _ in open(work / "distill" / "text" / "train.de")) == 300
    # 4.-5. the LT trained on it, and the average of its 5 last checkpoints
    kept = sorted(f for f in os.listdir(work / "lt") if re.fullmatch(r"checkpoint_\d+_\d+\.pt", f))
    assert len(kept) == 5, kept
    assert "averaged 5 checkpoints" in out
    avg = torch.load(work / "lt" / "average5.pt", map_location="cpu", weights_only=False)
    assert avg["cfg"]["model"].arch == "latent_transformer_tiny" and avg["cfg"]["model"].bottleneck == "em"
    # 6. sacreBLEU of the LT and of the AR greedy baseline, on all 20 test sentences
    assert len(re.findall(r"^signature nrefs:1\|case:mixed", out, re.M)) == 2, out
    assert len(re.findall(r"^BLEU = \d+\.\d+", out, re.M)) == 2, out
    for gen in (work / "lt" / "gen.test.txt", work / "teacher" / "gen.test.greedy.txt"):
        assert sum(line.startswith("H-") for line in open(gen)) == 20
    # 7. tokenized BLEU with compound splitting, both models; the hyphen of "E-Mail" is split in the references
    assert len(re.findall(r"gen\.test(\.greedy)?\.txt: BLEU4 = \d+\.\d+", out)) == 2, out
    refs = open(work / "lt" / "gen.test.txt.ref").read()
    assert "##AT##-##AT##" in refs or "E-Mail" not in " ".join(de for _, de in test)
    # 8. decoding speed, LT against AR greedy and beam 4, batch 1 and 64
    assert re.search(r"^speedup batch1=\d+\.\d\d batch64=\d+\.\d\d$", out, re.M), out
    assert re.search(r"^ratio batch1: AR beam4 / LT = \d+\.\d\d", out, re.M), out
