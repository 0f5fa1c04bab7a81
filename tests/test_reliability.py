"""Reliability of training, distributed training, generation and mixed precision (tiny models, CPU).

1. resume is exact (soft EM, denoising noise and warm-up schedules active);
2. one codebook across ranks (fairseq-train, 2 gloo ranks on CPU, hard and soft EM);
3. bad input: empty / over-long / unknown-word sentences, target lengths not a multiple of 2^nc, NaN reaching
   the quantizer (directly and through a model train step), an all-padding batch;
4. fairseq-generate --batch-size 1 == --batch-size 64 for hard VQ (soft EM is in test_binaries.py);
5. bf16: EMA statistics stay fp32 under model.bfloat16(), still move under a bf16 forward, and autocast
   does not change assignments.
"""
import copy
import logging
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from fairseq_helpers import (
    BackwardOnly,
    build_task_and_model,
    free_port,
    generate,
    hypotheses,
    interactive,
    make_copy_task,
    make_sample,
    preprocess,
    train,
    train_distributed_rank,
    write_parallel,
)
from vq_nat.modules import VectorQuantizer

# 64 training sentences at --max-tokens 150: 4 batches per epoch, so --max-update 3 stops mid-epoch and
# --max-update 6 crosses an epoch boundary (and its validation)
FAST = ["--max-tokens", "150", "--no-epoch-checkpoints"]
MAX_POS = 32  # max source / target positions of the generation checkpoint

# the second test split ("test1"): inputs a user may well give fairseq-generate
BAD = [
    ("w1 w2 w3", "w1 w2 w3"),  # 0 ordinary
    ("", ""),  # 1 empty line
    (" ".join(["w2"] * 40), " ".join(["w2"] * 40)),  # 2 longer than the model's max positions (32)
    ("foo w1 bar", "foo w1 bar"),  # 3 words not in the dictionary -> <unk>
    (" ".join(f"w{i % 12}" for i in range(15)), " ".join(f"w{i % 12}" for i in range(15))),  # 4: 16 with EOS
    ("w5", "w5"),  # 5 one word (2 tokens with EOS: far from a multiple of 8)
]
LONG_ID = 2
N_TEST = 12
BOTTLENECK_KEYS = ("decoder.bottleneck.embed", "decoder.bottleneck.ema_count", "decoder.bottleneck.ema_sum")


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    raw = str(root / "raw")
    make_copy_task(raw, n_train=64, n_valid=8, n_test=N_TEST)
    write_parallel(raw, "bad", BAD)
    dest = str(root / "bin")
    preprocess(raw, dest, ["--testpref", f"{os.path.join(raw, 'test')},{os.path.join(raw, 'bad')}"])
    assert os.path.exists(os.path.join(dest, "test1.src-tgt.src.bin"))
    return dest


@pytest.fixture(scope="module")
def vq_ckpt(data_bin, tmp_path_factory):
    """A hard-VQ checkpoint with small max positions (so an over-long input exists)."""
    save = str(tmp_path_factory.mktemp("vq_ckpt"))
    train(data_bin, save, ["--bottleneck", "vq", "--max-update", "8", "--mask-startup-steps", "2",
                           "--max-source-positions", str(MAX_POS), "--max-target-positions", str(MAX_POS)] + FAST)
    return os.path.join(save, "checkpoint_last.pt")


def load_model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def scores(output: str) -> dict:
    out = {}
    for line in output.splitlines():
        if line.startswith("H-"):
            parts = line.split("\t")
            out[int(parts[0][2:])] = float(parts[1])
    return out


# ------------------------------------------------------------------------------------------------ 1. resume


RESUME = ["--bottleneck", "em", "--num-samples", "3", "--word-dropout", "0.3", "--word-shuffle", "0.5",
          "--mask-startup-steps", "4"] + FAST


def test_resume_is_exact(data_bin, tmp_path):
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    train(data_bin, once, RESUME + ["--max-update", "6"])
    train(data_bin, twice, RESUME + ["--max-update", "3"])
    mid = load_model_state(os.path.join(twice, "checkpoint_last.pt"))
    itr = mid["extra_state"]["train_iterator"]
    assert (itr["epoch"], itr["iterations_in_epoch"]) == (1, 3), "the first leg must stop mid-epoch"
    train(data_bin, twice, RESUME + ["--max-update", "6"])

    a = load_model_state(os.path.join(once, "checkpoint_last.pt"))
    b = load_model_state(os.path.join(twice, "checkpoint_last.pt"))
    for ck in (a, b):
        assert ck["optimizer_history"][-1]["num_updates"] == 6
    assert a["model"].keys() == b["model"].keys()
    for key in BOTTLENECK_KEYS:
        assert key in a["model"], key
        # the second leg did move the codebook (the comparison is not between two copies of update 3)
        assert not torch.equal(a["model"][key], mid["model"][key]), key
    for key, va in a["model"].items():
        vb = b["model"][key]
        assert va.dtype == vb.dtype, key
        if va.is_floating_point():
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(va, vb), key


# ------------------------------------------------------------------------------------------------ 2. ranks


def test_one_codebook_across_ranks(data_bin, tmp_path):
    common = ["--max-update", "4", "--mask-startup-steps", "2", "--num-samples", "3"] + FAST
    runs = [("vq", ["--bottleneck", "vq"] + common), ("em", ["--bottleneck", "em"] + common)]
    capture = tmp_path / "capture"
    capture.mkdir()
    ctx = mp.spawn(train_distributed_rank, args=(data_bin, str(tmp_path / "ckpt"), free_port(), 2, runs,
                                                 str(capture)), nprocs=2, join=False)
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=2):
            if time.time() > deadline:
                pytest.fail("2-rank gloo training did not finish in 300 s (a collective that not every rank "
                            "entered?)")
    finally:
        for p in ctx.processes:  # only the two children this test started
            if p.is_alive():
                p.kill()
                p.join()

    for name, _ in runs:
        r0 = torch.load(capture / f"{name}.rank0.pt", weights_only=False)
        r1 = torch.load(capture / f"{name}.rank1.pt", weights_only=False)
        assert r0["num_updates"] == r1["num_updates"] == 4, name
        for key in BOTTLENECK_KEYS:
            assert torch.equal(r0["model"][key], r1["model"][key]), f"{name}: {key} differs across ranks"
        assert not torch.equal(r0["model"]["decoder.bottleneck.ema_count"],
                               torch.ones_like(r0["model"]["decoder.bottleneck.ema_count"])), "EMA never ran"
        for key, v0 in r0["model"].items():  # and, as fairseq promises, the same parameters
            torch.testing.assert_close(v0, r1["model"][key], rtol=0, atol=1e-6,
                                       msg=lambda m, k=key: f"{name}: {k}: {m}")


# ------------------------------------------------------------------------------------------------ 3. bad input


def test_generate_overlong_input_is_a_clear_error_or_skipped(data_bin, vq_ckpt, caplog):
    # default: fairseq refuses with a message that names the flag
    with pytest.raises(Exception, match="skip-invalid-size-inputs-valid-test"):
        generate(data_bin, vq_ckpt, ["--gen-subset", "test1"])
    caplog.set_level(logging.WARNING)
    out = generate(data_bin, vq_ckpt, ["--gen-subset", "test1", "--skip-invalid-size-inputs-valid-test"])
    hyps = hypotheses(out)
    assert sorted(hyps) == [i for i in range(len(BAD)) if i != LONG_ID], "everything else translated"
    assert "skipped" in caplog.text and "invalid size" in caplog.text
    src = {int(l.split("\t")[0][2:]): l.split("\t")[1] if "\t" in l else "" for l in out.splitlines()
           if l.startswith("S-")}
    assert src[1] == "" and "<unk>" in src[3], src
    for i, h in hyps.items():
        assert "<pad>" not in h and "<s>" not in h, (i, h)


def test_interactive_unknown_words_and_empty_lines(data_bin, vq_ckpt):
    lines = ["w1 w2 w3", "", "foo bar", "", "", "w1 qqq w2 zzz", "   ", "w3"]
    out = interactive(data_bin, vq_ckpt, lines)
    hyps = hypotheses(out)
    assert sorted(hyps) == list(range(len(lines))), "one H- line per input line"


def test_target_lengths_not_a_multiple_of_compression(tmp_path):
    task, model, criterion = build_task_and_model(str(tmp_path), ["--bottleneck", "em", "--num-samples", "3",
                                                                  "--mask-startup-steps", "4"])
    lengths = list(range(1, 18))  # 2..18 tokens with EOS; 2^nc = 8
    sample = make_sample(task.target_dictionary, lengths, seed=3)
    for train_mode in (True, False):
        model.train(train_mode)
        loss, _, log = criterion(model, sample)
        assert torch.isfinite(loss), train_mode
        out = model(**sample["net_input"], target=sample["target"])
        assert out["features"].shape[:2] == sample["target"].shape
        got = (~out["latent_padding_mask"]).sum(1).tolist()
        assert got == [-(-(n + 1) // 8) for n in lengths]


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_nan_inputs_never_reach_the_codebook(assignment, caplog):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, assignment=assignment, num_samples=4, decay=0.9).train()
    ref = copy.deepcopy(vq)
    z = torch.randn(3, 5, 8)
    z[0, 1] = float("nan")
    z[2, 4, 3] = float("inf")
    z[1, 0, 0] = float("-inf")
    bad = ~torch.isfinite(z).all(-1)
    caplog.set_level(logging.WARNING, logger="vq_nat.modules.vector_quantizer")
    torch.manual_seed(1)
    out = vq(z)
    assert "non-finite" in caplog.text
    for name in ("embed", "ema_count", "ema_sum"):
        assert torch.isfinite(getattr(vq, name)).all(), name
    assert torch.isfinite(out.perplexity)
    # the loss is not hidden: non-finite z_e make it non-finite, for fairseq's NaN/overflow handling to see
    assert not torch.isfinite(out.loss)
    # the EM step exactly as if those positions were padding
    torch.manual_seed(1)
    ref_out = ref(z.masked_fill(bad.unsqueeze(-1), 0.0), padding_mask=bad)
    for name in ("embed", "ema_count", "ema_sum"):
        torch.testing.assert_close(getattr(vq, name), getattr(ref, name), rtol=0, atol=1e-6)
    assert torch.equal(out.codes[~bad], ref_out.codes[~bad])
    assert torch.isfinite(ref_out.loss)


def test_nan_weight_through_a_model_train_step(tmp_path, caplog):
    task, model, criterion = build_task_and_model(str(tmp_path), ["--bottleneck", "em", "--num-samples", "3",
                                                                  "--mask-startup-steps", "4"])
    d = task.target_dictionary
    vq = model.decoder.bottleneck
    caplog.set_level(logging.WARNING, logger="vq_nat.modules.vector_quantizer")
    # (a) one target word's embedding is NaN: the latents of sentences containing it are NaN, the others not
    nan_word = d.index("w3")
    words = [[d.index(w) for w in s.split()] for s in ("w1 w3 w2 w4", "w5 w6 w7", "w3", "w8 w9 w10 w11 w2 w1 w5")]
    sample = make_sample(d, None, words=words)
    with torch.no_grad():
        model.decoder.embed_tokens.weight[nan_word] = float("nan")
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    loss, _, _ = task.train_step(sample, model, criterion, BackwardOnly(), update_num=1)
    assert "non-finite" in caplog.text
    assert not torch.isfinite(loss), "the loss must show the NaN (fairseq's NaN handling reads it)"
    for name in ("embed", "ema_count", "ema_sum"):
        assert torch.isfinite(getattr(vq, name)).all(), name
    assert not torch.equal(vq.ema_count, before["ema_count"]), "the finite latents still update the codebook"
    # (b) a compressor weight is NaN: every latent of the batch is NaN
    caplog.clear()
    model.zero_grad()
    with torch.no_grad():
        model.decoder.embed_tokens.weight[nan_word] = 0.0
        next(model.decoder.compressor.parameters()).view(-1)[0] = float("nan")
    task.train_step(sample, model, criterion, BackwardOnly(), update_num=2)
    assert "non-finite" in caplog.text
    for name in ("embed", "ema_count", "ema_sum"):
        assert torch.isfinite(getattr(vq, name)).all(), name


def _trained_quantizer(assignment):
    """A quantizer whose EMA counts are far from uniform (a few codes used, the rest decayed)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, assignment=assignment, num_samples=4, decay=0.8).train()
    centers = vq.codebook[:3].clone()
    for _ in range(40):
        z = centers[torch.randint(0, 3, (2, 6))] + 0.05 * torch.randn(2, 6, 8)
        vq(z)
    assert vq.ema_count.min() < 1e-3 < vq.ema_count.max()
    return vq


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_all_padding_batch_is_finite(assignment):
    vq = _trained_quantizer(assignment)
    z = torch.randn(2, 6, 8)
    out = vq(z, padding_mask=torch.ones(2, 6, dtype=torch.bool))
    for t in (out.loss, out.perplexity, out.codes_used, out.quantized, out.targets):
        assert torch.isfinite(t.float()).all()
    assert float(out.loss) == 0.0
    for name in ("embed", "ema_count", "ema_sum"):
        assert torch.isfinite(getattr(vq, name)).all(), name


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_all_padding_batch_leaves_codebook_unchanged(assignment):
    vq = _trained_quantizer(assignment)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 6, 8), padding_mask=torch.ones(2, 6, dtype=torch.bool))
    torch.testing.assert_close(vq.embed, before["embed"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(vq.ema_count, before["ema_count"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ 4. batching


def positional_scores(output: str) -> dict:
    return {int(l.split("\t")[0][2:]): [float(x) for x in l.split("\t")[1].split()]
            for l in output.splitlines() if l.startswith("P-")}


def assert_same_generation(o1: str, o64: str, n: int):
    h1, h64 = hypotheses(o1), hypotheses(o64)
    assert sorted(h1) == list(range(n))
    assert h1 == h64
    s1, s64 = scores(o1), scores(o64)
    p1, p64 = positional_scores(o1), positional_scores(o64)
    for i in s1:
        assert s1[i] == pytest.approx(s64[i], abs=1e-3), i
        assert p1[i] == pytest.approx(p64[i], abs=1e-3), i


def end_bias_checkpoint(ckpt: str, out_path: str, shift=None) -> list:
    """A copy of ``ckpt`` with the latent predictor's END logit shifted; ``shift=None`` picks the shift that gives
    the most varied latent lengths over the test set (so a batch mixes sentences that stop at different
    latents). Returns the latent lengths of the test sentences."""
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt])
    model = models[0].eval()
    task.load_dataset("test")
    sample = next(task.get_batch_iterator(task.dataset("test"), max_sentences=64).next_epoch_itr(shuffle=False))
    enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
    bias = model.decoder.latent_predictor.output.bias
    end = model.decoder.num_codes  # END of block 0
    base = float(bias[end])

    def lengths(delta):
        with torch.no_grad():
            bias[end] = base + delta
            _, _, pad, _, _ = model.decoder.generate(enc, MAX_POS)
        return (~pad).sum(1).tolist()

    if shift is None:
        best = (0, 0.0)
        for d in sorted((0.1 * i for i in range(-30, 31)), key=abs):
            best = max(best, (len(set(lengths(d))), d), key=lambda x: x[0])
            if best[0] >= 3:
                break
        shift = best[1]
    lens = lengths(shift)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["model"]["decoder.latent_predictor.output.bias"][end] = base + shift
    torch.save(state, out_path)
    return lens


def test_generate_batch_size_does_not_change_hypotheses_hard_vq(data_bin, vq_ckpt, tmp_path):
    o1 = generate(data_bin, vq_ckpt, ["--batch-size", "1"])
    o64 = generate(data_bin, vq_ckpt, ["--batch-size", "64"])
    assert_same_generation(o1, o64, N_TEST)
    # the same with a batch that mixes latent lengths (END shifted until test sentences stop at different latents)
    varied = str(tmp_path / "varied.pt")
    lens = end_bias_checkpoint(vq_ckpt, varied)
    assert len(set(lens)) >= 2, lens
    o1 = generate(data_bin, varied, ["--batch-size", "1"])
    o64 = generate(data_bin, varied, ["--batch-size", "64"])
    assert_same_generation(o1, o64, N_TEST)


def test_generate_batch_size_invariance_with_per_sentence_length_budget(data_bin, vq_ckpt, tmp_path):
    # a latent predictor that has not learned to stop (END never wins) runs into every sentence's budget
    noend = str(tmp_path / "noend.pt")
    end_bias_checkpoint(vq_ckpt, noend, shift=-1e4)
    budget = ["--max-len-a", "1", "--max-len-b", "2"]  # |x| + 2 tokens: 1 or 2 latents here
    o1 = generate(data_bin, noend, ["--batch-size", "1"] + budget)
    o64 = generate(data_bin, noend, ["--batch-size", "64"] + budget)
    assert_same_generation(o1, o64, N_TEST)


# ------------------------------------------------------------------------------------------------ 5. bf16


def test_bfloat16_model_keeps_ema_fp32_and_updates_it(tmp_path):
    task, model, criterion = build_task_and_model(str(tmp_path), ["--bottleneck", "vq", "--mask-startup-steps",
                                                                  "4", "--dropout", "0"])
    model.bfloat16()  # what fairseq's --bf16 does to the model
    vq = model.decoder.bottleneck
    for name in ("embed", "ema_count", "ema_sum"):
        assert getattr(vq, name).dtype == torch.float32, name
    assert model.encoder.embed_tokens.weight.dtype == torch.bfloat16
    assert next(model.decoder.compressor.parameters()).dtype == torch.bfloat16

    model.train()
    sample = make_sample(task.target_dictionary, [5, 11, 3, 8], seed=2)
    total_before = vq.ema_count.sum().item()
    out = model(**sample["net_input"], target=sample["target"])
    n_valid = int((~out["latent_padding_mask"]).sum())
    lam = vq.decay
    # sum_j c_j <- lam * sum_j c_j + (1 - lam) * (#latents): the 0.001 * count term survives (fp32 buffers)
    assert vq.ema_count.sum().item() == pytest.approx(lam * total_before + (1 - lam) * n_valid, abs=1e-4)
    assert vq.ema_count.dtype == torch.float32 and torch.isfinite(vq.ema_count).all()
    logits = model.decoder.output_layer(out["features"])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_bfloat16_quantizer_forward_updates_ema_counts(assignment):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, assignment=assignment, num_samples=4).bfloat16().train()
    for name in ("embed", "ema_count", "ema_sum"):
        assert getattr(vq, name).dtype == torch.float32, name
    old = vq.ema_count.clone()
    z = torch.randn(4, 5, 8).bfloat16()
    out = vq(z)
    # hard: one code per position; soft: m samples per position, each weighing 1/m
    counts = torch.bincount(out.codes.reshape(-1), minlength=16).float() / vq.num_samples
    expected = vq.decay * old[0] + (1 - vq.decay) * counts
    assert vq.ema_count.dtype == torch.float32
    assert not torch.equal(vq.ema_count, old), "0.001 * count vanished"
    torch.testing.assert_close(vq.ema_count[0], expected, rtol=0, atol=1e-6)
    assert out.quantized.dtype == torch.bfloat16


@pytest.mark.parametrize("assignment", ["hard", "soft"])
@pytest.mark.parametrize("training", [False, True])
def test_autocast_bf16_assignments_match_fp32(assignment, training):
    torch.manual_seed(0)
    vq32 = VectorQuantizer(32, 16, assignment=assignment, num_samples=5, decay=0.9).train(training)
    vqac = copy.deepcopy(vq32)
    # points between codes, so that a bf16 distance would pick a different code
    z = 0.5 * (vq32.codebook[torch.randint(0, 32, (64,))] + vq32.codebook[torch.randint(0, 32, (64,))])
    z = (z + 0.01 * torch.randn_like(z)).view(4, 16, 16)
    for _ in range(2):
        torch.manual_seed(7)
        out32 = vq32(z)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outac = vqac(z)
        assert torch.equal(out32.codes, outac.codes)
        torch.testing.assert_close(outac.quantized.float(), out32.quantized, rtol=0, atol=1e-6)
    for name in ("embed", "ema_count", "ema_sum"):
        assert getattr(vqac, name).dtype == torch.float32
        assert torch.equal(getattr(vqac, name), getattr(vq32, name)), name


def test_fairseq_train_stops_on_nan_encoder_outputs_with_its_own_error(tmp_path):
    """fairseq-train resumed from a checkpoint whose compressor holds a NaN weight: the codebook is kept finite,
    the loss is not, and fairseq's own overflow handling stops training (FloatingPointError) instead of training
    on with the NaN positions silently dropped."""
    from fairseq import checkpoint_utils

    raw, dest, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    make_copy_task(raw, n_train=100, n_valid=8, n_test=4)
    preprocess(raw, dest)
    flags = ["--bottleneck", "em", "--num-samples", "3", "--mask-startup-steps", "0", "--max-update", "1"]
    train(dest, save, flags)
    path = os.path.join(save, "checkpoint_last.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    key = next(k for k in state["model"] if k.startswith("decoder.compressor.") and k.endswith("weight"))
    state["model"][key].view(-1)[0] = float("nan")
    from omegaconf import OmegaConf

    state["cfg"] = OmegaConf.to_container(state["cfg"])
    torch.save(state, path)
    with pytest.raises(Exception) as info:
        train(dest, save, flags[:-2] + ["--max-update", "3"])
    # fairseq raises FloatingPointError("gradients are Nan/Inf"), then re-runs the step under its NanDetector,
    # which may itself fail on models whose encoder returns a dict of lists (fairseq's TransformerEncoder)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, FloatingPointError) and "Nan/Inf" in str(x) for x in chain), chain
