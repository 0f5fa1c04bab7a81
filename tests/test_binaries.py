"""End to end through fairseq's own entry points: preprocess -> train -> generate / interactive."""
import glob
import logging
import os

import pytest
import torch

from fairseq_helpers import generate, hypotheses, interactive, make_copy_task, preprocess, train

N_TEST = 21  # not a multiple of fairseq's --required-batch-size-multiple (8): no sentence may be lost


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    raw = str(root / "raw")
    make_copy_task(raw, n_train=200, n_valid=16, n_test=N_TEST)
    # an empty line and an over-long line in the test set: both must still get a hypothesis
    with open(os.path.join(raw, "test.src"), "a") as f:
        f.write("\n" + " ".join(["w1"] * 300) + "\n")
    with open(os.path.join(raw, "test.tgt"), "a") as f:
        f.write("\n" + " ".join(["w1"] * 300) + "\n")
    dest = str(root / "bin")
    preprocess(raw, dest)
    return dest


CASES = [
    ("vq", "ema", []),
    ("em", "ema", []),
    ("vq", "grad", []),
    ("em", "grad", []),
    ("gumbel", "ema", []),
    ("semhash", "ema", []),
    ("em", "ema", ["--latent-predictor", "parallel"]),
]


@pytest.mark.parametrize("bottleneck,update,extra", CASES)
def test_train_generate_interactive(data_bin, tmp_path, caplog, bottleneck, update, extra):
    save = str(tmp_path / "ckpt")
    caplog.set_level(logging.INFO)
    train(data_bin, save, ["--bottleneck", bottleneck, "--codebook-update", update, "--num-samples", "3",
                           "--mask-startup-steps", "2", "--word-dropout", "0.3", "--word-shuffle", "0.5", *extra])
    ckpt = os.path.join(save, "checkpoint_last.pt")
    assert os.path.exists(ckpt)
    log = caplog.text
    keys = ("length_loss", "length_acc") if "parallel" in extra else ()
    for key in ("recon_loss", "vq_loss", "lp_loss", "code_ppl", "codes_used", "nll_loss") + keys:
        assert f"{key}=" in log or f"{key} " in log, key

    out = generate(data_bin, ckpt, ["--scoring", "sacrebleu", "--max-len-b", "40"])
    hyps = hypotheses(out)
    assert sorted(hyps) == list(range(N_TEST + 2)), "one hypothesis per test sentence"
    assert "BLEU" in out  # sacrebleu scoring ran

    lines = ["w1 w2 w3", "", "w4 w5 w6 w7 w8 w9 w10 w11 w1 w2 w3"]
    out = interactive(data_bin, ckpt, lines)
    assert sorted(hypotheses(out)) == [0, 1, 2], "one H- line per input line, empty lines included"


def test_generate_batch_size_does_not_change_hypotheses(data_bin, tmp_path):
    save = str(tmp_path / "ckpt")
    train(data_bin, save, ["--bottleneck", "em", "--max-update", "6", "--mask-startup-steps", "2"])
    ckpt = os.path.join(save, "checkpoint_last.pt")
    h1 = hypotheses(generate(data_bin, ckpt, ["--batch-size", "1", "--max-len-b", "40"]))
    h64 = hypotheses(generate(data_bin, ckpt, ["--batch-size", "64", "--max-len-b", "40"]))
    assert h1 == h64


def test_checkpoint_of_another_architecture_is_a_clear_error(data_bin, tmp_path):
    save = str(tmp_path / "ckpt")
    train(data_bin, save, ["--bottleneck", "vq"])
    ckpt = os.path.join(save, "checkpoint_last.pt")
    state = torch.load(ckpt, weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if "latent_predictor" not in k}
    bad = str(tmp_path / "bad.pt")
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="does not match this latent_transformer"):
        generate(data_bin, bad)
    assert glob.glob(os.path.join(save, "checkpoint*.pt"))


def test_a_checkpoint_is_checked_against_the_data_and_options_it_was_trained_with(data_bin, tmp_path, caplog):
    """The model carries a signature of its dictionaries and latent options: decoding with a dictionary of the same
    size but other symbols is an error (the weights would load and translate into the wrong words), resuming
    with another --bottleneck a warning; a checkpoint from before the signature still loads; an image_ae
    checkpoint given to fairseq-generate is named."""
    import shutil

    save = str(tmp_path / "ckpt")
    train(data_bin, save, ["--bottleneck", "em", "--num-samples", "3", "--mask-startup-steps", "2"])
    ckpt = os.path.join(save, "checkpoint_last.pt")
    before = hypotheses(generate(data_bin, ckpt, ["--max-len-b", "40"]))

    other = str(tmp_path / "other_bin")
    shutil.copytree(data_bin, other)
    for name in os.listdir(other):
        if name.startswith("dict."):
            path = os.path.join(other, name)
            text = open(path, encoding="utf-8").read().replace("w", "v")  # same size, other symbols
            open(path, "w", encoding="utf-8").write(text)
    with pytest.raises(ValueError, match="trained with another source language or dictionary .*pass the binarized"):
        generate(other, ckpt)
    with pytest.raises(ValueError, match="another source language or dictionary"):  # the other direction
        generate(data_bin, ckpt, ["-s", "tgt", "-t", "src"])

    state = torch.load(ckpt, weights_only=False)
    assert state["model"]["signature"].dtype == torch.int64 and state["model"]["signature"].shape == (3,)
    # signed without the languages (the first signed checkpoints): still loads, same hypotheses
    from vq_nat.models.signature import signature

    from fairseq.data import Dictionary

    src, tgt = (Dictionary.load(os.path.join(data_bin, f"dict.{lang}.txt")) for lang in ("src", "tgt"))
    unsided = state["model"]["signature"].clone()
    unsided[:2] = torch.tensor(signature(state["cfg"]["model"], src, tgt)[:2])
    assert not torch.equal(unsided, state["model"]["signature"])
    state["model"]["signature"] = unsided
    unsigned = str(tmp_path / "unsided.pt")
    torch.save(state, unsigned)
    assert hypotheses(generate(data_bin, unsigned, ["--max-len-b", "40"])) == before
    del state["model"]["signature"]  # as saved before the signature existed
    old = str(tmp_path / "old.pt")
    torch.save(state, old)
    assert hypotheses(generate(data_bin, old, ["--max-len-b", "40"])) == before

    caplog.set_level(logging.WARNING)
    train(data_bin, save, ["--bottleneck", "vq", "--max-update", "4", "--mask-startup-steps", "2"])  # resumes
    assert "trained with other latent options than --bottleneck vq" in caplog.text

    from image_ae.train import rng_state

    image = str(tmp_path / "image.pt")
    torch.save({"version": 1, "step": 3, "model": {}, "optimizer": {}, "rng": rng_state(torch.device("cpu")),
                "args": {"bottleneck": "vq"}}, image)
    with pytest.raises(RuntimeError, match=f"cannot load {image}: an image_ae checkpoint"):
        generate(data_bin, image)


def test_decoding_options_that_would_give_silently_wrong_output_are_errors(data_bin, tmp_path):
    save = str(tmp_path / "ckpt")
    train(data_bin, save, ["--bottleneck", "em", "--num-samples", "3", "--mask-startup-steps", "2"])
    ckpt = os.path.join(save, "checkpoint_last.pt")
    for bad in (["--max-len-a", "nan"], ["--max-len-a", "-5"], ["--max-len-b", "0"]):
        with pytest.raises(ValueError, match="--max-len-a must be a finite number >= 0"):
            generate(data_bin, ckpt, bad)
    with pytest.raises(ValueError, match="--sampling: the latent generator does not sample tokens"):
        generate(data_bin, ckpt, ["--sampling", "--sampling-topk", "5", "--beam", "1"])
    # validation BLEU from the oracle would be reported as bleu and choose the checkpoints
    with pytest.raises(ValueError, match="--oracle-latents with --eval-bleu would report the oracle"):
        train(data_bin, str(tmp_path / "eb"), ["--eval-bleu", "--oracle-latents"])
