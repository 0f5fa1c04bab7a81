"""Where BLEU is lost: teacher-forced (oracle-latent) decoding, the E-step posterior's entropy, the logged metrics."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fairseq_helpers import build_task_and_model, generate, hypotheses, make_copy_task, make_sample, preprocess, train
from vq_nat.latent_generator import LatentGenerator
from vq_nat.modules import VectorQuantizer


def numpy_posterior(z, codebook, temperature):
    """q(j | z_i) = softmax_j(-||z_i - e_j||^2 / T), (rows, K)."""
    d = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    logits = -d / temperature
    logits -= logits.max(-1, keepdims=True)
    q = np.exp(logits)
    return q / q.sum(-1, keepdims=True)


def numpy_entropy(p):
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)


def numpy_posterior_entropy(z, codebook, temperature):
    """H(q(. | z_i)) in nats, per row."""
    return numpy_entropy(numpy_posterior(z, codebook, temperature))


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_posterior_entropy_equals_numpy_and_ignores_padding(assignment):
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=7, dim=4, assignment=assignment, num_samples=5, temperature=3.0)
    vq.eval()
    z = torch.randn(2, 5, 4) * 0.7
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out = vq(z, padding_mask=pad)
    h = numpy_posterior_entropy(z.reshape(-1, 4).double().numpy(), vq.codebook.double().numpy(), 3.0)
    real = (~pad).reshape(-1).numpy()
    assert out.posterior_entropy.item() == pytest.approx(h[real].mean(), rel=1e-4)
    assert 0.0 < out.posterior_entropy.item() < math.log(7)


def numpy_information(z, codebook, temperature):
    """I(row; code) = H(mean_i q_i) - mean_i H(q_i) for q_i = q(. | z_i), in nats."""
    q = numpy_posterior(z, codebook, temperature)
    return numpy_entropy(q.mean(0)) - numpy_entropy(q).mean()


@pytest.mark.parametrize("blocks", [1, 2])
def test_information_equals_numpy_over_the_real_positions_and_blocks(blocks, monkeypatch):
    import vq_nat.modules.vector_quantizer as vqm

    monkeypatch.setattr(vqm, "_CHUNK_SCORES", 7 * 3)  # 3 rows per chunk: the sum crosses chunk boundaries
    torch.manual_seed(2)
    vq = VectorQuantizer(num_codes=7, dim=4, assignment="soft", num_samples=5, temperature=2.0,
                         num_blocks=blocks).eval()
    z = torch.randn(2, 5, 4) * 0.8
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    real = (~pad).reshape(-1).numpy()
    x = z.reshape(-1, blocks, 4 // blocks).double().numpy()[real]
    cb = vq.embed.double().numpy()
    want = np.mean([numpy_information(x[:, j], cb[j], 2.0) for j in range(blocks)])
    got = vq(z, padding_mask=pad).information.item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert 0.0 < got < math.log(7)


def test_information_is_log_perplexity_when_one_hot_and_zero_when_every_posterior_is_the_same():
    torch.manual_seed(3)
    z = torch.randn(200, 8)
    hard = VectorQuantizer(num_codes=16, dim=8, assignment="hard", temperature=1e-4).eval()
    out = hard(z)
    assert out.information.item() == pytest.approx(math.log(out.perplexity.item()), rel=1e-4)
    # all codes at one point: the posterior is uniform at every position, however many codes the samples hit
    same = VectorQuantizer(num_codes=16, dim=8, assignment="soft", num_samples=10).eval()
    same.embed.zero_()
    out = same(z)
    assert out.perplexity.item() > 10.0
    assert abs(out.information.item()) < 1e-5


def test_posterior_entropy_rises_with_temperature_and_vanishes_as_it_goes_to_zero():
    torch.manual_seed(1)
    z = torch.randn(64, 8)
    base = VectorQuantizer(num_codes=16, dim=8, assignment="soft", num_samples=10).eval()
    hard_codes = base.nearest_codes(z)
    entropies = []
    for t in (1e-4, 0.3, 1.0, 3.0, 10.0, 100.0):
        vq = VectorQuantizer(num_codes=16, dim=8, assignment="soft", num_samples=10, temperature=t).eval()
        vq.embed.copy_(base.embed)
        out = vq(z)
        entropies.append(out.posterior_entropy.item())
        if t == 1e-4:  # T -> 0: every one of the m samples is the nearest code, i.e. hard EM
            assert torch.equal(out.codes, hard_codes.unsqueeze(-1).expand(-1, 10))
    assert entropies[0] < 1e-6
    assert all(a < b for a, b in zip(entropies, entropies[1:])), entropies
    assert entropies[-1] == pytest.approx(math.log(16), rel=0.05)


def test_criterion_logs_posterior_entropy_and_distinct_sample_codes(tmp_path):
    task, model, criterion = build_task_and_model(str(tmp_path), ["--bottleneck", "em", "--num-samples", "6",
                                                                  "--soft-em-temperature", "1e6"])
    sample = make_sample(task.target_dictionary, [3, 9, 17])
    model.train()
    _, _, log = criterion(model, sample)
    q = model.decoder.bottleneck
    # at an enormous temperature the posterior is uniform: entropy log K, the 6 samples nearly all distinct
    assert log["post_ent"] / log["nreal_latents"] == pytest.approx(math.log(q.num_codes), rel=1e-3)
    assert 4.0 < log["sample_codes"] / log["nreal_latents"] <= 6.0
    # a uniform posterior at every latent tells nothing about which latent it is
    assert abs(float(log["code_info"])) < 1e-3


def test_teacher_forced_decoding_equals_decoding_the_reference_codes(tmp_path):
    task, model, _ = build_task_and_model(str(tmp_path), ["--bottleneck", "em", "--num-samples", "4"])
    model.eval()
    sample = make_sample(task.target_dictionary, [3, 8, 20, 1])
    args = type("A", (), {"max_len_a": 0, "max_len_b": 50})()
    task.cfg.oracle_latents = True
    oracle = task.build_generator([model], args).generate([model], sample)
    task.cfg.oracle_latents = False
    dec = model.decoder
    with torch.no_grad():
        enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
        codes, latent_pad = dec.reference_codes(sample["target"], enc)
        z_e, _ = dec.encode_target(dec.pad_to_multiple(sample["target"]), enc)
        tokens, _, pad_out, codes_out, _ = dec.generate(enc, 0, codes=codes, latent_pad=latent_pad)
    assert torch.equal(codes, dec.bottleneck.nearest_codes(z_e))
    assert torch.equal(codes_out, codes) and torch.equal(pad_out, latent_pad)
    for i, h in enumerate(oracle):
        n = int((~latent_pad[i]).sum())
        assert n == (int(sample["target"][i].ne(task.target_dictionary.pad()).sum()) + 7) // 8
        assert torch.equal(h[0]["latents"], codes[i, :n])
        toks = h[0]["tokens"]
        assert torch.equal(toks[:-1], tokens[i, : len(toks) - 1])
    with pytest.raises(ValueError, match="npd-candidates"):
        LatentGenerator(task.target_dictionary, npd_candidates=2, npd_teacher=object(), oracle_latents=True)


def test_fairseq_generate_oracle_latents_and_the_diagnosis_script(tmp_path):
    raw, dest, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    make_copy_task(raw, n_train=200, n_valid=16, n_test=13)
    preprocess(raw, dest)
    train(dest, save, ["--bottleneck", "em", "--num-samples", "3", "--max-update", "4"])
    ckpt = os.path.join(save, "checkpoint_last.pt")
    out = generate(dest, ckpt, ["--oracle-latents", "--max-len-b", "40"])
    assert sorted(hypotheses(out)) == list(range(13))

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import diagnose

    report = diagnose.main([dest, "--path", ckpt, "--subset", "valid", "--cpu", "--max-len-b", "40"])
    for key in ("bleu", "bleu_oracle", "lp_acc", "lp_end_acc", "len_err", "len_abs_err", "codes_ae",
                "codes_pred", "post_ent", "sample_codes", "sentences", "ze_spread", "len_ratio"):
        assert key in report, key
    assert report["sentences"] == 16
    assert 0.0 <= report["lp_acc"] <= 1.0 and report["len_abs_err"] >= abs(report["len_err"])
    assert 0.0 <= report["ze_spread"] <= 1.0
    assert report["len_ratio"] > 0.0


def _predictor_setup(tmp_path):
    """A tiny vq model in eval mode, a 5-sentence sample, its latent predictor, code embedding and encoding."""
    task, model, _ = build_task_and_model(str(tmp_path), ["--bottleneck", "vq", "--dropout", "0"])
    model.eval()
    sample = make_sample(task.target_dictionary, [3, 8, 20, 1, 13])
    with torch.no_grad():
        enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    return task, model, sample, model.decoder.latent_predictor, model.decoder.bottleneck.embed_codes, enc


def test_latent_beam_of_one_is_greedy_and_beam_scores_are_the_sequences_log_probabilities(tmp_path):
    task, model, sample, lp, emb, enc = _predictor_setup(tmp_path)
    with torch.no_grad():
        g_codes, g_pad, g_scores = lp.generate(enc, emb, 6, 5)
        b_codes, b_pad, b_scores = lp.beam_search(enc, emb, 6, 5, beam=1)
        assert torch.equal(b_pad, g_pad) and torch.equal(b_codes.masked_fill(b_pad, 0), g_codes.masked_fill(g_pad, 0))
        assert torch.allclose(b_scores, g_scores, atol=1e-5)

        k = 4
        codes, pad, scores = lp.beam_search(enc, emb, 6, 5, beam=k)
        order = torch.arange(5).repeat_interleave(k)
        from vq_nat.models.latent_predictor import _reorder

        logits = lp(emb(codes).masked_fill(pad.unsqueeze(-1), 0.0), pad, _reorder(enc, order))[:, :, 0]
        lprobs = torch.log_softmax(logits, -1)
        lengths = (~pad).sum(1)
        for r in range(codes.size(0)):
            n = int(lengths[r])
            want = sum(float(lprobs[r, j, codes[r, j]]) for j in range(n)) + float(lprobs[r, n, lp.end])
            assert scores[r].item() == pytest.approx(want, abs=1e-4)
        mean = (scores / (lengths + 1)).view(5, k)
        assert (mean[:, :-1] >= mean[:, 1:] - 1e-6).all()  # best first
        for s in range(5):  # k distinct sequences per sentence
            seqs = {tuple(codes[s * k + j, : int(lengths[s * k + j])].tolist()) for j in range(k)}
            assert len(seqs) == k

    args = type("A", (), {"max_len_a": 0, "max_len_b": 50})()
    task.cfg.latent_beam = 3
    try:
        hypos = task.build_generator([model], args).generate([model], sample)
    finally:
        task.cfg.latent_beam = 1
    assert len(hypos) == 5 and all(h[0]["tokens"][-1] == task.target_dictionary.eos() for h in hypos)
    with pytest.raises(ValueError, match="latent-beam"):
        LatentGenerator(task.target_dictionary, npd_candidates=2, npd_teacher=object(), latent_beam=2)


def test_validation_logs_oracle_bleu_and_posterior_entropy(tmp_path, caplog):
    import logging

    raw, dest, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    make_copy_task(raw, n_train=100, n_valid=12, n_test=4)
    preprocess(raw, dest)
    caplog.set_level(logging.INFO)
    train(dest, save, ["--bottleneck", "em", "--num-samples", "3", "--max-update", "2", "--eval-bleu",
                       "--eval-bleu-args", '{"max_len_b": 30}'])
    valid = [r.getMessage() for r in caplog.records if "valid on" in r.getMessage()]
    assert valid, caplog.text[-2000:]
    for key in ("bleu_oracle", "bleu", "post_ent", "code_info", "sample_codes", "lp_acc"):
        assert f"| {key} " in valid[-1], (key, valid[-1])


def test_generate_rejects_a_plain_transformer_and_warns_about_beam(tmp_path, caplog):
    import logging

    raw, dest = str(tmp_path / "raw"), str(tmp_path / "bin")
    make_copy_task(raw, n_train=100, n_valid=8, n_test=5)
    preprocess(raw, dest)
    ar = str(tmp_path / "ar")
    train(dest, ar, ["--task", "translation", "--arch", "transformer", "--criterion", "cross_entropy",
                     "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
                     "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16",
                     "--max-update", "1"], arch_flags=[])
    with pytest.raises(ValueError, match="needs a latent_transformer checkpoint; this one is transformer"):
        generate(dest, os.path.join(ar, "checkpoint_last.pt"))
    lt = str(tmp_path / "lt")
    train(dest, lt, ["--bottleneck", "vq", "--max-update", "1"])
    caplog.set_level(logging.WARNING)
    out = generate(dest, os.path.join(lt, "checkpoint_last.pt"), ["--beam", "4", "--nbest", "3"])
    assert "--beam 4 / --nbest 3 are ignored" in caplog.text
    assert "with beam=1" in out and "beam=4" not in out
    assert sorted(hypotheses(out)) == list(range(5))
    caplog.clear()
    out = generate(dest, os.path.join(lt, "checkpoint_last.pt"))  # fairseq's default --beam 5: no warning
    assert "are ignored" not in caplog.text and "with beam=1" in out


def test_generate_without_the_latent_task_names_the_task_to_use(tmp_path):
    from fairseq import options
    from fairseq_cli import generate as generate_cli

    from fairseq_helpers import USER_DIR

    raw, dest, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    make_copy_task(raw, n_train=100, n_valid=8, n_test=5)
    preprocess(raw, dest)
    train(dest, save, ["--bottleneck", "vq", "--max-update", "1"])
    args = options.parse_args_and_arch(options.get_generation_parser(), [
        dest, "--user-dir", USER_DIR, "--path", os.path.join(save, "checkpoint_last.pt"), "--cpu"])
    with pytest.raises(ValueError, match="pass --task latent_translation"):
        generate_cli.main(args)


def test_plot_curves_reads_fairseq_json_logs(tmp_path, capsys):
    import json

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import plot_curves

    run = tmp_path / "run"
    run.mkdir()
    lines = ["[config dump]", json.dumps({"num_updates": "50", "train_wall": "10"}),
             json.dumps({"num_updates": "100", "train_wall": "12"}),
             json.dumps({"valid_num_updates": "100", "valid_bleu": "3.5"}),
             json.dumps({"num_updates": "150", "train_wall": "11"}),
             json.dumps({"valid_num_updates": "150", "valid_bleu": "4.25"})]
    (run / "train.log").write_text("\n".join(lines) + "\n")
    assert plot_curves.curve(str(run / "train.log")) == [(100, 22.0, 3.5), (150, 33.0, 4.25)]
    out = str(tmp_path / "c.png")
    plot_curves.main(["--run", f"x={run}", "--out", out])
    assert os.path.getsize(out) > 0 and "| x | 150 | 33 | 4.25 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no train.log"):
        plot_curves.main(["--run", f"y={tmp_path}", "--out", out])


def test_distinct_samples_counts_distinct_codes_per_position():
    from vq_nat.modules import distinct_samples

    codes = torch.tensor([[[3, 3, 3, 3], [1, 2, 1, 5]], [[0, 1, 2, 3], [7, 7, 2, 7]]])
    want = np.array([[len(set(row)) for row in pos] for pos in codes.tolist()], dtype=np.float32)
    np.testing.assert_array_equal(distinct_samples(codes).numpy(), want)


def test_averaged_checkpoints_decode_with_fairseq_generate(tmp_path):
    """scripts/average_checkpoints.py on two checkpoints of one run: floating-point tensors (the codebook and its
    EMA statistics included) are the mean, the quantizer's bool ``initialized`` flag is kept, and the average
    decodes through fairseq-generate."""
    from fairseq import checkpoint_utils

    raw, dest, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    make_copy_task(raw, n_train=200, n_valid=8, n_test=6)
    preprocess(raw, dest)
    train(dest, save, ["--bottleneck", "em", "--num-samples", "3", "--max-update", "6",
                       "--save-interval-updates", "1", "--no-epoch-checkpoints"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    avg = str(tmp_path / "avg.pt")
    p = subprocess.run([sys.executable, os.path.join(root, "scripts", "average_checkpoints.py"), "--inputs", save,
                        "--num-update-checkpoints", "2", "--output", avg], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    by_update = sorted((int(m[1]), f) for f in os.listdir(save) if (m := re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", f)))
    assert re.findall(r"checkpoint_\d+_\d+\.pt", p.stdout) == [f for _, f in by_update[-2:]], p.stdout
    a, b = (checkpoint_utils.load_checkpoint_to_cpu(os.path.join(save, f))["model"] for _, f in by_update[-2:])
    got = checkpoint_utils.load_checkpoint_to_cpu(avg)["model"]
    codebook = [k for k in got if k.endswith("bottleneck.embed")][0]
    assert not torch.equal(a[codebook], b[codebook]), "the codebook must have moved between the checkpoints"
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a[k].double() + b[k].double()).div(2).to(v.dtype))
        else:
            assert torch.equal(v, b[k]), k
    flag = [k for k in got if k.endswith("bottleneck.initialized")][0]
    assert got[flag].dtype == torch.bool and bool(got[flag])
    assert sorted(hypotheses(generate(dest, avg, ["--max-len-b", "40"]))) == list(range(6))
    p = subprocess.run([sys.executable, os.path.join(root, "scripts", "average_checkpoints.py"), "--inputs",
                        avg, str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x.pt")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "no such checkpoint" in p.stderr


def _length_setup(tmp_path):
    task, model, criterion = build_task_and_model(str(tmp_path), ["--bottleneck", "vq", "--dropout", "0",
                                                                  "--latent-predictor", "parallel"])
    model.eval()
    lp = model.decoder.latent_predictor
    with torch.no_grad():  # distinct, confident length choices per sentence
        lp.length_output.weight.add_(0.5 * torch.randn_like(lp.length_output.weight))
    sample = make_sample(task.target_dictionary, [3, 8, 20, 1, 13])
    with torch.no_grad():
        enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    return task, model, criterion, sample, lp, model.decoder.bottleneck.embed_codes, enc


def test_the_length_classifier_reads_the_mean_of_the_real_source_states(tmp_path):
    """log p(L | x) = log_softmax(W mean_{s real} h_s) (fairseq NAT's ``forward_length``); decoding emits the
    most probable L within the budget."""
    task, model, _, _, lp, emb, enc = _length_setup(tmp_path)
    with torch.no_grad():
        states, mask = enc["encoder_out"][0], enc["encoder_padding_mask"][0]
        for i in range(5):
            real = states[~mask[i], i]  # (S_i, H)
            want = torch.log_softmax(lp.length_output(real.mean(0)), -1)
            torch.testing.assert_close(torch.log_softmax(lp.length_logits(enc)[i], -1), want, atol=1e-5, rtol=0)
        budget = 9
        lengths, length_lp = lp.top_lengths(enc, budget)
        want = torch.log_softmax(lp.length_logits(enc), -1)[:, 1 : budget + 1].max(-1)
        assert torch.equal(lengths[:, 0], want.indices + 1) and torch.equal(length_lp[:, 0], want.values)
        assert len(set(lengths[:, 0].tolist())) > 1
        _, pad, _ = lp.generate(enc, emb, budget, 5)
        assert torch.equal((~pad).sum(1), lengths[:, 0])


def test_latent_length_loss_is_the_cross_entropy_of_the_number_of_latents(tmp_path):
    task, model, criterion, sample, lp, emb, enc = _length_setup(tmp_path)
    model.decoder.set_num_updates(10 ** 6)  # past the latent-loss start: the gate is open
    loss, _, log = criterion(model, sample)  # evaluation mode: the codebook stays as it is between the calls
    out = model(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], target=sample["target"])
    lengths = (~out["latent_padding_mask"]).sum(1).numpy()
    logits = out["losses"]["length"]["out"].detach().double().numpy()
    logits -= logits.max(-1, keepdims=True)
    lprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -lprobs[np.arange(len(lengths)), lengths].sum()
    assert float(log["length_loss"]) == pytest.approx(want, rel=1e-5)
    assert int(log["length_correct"]) == int((lprobs.argmax(-1) == lengths).sum())
    criterion.length_loss_factor = 0.0
    without, _, _ = criterion(model, sample)
    gate = criterion.latent_loss_weight * out["losses"]["length"]["factor"]
    assert gate > 0 and float(loss - without) == pytest.approx(gate * 0.1 * want / 5 * log["sample_size"], rel=1e-4)


def test_the_length_classifier_keeps_each_sentence_within_its_own_budget_whatever_the_batch(tmp_path):
    """Per-sentence length budgets (a·|x| + b tokens) bound the predicted number of latents before the codes
    are predicted, so a sentence decodes to the same tokens alone and in a batch."""
    task, model, _, sample, lp, _, _ = _length_setup(tmp_path)
    with torch.no_grad():
        # the longer the more probable: the classifier wants more latents than any budget allows
        lp.length_output.bias.add_(5.0 * torch.arange(lp.length_output.bias.numel()))
        lp.remaining.weight.mul_(30.0)  # and the codes depend strongly on the number of latents to come
    gen = LatentGenerator(task.target_dictionary, max_len_a=0.5, max_len_b=2)
    batch = [h[0]["tokens"].tolist() for h in gen.generate([model], sample)]
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    limits = (0.5 * lengths.float() + 2).long()  # 2-12 tokens: 1 or 2 latents of 8
    assert len(set(limits.tolist())) > 1
    for i in range(src.size(0)):
        n = int(lengths[i])
        one = {"id": sample["id"][i : i + 1], "target": sample["target"][i : i + 1],
               "net_input": {"src_tokens": src[i : i + 1, -n:], "src_lengths": lengths[i : i + 1]}}
        alone = gen.generate([model], one)[0][0]
        assert alone["tokens"].tolist() == batch[i]
        f = model.decoder.factor
        assert len(alone["latents"]) == (int(limits[i]) + f - 1) // f  # the budget, in latents of 2^nc tokens
