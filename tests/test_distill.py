"""scripts/distill.sh reuses a decoding only when it came from the same teacher, data and beam, and never replaces
a finished distillation of other inputs without --overwrite. The teacher's decoding is a stand-in
``fairseq-generate`` on PATH (it records which checkpoint it decoded with), so every run takes seconds."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from fairseq_helpers import make_copy_task, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 12
STUB = """#!/usr/bin/env bash
# stand-in for fairseq-generate: every training sentence gets the hypothesis written in TEACHER.hyp
while [ $# -gt 0 ]; do case "$1" in --path) teacher="$2"; shift 2 ;; *) shift ;; esac; done
echo "$teacher" >> "$STUB_LOG"
for ((i = 0; i < STUB_N; i++)); do printf 'H-%d\\t-0.5\\t%s\\n' "$i" "$(cat "$teacher.hyp")"; done
"""


def fake_checkpoint(path, arch="transformer", task="translation", entries=16, hyp="w1"):
    """A checkpoint with what the checks read (kind, task, embedding sizes); the stub decodes it to ``hyp``."""
    model = {f"{side}.embed_tokens.weight": torch.zeros(entries, 2) for side in ("encoder", "decoder")}
    torch.save({"cfg": {"model": argparse.Namespace(arch=arch), "task": {"_name": task}}, "model": model,
                "args": None}, path)
    with open(path + ".hyp", "w") as f:
        f.write(hyp)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    raw, data = str(root / "raw"), str(root / "bin")
    make_copy_task(raw, n_train=N_TRAIN, n_valid=3, n_test=3)
    preprocess(raw, data)
    stub_dir = root / "stub"
    stub_dir.mkdir()
    (stub_dir / "fairseq-generate").write_text(STUB)
    os.chmod(stub_dir / "fairseq-generate", 0o755)
    log = str(root / "decoded_with.log")
    env = {**os.environ, "STUB_LOG": log, "STUB_N": str(N_TRAIN), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(stub_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")])}

    def run(*args, check=True):
        p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "distill.sh"), *args], env=env, capture_output=True,
                           text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"distill.sh {args} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        return p

    def decoded_with():
        return [os.path.basename(line.strip()) for line in open(log)] if os.path.exists(log) else []

    return root, data, run, decoded_with


def targets(out):
    return set(open(os.path.join(out, "text", "train.tgt")).read().split("\n")) - {""}


def test_a_different_teacher_is_decoded_again_and_a_finished_dir_needs_overwrite(setup):
    root, data, run, decoded_with = setup
    a = fake_checkpoint(str(root / "a.pt"), hyp="w1")
    b = fake_checkpoint(str(root / "b.pt"), hyp="w2 w3")
    out = str(root / "nested" / "out")  # parents are created
    p = run(data, a, out, "--beam", "2")
    assert f"{N_TRAIN} distilled pairs" in p.stdout and decoded_with() == ["a.pt"] and targets(out) == {"w1"}
    assert os.path.exists(os.path.join(out, "train.src-tgt.tgt.bin"))
    p = run(data, a, out, "--beam", "2", "--batch-size", "7")  # same teacher, data and beam: reused
    assert "reusing" in p.stdout and decoded_with() == ["a.pt"]

    # another teacher, or another beam, would replace a finished distillation: refused, nothing touched
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("distill.key", "train.src-tgt.tgt.bin")}
    p = run(data, b, out, "--beam", "2", check=False)
    assert p.returncode != 0 and "holds a distillation of other inputs" in p.stderr, p.stderr
    assert f"was: teacher {a} " in p.stderr and f"now: teacher {b} " in p.stderr
    assert "pass --overwrite to replace it" in p.stderr
    p = run(data, a, out, check=False)  # the default beam 4
    assert p.returncode != 0 and "was: beam 2" in p.stderr and "now: beam 4" in p.stderr
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    assert decoded_with() == ["a.pt"] and targets(out) == {"w1"}

    # --overwrite: decoded again with the new teacher
    p = run(data, b, out, "--beam", "2", "--overwrite")
    assert "reusing" not in p.stdout and decoded_with() == ["a.pt", "b.pt"] and targets(out) == {"w2 w3"}

    # a retrained teacher at the same path (new modification time) is another teacher
    st = os.stat(b)
    os.utime(b, (st.st_atime, st.st_mtime + 10))
    p = run(data, b, out, "--beam", "2", check=False)
    assert p.returncode != 0 and "holds a distillation of other inputs" in p.stderr

    # an unfinished directory (stopped after decoding with b) asked for teacher a: its stale decoding is not reused
    os.remove(os.path.join(out, "distill.key"))
    for f in os.listdir(out):
        if f.startswith("train."):
            os.remove(os.path.join(out, f))
    p = run(data, a, out, "--beam", "2")
    assert "decoded from other inputs" in p.stdout and "reusing" not in p.stdout
    assert decoded_with() == ["a.pt", "b.pt", "a.pt"] and targets(out) == {"w1"}


def test_a_wrong_teacher_or_option_is_named_before_any_decoding(setup):
    root, data, run, decoded_with = setup
    n = len(decoded_with())
    out = str(root / "never")
    lt = fake_checkpoint(str(root / "lt.pt"), arch="latent_transformer_tiny", task="latent_translation")
    p = run(data, lt, out, check=False)
    assert p.returncode != 0
    assert f"TEACHER.pt {lt} is a Latent Transformer checkpoint (latent_transformer_tiny); pass an autoregressive " \
           f"transformer checkpoint" in p.stderr, p.stderr
    other = fake_checkpoint(str(root / "other.pt"), entries=24)
    p = run(data, other, out, check=False)
    assert p.returncode != 0 and "was trained with a source dictionary of 24 entries" in p.stderr
    assert "has 16: another dictionary" in p.stderr
    broken = root / "broken.pt"
    broken.write_bytes(b"\x00" * 10)
    p = run(data, str(broken), out, check=False)
    assert p.returncode != 0 and "cannot read checkpoint" in p.stderr and "corrupt" in p.stderr
    good = fake_checkpoint(str(root / "good.pt"))
    p = run(data, good, out, "--beam", "0", check=False)
    assert p.returncode != 0 and "--beam must be an integer >= 1, got '0'" in p.stderr
    assert not os.path.exists(out) and len(decoded_with()) == n


def test_out_bin_may_not_be_the_data_itself_even_with_overwrite(setup):
    root, data, run, decoded_with = setup
    n = len(decoded_with())
    before = {f: os.path.getmtime(os.path.join(data, f)) for f in os.listdir(data)}
    good = fake_checkpoint(str(root / "good2.pt"))
    for out in (data, os.path.join(data, "sub"), str(root)):
        p = run(data, good, out, "--overwrite", check=False)
        assert p.returncode != 0 and "choose another directory" in p.stderr, p.stderr
    assert {f: os.path.getmtime(os.path.join(data, f)) for f in os.listdir(data)} == before
    assert len(decoded_with()) == n
