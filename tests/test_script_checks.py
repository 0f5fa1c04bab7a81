"""The scripts that load checkpoints or write outputs check them before any work: a missing, corrupt or wrong
checkpoint (image_ae vs translation, autoregressive vs Latent Transformer, another dictionary) is one line naming
it; an existing output is replaced only with --overwrite; a missing parent directory is created."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_distill import fake_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import average_checkpoints  # noqa: E402
import dump_latents  # noqa: E402
import plot_curves  # noqa: E402
import profile_decode  # noqa: E402
import score  # noqa: E402


@pytest.fixture
def files(tmp_path):
    """A data directory with 12-word dictionaries (16 entries with fairseq's 4 specials) and checkpoints of every
    kind: autoregressive, Latent Transformer, another dictionary, image_ae, corrupt."""
    from fairseq_helpers import make_copy_task, preprocess

    data = tmp_path / "bin"
    make_copy_task(str(tmp_path / "raw"), n_train=6, n_valid=3, n_test=2)  # 12 words
    preprocess(str(tmp_path / "raw"), str(data))
    ref = tmp_path / "ref.tgt"
    ref.write_text("w1\n")
    image = tmp_path / "image.pt"
    torch.save({"version": 1, "step": 3, "model": {}, "optimizer": {}, "rng": {},
                "args": {"bottleneck": "vq", "image_size": 32, "arch": "vqvae"}}, image)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    return {
        "data": str(data), "ref": str(ref), "tmp": tmp_path,
        "ar": fake_checkpoint(str(tmp_path / "ar.pt")),
        "lt": fake_checkpoint(str(tmp_path / "lt.pt"), arch="latent_transformer_tiny", task="latent_translation"),
        "other": fake_checkpoint(str(tmp_path / "other.pt"), arch="latent_transformer_tiny",
                                 task="latent_translation", entries=40),
        "image": str(image), "corrupt": str(corrupt),
    }


def exits(main, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    assert message in e.value.code, e.value.code


def test_score_names_a_wrong_checkpoint_before_decoding(files):
    common = [files["data"], "--ref", files["ref"], "--path"]
    exits(score.main, common + [files["image"]], f"--path {files['image']} is an image_ae checkpoint (image VQ-VAE); "
                                                 "pass a fairseq translation checkpoint")
    exits(score.main, common + [files["corrupt"]], f"cannot read checkpoint {files['corrupt']}")
    exits(score.main, common + [files["other"]], "was trained with a source dictionary of 40 entries, but "
                                                 f"{files['data']}/dict.src.txt has 16: another dictionary")
    out = files["tmp"] / "gen.txt"
    out.write_text("previous result")
    exits(score.main, common + [files["ar"], "--out", str(out)], f"--out {out} exists; pass --overwrite")
    assert out.read_text() == "previous result"


def test_dump_latents_and_profile_decode_need_a_latent_transformer(files):
    common = [files["data"], "--path"]
    for main in (dump_latents.main, profile_decode.main):
        exits(main, common + [files["ar"]], f"--path {files['ar']} is a transformer checkpoint (task translation); "
                                            "pass a latent_transformer checkpoint")
        exits(main, common + [files["image"]], "is an image_ae checkpoint")
        exits(main, common + [files["other"]], "another dictionary")
        exits(main, common + [str(files["tmp"] / "missing.pt")], "no such checkpoint")
    exits(profile_decode.main, common + [files["lt"], "--npd-candidates", "2", "--npd-teacher", files["lt"]],
          f"--npd-teacher {files['lt']} is a Latent Transformer checkpoint (latent_transformer_tiny); pass an "
          "autoregressive transformer checkpoint")
    exits(profile_decode.main, common + [files["lt"], "--batch-size", "0"], "--batch-size must be >= 1, got 0")
    png = files["tmp"] / "usage.png"
    png.write_bytes(b"previous")
    exits(dump_latents.main, common + [files["lt"], "--png", str(png)], f"--png {png} exists; pass --overwrite")


def test_average_checkpoints_checks_every_input_and_keeps_an_existing_output(files):
    out = str(files["tmp"] / "new" / "dir" / "avg.pt")
    exits(average_checkpoints.main, ["--inputs", files["ar"], files["image"], "--output", out],
          f"--inputs {files['image']} is an image_ae checkpoint")
    exits(average_checkpoints.main, ["--inputs", files["ar"], files["corrupt"], "--output", out],
          "cannot read checkpoint")
    exits(average_checkpoints.main, ["--inputs", files["ar"], files["lt"], "--output", out],
          "the checkpoints have different models (ar.pt: transformer, lt.pt: latent_transformer_tiny)")
    assert not os.path.exists(out) and os.path.isdir(os.path.dirname(out))  # parent created, nothing written
    state = torch.load(files["lt"], weights_only=False)
    for key, value, what in (("task", {"_name": "latent_translation", "data": "elsewhere"}, "training data"),
                             ("common", {"seed": 7}, "seeds")):
        other = str(files["tmp"] / f"other_{key}.pt")
        torch.save({**state, "cfg": {**state["cfg"], key: value}}, other)
        exits(average_checkpoints.main, ["--inputs", files["lt"], other, "--output", out],
              f"the checkpoints have different {what}")
    exits(average_checkpoints.main, ["--inputs", files["ar"], "--output", files["lt"]],
          f"--output {files['lt']} exists; pass --overwrite")


def test_plot_curves_keeps_an_existing_png_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text(json.dumps({"num_updates": "10", "train_wall": "5"}) + "\n"
                                   + json.dumps({"valid_num_updates": "10", "valid_bleu": "1.5"}) + "\n")
    out = tmp_path / "plots" / "new" / "c.png"  # missing parents are created
    plot_curves.main(["--run", f"x={run}", "--out", str(out)])
    first = out.read_bytes()
    exits(plot_curves.main, ["--run", f"x={run}", "--out", str(out), "--title", "other"],
          f"--out {out} exists; pass --overwrite")
    assert out.read_bytes() == first
    plot_curves.main(["--run", f"x={run}", "--out", str(out), "--title", "other", "--overwrite"])
    assert out.read_bytes() != first
    exits(plot_curves.main, ["--run", f"x={run}", "--out", str(tmp_path / "d.png"), "--cores", "0"],
          "--cores must be > 0")


@pytest.mark.parametrize("script", ["prepare-data.sh", "prepare-multi30k.sh"])
def test_prepare_scripts_keep_prepared_data_unless_overwrite(tmp_path, script):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    (out / "bin").mkdir(parents=True)
    (out / "bin" / "dict.en.txt").write_text("mine 1\n")
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), str(raw), str(out)], capture_output=True,
                       text=True)
    assert p.returncode != 0
    assert f"{out} already holds prepared data" in p.stderr and "pass --overwrite to replace it" in p.stderr, p.stderr
    assert sorted(os.listdir(out)) == ["bin"] and (out / "bin" / "dict.en.txt").read_text() == "mine 1\n"


def test_score_checks_the_references_against_the_split_before_decoding(files, tmp_path):
    data = files["data"]
    ref = tmp_path / "valid.tgt"
    ref.write_text("w1\nw2\n")
    exits(score.main, [data, "--path", files["ar"], "--subset", "valid", "--ref", str(ref)],
          "the valid split of " + data + " has 3 sentences but --ref has 2 lines")
    exits(score.main, [data, "--path", files["ar"], "--subset", "dev", "--ref", str(ref)], f"{data} has no dev split (")
    exits(dump_latents.main, [data, "--path", files["lt"], "--subset", "dev"], f"{data} has no dev split (")


def test_a_dictionary_of_the_same_size_with_other_symbols_is_named(files):
    """A fixed-size vocabulary passes the size check; the training data's own dictionary files tell the rest."""
    from io_checks import LATENT, require

    other = files["tmp"] / "other_bin"
    other.mkdir()
    for name in os.listdir(files["data"]):
        if name.startswith("dict."):
            words = open(os.path.join(files["data"], name), encoding="utf-8").read().replace("w", "v")
            (other / name).write_text(words, encoding="utf-8")
    lt = files["tmp"] / "lt_other.pt"
    state = torch.load(files["lt"], weights_only=False)
    state["cfg"]["task"]["data"] = str(other)
    torch.save(state, lt)
    with pytest.raises(SystemExit, match="other symbols than .*another vocabulary"):
        require(str(lt), "score.py", LATENT, files["data"])
    state["cfg"]["task"]["data"] = files["data"]  # trained on this very data: accepted
    torch.save(state, lt)
    require(str(lt), "score.py", LATENT, files["data"])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "diagnose.py: --batch-size must be >= 1, got 0"),
    (["--max-len-a", "-1"], "diagnose.py: --max-len-a must be a finite number >= 0, got -1.0"),
])
def test_diagnose_names_a_bad_number_in_one_line_before_loading(tmp_path, argv, message):
    """Checked before the checkpoint is read (none exists here): one line, no traceback."""
    p = subprocess.run([sys.executable, "scripts/diagnose.py", str(tmp_path), "--path", str(tmp_path / "none.pt"),
                        *argv], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip() == message, p.stderr
