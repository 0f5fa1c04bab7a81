"""Every option checked once where it enters, and the model -> criterion loss contract: through fairseq's own
entry points where a user meets them."""
import logging
import math
import os

import pytest
import torch

from fairseq_helpers import build_task_and_model, generate, make_copy_task, make_sample, preprocess, train


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_copy_task(str(root / "raw"), n_train=60, n_valid=8, n_test=8)
    preprocess(str(root / "raw"), str(root / "bin"))
    return str(root / "bin")


@pytest.fixture(scope="module")
def checkpoints(data_bin, tmp_path_factory):
    """Tiny trained latent transformers: the paper's predictor, the one-pass predictor, one with product codes."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, extra in (("plain", []), ("parallel", ["--latent-predictor", "parallel"]),
                        ("blocks", ["--num-blocks", "2"])):
        train(data_bin, str(root / name), ["--bottleneck", "vq", "--max-update", "2", *extra])
        paths[name] = str(root / name / "checkpoint_last.pt")
    return paths


# ------------------------------------------------------------------------------------------- out of range
@pytest.mark.parametrize("flags,message", [
    (["--num-codes", "1"], r"--num-codes must be in \[2, 16777216\], got 1"),
    (["--codebook-decay", "1.0"], r"--codebook-decay must be a finite number in \[0.0, 1.0\), got 1.0"),
    (["--commitment-beta", "-0.5"], r"--commitment-beta must be a finite number in \[0.0, inf\), got -0.5"),
    (["--num-samples", "0"], r"--num-samples must be >= 1, got 0"),
    (["--latent-predictor", "parallel", "--latent-glancing-ratio", "1.5"],
     r"--latent-glancing-ratio must be a finite number in \[0.0, 1.0\], got 1.5"),
    (["--soft-em-anneal-updates", "-3"], r"--soft-em-anneal-updates must be >= 0, got -3"),
    (["--mask-startup-steps", "-1"], r"--mask-startup-steps must be >= 0, got -1"),
    (["--num-blocks", "3"], r"--num-blocks 3 must divide --decoder-embed-dim 32"),
    (["--bottleneck", "semhash", "--num-codes", "12"], r"--num-codes a power of 2"),
    (["--soft-em-temperature", "0"], r"--soft-em-temperature must be a finite number >= 0.0001 .*, got 0.0"),
    (["--soft-em-temperature", "1e-37"], r"--soft-em-temperature must be a finite number >= 0.0001 .*, got 1e-37"),
    (["--num-codes", "1099511627776"], r"--num-codes"),
    (["--label-smoothing", "1.0"], r"--label-smoothing must be a finite number in \[0.0, 1.0\), got 1.0"),
    (["--latent-loss-weight", "-1"], r"--latent-loss-weight must be a finite number in \[0.0, inf\), got -1.0"),
    (["--length-loss-factor", "nan"], r"--length-loss-factor must be a finite number in \[0.0, inf\), got nan"),
    (["--word-dropout", "1.5"], r"--word-dropout must be a probability in \[0, 1\], got 1.5"),
    (["--word-shuffle-distance", "-2"], r"--word-shuffle-distance must be an integer >= 0, got -2"),
])
def test_fairseq_train_refuses_an_option_out_of_range_naming_it_and_its_range(data_bin, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train(data_bin, str(tmp_path / "ckpt"), flags)
    assert not os.path.exists(tmp_path / "ckpt" / "checkpoint_last.pt")  # refused before any training


# ------------------------------------------------------------------------------------------- no effect
@pytest.mark.parametrize("flags,message", [
    (["--bottleneck", "vq", "--num-samples", "5"], "--num-samples 5 has no effect: soft EM's samples"),
    (["--bottleneck", "vq", "--soft-em-temperature", "2"], "--soft-em-temperature 2.0 has no effect"),
    (["--codebook-update", "grad", "--dead-code-threshold", "0.3"],
     "--dead-code-threshold 0.3 has no effect: the codebook EMA"),
    (["--codebook-update", "grad", "--codebook-decay", "0.9"], "--codebook-decay 0.9 has no effect"),
    (["--codebook-update", "grad", "--codebook-epsilon", "0.01"], "--codebook-epsilon 0.01 has no effect"),
    (["--bottleneck", "gumbel", "--kmeans-init"], "--kmeans-init True has no effect: a VQ codebook option"),
    (["--length-loss-factor", "0.5"], "--length-loss-factor 0.5 has no effect: the model has no length"),
    (["--word-shuffle", "0.5", "--word-shuffle-distance", "0"], "--word-shuffle 0.5 has no effect"),
])
def test_an_option_without_effect_is_a_warning_saying_why(tmp_path, caplog, flags, message):
    caplog.set_level(logging.WARNING)
    build_task_and_model(str(tmp_path), flags)
    assert message in caplog.text


def test_the_presets_own_values_never_warn(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    build_task_and_model(str(tmp_path / "a"), ["--bottleneck", "em"])
    build_task_and_model(str(tmp_path / "b"), ["--arch", "latent_transformer_tiny_onepass", "--bottleneck", "vq"])
    assert "has no effect" not in caplog.text


def test_mutually_exclusive_bottleneck_options_are_errors(tmp_path):
    with pytest.raises(ValueError, match="--num-blocks applies to --bottleneck vq/em only, not gumbel"):
        build_task_and_model(str(tmp_path / "a"), ["--bottleneck", "gumbel", "--num-blocks", "2"])
    with pytest.raises(ValueError, match="--soft-em-anneal-updates applies to --bottleneck em only, not vq"):
        build_task_and_model(str(tmp_path / "b"), ["--bottleneck", "vq", "--soft-em-anneal-updates", "10"])


# ------------------------------------------------------------------------------------------- generation
def test_generator_options_for_another_predictor_are_refused_before_decoding(data_bin, checkpoints):
    with pytest.raises(ValueError, match="--latent-length-beam needs a model with a length classifier"):
        generate(data_bin, checkpoints["plain"], ["--latent-length-beam", "2"])
    with pytest.raises(ValueError, match="--latent-beam searches over autoregressive latent sequences"):
        generate(data_bin, checkpoints["parallel"], ["--latent-beam", "2"])
    with pytest.raises(ValueError, match="--latent-beam needs --num-blocks 1"):
        generate(data_bin, checkpoints["blocks"], ["--latent-beam", "2"])


@pytest.mark.parametrize("option", ["latent_length_prediction", "no_decoder_source_attention"])
def test_a_checkpoint_trained_with_a_removed_option_is_a_clear_error(data_bin, checkpoints, tmp_path, option):
    """Options removed for giving nothing measurable change the weights: such a checkpoint is refused by name."""
    state = torch.load(checkpoints["plain"], weights_only=False)
    setattr(state["cfg"]["model"], option, True)
    path = str(tmp_path / "old.pt")
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"trained with --{option.replace('_', '-')}, an option of vq-nat 0.1"):
        generate(data_bin, path, [])


def test_a_latent_transformer_as_npd_teacher_is_a_clear_error(data_bin, checkpoints):
    with pytest.raises(ValueError, match="--npd-teacher .* is a latent_transformer checkpoint; the teacher must be "
                                         "an autoregressive translation model"):
        generate(data_bin, checkpoints["plain"], ["--npd-candidates", "3", "--npd-teacher", checkpoints["plain"]])


# ------------------------------------------------------------------------------------------- loss contract
def test_the_criterion_needs_nothing_from_the_model_but_its_forward_output(tmp_path):
    """The criterion sums the named terms of any forward output: no attribute of the model is read."""
    task, model, criterion = build_task_and_model(str(tmp_path), ["--bottleneck", "em", "--num-samples", "3",
                                                                  "--latent-predictor", "parallel"])
    model.eval()
    model.set_num_updates(10 ** 6)
    sample = make_sample(task.target_dictionary, [3, 9, 5], seed=1)
    torch.manual_seed(0)
    loss, size, log = criterion(model, sample)
    torch.manual_seed(0)
    out = model(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], target=sample["target"])

    class OnlyForward:  # a callable with no attributes at all
        __slots__ = ()

        def __call__(self, *args, **kwargs):
            return out

    loss2, size2, log2 = criterion(OnlyForward(), sample)
    assert size2 == size and torch.equal(loss2, loss)
    assert set(out["losses"]) == {"recon", "vq", "lp", "length"}
    # the total is the documented sum of term means, times the number of target tokens
    terms = {}
    for name, term in out["losses"].items():
        if "loss" in term:
            terms[name] = term["loss"]
            continue
        lprobs = torch.log_softmax(term["out"].float(), -1)
        mask = term.get("mask", torch.ones(lprobs.shape[: term["tgt"].dim() - (term["tgt"].dim() == lprobs.dim())],
                                           dtype=torch.bool))
        tgt = term["tgt"] if term["tgt"].dim() == lprobs.dim() else term["tgt"].unsqueeze(-1)
        terms[name] = -lprobs.gather(-1, tgt).mean(-1)[mask].sum() / mask.sum()
    want = terms["recon"] + terms["vq"] + terms["lp"] + 0.1 * terms["length"]
    assert float(loss) == pytest.approx(float(want) * sample["ntokens"], rel=1e-5)
    for key in ("recon_loss", "vq_loss", "lp_loss", "lp_correct", "length_loss", "length_correct", "post_ent",
                "code_info", "sample_codes", "code_ppl", "codes_used", "masking", "nreal_latents"):
        assert key in log, key


@pytest.mark.parametrize("m,blocks", [(1, 1), (4, 1), (5, 2)])
def test_sparse_soft_em_targets_equal_the_dense_averaged_one_hots(m, blocks):
    """-(1/m) sum_s log p(c_s) = -sum_j q_j log p(j), q_j the share of the m samples equal to j (§3.2); the
    accuracy's gold code is q's argmax (ties: the smallest code)."""
    from fairseq.tasks import FairseqTask

    from vq_nat.criterions.latent_vq import LatentVQCriterion

    class Task(FairseqTask):
        target_dictionary = type("D", (), {"pad": lambda self: 1})()

    torch.manual_seed(m)
    b, length, k = 3, 6, 7
    logits = torch.randn(b, length, blocks, k)
    samples = torch.randint(0, k, (b, length, blocks, m))
    mask = torch.rand(b, length) < 0.7
    dense = torch.zeros(b, length, blocks, k, dtype=torch.float64).scatter_add_(
        -1, samples, torch.full(samples.shape, 1.0 / m, dtype=torch.float64))
    lprobs = torch.log_softmax(logits.double(), -1)
    want = -(dense * lprobs).sum(-1)[mask].sum()
    want_correct = ((lprobs.argmax(-1) == dense.argmax(-1)).all(-1) & mask).sum()
    criterion = LatentVQCriterion(Task(None))
    loss, nll, count, correct = criterion.classification({"out": logits, "tgt": samples, "mask": mask, "acc": True})
    assert count == int(mask.sum()) and int(correct) == int(want_correct)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


def test_the_training_forward_never_builds_the_dense_code_targets(tmp_path, monkeypatch):
    """The latent predictor learns from the m sampled codes: the (N, K) ``QuantizerOutput.targets`` is never
    read on the training path (it is the largest tensor of a step at K = 4096)."""
    from vq_nat.modules import QuantizerOutput

    def refuse(self):
        raise AssertionError("the dense (N, K) targets were built")

    monkeypatch.setattr(QuantizerOutput, "targets", property(refuse))
    for name, flags in (("em", ["--bottleneck", "em", "--num-samples", "4"]),
                        ("par", ["--bottleneck", "em", "--latent-predictor", "parallel"]),
                        ("gumbel", ["--bottleneck", "gumbel"])):
        task, model, criterion = build_task_and_model(str(tmp_path / name), flags)
        model.train()
        loss, _, _ = criterion(model, make_sample(task.target_dictionary, [4, 10, 7]))
        assert math.isfinite(float(loss))
        loss.backward()
