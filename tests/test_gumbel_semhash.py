"""Tests for the Gumbel-Softmax and improved-semantic-hashing bottlenecks (CPU, fast)."""
import logging
import math

import numpy as np
import pytest
import torch

from vq_nat.modules.gumbel import GumbelSoftmaxQuantizer, inverse_exp_decay, inverse_lin_decay
from vq_nat.modules.semhash import SemanticHashingQuantizer, saturating_sigmoid

B, T, DIM = 3, 7, 16


def make(kind, **kw):
    torch.manual_seed(0)
    if kind == "gumbel":
        return GumbelSoftmaxQuantizer(num_codes=32, dim=DIM, **kw)
    return SemanticHashingQuantizer(num_bits=5, dim=DIM, **kw)


def padding_mask():
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, 2:] = True
    return mask


def np_perplexity(codes, num_codes):
    counts = np.bincount(codes, minlength=num_codes).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return math.exp(-(nz * np.log(nz)).sum()), (counts > 0).mean()


@pytest.fixture(params=["gumbel", "semhash"])
def kind(request):
    return request.param


@pytest.mark.parametrize("train", [True, False])
def test_shapes_targets_codes(kind, train):
    q = make(kind).train(train)
    z = torch.randn(B, T, DIM) * 3
    out = q(z)
    k = q.num_codes
    assert out.quantized.shape == (B, T, DIM) and out.quantized.dtype == z.dtype
    assert out.codes.shape == (B, T) and out.codes.dtype == torch.long
    assert out.targets.shape == (B, T, k)
    assert torch.allclose(out.targets.sum(-1), torch.ones(B, T))
    assert ((out.targets == 0) | (out.targets == 1)).all()
    assert torch.equal(out.targets.argmax(-1), out.codes)
    assert out.codes.min() >= 0 and out.codes.max() < k
    for s in (out.loss, out.perplexity, out.codes_used):
        assert s.dim() == 0 and torch.isfinite(s)
    assert 1.0 <= out.perplexity.item() <= k + 1e-4
    assert 0.0 < out.codes_used.item() <= 1.0
    # any leading shape, incl. a single vector
    assert q(torch.randn(DIM)).quantized.shape == (DIM,)
    assert q(torch.randn(2, 3, 4, DIM)).codes.shape == (2, 3, 4)


@pytest.mark.parametrize("train", [True, False])
def test_padding_invariance(kind, train):
    q = make(kind).train(train)
    mask = padding_mask()
    z1 = torch.randn(B, T, DIM) * 3
    z2 = z1.clone()
    z2[mask] = torch.randn(int(mask.sum()), DIM) * 10  # change only padded positions
    torch.manual_seed(1)
    o1 = q(z1, padding_mask=mask)
    torch.manual_seed(1)  # same noise draw in training
    o2 = q(z2, padding_mask=mask)
    assert torch.allclose(o1.loss, o2.loss, atol=1e-6)
    assert torch.allclose(o1.perplexity, o2.perplexity)
    assert torch.equal(o1.codes_used, o2.codes_used)
    assert torch.equal(o1.codes[~mask], o2.codes[~mask])


def test_all_padding_is_finite(kind):
    q = make(kind).train()
    out = q(torch.randn(B, T, DIM), padding_mask=torch.ones(B, T, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.perplexity.item() == 1.0 and out.codes_used.item() == 0.0


def test_eval_determinism(kind):
    q = make(kind).eval()
    z = torch.randn(B, T, DIM) * 3
    o1, o2 = q(z), q(z)
    for name in ("quantized", "codes", "targets", "loss", "perplexity", "codes_used"):
        assert torch.equal(getattr(o1, name), getattr(o2, name)), name
    # eval forward value is exactly the embedding of the code (what the latent predictor's codes decode to)
    assert torch.allclose(o1.quantized, q.embed_codes(o1.codes), atol=1e-5)


def test_gradients_reach_input_and_parameters(kind):
    q = make(kind).train()
    q.set_num_updates(10**6)  # past warm-ups: semhash mixes discrete and soft bits
    z = (torch.randn(B, T, DIM) * 3).requires_grad_()
    out = q(z, padding_mask=padding_mask())
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_low_precision_input_returns_same_dtype(kind):
    q = make(kind).train()
    z = torch.randn(B, T, DIM).bfloat16()
    out = q(z)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_num_updates_is_in_state_dict(kind):
    q = make(kind)
    q.set_num_updates(1234)
    sd = q.state_dict()
    assert int(sd["num_updates"]) == 1234
    q2 = make(kind)
    q2.load_state_dict(sd)
    assert int(q2.num_updates) == 1234


def test_perplexity_matches_numpy(kind):
    q = make(kind).eval()
    mask = padding_mask()
    out = q(torch.randn(B, T, DIM) * 3, padding_mask=mask)
    ppl, used = np_perplexity(out.codes[~mask].numpy(), q.num_codes)
    assert out.perplexity.item() == pytest.approx(ppl, rel=1e-5)
    assert out.codes_used.item() == pytest.approx(used)


# ----------------------------------------------------------------------------- schedules


def test_t2t_decay_helpers():
    s = torch.tensor([0.0, 50.0, 100.0, 200.0])
    # inverse_lin_decay(100): 0.01 + 0.99 * min(step / 100, 1)
    assert torch.allclose(inverse_lin_decay(100, s), torch.tensor([0.01, 0.505, 1.0, 1.0]))
    # inverse_exp_decay(100): 0.01 ** (max(100 - step, 0) / 100)
    assert torch.allclose(inverse_exp_decay(100, s), torch.tensor([0.01, 0.1, 1.0, 1.0]))


def test_gumbel_schedules_by_hand():
    q = make("gumbel")  # t2t defaults: tau 1.19 -> 0.2 over 150000, noise 0.5 * inverse_exp_decay(30000)
    expect_tau = {0: 1.19, 75000: 1.19 - 0.99 * 0.5, 150000: 0.2, 400000: 0.2}
    expect_noise = {0: 0.005, 15000: 0.05, 30000: 0.5, 400000: 0.5}
    for step, tau in expect_tau.items():
        q.set_num_updates(step)
        assert q.temperature().item() == pytest.approx(tau, abs=1e-6)
        # identical to t2t's 1.2 - inverse_lin_decay(150000)
        assert tau == pytest.approx(1.2 - (0.01 + 0.99 * min(step / 150000, 1.0)), abs=1e-9)
    for step, c in expect_noise.items():
        q.set_num_updates(step)
        assert q.noise_multiplier().item() == pytest.approx(c, rel=1e-5)
    q2 = GumbelSoftmaxQuantizer(8, 4, temperature_start=2.0, temperature_min=0.5, anneal_steps=1000,
                                noise_scale=1.0, noise_warmup_steps=0)
    assert q2.temperature(torch.tensor(250.0)).item() == pytest.approx(2.0 - 1.5 * 0.25)
    assert q2.noise_multiplier(torch.tensor(0.0)).item() == 1.0


def test_semhash_mix_schedule_by_hand():
    q = make("semhash")  # pd = 0.5 * 0.01 ** (max(20000 - step, 0) / 20000)
    for step, pd in {0: 0.005, 10000: 0.05, 20000: 0.5, 10**6: 0.5}.items():
        q.set_num_updates(step)
        assert q.discrete_prob().item() == pytest.approx(pd, rel=1e-5)


# ----------------------------------------------------------------------------- gumbel specifics


def test_gumbel_train_forward_is_hard_one_hot_of_sample():
    q = make("gumbel", random_temperature_prob=0.0).train()
    out = q(torch.randn(B, T, DIM) * 3)
    assert torch.allclose(out.quantized, q.embed_codes(out.codes), atol=1e-5)
    soft = make("gumbel", hard=False).train()
    o = soft(torch.randn(B, T, DIM))
    assert not torch.allclose(o.quantized, soft.embed_codes(o.codes), atol=1e-4)


def test_gumbel_low_temperature_sample_follows_logits_without_noise():
    q = make("gumbel", noise_scale=0.0, random_temperature_prob=0.0).train()
    z = torch.randn(B, T, DIM) * 3
    q.eval()
    ref = q(z).codes
    q.train()
    assert torch.equal(q(z).codes, ref)


def test_gumbel_loss_matches_numpy_t2t_formula():
    q = make("gumbel").eval()
    mask = padding_mask()
    z = torch.randn(B, T, DIM) * 3
    out = q(z, padding_mask=mask)
    w, b = q.to_logits.weight.detach().numpy(), q.to_logits.bias.detach().numpy()
    x = z[~mask].numpy().astype(np.float64)
    logits = x @ w.T + b
    logq = logits - logits.max(-1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
    kl = -logq.max(-1)
    distrib = logq * np.eye(q.num_codes)[logq.argmax(-1)]
    d_dev = -((distrib - distrib.mean(0, keepdims=True)) ** 2).mean(0).mean()
    assert out.loss.item() == pytest.approx(5.0 * d_dev + 0.002 * kl.mean(), rel=1e-4)


# ----------------------------------------------------------------------------- semhash specifics


def test_semhash_codes_equal_bits_by_hand():
    q = SemanticHashingQuantizer(num_bits=3, dim=3).eval()
    with torch.no_grad():
        q.to_bits.weight.copy_(torch.eye(3))
        q.to_bits.bias.zero_()
    z = torch.tensor([[5.0, -5.0, 5.0], [-5.0, 5.0, 5.0], [-5.0, -5.0, -5.0], [5.0, 5.0, -5.0], [0.1, 0.0, 3.0]])
    # lower-endian: bits (b0, b1, b2) -> b0 + 2 b1 + 4 b2; sigmoid(0) * 1.2 - 0.1 = 0.5 is not > 0.5
    # (0.1 -> 1.2 * sigmoid(0.1) - 0.1 = 0.5300 > 0.5)
    expect = [1 + 4, 2 + 4, 0, 1 + 2, 1 + 4]
    out = q(z)
    assert out.codes.tolist() == expect
    assert q.codes_to_bits(torch.tensor(expect)).tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert torch.equal(q.bits_to_codes(q.codes_to_bits(torch.arange(8))), torch.arange(8))


def test_saturating_sigmoid():
    x = torch.tensor([-10.0, 0.0, 10.0, math.log(3.0)])
    # 1.2 * sigmoid(x) - 0.1 clipped to [0, 1]; sigmoid(log 3) = 0.75 -> 0.8
    assert torch.allclose(saturating_sigmoid(x), torch.tensor([0.0, 0.5, 1.0, 0.8]))


def test_semhash_mix_extremes():
    z = torch.randn(B, T, DIM) * 3
    always = make("semhash", noise_std=0.0, startup_steps=0, discrete_mix=1.0).train()
    out = always(z)
    assert torch.allclose(out.quantized, always.embed_codes(out.codes), atol=1e-5)
    never = make("semhash", noise_std=0.0, startup_steps=0, discrete_mix=0.0).train()
    out = never(z)
    y = saturating_sigmoid(never.to_bits(z))
    soft = never.from_bits(y) + never.from_inv_bits(1 - y)
    assert torch.allclose(out.quantized, soft, atol=1e-5)
    # the mix draws one coin per position: about pd of them discrete
    half = make("semhash", noise_std=0.0, startup_steps=0, discrete_mix=0.5).train()
    out = half(torch.randn(4000, DIM) * 3)
    frac = (out.quantized - half.embed_codes(out.codes)).abs().amax(-1).lt(1e-5).float().mean().item()
    assert 0.45 < frac < 0.55


@pytest.mark.parametrize("make", [lambda: SemanticHashingQuantizer(num_bits=3, dim=4),
                                  lambda: GumbelSoftmaxQuantizer(num_codes=8, dim=4)])
def test_non_finite_inputs_are_named_and_left_out_of_the_code_statistics(make, caplog):
    """A NaN row's code means nothing: a warning counts such rows and the statistics cover the finite ones only."""
    torch.manual_seed(0)
    q = make().eval()
    z = torch.randn(6, 4)
    clean = q(z[:4])
    z[4, 2] = float("nan")
    z[5, 0] = float("inf")
    with caplog.at_level(logging.WARNING):
        out = q(z)
    assert "2 non-finite encoder outputs" in caplog.text
    torch.testing.assert_close(out.quantized[:4], clean.quantized)
    torch.testing.assert_close(out.perplexity, clean.perplexity)
    torch.testing.assert_close(out.codes_used, clean.codes_used)


@pytest.mark.parametrize("make", [lambda: SemanticHashingQuantizer(num_bits=3, dim=4),
                                  lambda: GumbelSoftmaxQuantizer(num_codes=8, dim=4)])
def test_non_finite_padding_changes_nothing(make, caplog):
    """Whatever the padded positions hold, the loss and the statistics are those of the real ones, silently."""
    torch.manual_seed(0)
    q = make().train()
    z, pad = torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 4] = True
    torch.manual_seed(1)
    clean = q(z, padding_mask=pad)
    z[0, 4] = float("nan")
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING):
        out = q(z, padding_mask=pad)
    assert "non-finite" not in caplog.text
    torch.testing.assert_close(out.loss, clean.loss)
    torch.testing.assert_close(out.perplexity, clean.perplexity)
    torch.testing.assert_close(out.quantized[~pad], clean.quantized[~pad])
