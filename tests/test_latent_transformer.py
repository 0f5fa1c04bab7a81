"""Model-level semantics of the Latent Transformer: schedules, latent targets, batching invariance, noise."""

import pytest
import torch

from fairseq_helpers import TINY, USER_DIR
from fairseq_helpers import make_sample as helpers_make_sample
from vq_nat.models.curriculum import masking_probability
from vq_nat.modules.schedules import annealed_temperature
from vq_nat.modules.compression import Compressor, Decompressor, conv_btc
from vq_nat.modules.denoising import word_dropout, word_shuffle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    d = tmp_path_factory.mktemp("dicts")
    for lang in ("src", "tgt"):
        with open(d / f"dict.{lang}.txt", "w") as f:
            for i in range(12):
                f.write(f"w{i} {100 - i}\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(d), "--user-dir", USER_DIR, "--task", "latent_translation", "--criterion", "latent_vq",
         "--source-lang", "src", "--target-lang", "tgt", "--optimizer", "adam", "--lr", "1e-3", "--cpu",
         "--bottleneck", "em", "--num-samples", "4", "--mask-startup-steps", "100", "--dropout", "0"] + TINY,
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def make_sample(task, lengths, seed=0):
    return helpers_make_sample(task.target_dictionary, lengths, seed=seed)


def test_masking_schedule_matches_tensor2tensor():
    # values of t2t transformer_nat's masking with mask_startup_steps = 50000
    for step, want in [(0, 1e-4), (6250, 0.0134), (12500, 0.2575), (25000, 0.505), (50000, 1.0), (90000, 1.0)]:
        assert masking_probability(step, 50000) == pytest.approx(want, rel=0.01, abs=1e-6)
    assert masking_probability(0, 0) == 1.0


def test_soft_em_temperature_anneals_geometrically_to_one():
    import numpy as np

    steps = np.array([0, 100, 250, 500, 1000, 5000])
    want = np.power(30.0, 1.0 - np.minimum(steps / 500, 1.0))  # 30, 30^0.8, 30^0.5, 1, 1, 1
    got = np.array([annealed_temperature(int(u), 30.0, 500) for u in steps])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == 30.0 and got[3] == 1.0 and np.all(np.diff(got) <= 0)
    assert annealed_temperature(700, 30.0, 0) == 30.0  # 0: constant


def test_annealed_temperature_follows_the_updates_and_is_saved_with_the_model(tmp_path):
    from fairseq_helpers import build_task_and_model

    task, model, criterion = build_task_and_model(
        str(tmp_path), ["--bottleneck", "em", "--soft-em-temperature", "30", "--soft-em-anneal-updates", "200"])
    dec = model.decoder
    sample = make_sample(task, [5, 9])
    model.train()
    criterion(model, sample)
    assert dec.bottleneck.temperature == pytest.approx(30.0)
    model.set_num_updates(100)
    criterion(model, sample)
    assert dec.bottleneck.temperature == pytest.approx(30.0 ** 0.5)
    state = model.state_dict()
    _, fresh, _ = build_task_and_model(
        str(tmp_path / "b"), ["--bottleneck", "em", "--soft-em-temperature", "30", "--soft-em-anneal-updates", "200"])
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        criterion(fresh, sample)
    assert fresh.decoder.bottleneck.temperature == pytest.approx(30.0 ** 0.5)
    # the quantizer owns the schedule; checkpoints that kept it in the decoder still load
    assert "decoder.bottleneck.current_temperature" in state and "decoder.soft_em_temperature" not in state
    state["decoder.soft_em_temperature"] = state.pop("decoder.bottleneck.current_temperature")
    _, old, _ = build_task_and_model(
        str(tmp_path / "o"), ["--bottleneck", "em", "--soft-em-temperature", "30", "--soft-em-anneal-updates", "200"])
    old.load_state_dict(state)
    assert old.decoder.bottleneck.temperature == pytest.approx(30.0 ** 0.5)
    model.set_num_updates(400)
    criterion(model, sample)
    assert dec.bottleneck.temperature == pytest.approx(1.0)
    with pytest.raises(ValueError, match="--bottleneck em only"):
        build_task_and_model(str(tmp_path / "c"), ["--bottleneck", "vq", "--soft-em-anneal-updates", "200"])


def test_train_step_passes_the_update_number_to_the_model(built):
    task, model, criterion = built
    from fairseq.optim.adam import FairseqAdam

    opt = FairseqAdam(type("C", (), {"lr": [1e-3], "adam_betas": "(0.9, 0.999)", "adam_eps": 1e-8,
                                     "weight_decay": 0.0, "use_old_adam": False, "fp16_adam_stats": False,
                                     "tpu": False})(), list(model.parameters()))
    sample = make_sample(task, [5, 9, 3])
    _, _, log = task.train_step(sample, model, criterion, opt, update_num=37)
    assert model.decoder.num_updates == 37
    assert log["masking"] == pytest.approx(masking_probability(37, 100))
    # the latent-predictor loss is gated until --latent-loss-start (default: --mask-startup-steps)
    assert model.decoder.latent_gate() == 0.0
    model.set_num_updates(101)
    assert model.decoder.latent_gate() == 1.0


def test_latent_targets_end_symbol_after_each_sentence(built):
    task, model, _ = built
    model.eval()
    sample = make_sample(task, [2, 7, 16])  # 3, 8, 17 tokens with EOS -> 1, 1, 3 latents (nc = 3)
    out = model(**sample["net_input"], target=sample["target"])
    term = out["losses"]["lp"]
    lt, valid = term["tgt"], term["mask"]  # (B, L + 1, blocks, m) sampled codes, (B, L + 1)
    k, m = model.decoder.num_codes, model.decoder.bottleneck.num_samples
    assert lt.shape == (3, 4, 1, m) and term["out"].shape == (3, 4, 1, k + 1)
    lengths = (~out["latent_padding_mask"]).sum(1).tolist()
    assert lengths == [1, 1, 3]
    for i, n in enumerate(lengths):
        assert (lt[i, n] == k).all()  # END right after the last latent
        assert (lt[i, :n] < k).all()  # the m sampled codes of each latent
        assert valid[i, : n + 1].all() and not valid[i, n + 1 :].any()
    assert out["features"].shape[:2] == sample["target"].shape


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_reconstruction_loss_projects_only_real_tokens_yet_equals_the_padded_computation(built, eps):
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    task, model, criterion = built
    model.eval()  # no dropout, no sampling differences between the two forward passes
    sample = make_sample(task, [2, 9, 5], seed=4)
    criterion.eps = eps
    torch.manual_seed(0)
    _, _, log = criterion(model, sample)
    torch.manual_seed(0)
    out = model(**sample["net_input"], target=sample["target"])
    lprobs = torch.log_softmax(model.decoder.output_layer(out["features"]).float(), -1)  # padding included
    recon, nll = label_smoothed_nll_loss(lprobs, sample["target"], eps, ignore_index=task.target_dictionary.pad())
    criterion.eps = 0.0
    torch.testing.assert_close(log["recon_loss"], recon.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log["nll_loss"], nll.detach(), rtol=1e-5, atol=1e-5)


def test_softmax_nll_value_and_gradient_equal_log_softmax_then_nll():
    from vq_nat.criterions.latent_vq import SoftmaxNLL

    torch.manual_seed(0)
    logits = (3 * torch.randn(9, 13)).requires_grad_()
    target = torch.randint(0, 13, (9,))
    ours = SoftmaxNLL.apply(logits, target)
    (2.5 * ours).backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref = torch.nn.functional.nll_loss(torch.log_softmax(logits, -1), target, reduction="sum")
    (2.5 * ref).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, logits.grad)
    # by hand: d/dlogits = 2.5 * (softmax - onehot)
    want = 2.5 * (torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(target, 13))
    torch.testing.assert_close(grad, want)


def test_decoding_fewer_positions_changes_none_of_them(built):
    """The decoder is causal: decoding only the first T positions (the batch's longest target) gives exactly
    the first T positions of the full L * 2^nc decoding, with gradients (training) as without fusion."""
    task, model, _ = built
    model.train()  # dropout 0 in this fixture: deterministic, autograd on, fairseq's layer code
    dec = model.decoder
    sample = make_sample(task, [4, 11, 6], seed=5)
    enc = model.encoder(**sample["net_input"])
    latents = torch.randn(3, 2, dec.embed_tokens.embedding_dim)
    latent_pad = torch.tensor([[False, True], [False, False], [False, True]])
    full = dec.decode(latents, latent_pad, enc)
    short = dec.decode(latents, latent_pad, enc, length=12)
    assert full.shape[1] == 16 and short.shape[1] == 12
    torch.testing.assert_close(short, full[:, :12], rtol=1e-5, atol=1e-5)


def test_autoencoder_and_decoder_are_batching_invariant(built):
    task, model, criterion = built
    model.eval()
    dec = model.decoder
    sample = make_sample(task, [4, 11, 6], seed=3)
    pad_id = task.target_dictionary.pad()
    with torch.no_grad():
        enc = model.encoder(**sample["net_input"])
        tgt = dec.pad_to_multiple(sample["target"])
        z_e, lpad = dec.encode_target(tgt, enc)
        logits = dec.decode(z_e, lpad, enc)
        for i in range(3):
            n = int(sample["target"][i].ne(pad_id).sum())
            src = sample["net_input"]["src_tokens"][i : i + 1]
            src = src[:, src[0].ne(pad_id)]
            enc1 = model.encoder(src, src_lengths=torch.tensor([src.size(1)]))
            z1, lpad1 = dec.encode_target(dec.pad_to_multiple(sample["target"][i : i + 1, :n]), enc1)
            nl = z1.size(1)
            torch.testing.assert_close(z1[0], z_e[i, :nl], rtol=1e-4, atol=1e-4)
            out1 = dec.decode(z1, lpad1, enc1)
            torch.testing.assert_close(out1[0, :n], logits[i, :n], rtol=1e-4, atol=1e-4)


def test_generate_stops_at_end_and_cuts_at_eos(built):
    task, model, _ = built
    model.eval()
    gen = task.build_generator([model], type("A", (), {"max_len_a": 0, "max_len_b": 50})())
    sample = make_sample(task, [3, 8])
    hypos = gen.generate([model], sample)
    assert len(hypos) == 2
    for h in hypos:
        toks = h[0]["tokens"]
        assert toks[-1] == task.target_dictionary.eos()
        assert (toks[:-1] != task.target_dictionary.eos()).all()
        assert len(toks) <= 50 + 1 and len(h[0]["positional_scores"]) == len(toks)
        assert 1 <= len(h[0]["latents"]) <= (50 + 7) // 8


def test_compress_decompress_lengths_and_padding_invariance():
    torch.manual_seed(0)
    comp, decomp = Compressor(8, 2).eval(), Decompressor(8, 2).eval()
    x = torch.randn(2, 12, 8)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 5:] = True
    z, zpad = comp(x, pad)
    assert z.shape == (2, 3, 8) and zpad.tolist() == [[False] * 3, [False, False, True]]
    z1, _ = comp(x[1:, :8], pad[1:, :8])  # the same sentence alone, padded only to a multiple of 4
    torch.testing.assert_close(z1[0, :2], z[1, :2], rtol=1e-5, atol=1e-5)
    y, ypad = decomp(z, zpad)
    assert y.shape == (2, 12, 8) and ypad[1].sum() == 4
    with pytest.raises(ValueError, match="multiple of 2"):
        comp(torch.randn(1, 7, 8))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (2, 2, 0), (5, 1, 2), (3, 2, 1)])
def test_conv_btc_equals_conv1d(kernel, stride, padding):
    """conv_btc (channels-last conv2d on the batch-first input) is nn.Conv1d on the transposed input, with and
    without autograd, gradients included, and follows an in-place weight update."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 6, kernel, stride=stride, padding=padding)
    for b, t in [(1, 1), (2, 1), (1, 2), (3, 4), (1, 16), (4, 32), (2, 7)]:
        if t + 2 * padding < kernel:
            continue
        x = torch.randn(b, t, 8, requires_grad=True)
        want = conv(x.transpose(1, 2)).transpose(1, 2)
        with torch.no_grad():
            torch.testing.assert_close(conv_btc(x, conv), want, rtol=1e-5, atol=1e-5)
        got = conv_btc(x, conv)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(torch.autograd.grad(got.square().sum(), [x, conv.weight, conv.bias]),
                        torch.autograd.grad(want.square().sum(), [x, conv.weight, conv.bias])):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        conv.weight.mul_(-2.0)
        torch.testing.assert_close(conv_btc(x, conv), conv(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)
        if padding * 2 + 1 == kernel and stride == 1:
            torch.testing.assert_close(conv_btc(x[:, :1], conv), conv(x[:, :1].transpose(1, 2)).transpose(1, 2))


def test_denoising_noise():
    torch.manual_seed(0)
    tokens = torch.arange(4, 24).view(2, 10)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :7] = True
    shuffled = word_shuffle(tokens, mask, p=1.0, k=3)
    assert torch.equal(shuffled[:, 7:], tokens[:, 7:])  # EOS / padding stay
    for i in range(2):
        assert sorted(shuffled[i, :7].tolist()) == tokens[i, :7].tolist()
        moved = [abs(shuffled[i].tolist().index(t) - j) for j, t in enumerate(tokens[i, :7].tolist())]
        assert max(moved) <= 3
    assert torch.equal(word_shuffle(tokens, mask, p=0.0), tokens)
    dropped = word_dropout(tokens, mask, p=0.5, unk=3)
    assert torch.equal(dropped[:, 7:], tokens[:, 7:])
    assert ((dropped == tokens) | (dropped == 3)).all()
    assert 0 < (dropped == 3).sum() < 14


def test_the_latent_loss_trains_the_predictor_and_the_autoencoder_through_the_straight_through_latents(tmp_path):
    from fairseq_helpers import build_task_and_model

    task, model, _ = build_task_and_model(str(tmp_path), ["--bottleneck", "vq", "--dropout", "0"])
    model.train()
    sample = make_sample(task, [5, 11])
    out = model(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], target=sample["target"])
    term = out["losses"]["lp"]
    lp = -torch.log_softmax(term["out"], -1).gather(-1, term["tgt"])[term["mask"]].sum()
    lp.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.compressor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.latent_predictor.parameters())


def test_a_budget_that_ends_before_the_latent_loss_starts_is_warned(tmp_path, caplog):
    import logging

    from fairseq_helpers import build_task_and_model

    with caplog.at_level(logging.WARNING):
        build_task_and_model(str(tmp_path), ["--mask-startup-steps", "500", "--max-update", "300"])
    assert "latent predictor is never trained" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_task_and_model(str(tmp_path / "b"), ["--mask-startup-steps", "500", "--max-update", "3000"])
    assert "never trained" not in caplog.text
    # the tiny preset's own defaults train the latent predictor within a 1,000-update budget
    with caplog.at_level(logging.WARNING):
        _, model, _ = build_task_and_model(str(tmp_path / "c"), ["--max-update", "1000"])
    assert "never trained" not in caplog.text
    assert model.decoder.latent_loss_start <= 400 and model.decoder.mask_startup_steps <= 400
