"""GPU readiness without a GPU: the size presets (one definition of tiny and base, the paper's base teacher and base
Latent Transformer built with their sizes, nothing trained), fairseq options passed through experiments.py, no
unconditional --cpu, and scripts/gpu_check.sh refusing to run without CUDA (its table code run on stand-in files)."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from fairseq_helpers import make_copy_task, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def dictionaries(path):
    os.makedirs(path, exist_ok=True)
    for lang in ("en", "de"):
        with open(os.path.join(path, f"dict.{lang}.txt"), "w") as f:
            f.writelines(f"w{i} 1\n" for i in range(20))
    return str(path)


def build(argv):
    """fairseq's own option parsing and task / model builders; nothing is trained."""
    import vq_nat.models.presets  # noqa: F401  (the transformer_teacher_* archs)
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task).build_model(cfg.model)


def dims(model):
    enc, dec = model.encoder.layers, model.decoder.layers
    return dict(embed_dim=model.encoder.embed_tokens.embedding_dim, ffn_embed_dim=enc[0].fc1.out_features,
                attention_heads=enc[0].self_attn.num_heads, encoder_layers=len(enc), decoder_layers=len(dec),
                decoder_ffn=dec[0].fc1.out_features, decoder_heads=dec[0].self_attn.num_heads,
                decoder_dim=dec[0].self_attn.embed_dim)


def expect(size, **layers):
    s = {**size, **layers}
    return dict(s, decoder_ffn=s["ffn_embed_dim"], decoder_heads=s["attention_heads"], decoder_dim=s["embed_dim"])


def test_presets_are_plain_python_and_name_the_paper_sizes():
    from vq_nat.models import presets

    assert presets.size("base") == dict(embed_dim=512, ffn_embed_dim=2048, attention_heads=8, encoder_layers=6,
                                        decoder_layers=6)
    assert presets.size("tiny") == dict(embed_dim=128, ffn_embed_dim=256, attention_heads=4, encoder_layers=3,
                                        decoder_layers=3)
    assert presets.size_flags("tiny", 6, 1)[-4:] == ["--encoder-layers", "6", "--decoder-layers", "1"]
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        presets.size("huge")
    # scripts/experiments.py reads the file itself, without fairseq
    code = ("import runpy, sys; p = runpy.run_path('vq_nat/models/presets.py'); "
            "assert 'fairseq' not in sys.modules; print(' '.join(p['size_flags']('base')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == presets.size_flags("base")


def test_base_teacher_from_the_script_and_the_registered_archs_have_the_presets_sizes(tmp_path):
    from vq_nat.models import presets

    data = dictionaries(tmp_path / "dicts")
    p = subprocess.run(["bash", "scripts/train-teacher.sh", data, str(tmp_path / "save"), "--size", "base",
                        "--dry-run", "--fp16"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    cmd = shlex.split(p.stdout)
    assert cmd[0] == "fairseq-train" and cmd[-1] == "--fp16" and "--cpu" not in cmd
    assert cmd[cmd.index("--arch") + 1] == "transformer_teacher_base"
    assert not os.path.exists(tmp_path / "save"), "--dry-run runs nothing"
    base = presets.size("base")
    assert dims(build(cmd[1:] + ["-s", "en", "-t", "de"])) == expect(base)
    # later options win over the preset: a 6+1 AR of the base width; another arch with all of its own sizes
    assert dims(build(cmd[1:] + ["-s", "en", "-t", "de", "--decoder-layers", "1"])) == expect(base, decoder_layers=1)
    big = dict(embed_dim=1024, ffn_embed_dim=4096, attention_heads=16, encoder_layers=6, decoder_layers=6)
    assert dims(build(cmd[1:] + ["-s", "en", "-t", "de", "--arch", "transformer_vaswani_wmt_en_de_big"])) == expect(big)
    common = [data, "-s", "en", "-t", "de", "--task", "translation", "--share-all-embeddings"]
    assert dims(build(common + ["--arch", "transformer_teacher_base"])) == expect(base)
    tiny = presets.size("tiny")
    assert dims(build(common + ["--arch", "transformer_teacher_tiny"])) == expect(tiny)
    assert dims(build(common + ["--arch", "transformer_teacher_tiny_e6d1"])) == expect(tiny, encoder_layers=6,
                                                                                         decoder_layers=1)
    p = subprocess.run(["bash", "scripts/train-teacher.sh", data, str(tmp_path / "save"), "--size", "huge"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "unknown --size 'huge'" in p.stderr


def test_base_and_tiny_latent_transformers_have_the_presets_sizes(tmp_path):
    from vq_nat.models import presets

    data = dictionaries(tmp_path / "dicts")
    common = [data, "-s", "en", "-t", "de", "--task", "latent_translation", "--criterion", "latent_vq",
              "--share-all-embeddings"]
    model = build(common + ["--arch", "latent_transformer"])  # the paper's Table 1 model
    assert dims(model) == expect(presets.size("base"))
    bottleneck = model.decoder.bottleneck
    assert tuple(bottleneck.codebook.shape) == (4096, 512) and bottleneck.num_samples == 10  # K=2^12, m=10
    assert model.decoder.factor == 8  # nc=3
    assert dims(build(common + ["--arch", "latent_transformer_tiny"])) == expect(presets.size("tiny"))


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_ready")
    make_copy_task(str(root / "raw"), n_train=40, n_valid=4, n_test=4)
    preprocess(str(root / "raw"), str(root / "bin"))
    return root, str(root / "bin")


def experiments(*args):
    return subprocess.run([sys.executable, "scripts/experiments.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)


def commands(stdout, tool):
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith(f"+ {tool} ")]


def test_experiments_passes_fairseq_options_through_and_adds_cpu_only_when_asked(data_bin):
    root, data = data_bin
    work = str(root / "dry")
    common = ["--data", data, "--raw", str(root / "raw"), "--work", work, "--dry-run"]
    p = experiments("levers", *common, "--subset", "valid", "--only", "base", "--", "--fp16", "--update-freq", "2")
    assert p.returncode == 0, p.stderr
    (train,) = commands(p.stdout, "fairseq-train")
    assert train[-3:] == ["--fp16", "--update-freq", "2"] and "--cpu" not in train
    assert "scripts/diagnose.py" in p.stdout and "--cpu" not in p.stdout
    assert not os.path.exists(work), "--dry-run writes nothing"

    p = experiments("table1", *common, "--only", "ar", "--generate-args=--beam 5 --fp16", "--",
                    "--distributed-world-size", "2")
    assert p.returncode == 0, p.stderr
    (train,) = commands(p.stdout, "fairseq-train")
    assert train[-2:] == ["--distributed-world-size", "2"] and "--cpu" not in train
    gens = commands(p.stdout, "fairseq-generate")
    assert len(gens) == 4 and all(g[-3:] == ["--beam", "5", "--fp16"] and "--cpu" not in g for g in gens)

    p = experiments("table1", *common, "--only", "ar", "--cpu")
    assert p.returncode == 0, p.stderr
    assert all("--cpu" in c for c in commands(p.stdout, "fairseq-train") + commands(p.stdout, "fairseq-generate"))


def test_options_after_the_separator_reach_fairseq_train(data_bin):
    """Trained for real: the checkpoint's configuration holds the passed options, which win over the presets."""
    import torch

    root, data = data_bin
    work = str(root / "real")
    p = experiments("table1", "--data", data, "--raw", str(root / "raw"), "--work", work, "--only", "ar",
                    "--no-decode", "--max-update", "1", "--max-tokens", "300", "--",
                    "--update-freq", "2", "--encoder-layers", "1", "--decoder-layers", "1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = torch.load(os.path.join(work, "ar", "checkpoint_last.pt"), map_location="cpu", weights_only=False)["cfg"]
    assert list(cfg["optimization"]["update_freq"]) == [2]
    assert (cfg["model"].encoder_layers, cfg["model"].decoder_layers, cfg["model"].encoder_embed_dim) == (1, 1, 128)


def test_gpu_check_refuses_without_cuda_and_writes_nothing(tmp_path):
    work = tmp_path / "check"
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--work", str(work)], cwd=ROOT,
                       env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert p.returncode != 0
    assert "no CUDA GPU visible" in p.stderr and "nothing was run" in p.stderr
    assert not work.exists()
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--max-update", "many"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "--max-update must be a positive number" in p.stderr
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0 and "--overwrite" in p.stdout


def test_gpu_check_table_from_stand_in_outputs(tmp_path):
    """The table step of gpu_check.sh (its last Python block) on stand-in results, train logs and bench output."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh"), encoding="utf-8").read()
    code = re.findall(r"<<'PY'\n(.*?)\nPY\n", text, re.S)[-1]
    exp = tmp_path / "exp"
    lt = "lt-em-raw-K512-m10-nc1-s1"
    rows = [dict(table="table1", label="AR transformer, greedy", run="ar", bleu=30.5, ms_b1=9.0, ms_b64=0.5, updates=800,
                 kind="ar", signature="nrefs:1"),
            dict(table="table1", label="LT em (m=10), nc=1, K=512", run=lt, bleu=20.25, ms_b1=3.0, ms_b64=0.25,
                 updates=800, kind="lt", signature="nrefs:1")]
    for run, fp16 in (("ar", True), (lt, False)):
        (exp / run).mkdir(parents=True)
        log = {"num_updates": "800", "train_wall": "40"} | ({"loss_scale": "8"} if fp16 else {})
        (exp / run / "train.log").write_text(json.dumps(log) + "\n")
    (exp / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench.txt"
    bench.write_text("batch   1  LT                   2.50 ms/sentence  (min 2.4)\n"
                     "batch   1  AR greedy            8.00 ms/sentence  (min 7.9)\n"
                     "batch  64  LT                   0.20 ms/sentence  (min 0.2)\n"
                     "batch  64  AR greedy            0.40 ms/sentence  (min 0.4)\n"
                     "speedup batch1=3.20 batch64=2.00\n")
    table = tmp_path / "gpu_check.md"
    p = subprocess.run([sys.executable, "-", str(exp), str(bench), str(table), os.path.join(ROOT, "scripts"), "0", lt],
                       input=code, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "did not train in fp16" in p.stderr  # the LT's log has no loss scale
    lines = table.read_text().splitlines()
    assert "speedup over AR greedy" in lines[0] and "batch1=3.20 batch64=2.00" in lines[0]
    assert lines[4] == "| AR transformer, greedy | 800 | 40 (20.0) | yes | 30.50 | 9.00 / 0.50 | 8.00 / 0.40 |"
    assert lines[5] == "| LT em (m=10), nc=1, K=512 | 800 | 40 (20.0) | NO | 20.25 | 3.00 / 0.25 | 2.50 / 0.20 |"
