"""The parallel latent predictor (--latent-predictor parallel), the length beam, and the one END-and-length policy
shared by greedy, sampled, beam, oracle and parallel latent decoding."""
import math
import os

import numpy as np
import pytest
import torch

from fairseq_helpers import (build_task_and_model, generate, hypotheses, interactive, make_copy_task, make_sample,
                             preprocess, train)
from vq_nat.models.latent_predictor import end_policy
from vq_nat.models.parallel_latent_predictor import glancing_count, random_positions

PARALLEL = ["--bottleneck", "em", "--num-samples", "3", "--latent-predictor", "parallel", "--dropout", "0"]


def _model(tmp_path, flags, seed=0):
    task, model, criterion = build_task_and_model(str(tmp_path / "d"), flags, vocab=20, seed=seed)
    for p in model.parameters():  # larger weights than the init: differences would show, not vanish
        p.data.add_(0.05 * torch.randn_like(p))
    return task, model, criterion


def _encode(model, sample):
    return model.encode_source(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])


# ------------------------------------------------------------------------------------------- glancing sampler
def test_glancing_count_and_random_positions_against_a_hand_computation():
    wrong = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    # N = ceil(R * d): d = 3, 0, 5
    assert glancing_count(wrong, 0.5).tolist() == [2, 0, 3]
    assert glancing_count(wrong, 0.0).tolist() == [0, 0, 0]
    n = torch.tensor([2, 0, 9])  # more than the row's real positions: all of them
    seen = np.zeros(5)
    for seed in range(400):
        torch.manual_seed(seed)
        mask = random_positions(real, n)
        assert mask.sum(1).tolist() == [2, 0, 3]
        assert not (mask & ~real).any()
        seen += mask[0].numpy()
    # uniform over the 5 positions of row 0: each chosen with probability 2 / 5
    np.testing.assert_allclose(seen / 400, 0.4, atol=0.08)


def test_parallel_predictor_glances_ratio_times_wrong_codes_and_drops_them_from_the_loss(tmp_path, monkeypatch):
    task, model, criterion = _model(tmp_path, PARALLEL + ["--latent-glancing-ratio", "0.5"])
    lp = model.decoder.latent_predictor
    assert lp.parallel
    sample = make_sample(task.target_dictionary, [3, 9, 17, 30], seed=1)
    dec = model.decoder
    enc = _encode(model, sample)
    z_e, pad = dec.encode_target(dec.pad_to_multiple(sample["target"]), enc)
    ref = dec.bottleneck.nearest_codes(z_e)
    latents = dec.bottleneck.embed_codes(ref).masked_fill(pad.unsqueeze(-1), 0.0)
    lp.eval()  # the first pass, by hand: nothing glanced
    with torch.no_grad():
        guess = lp(latents, pad, enc)[0].argmax(-1)[..., 0]
    wrong = ((guess != ref) & ~pad).sum(1)
    lp.train()
    torch.manual_seed(5)
    logits, glanced = lp(latents, pad, enc, reference=ref.unsqueeze(-1))
    assert wrong.sum() > 0
    assert glanced.sum(1).tolist() == [math.ceil(0.5 * w) for w in wrong.tolist()]
    assert not (glanced & pad).any()
    assert logits.shape == (*pad.shape, 1, dec.num_codes)  # K codes, no END
    # the second pass's inputs: the reference latent at the glanced positions, the copied source elsewhere
    seen = []
    original = lp._pass
    monkeypatch.setattr(lp, "_pass", lambda x, *a: seen.append(x.detach().clone()) or original(x, *a))
    torch.manual_seed(5)
    _, again = lp(latents, pad, enc, reference=ref.unsqueeze(-1))
    assert torch.equal(again, glanced) and len(seen) == 2
    copy = lp._inputs(enc, (~pad).sum(1), pad.size(1))
    assert torch.equal(seen[0], copy)
    torch.testing.assert_close(seen[1], torch.where(glanced.unsqueeze(-1), latents, copy), atol=0, rtol=0)

    # through the model's training forward: glanced positions and padding are no target
    model.train()
    torch.manual_seed(7)
    out = model(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], target=sample["target"])
    term = out["losses"]["lp"]
    assert term["tgt"].shape == (*out["latent_padding_mask"].shape, 1, 3)  # the 3 soft-EM samples per latent
    assert term["out"].shape == (*out["latent_padding_mask"].shape, 1, dec.num_codes)  # K codes, no END
    has_target = term["mask"]
    assert not (has_target & out["latent_padding_mask"]).any()
    n_glanced = int((~has_target & ~out["latent_padding_mask"]).sum())
    assert n_glanced > 0
    loss, _, log = criterion(model, sample)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bottleneck", ["vq", "em"])
def test_a_soft_em_temperature_out_of_range_is_an_error_naming_the_option(tmp_path, bottleneck):
    with pytest.raises(ValueError, match="--soft-em-temperature must be a finite number >= 0.0001 .*, got -1"):
        _model(tmp_path, ["--bottleneck", bottleneck, "--soft-em-temperature", "-1"])


def test_the_one_pass_preset(tmp_path, monkeypatch):
    """``--arch latent_transformer_tiny_onepass``: the parallel predictor, K=64, 3 latent-predictor layers."""
    import fairseq_helpers

    # the test sizes, with the preset's own K and latent-predictor depth (no --num-codes / --latent-layers)
    tiny = fairseq_helpers.TINY
    own = {i for i, a in enumerate(tiny) if a in ("--num-codes", "--latent-layers")}
    flags = [a for i, a in enumerate(tiny) if i not in own and i - 1 not in own]
    flags[flags.index("latent_transformer_tiny")] = "latent_transformer_tiny_onepass"
    monkeypatch.setattr(fairseq_helpers, "TINY", flags)
    task, model, _ = build_task_and_model(str(tmp_path / "d"), [], vocab=20)
    lp = model.decoder.latent_predictor
    assert lp.parallel and lp.num_codes == 64 and len(lp.layers) == 3 and lp.glancing_ratio == 0.5
    assert model.decoder.bottleneck.num_codes == 64 and model.args.num_compress_steps == 3  # the test sizes' nc


def test_glancing_ratio_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"--latent-glancing-ratio must be a finite number in \[0.0, 1.0\], got 1.5"):
        _model(tmp_path, PARALLEL + ["--latent-glancing-ratio", "1.5"])
    with pytest.raises(ValueError, match="applies to --latent-predictor parallel only"):
        _model(tmp_path, ["--bottleneck", "em", "--latent-glancing-ratio", "0.3"])


# ------------------------------------------------------------------------------------------- decoding
def test_parallel_generate_is_one_pass_at_the_predicted_length_and_batch_invariant(tmp_path):
    task, model, _ = _model(tmp_path, PARALLEL)
    model.eval()
    lp, dec = model.decoder.latent_predictor, model.decoder
    sample = make_sample(task.target_dictionary, [3, 11, 6, 17, 1], seed=3)
    enc = _encode(model, sample)
    budgets = torch.tensor([3, 1, 5, 8, 2])
    codes, pad, scores = lp.generate(enc, dec.bottleneck.embed_codes, 8, 5, budgets=budgets)
    lengths, length_lp = (t[:, 0] for t in lp.top_lengths(enc, 8, budgets))
    assert torch.equal((~pad).sum(1), lengths)
    assert ((~pad).sum(1) <= budgets).all() and ((~pad).sum(1) >= 1).all()
    # the score is log p(L) + sum_j max_c log p(c_j | x, L), from the model's own log-probabilities
    for i in range(5):
        one = model.encoder.reorder_encoder_out(enc, torch.tensor([i]))
        c1, p1, s1 = lp.generate(one, dec.bottleneck.embed_codes, 8, 1, budgets=budgets[i : i + 1])
        n = int(lengths[i])
        assert torch.equal(c1[0, :n], codes[i, :n]), "batch-1 codes equal batch-5 codes"
        assert s1.item() == pytest.approx(scores[i].item(), abs=1e-4)
        x = lp._inputs(one, lengths[i : i + 1], n)
        lprobs = torch.log_softmax(lp._pass(x, torch.zeros(1, n, dtype=torch.bool), lengths[i : i + 1], one), -1)
        want = float(lprobs.max(-1).values.sum()) + float(length_lp[i])
        assert scores[i].item() == pytest.approx(want, abs=1e-4)


def test_length_beam_of_one_is_plain_decoding_and_wider_beams_pick_the_best_mean_token_score(tmp_path):
    from vq_nat.latent_generator import LatentGenerator

    task, model, _ = _model(tmp_path, PARALLEL)
    model.eval()
    sample = make_sample(task.target_dictionary, [3, 11, 6, 17, 1], seed=3)
    d = task.target_dictionary
    plain = LatentGenerator(d, max_len_a=1.2, max_len_b=10).generate([model], sample)
    one = LatentGenerator(d, max_len_a=1.2, max_len_b=10, length_beam=1).generate([model], sample)
    for a, b in zip(plain, one):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"]) and torch.equal(a[0]["latents"], b[0]["latents"])
    k = 3
    wide = LatentGenerator(d, max_len_a=1.2, max_len_b=10, length_beam=k).generate([model], sample)
    lp = model.decoder.latent_predictor
    enc = _encode(model, sample)
    f = model.decoder.factor
    budget = ((1.2 * sample["net_input"]["src_lengths"].float() + 10).long() + f - 1) // f
    top, top_lp = lp.top_lengths(enc, int(budget.max()), budget, beam=k)
    for i, hyp in enumerate(wide):
        # each candidate length decoded alone: the returned hypothesis is the best by mean token score
        cands = []
        for j in range(k):
            if not torch.isfinite(top_lp[i, j]):
                continue
            single = {**sample, "net_input": {n: v[i : i + 1] for n, v in sample["net_input"].items()},
                      "target": sample["target"][i : i + 1]}
            enc1 = model.encode_source(single["net_input"]["src_tokens"], single["net_input"]["src_lengths"])
            limit = (1.2 * single["net_input"]["src_lengths"].float() + 10).long()
            out = model.decoder.generate(enc1, int(limit), latent_budget=(limit + f - 1) // f, token_budget=limit,
                                         latent_lengths=top[i, j : j + 1])
            cands.append((int(top[i, j]), out))
        chosen = [c for c in cands if c[0] == len(hyp[0]["latents"])]
        assert chosen and torch.equal(chosen[0][1][3][0, : len(hyp[0]["latents"])], hyp[0]["latents"])
        assert _mean_score(chosen[0][1], d) == pytest.approx(max(_mean_score(c[1], d) for c in cands), abs=1e-5)
    # a beam wider than the number of lengths there are decodes each length once: the same as the widest beam
    most = model.decoder.latent_limit(int((1.2 * sample["net_input"]["src_lengths"].float() + 10).long().max()))
    widest = LatentGenerator(d, max_len_a=1.2, max_len_b=10, length_beam=most).generate([model], sample)
    huge = LatentGenerator(d, max_len_a=1.2, max_len_b=10, length_beam=100000).generate([model], sample)
    for a, b in zip(widest, huge):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])
    with pytest.raises(ValueError, match="latent-length-beam needs a model with a length classifier"):
        task2, ar, _ = _model(tmp_path / "ar", ["--bottleneck", "em"])
        LatentGenerator(d, length_beam=2).generate([ar.eval()], sample)


def _mean_score(out, d):
    """Mean log-probability of the emitted tokens: up to and with the first EOS, else the whole span."""
    tokens, scores = out[0][0], out[1][0]
    is_eos = tokens.eq(d.eos())
    end = int(is_eos.int().argmax()) + 1 if bool(is_eos.any()) else int(tokens.ne(d.pad()).sum())
    return float(scores[:end].sum()) / end


# ------------------------------------------------------------------------------------------- the one END policy
def test_end_policy_rules():
    lp = torch.log_softmax(torch.randn(3, 5), -1)  # K = 4 codes + END (index 4)
    c = end_policy(lp, 0, 4, 6)
    assert torch.isinf(c[:, 4]).all() and torch.equal(c[:, :4], lp[:, :4])
    c = end_policy(lp, 6, 4, 6)  # the budget: END only, at its own log-probability
    assert torch.isinf(c[:, :4]).all() and torch.equal(c[:, 4], lp[:, 4])
    c = end_policy(lp, 2, 4, 6)  # otherwise the model's own log-probabilities
    assert torch.equal(c, lp)
    c = end_policy(lp, 2, 4, 6, budgets=torch.tensor([1, 2, 3]))  # each row's own budget
    assert torch.isinf(c[0, :4]).all() and torch.isinf(c[1, :4]).all() and torch.equal(c[2], lp[2])
    assert torch.equal(c[:2, 4], lp[:2, 4])


@pytest.mark.parametrize("budgets", [None, [4, 2, 4, 3, 1]])
def test_greedy_and_beam_of_one_share_the_policy_and_score_the_models_own_log_probabilities(tmp_path, budgets):
    task, model, _ = _model(tmp_path, ["--bottleneck", "em", "--num-samples", "3"])
    model.eval()
    lp, dec = model.decoder.latent_predictor, model.decoder
    with torch.no_grad():
        lp.output.bias[lp.end] += 1.0  # some sentences stop early, others run into the budget
    sample = make_sample(task.target_dictionary, [3, 11, 6, 17, 1], seed=3)
    enc = _encode(model, sample)
    budgets = None if budgets is None else torch.tensor(budgets)
    g_codes, g_pad, g_scores = lp.generate(enc, dec.bottleneck.embed_codes, 4, 5, budgets=budgets)
    b_codes, b_pad, b_scores = lp.beam_search(enc, dec.bottleneck.embed_codes, 4, 5, 1, budgets=budgets)
    assert torch.equal(g_pad, b_pad[:, : g_pad.size(1)]) and not b_pad[:, g_pad.size(1):].any()
    assert torch.equal(g_codes.masked_fill(g_pad, 0), b_codes[:, : g_codes.size(1)])
    torch.testing.assert_close(g_scores, b_scores, atol=1e-4, rtol=1e-5)
    if budgets is not None:
        assert ((~g_pad).sum(1) <= budgets).all()
    # the scores are the model's own log-probabilities: teacher-forced recomputation
    n = (~g_pad).sum(1)
    latents = dec.bottleneck.embed_codes(g_codes).masked_fill(g_pad.unsqueeze(-1), 0.0)
    with torch.no_grad():
        lprobs = torch.log_softmax(lp(latents, g_pad, enc).float(), -1)[:, :, 0]
    want = lprobs[:, :-1].gather(-1, g_codes.unsqueeze(-1)).squeeze(-1).masked_fill(g_pad, 0).sum(1)
    want = want + lprobs[torch.arange(5), n, lp.end]
    torch.testing.assert_close(g_scores, want, atol=1e-4, rtol=1e-5)


def test_latent_beam_hypotheses_carry_the_beams_own_latent_scores(tmp_path):
    from vq_nat.latent_generator import LatentGenerator

    task, model, _ = _model(tmp_path, ["--bottleneck", "em", "--num-samples", "3"])
    model.eval()
    d = task.target_dictionary
    sample = make_sample(d, [3, 11, 6, 17, 1], seed=3)
    hyps = LatentGenerator(d, max_len_a=1.2, max_len_b=10, latent_beam=3).generate([model], sample)
    enc = _encode(model, sample)
    f = model.decoder.factor
    limits = (1.2 * sample["net_input"]["src_lengths"].float() + 10).long()
    lp = model.decoder.latent_predictor
    codes, pad, scores = lp.beam_search(enc, model.decoder.bottleneck.embed_codes,
                                        model.decoder.latent_limit(int(limits.max())), 5, 3,
                                        budgets=(limits + f - 1) // f)
    for i, h in enumerate(hyps):
        n = int((~pad[3 * i]).sum())
        assert torch.equal(h[0]["latents"], codes[3 * i, :n])
        assert h[0]["latent_score"].item() == pytest.approx(scores[3 * i].item(), abs=1e-5)
        assert h[0]["latent_score"].item() < 0.0
    # each sentence's END is forced at its own budget, never at the batch's: the beam is batch-invariant
    gen = LatentGenerator(d, max_len_a=1.2, max_len_b=10, latent_beam=3)
    for i, h in enumerate(hyps):
        single = {**sample, "net_input": {n: v[i : i + 1] for n, v in sample["net_input"].items()},
                  "target": sample["target"][i : i + 1]}
        (one,) = gen.generate([model], single)
        assert torch.equal(one[0]["tokens"], h[0]["tokens"]) and torch.equal(one[0]["latents"], h[0]["latents"])


def test_oracle_and_parallel_decoding_respect_the_length_budget_and_no_empty_latents(tmp_path):
    from vq_nat.latent_generator import LatentGenerator

    task, model, _ = _model(tmp_path, PARALLEL)
    model.eval()
    d = task.target_dictionary
    sample = make_sample(d, [3, 11, 6, 17, 1], seed=3)
    f = model.decoder.factor
    for gen in (LatentGenerator(d, max_len_a=0, max_len_b=f + 1), LatentGenerator(d, oracle_latents=True)):
        for i, hyp in enumerate(gen.generate([model], sample)):
            n = len(hyp[0]["latents"])
            assert n >= 1
            if not gen.oracle_latents:  # budget: f + 1 tokens -> 2 latents (+ EOS)
                assert n <= 2 and len(hyp[0]["tokens"]) <= f + 2
            else:  # the reference's own number of latents
                assert n == math.ceil(int(sample["target"][i].ne(d.pad()).sum()) / f)
    with pytest.raises(ValueError, match="takes --latent-length-beam instead"):
        LatentGenerator(d, latent_beam=2).generate([model], sample)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("pdata")
    raw = str(root / "raw")
    make_copy_task(raw, n_train=200, n_valid=16, n_test=21)
    dest = str(root / "bin")
    preprocess(raw, dest)
    return dest


def test_parallel_trains_with_fairseq_train_and_decodes_batch_invariantly(data_bin, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    save = str(tmp_path / "ckpt")
    train(data_bin, save, PARALLEL + ["--max-update", "6", "--mask-startup-steps", "2"])
    for key in ("lp_loss", "lp_acc", "length_loss", "length_acc"):
        assert f"{key}=" in caplog.text or f"{key} " in caplog.text, key
    ckpt = os.path.join(save, "checkpoint_last.pt")
    h1 = hypotheses(generate(data_bin, ckpt, ["--batch-size", "1", "--max-len-b", "40"]))
    h64 = hypotheses(generate(data_bin, ckpt, ["--batch-size", "64", "--max-len-b", "40"]))
    assert sorted(h1) == list(range(21)) and h1 == h64
    beam = ["--max-len-b", "40", "--latent-length-beam", "3"]
    hl = hypotheses(generate(data_bin, ckpt, ["--batch-size", "64"] + beam))
    assert sorted(hl) == list(range(21)) and hl == hypotheses(generate(data_bin, ckpt, ["--batch-size", "1"] + beam))
    out = interactive(data_bin, ckpt, ["w1 w2 w3", "", "w4 w5 w6 w7"])
    assert sorted(hypotheses(out)) == [0, 1, 2]
