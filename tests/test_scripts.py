"""The shell scripts end to end on tiny data: prepare-data.sh -> train-teacher.sh -> distill.sh, and their errors."""
import math
import os
import shutil
import subprocess
import sys

import pytest

from fairseq_helpers import make_copy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def run(*args, check=True):
    p = subprocess.run(["bash", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    raw = str(root / "raw")
    make_copy_task(raw, n_train=60, n_valid=8, n_test=8, reverse=True)
    for split in ("train", "valid", "test"):  # the scripts expect {split}.{en,de}; an empty line must survive
        for old, new in (("src", "en"), ("tgt", "de")):
            os.rename(os.path.join(raw, f"{split}.{old}"), os.path.join(raw, f"{split}.{new}"))
    with open(os.path.join(raw, "test.en"), "a") as f:
        f.write("\n")
    with open(os.path.join(raw, "test.de"), "a") as f:
        f.write("\n")
    out = str(root / "out")
    run("scripts/prepare-data.sh", raw, out, "--merges", "20", "--workers", "1")
    return root, raw, out


def test_prepare_data_keeps_every_pair(prepared):
    _, raw, out = prepared
    assert os.path.exists(os.path.join(out, "bin", "dict.en.txt"))
    assert os.path.exists(os.path.join(out, "bpe", "codes"))
    for split, n in (("train", 60), ("valid", 8), ("test", 9)):
        assert sum(1 for _ in open(os.path.join(out, "bpe", f"{split}.de"))) == n
    log = open(os.path.join(out, "preprocess.log")).read()
    assert "test.de: 9 sents" in log


def test_prepare_data_errors(prepared, tmp_path):
    root, raw, _ = prepared
    p = run("scripts/prepare-data.sh", str(tmp_path / "nowhere"), str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "no such directory" in p.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "valid", "test"):
        (bad / f"{split}.en").write_text("a b\nc d\n")
        (bad / f"{split}.de").write_text("a b\n")
    p = run("scripts/prepare-data.sh", str(bad), str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "not line-aligned" in p.stderr
    for split in ("train", "valid", "test"):
        (bad / f"{split}.de").write_text("a b\nc d\n")
    (bad / "valid.de").unlink()
    p = run("scripts/prepare-data.sh", str(bad), str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "missing file" in p.stderr
    (bad / "valid.de").write_text("a b\nc d\n")
    (bad / "test.en").write_text("")
    (bad / "test.de").write_text("")
    p = run("scripts/prepare-data.sh", str(bad), str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "test:" in p.stderr and "empty" in p.stderr
    assert not os.path.exists(tmp_path / "o"), "nothing written for a rejected input"


def test_prepare_data_names_a_non_utf8_line_and_leaves_no_partial_output(prepared, tmp_path):
    _, raw, _ = prepared
    bad = tmp_path / "latin1"
    shutil.copytree(raw, bad)
    lines = (bad / "valid.de").read_bytes().split(b"\n")
    lines[2] = "Gr\u00fc\u00dfe".encode("latin-1")  # 0xfc: not UTF-8
    (bad / "valid.de").write_bytes(b"\n".join(lines))
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run("scripts/prepare-data.sh", str(bad), str(out), "--merges", "20", "--workers", "1", check=False)
    assert p.returncode != 0
    assert "valid.de: line 3 is not UTF-8" in p.stderr, p.stderr
    assert sorted(os.listdir(out)) == ["keep.txt"] and not [f for f in os.listdir(tmp_path) if "partial" in f]
    # a failure after the checks (here: a bad --merges value for subword-nmt) leaves no partial output either
    shutil.copy(os.path.join(raw, "valid.de"), bad / "valid.de")
    p = run("scripts/prepare-data.sh", str(bad), str(out), "--merges", "notanumber", "--workers", "1", check=False)
    assert p.returncode != 0
    assert sorted(os.listdir(out)) == ["keep.txt"] and not [f for f in os.listdir(tmp_path) if "partial" in f]
    run("scripts/prepare-data.sh", str(bad), str(out), "--merges", "20", "--workers", "1")
    assert sorted(os.listdir(out)) == ["bin", "bpe", "keep.txt", "preprocess.log", "tok"]


def test_teacher_and_distillation(prepared):
    root, _, out = prepared
    data_bin = os.path.join(out, "bin")
    teacher = str(root / "teacher")
    run("scripts/train-teacher.sh", data_bin, teacher, "--max-update", "2", "--encoder-layers", "1",
        "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--max-tokens", "500", "--cpu")
    ckpt = os.path.join(teacher, "checkpoint_last.pt")
    assert os.path.exists(ckpt)
    distilled = str(root / "distilled")
    p = run("scripts/distill.sh", data_bin, ckpt, distilled, "--beam", "2", "--batch-size", "16")
    assert "60 distilled pairs" in p.stdout
    for f in ("train.en-de.en.bin", "train.en-de.de.bin", "valid.en-de.de.bin", "test.en-de.en.idx", "dict.de.txt"):
        assert os.path.exists(os.path.join(distilled, f)), f
    assert sum(1 for _ in open(os.path.join(distilled, "text", "train.de"))) == 60
    # resumable: the finished decoding of the same teacher, data and beam is reused
    p = run("scripts/distill.sh", data_bin, ckpt, distilled, "--beam", "2")
    assert "reusing" in p.stdout and "60 distilled pairs" in p.stdout
    p = run("scripts/distill.sh", data_bin, str(root / "missing.pt"), distilled, check=False)
    assert p.returncode != 0 and "no such checkpoint" in p.stderr


def py(*args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_experiments_table1_resume_report_robustness_and_dump_latents(prepared):
    import json

    root, raw, out = prepared
    data_bin, work = os.path.join(out, "bin"), str(root / "exp")
    lt = "lt-em-raw-K512-m10-nc1-s1"
    args = ["scripts/experiments.py", "table1", "--data", data_bin, "--raw", raw, "--work", work,
            "--max-update", "2", "--max-tokens", "500", "--log-interval", "1", "--only", lt, "ar"]
    py(*args)
    rows = [json.loads(line) for line in open(os.path.join(work, "results.jsonl"))]
    assert [r["label"] for r in rows] == ["LT em (m=10), nc=1, K=512", "AR transformer, beam 4",
                                          "AR transformer, greedy"]
    for r in rows:
        assert 0.0 <= r["bleu"] <= 100.0 and r["ms_b1"] > 0 and r["ms_b64"] > 0 and r["updates"] == 2
        assert r["signature"].startswith("nrefs:1|case:mixed")
    # rerunning continues: nothing is trained or decoded again
    p = py(*args)
    assert f"{lt}: trained (2 updates)" in p.stdout and "fairseq-generate" not in p.stdout
    # the distilled rows need the distilled data
    p = py(*args[:-2], "lt-em-distill-K512-m10-nc1-s1", check=False)
    assert p.returncode != 0 and "needs --distill" in p.stderr
    report = py("scripts/experiments.py", "report", "--work", work).stdout
    assert "| AR transformer, greedy | 2 " in report and "1.00× / 1.00×" in report
    assert "| K1024 | lt-em-distill-K1024-m10-nc1-s1 | not run | not run |" in report

    p = py("scripts/experiments.py", "robustness", "--data", data_bin, "--raw", raw, "--work", work,
           "--seeds", "1", "--max-update", "3", "--max-tokens", "500", "--log-interval", "1")
    assert os.path.getsize(os.path.join(work, "robustness.png")) > 0
    assert "| lt-vq-raw-K512-m10-nc1-s1-noreseed | 3 |" in p.stdout
    assert "| lt-em-raw-K512-m10-nc1-s1-noreseed | 3 |" in p.stdout
    for row in (line for line in p.stdout.splitlines() if line.startswith("| lt-")):  # code_info, last column
        assert 0.0 <= float(row.strip(" |").split(" | ")[-1]) <= math.log(512) + 1e-3, row
    import torch

    # the paper's Figure 3 setting: other K and nc, the autoencoder attending to the source, a soft-EM temperature
    # annealed to 1 (hard EM's run has none); own runs and picture
    p = py("scripts/experiments.py", "robustness", "--data", data_bin, "--raw", raw, "--work", work,
           "--seeds", "1", "--max-update", "2", "--max-tokens", "500", "--log-interval", "1",
           "--codes", "64", "--nc", "2", "--ae-attend-source", "--temperature", "30", "--anneal-updates", "2")
    assert os.path.getsize(os.path.join(work, "robustness-K64-nc2-attsrc-T30-anneal2.png")) > 0
    for b, suffix, temperature, anneal in (("vq", "", 1.0, 0), ("em", "-T30-anneal2", 30.0, 2)):
        name = f"lt-{b}-raw-K64-m10-nc2-s1-noreseed{suffix}-attsrc"
        assert f"| {name} | 2 |" in p.stdout
        state = torch.load(os.path.join(work, name, "checkpoint_last.pt"), map_location="cpu", weights_only=False)
        cfg = state["cfg"]["model"]
        assert (cfg.num_codes, cfg.num_compress_steps, cfg.ae_attend_source) == (64, 2, True)
        assert (cfg.soft_em_temperature, cfg.soft_em_anneal_updates) == (temperature, anneal)
        if anneal:  # saved with the temperature of the last training step (update_num 1 of 2): 30 ** (1 - 1/2)
            assert float(state["model"]["decoder.bottleneck.current_temperature"]) == pytest.approx(30.0 ** 0.5)

    # k-means codebook init without the decoder warm-up, one bottleneck only: only its run is trained
    p = py("scripts/experiments.py", "robustness", "--data", data_bin, "--raw", raw, "--work", work,
           "--seeds", "1", "--max-update", "2", "--max-tokens", "500", "--log-interval", "1",
           "--kmeans-init", "--mask-startup-steps", "0", "--only", "em")
    assert os.path.getsize(os.path.join(work, "robustness-K512-nc1-kmeans-ms0.png")) > 0
    name = "lt-em-raw-K512-m10-nc1-s1-noreseed-kmeans-ms0"
    assert f"| {name} | 2 |" in p.stdout
    assert not os.path.exists(os.path.join(work, name.replace("-em-", "-vq-")))
    state = torch.load(os.path.join(work, name, "checkpoint_last.pt"), map_location="cpu", weights_only=False)
    assert state["cfg"]["model"].kmeans_init and state["cfg"]["model"].mask_startup_steps == 0
    assert bool(state["model"]["decoder.bottleneck.initialized"])
    p = py("scripts/experiments.py", "robustness", "--data", data_bin, "--raw", raw, "--work", work,
           "--only", "em", "gumbel", check=False)
    assert p.returncode != 0 and "vq and/or em" in p.stderr

    # the speed benchmarks run end to end (their numbers are measured in the README, never asserted here)
    import re

    lt_ckpt, ar_ckpt = (os.path.join(work, name, "checkpoint_last.pt") for name in (lt, "ar"))
    p = py("scripts/bench_decode.py", data_bin, "--lt-path", lt_ckpt, "--ar-path", ar_ckpt, "--repeats", "1",
           "--max-sentences", "4", "--batch-sizes", "1", "4", "--ar-beams", "1", "--lt-npd", "2", "--cpu")
    assert re.fullmatch(r"speedup batch1=\d+\.\d\d batch4=\d+\.\d\d", p.stdout.splitlines()[-1]), p.stdout
    assert re.search(r"^ratio batch4: AR greedy / LT = \d+\.\d\d", p.stdout, re.M), p.stdout
    assert re.search(r"^ratio batch1: AR greedy / LT NPD2 = \d+\.\d\d", p.stdout, re.M), p.stdout
    assert re.search(r"^batch   4  LT NPD2 .* ms/sentence", p.stdout, re.M), p.stdout
    tiny = ("--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 "
            "--encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 2 --decoder-attention-heads 2")
    p = py("scripts/bench_train.py", data_bin, "--steps", "1", "--repeats", "1", "--max-tokens", "300",
           "--size-args", tiny)
    assert re.match(r"ratio words/s LT/AR = \d+\.\d\d", p.stdout.splitlines()[-1]), p.stdout
    p = py("scripts/profile_decode.py", data_bin, "--path", lt_ckpt, "--max-sentences", "4", "--batch-size", "2",
           "--npd-candidates", "3", "--npd-teacher", ar_ckpt, "--ops", "3", "--cpu")
    stages = re.findall(r"^stage (.+?) +\d+\.\d\d ms/sentence +(\d+\.\d) %$", p.stdout, re.M)
    assert [name for name, _ in stages] == ["source encoder", "latent predictor", "parallel decoder",
                                            "vocabulary projection", "teacher rescoring",
                                            "rest (post-processing, glue)"], p.stdout
    m = re.search(r"distinct latent sequences (\d+) of (\d+); distinct token candidates (\d+) of (\d+)", p.stdout)
    assert m and int(m[2]) == int(m[4]) == 3 * 4 and 4 <= int(m[1]) <= 12 and 4 <= int(m[3]) <= 12, p.stdout
    assert len(re.findall(r"^op \S+ .* calls/sentence", p.stdout, re.M)) == 3, p.stdout
    m = re.search(r"^sentences per latent count: (.+); the one-latent sentences use (\d+) distinct codes$", p.stdout,
                  re.M)
    per_count = dict(map(int, item.split(": ")) for item in m[1].split(", ")) if m else {}
    assert sum(per_count.values()) == 3 * 4 and int(m[2]) <= per_count.get(1, 0), p.stdout  # B·k latent rows

    png = str(root / "usage.png")
    p = py("scripts/dump_latents.py", data_bin, "--path", os.path.join(work, lt, "checkpoint_last.pt"),
           "--show", "3", "--png", png, "--cpu")
    lines = p.stdout.splitlines()
    assert lines[0].startswith("S-0\t") and lines[1].startswith("T-0\t")
    assert lines[2].startswith("A-0\t") and lines[2].endswith("|eos")
    assert lines[3].startswith("P-0\t") and lines[3].endswith("<end>")
    assert "9 sentences" in p.stdout and os.path.getsize(png) > 0
    p = py("scripts/dump_latents.py", data_bin, "--path", str(root / "missing.pt"), check=False)
    assert p.returncode != 0 and "no such checkpoint" in p.stderr


def test_experiments_levers_trains_a_combo_and_diagnoses_it(prepared):
    """``levers --only vq+kmeans``: the preset with both factors changed, trained and diagnosed on valid; the same
    for ``par+K64``, then both timed with ``bench_decode.py`` against a 3+3 and a 6+1 AR."""
    import json

    import torch

    root, raw, out = prepared
    data_bin, work = os.path.join(out, "bin"), str(root / "levers")
    common = ["scripts/experiments.py", "levers", "--data", data_bin, "--raw", raw, "--work", work,
              "--subset", "valid", "--max-update", "2", "--max-tokens", "500", "--log-interval", "1"]
    py(*common, "--only", "vq+kmeans")
    name = "lever-vq+kmeans-raw-s1"
    cfg = torch.load(os.path.join(work, name, "checkpoint_last.pt"), map_location="cpu",
                     weights_only=False)["cfg"]["model"]
    # the later flag wins: the preset re-seeds at 0.1, the kmeans lever turns it off
    assert (cfg.bottleneck, cfg.kmeans_init, cfg.dead_code_threshold) == ("vq", True, 0.0)
    (row,) = [json.loads(line) for line in open(os.path.join(work, "results.jsonl"))]
    assert (row["label"], row["run"], row["updates"], row["sentences"]) == ("vq+kmeans", name, 2, 8)
    assert 0.0 <= row["bleu"] <= 100.0 and 0.0 <= row["bleu_oracle"] <= 100.0
    assert 1 <= row["codes_ae"] <= 512 and row["sample_codes"] is None  # hard EM draws no samples
    p = py(*common, "--only", "vq+nosuch", check=False)
    assert p.returncode != 0 and "unknown lever(s) ['nosuch']" in p.stderr

    # the one-pass latent predictor with a small codebook: trained, diagnosed, and timed beside the other LT and
    # two ARs (3+3 and 6+1) in the same rounds
    py(*common, "--only", "par+K64")
    par = os.path.join(work, "lever-par+K64-raw-s1", "checkpoint_last.pt")
    cfg = torch.load(par, map_location="cpu", weights_only=False)["cfg"]["model"]
    assert (cfg.latent_predictor, cfg.num_codes) == ("parallel", 64)
    row = [json.loads(line) for line in open(os.path.join(work, "results.jsonl"))][-1]
    assert row["label"] == "par+K64" and 0.0 <= row["lp_end_acc"] <= 1.0 and 1 <= row["codes_ae"] <= 64
    # score.py scores a checkpoint as the tables do: the same BLEU as diagnose.py's greedy decoding
    ref = os.path.join(raw, "valid.de")
    p = py("scripts/score.py", data_bin, "--path", par, "--subset", "valid", "--ref", ref, "--", "--cpu")
    sig, bleu = p.stdout.splitlines()[-2:]
    assert sig.startswith("signature nrefs:1|case:mixed") and float(bleu.split()[2]) == pytest.approx(row["bleu"])
    out = os.path.join(work, "par.valid.txt")
    py("scripts/score.py", data_bin, "--path", par, "--subset", "valid", "--ref", ref, "--out", out, "--", "--cpu",
       "--latent-length-beam", "2")
    assert sum(line.startswith("H-") for line in open(out)) == 8
    p = py("scripts/score.py", data_bin, "--path", par, "--subset", "valid", "--ref", ref, "--out", out, check=False)
    assert p.returncode != 0 and "exists; pass --overwrite" in p.stderr
    # table1's deep-encoder / shallow-decoder AR: 6 + 1 layers of the teacher's width
    py("scripts/experiments.py", "table1", "--data", data_bin, "--distill", data_bin, "--raw", raw, "--work", work,
       "--max-update", "1", "--max-tokens", "500", "--only", "ar-e6d1-distill", "--no-decode")
    cfg = torch.load(os.path.join(work, "ar-e6d1-distill", "checkpoint_last.pt"), map_location="cpu",
                     weights_only=False)["cfg"]["model"]
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_embed_dim) == (6, 1, 128)
    ars = []
    for layers in (("3", "3"), ("6", "1")):
        save = os.path.join(work, "ar" + "".join(layers))
        run("scripts/train-teacher.sh", data_bin, save, "--max-update", "1", "--encoder-layers", layers[0],
            "--decoder-layers", layers[1], "--max-tokens", "500", "--cpu")
        ars.append(os.path.join(save, "checkpoint_last.pt"))
    import re

    p = py("scripts/bench_decode.py", data_bin, "--lt-path", par, os.path.join(work, name, "checkpoint_last.pt"),
           "--ar-path", *ars, "--repeats", "1", "--max-sentences", "2", "--batch-sizes", "2", "--ar-beams", "1",
           "--cpu")
    for model in ("LT ar-pred K512", "AR 3+3 greedy", "AR 6+1 greedy"):
        assert re.search(rf"^ratio batch2: {re.escape(model)} / LT par K64 = \d+\.\d\d", p.stdout, re.M), p.stdout
    assert re.fullmatch(r"speedup batch2=\d+\.\d\d", p.stdout.splitlines()[-1]), p.stdout


def test_experiments_curve_scores_each_kept_checkpoint_of_a_translation_lev_run(prepared):
    """fairseq's NAT validates without BLEU; ``curve`` decodes its checkpoints into valid_bleu.log points that
    plot_curves.py draws beside train.log."""
    import json

    root, raw, out = prepared
    data_bin, work = os.path.join(out, "bin"), str(root / "curve")
    common = ["--data", data_bin, "--distill", data_bin, "--raw", raw, "--work", work, "--only", "nat-distill"]
    p = py("scripts/experiments.py", "curve", *common, "--subset", "valid", check=False)
    assert p.returncode != 0 and "has no checkpoints" in p.stderr
    p = py("scripts/experiments.py", "table1", *common, "--max-update", "3", "--max-tokens", "500",
           "--log-interval", "1", "--keep-checkpoints", "--no-decode")
    assert "--keep-interval-updates -1" in p.stdout  # fairseq keeps every 500-update checkpoint
    save = os.path.join(work, "nat-distill")
    shutil.copy(os.path.join(save, "checkpoint_last.pt"), os.path.join(save, "checkpoint_1_2.pt"))  # as if kept
    p = py("scripts/experiments.py", "curve", *common, "--subset", "valid")
    points = [json.loads(line) for line in open(os.path.join(save, "valid_bleu.log"))]
    assert [pt["valid_num_updates"] for pt in points] == [2, 3]  # the kept checkpoint, then the last one
    assert all(0.0 <= pt["valid_bleu"] <= 100.0 for pt in points)
    assert f"nat-distill update 3: valid BLEU {points[1]['valid_bleu']:.2f}" in p.stdout
    p = py("scripts/experiments.py", "curve", *common, check=False)
    assert p.returncode != 0 and "pass --subset valid" in p.stderr
    assert "fairseq-generate" not in py("scripts/experiments.py", "curve", *common, "--subset", "valid").stdout
    png = str(root / "nat-curve.png")
    p = py("scripts/plot_curves.py", "--run", f"NAT={os.path.join(work, 'nat-distill')}", "--out", png)
    assert os.path.getsize(png) > 0 and "| NAT | 2 |" in p.stdout and "| NAT | 3 |" in p.stdout, p.stdout


def test_prepare_wmt14_from_local_archives(tmp_path):
    """The WMT'14 script on tiny stand-in archives with the statmt.org layout (the download path is not run)."""
    import tarfile

    src = tmp_path / "src"
    en = ["A house .", "The cat sleeps .", "Good morning ."]
    de = ["Ein Haus .", "Die Katze schläft .", "Guten Morgen ."]
    files = {"training/europarl-v7.de-en": (en, de), "commoncrawl.de-en": (en[:2], de[:2]),
             "training/news-commentary-v12.de-en": (en[1:], de[1:]), "dev/newstest2013": (en, de)}
    for name, (e, d) in files.items():
        for lang, lines in (("en", e), ("de", d)):
            p = src / f"{name}.{lang}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("\n".join(lines) + "\n")
    (src / "test-full").mkdir()
    for lang, kind, lines in (("en", "src", en), ("de", "ref", de)):
        segs = "".join(f'<seg id="{i + 1}">{s}</seg>\n' for i, s in enumerate(lines))
        (src / "test-full" / f"newstest2014-deen-{kind}.{lang}.sgm").write_text(
            f'<srcset setid="newstest2014">\n<doc docid="x">\n{segs}</doc>\n</srcset>\n')
    raw = tmp_path / "raw"
    raw.mkdir()
    members = {"training-parallel-europarl-v7.tgz": ["training/europarl-v7.de-en.en", "training/europarl-v7.de-en.de"],
               "training-parallel-commoncrawl.tgz": ["commoncrawl.de-en.en", "commoncrawl.de-en.de"],
               "training-parallel-nc-v12.tgz": ["training/news-commentary-v12.de-en.en",
                                                "training/news-commentary-v12.de-en.de"],
               "dev.tgz": ["dev/newstest2013.en", "dev/newstest2013.de"],
               "test-full.tgz": ["test-full/newstest2014-deen-src.en.sgm", "test-full/newstest2014-deen-ref.de.sgm"]}
    for archive, names in members.items():
        with tarfile.open(raw / archive, "w:gz") as t:
            for n in names:
                t.add(src / n, arcname=n)
    out = tmp_path / "out"
    p = run("scripts/prepare-wmt14-en-de.sh", str(raw), str(out), "--merges", "10", "--workers", "1")
    assert "train: 7 sentence pairs" in p.stdout and "test: 3 sentence pairs" in p.stdout
    assert (out / "raw" / "test.de").read_text().splitlines() == de  # SGML stripped, text kept
    assert (out / "bin" / "dict.de.txt").exists() and (out / "bin" / "test.en-de.de.idx").exists()
    (raw / "dev.tgz").unlink()
    p = run("scripts/prepare-wmt14-en-de.sh", str(raw), str(tmp_path / "o2"), check=False)
    assert p.returncode != 0 and "missing archive" in p.stderr


def test_bench_decode_rounds_rotate_the_first_model(monkeypatch):
    """Each model decodes all its batches in turn (warm); the first model rotates from round to round, so that
    no model always runs first; times are summed per model."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def fake(task, gen, models, sample, device, stats=None):
        calls.append((gen, sample))
        return {"A": 1.0, "B": 10.0, "C": 100.0}[gen]

    monkeypatch.setattr(bench, "decode_batch", fake)
    runners = {name: (None, name, None) for name in "ABC"}
    data = {"A": ([0, 1, 2], 3), "B": ([0, 1, 2], 3), "C": ([0, 1], 2)}
    assert bench.time_round(runners, data, "cpu", first=0) == {"A": 3.0, "B": 30.0, "C": 200.0}
    assert calls == [("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1), ("B", 2), ("C", 0), ("C", 1)]
    calls.clear()
    bench.time_round(runners, data, "cpu", first=4)
    assert [c[0] for c in calls] == list("BBBCCAAA")


@pytest.mark.parametrize("failing", ["train", "generate"])
def test_quickstart_fails_loudly(tmp_path, failing):
    """examples/quickstart.sh stops with a non-zero exit and the failing tool's last lines when fairseq-train
    exits non-zero, or when fairseq-generate prints no 'Translated N sentences' line (e.g. a fatal library
    error after which it still exits 0): never a silent success. The fairseq commands are stubs here."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    train_rc = 3 if failing == "train" else 0
    (venv / "fairseq-train").write_text(f"#!/bin/bash\necho 'train: something broke'\nexit {train_rc}\n")
    (venv / "fairseq-generate").write_text("#!/bin/bash\necho 'FATAL ERROR: cannot load a library'\nexit 0\n")
    for tool in venv.iterdir():
        tool.chmod(0o755)
    work = tmp_path / "work"
    (work / "data" / "bin").mkdir(parents=True)
    (work / "data" / "bin" / "dict.en.txt").write_text("")  # the data step is skipped when prepared
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "checkpoint_last.pt").write_text("")
    env = {**ENV, "VENV": str(tmp_path / "venv"), "WORK_DIR": str(work)}
    p = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode != 0
    if failing == "train":
        assert "fairseq-train failed (exit 3)" in p.stderr and "train: something broke" in p.stderr
        assert "decoding" not in p.stdout
    else:
        assert "fairseq-generate at batch 64 failed" in p.stderr and "FATAL ERROR" in p.stderr
        assert "sacreBLEU" not in p.stdout


@pytest.mark.parametrize("cpu", ["0", "1"])
def test_quickstart_ends_with_translations_next_to_references(tmp_path, cpu):
    """The quickstart's last lines: BLEU, speed, then a few detokenized test translations next to their sources and
    references. fairseq runs on whatever device it sees: ``--cpu`` only with CPU=1; TRAIN_ARGS / GENERATE_ARGS are
    appended. The fairseq commands are stubs that record their arguments and print a generate output."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    hyps = ["Ein Hund läuft .", "Zwei Männer @-@ Gruppe spielen .", "Eine Frau liest ."]
    gen = "".join(f"S-{i}\tx\nT-{i}\tx\nH-{i}\t-0.5\t{h}\n" for i, h in enumerate(hyps))
    gen += "2026-01-01 | INFO | fairseq_cli.generate | Translated 3 sentences (15 tokens) in 0.1s (30.00 sentences/s)\n"
    (tmp_path / "gen.txt").write_text(gen)
    (venv / "fairseq-train").write_text(f"#!/bin/bash\necho \"train $*\" >> {calls}\n")
    (venv / "fairseq-generate").write_text(f"#!/bin/bash\necho \"generate $*\" >> {calls}\ncat {tmp_path / 'gen.txt'}\n")
    for tool in venv.iterdir():
        tool.chmod(0o755)
    work = tmp_path / "work"
    (work / "data" / "bin").mkdir(parents=True)
    (work / "data" / "bin" / "dict.en.txt").write_text("")
    (work / "data" / "raw").mkdir()
    (work / "data" / "raw" / "test.en").write_text("A dog runs.\nTwo men play.\nA woman reads.\n")
    refs = ["Ein Hund rennt.", "Zwei Männer-Gruppe spielt.", "Eine Frau liest."]
    (work / "data" / "raw" / "test.de").write_text("".join(r + "\n" for r in refs))
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "checkpoint_last.pt").write_text("")
    env = {**ENV, "VENV": str(tmp_path / "venv"), "WORK_DIR": str(work), "SHOW": "2", "CPU": cpu,
           "TRAIN_ARGS": "--fp16 --update-freq 2", "GENERATE_ARGS": "--fp16"}
    # the stubs must be the ones found, before any fairseq on PATH
    env["PATH"] = str(venv) + os.pathsep + env["PATH"]
    p = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "quickstart: 2 of the 3 test translations (detokenized), with their references:" in p.stdout
    assert "  source     A dog runs.\n  LT         Ein Hund läuft.\n  reference  Ein Hund rennt." in p.stdout
    assert "  LT         Zwei Männer-Gruppe spielen.\n  reference  Zwei Männer-Gruppe spielt." in p.stdout
    assert "Eine Frau liest" not in p.stdout  # SHOW=2
    recorded = calls.read_text().splitlines()
    train = [c for c in recorded if c.startswith("train ")]
    generate = [c for c in recorded if c.startswith("generate ")]
    assert len(train) == 1 and len(generate) == 2
    assert train[0].endswith("--fp16 --update-freq 2") and all(g.endswith("--fp16") for g in generate)
    assert all((" --cpu" in c) == (cpu == "1") for c in recorded), recorded
    p = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env={**env, "CPU": "yes"}, capture_output=True,
                       text=True)
    assert p.returncode != 0 and "CPU must be 0 or 1" in p.stderr


def test_experiments_list_names_every_lever_with_its_flags():
    p = subprocess.run([sys.executable, "scripts/experiments.py", "levers", "--list"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = dict(line.split(None, 1) for line in p.stdout.splitlines())
    assert rows["par"] == "--latent-predictor parallel" and rows["K64"] == "--num-codes 64"
    assert rows["base"] == "(the preset)"
    p = subprocess.run([sys.executable, "scripts/experiments.py", "levers"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert p.returncode != 0 and "--work is required" in p.stderr
    for bad, message in ((["--max-update", "0"], "--max-update must be >= 1, got 0"),
                         (["--seeds", "-1"], "--seeds must be >= 0"), (["--temperature", "nan"], "--temperature must be")):
        p = subprocess.run([sys.executable, "scripts/experiments.py", "table1", "--work", "never", "--data", "d",
                            "--raw", "r", *bad], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert p.returncode != 0 and message in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(ROOT, "never"))


def test_experiments_decodes_again_when_the_checkpoint_or_the_options_change(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import experiments

    calls = []

    def fake_sh(cmd, log=None):
        calls.append(cmd)
        with open(log, "w") as f:
            f.write(f"H-0\t-0.1\tout{len(calls)}\n")

    monkeypatch.setattr(experiments, "sh", fake_sh)
    ckpt, out = tmp_path / "checkpoint_last.pt", str(tmp_path / "gen.txt")
    ckpt.write_bytes(b"model at update 3")
    experiments.generate_once(out, "DATA", str(ckpt), "test", 64, ["--beam", "1"])
    experiments.generate_once(out, "DATA", str(ckpt), "test", 64, ["--beam", "1"])
    assert len(calls) == 1  # the same checkpoint and command: reused
    ckpt.write_bytes(b"model at update 40, trained on")
    experiments.generate_once(out, "DATA", str(ckpt), "test", 64, ["--beam", "1"])
    assert len(calls) == 2 and "out2" in open(out).read()  # a checkpoint trained further: decoded again
    experiments.generate_once(out, "DATA", str(ckpt), "test", 64, ["--latent-length-beam", "3"])
    assert len(calls) == 3 and "--latent-length-beam" in calls[-1]


def test_bench_decode_names_a_bad_option_or_a_swapped_checkpoint_before_timing(tmp_path):
    import torch

    for bad, message in ((["--repeats", "0"], "--repeats must be >= 1"), (["--batch-sizes", "0"], "--batch-sizes"),
                         (["--max-len-a", "nan"], "--max-len-a must be")):
        p = subprocess.run([sys.executable, "scripts/bench_decode.py", "D", "--lt-path", "a", "--ar-path", "b", *bad],
                           cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert p.returncode != 0 and message in p.stderr, p.stderr
    ar = tmp_path / "ar.pt"
    torch.save({"cfg": {"model": {"_name": "transformer_teacher_tiny"}, "task": {"_name": "translation"}},
                "model": {}}, ar)
    p = subprocess.run([sys.executable, "scripts/bench_decode.py", str(tmp_path), "--lt-path", str(ar), "--ar-path",
                        str(ar)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "--lt-path" in p.stderr and "pass a latent_transformer checkpoint" in p.stderr, \
        p.stderr


def test_experiments_refuses_a_distillation_of_other_data(tmp_path):
    data, distill = tmp_path / "bin", tmp_path / "distill"
    data.mkdir()
    distill.mkdir()
    (data / "dict.en.txt").write_text("w1 3\nw2 2\n")
    (distill / "dict.en.txt").write_text("v1 3\nv2 2\n")
    p = subprocess.run([sys.executable, "scripts/experiments.py", "table1", "--work", str(tmp_path / "w"), "--data",
                        str(data), "--distill", str(distill), "--raw", "r", "--dry-run"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "not a distillation of this data" in p.stderr, p.stderr


def _fake_experiments(tmp_path, monkeypatch):
    """experiments.py with fairseq-train and diagnose.py replaced: a 'training' saves a checkpoint at --max-update."""
    import types

    import torch

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import experiments

    trained = []

    def fake_sh(cmd, log=None):
        save, updates = cmd[cmd.index("--save-dir") + 1], int(cmd[cmd.index("--max-update") + 1])
        trained.append(cmd)
        torch.save({"optimizer_history": [{"num_updates": updates}]}, os.path.join(save, "checkpoint_last.pt"))

    monkeypatch.setattr(experiments, "sh", fake_sh)
    monkeypatch.setitem(sys.modules, "diagnose", types.SimpleNamespace(main=lambda argv: {"bleu": 1.0}))
    data, raw = tmp_path / "bin", tmp_path / "raw"
    data.mkdir()
    raw.mkdir()
    (data / "train.en-de.en.idx").write_bytes(b"")
    common = ["levers", "--data", str(data), "--raw", str(raw), "--work", str(tmp_path / "w"), "--subset", "valid",
              "--cpu"]
    return experiments, trained, common


def test_experiments_refuses_a_finished_run_trained_with_other_options(tmp_path, monkeypatch, capsys):
    """The run name holds only the lever, --distill and the seed: a run directory trained with other options is
    named with them (not reused, no results row for the old model); --max-update and the logging options may
    change on resume; --overwrite trains it anew; a run trained before the record existed is accepted."""
    import json

    experiments, trained, common = _fake_experiments(tmp_path, monkeypatch)
    run = tmp_path / "w" / "lever-base-raw-s1"
    results = tmp_path / "w" / "results.jsonl"
    experiments.main(common + ["--only", "base", "--max-update", "2", "--max-tokens", "500"])
    assert len(trained) == 1 and (run / "train_command.json").exists()
    # resumed with a larger budget and other logging: trained on
    experiments.main(common + ["--only", "base", "--max-update", "4", "--max-tokens", "500", "--log-interval", "7"])
    assert len(trained) == 2 and len(results.read_text().splitlines()) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        experiments.main(common + ["--only", "base", "--max-update", "4", "--max-tokens", "200", "--",
                                   "--dropout", "0.5", "--num-codes", "32"])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"experiments.py: run lever-base-raw-s1 in {tmp_path / 'w'} was trained with other "
                              "options: "), message
    for change in ("--num-codes 512 -> 32", "--dropout 0.1 -> 0.5", "--max-tokens 500 -> 200",
                   "pass another --work for these options, or --overwrite to delete"):
        assert change in message, message
    assert "--max-update" not in message and "--log-interval" not in message
    assert len(trained) == 2 and len(results.read_text().splitlines()) == 2  # nothing trained, no row added
    assert "trained (4 updates)" not in capsys.readouterr().out
    # --overwrite: the old run is deleted and trained with the new options
    experiments.main(common + ["--only", "base", "--max-update", "4", "--max-tokens", "200", "--overwrite", "--",
                               "--dropout", "0.5", "--num-codes", "32"])
    assert len(trained) == 3 and "--dropout" in trained[-1][-4:]
    assert "deleting" in capsys.readouterr().out
    assert "0.5" in json.loads((run / "train_command.json").read_text())["cmd"]

    # a run trained before the record existed (checkpoints, no train_command.json): accepted and recorded
    (run / "train_command.json").unlink()
    experiments.main(common + ["--only", "base", "--max-update", "6", "--max-tokens", "300"])
    assert len(trained) == 4
    assert "INFO: lever-base-raw-s1 has checkpoints but no record" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--max-tokens 300 -> 500"):
        experiments.main(common + ["--only", "base", "--max-update", "6", "--max-tokens", "500"])


def test_experiments_checks_parallel_only_levers_before_training(tmp_path, monkeypatch):
    """g0/g03 (the parallel predictor's glancing) need par: refused before any combination is trained."""
    experiments, trained, common = _fake_experiments(tmp_path, monkeypatch)
    for combo, lever in (("g03", "g03 (--latent-glancing-ratio 0.3"), ("K64+g0", "g0 (--latent-glancing-ratio 0")):
        with pytest.raises(SystemExit) as e:
            experiments.main(common + ["--only", "base", combo, "--max-update", "1"])
        assert lever in e.value.code and f"combine them with par (e.g. par+{combo.split('+')[-1]}), not {combo!r}" \
            in e.value.code, e.value.code
    assert trained == [] and not os.path.exists(tmp_path / "w" / "lever-base-raw-s1")
    experiments.main(common + ["--only", "par+g03", "--max-update", "1"])
    assert "--latent-glancing-ratio" in trained[-1]
