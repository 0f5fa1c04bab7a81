"""The VQ-VAE bottleneck against small numpy computations of the paper's equations."""
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from vq_nat.modules import QuantizerOutput, VectorQuantizer


def np_dist(x, e):
    return ((x[:, None, :] - e[None, :, :]) ** 2).sum(-1)


def make(**kw):
    torch.manual_seed(0)
    return VectorQuantizer(**{"num_codes": 8, "dim": 4, **kw})


# ----------------------------------------------------------------------------- hard EM


def test_hard_assignment_is_nearest_code_eq1():
    vq = make().eval()
    z = torch.randn(3, 5, 4)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    e = vq.codebook.numpy()
    want = np_dist(z.reshape(-1, 4).numpy(), e).argmin(-1).reshape(3, 5)
    np.testing.assert_array_equal(out.codes.numpy(), want)
    np.testing.assert_allclose(out.quantized.detach().numpy(), e[want], rtol=1e-6, atol=1e-6)
    onehot = np.eye(8)[want]
    np.testing.assert_array_equal(out.targets.numpy(), onehot)
    # eq.2 as tensor2tensor computes it: beta * mean over every scalar entry
    np.testing.assert_allclose(out.loss.item(), 0.25 * ((z.numpy() - e[want]) ** 2).mean(), rtol=1e-5)
    p = onehot.reshape(-1, 8).mean(0)
    ent = -(p[p > 0] * np.log(p[p > 0])).sum()
    np.testing.assert_allclose(out.perplexity.item(), np.exp(ent), rtol=1e-5)
    np.testing.assert_allclose(out.codes_used.item(), (p > 0).mean())


@pytest.mark.parametrize("blocks", [1, 2])
def test_e_step_in_row_chunks_is_still_eq1(monkeypatch, blocks):
    import vq_nat.modules.vector_quantizer as vqm

    monkeypatch.setattr(vqm, "_CHUNK_SCORES", 8 * 3)  # K = 8: chunks of 3 rows, the last one shorter
    vq = make(num_blocks=blocks).eval()
    z = torch.randn(4, 5, 4)
    codes = vq(z).codes
    d = 4 // blocks
    for j in range(blocks):
        want = np_dist(z[..., j * d:(j + 1) * d].reshape(-1, d).numpy(), vq.embed[j].numpy()).argmin(-1)
        got = codes if blocks == 1 else codes[..., j]
        np.testing.assert_array_equal(got.reshape(-1).numpy(), want)


def test_targets_are_built_on_first_read_only():
    vq = make(assignment="soft", num_samples=4).eval()
    out = vq(torch.randn(3, 4))
    assert "targets" not in vars(out), "nothing N x K is built unless the targets are read"
    assert out.quantized.shape == (3, 4) and out.codes.shape == (3, 4) and out.loss.dim() == 0
    assert "targets" not in vars(out), "reading the other fields does not build them either"
    torch.testing.assert_close(out.targets, torch.nn.functional.one_hot(out.codes, 8).float().mean(-2))
    assert out.targets is out.targets  # built once


@pytest.mark.parametrize("blocks", [1, 2])
def test_nearest_codes_is_eq1_and_changes_nothing(blocks):
    vq = make(assignment="soft", num_blocks=blocks).train()  # soft EM: nearest_codes never samples
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(3, 5, 4)
    codes = vq.nearest_codes(z)
    d = 4 // blocks
    for j in range(blocks):
        e = vq.embed[j].numpy()
        want = np_dist(z[..., j * d:(j + 1) * d].reshape(-1, d).numpy(), e).argmin(-1).reshape(3, 5)
        got = codes.numpy() if blocks == 1 else codes[..., j].numpy()
        np.testing.assert_array_equal(got, want)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_straight_through_gradient_to_z_e():
    vq = make().train()
    z = torch.randn(6, 4, requires_grad=True)
    out = vq(z)
    g = torch.randn(6, 4)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_commitment_gradient_beta():
    vq = make(beta=0.5).eval()
    z = torch.randn(6, 4, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    zq = vq.codebook[out.codes].numpy()
    want = 0.5 * 2 * (z.detach().numpy() - zq) / z.numel()
    np.testing.assert_allclose(z.grad.numpy(), want, rtol=1e-5, atol=1e-7)


def test_ema_update_matches_eq4_5_with_laplace_smoothing():
    vq = make(decay=0.9, epsilon=1e-2).train()
    e0 = vq.codebook.clone().numpy()
    c0 = vq.ema_count[0].clone().numpy()
    m0 = vq.ema_sum[0].clone().numpy()
    z = torch.randn(20, 4)
    out = vq(z)
    codes = np_dist(z.numpy(), e0).argmin(-1)
    np.testing.assert_array_equal(out.codes.numpy(), codes)
    onehot = np.eye(8)[codes]
    c = 0.9 * c0 + 0.1 * onehot.sum(0)  # eq.4
    m = 0.9 * m0 + 0.1 * onehot.T @ z.numpy()  # eq.5
    n = c.sum()
    cs = (c + 1e-2) / (n + 8 * 1e-2) * n  # Laplace smoothing
    np.testing.assert_allclose(vq.ema_count[0].numpy(), c, rtol=1e-5)
    np.testing.assert_allclose(vq.ema_sum[0].numpy(), m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vq.codebook.numpy(), m / cs[:, None], rtol=1e-5, atol=1e-6)
    # z_q is read from the updated codebook (as tensor2tensor does)
    np.testing.assert_allclose(out.quantized.detach().numpy(), (m / cs[:, None])[codes], rtol=1e-5, atol=1e-6)


def test_eval_mode_never_changes_codebook():
    vq = make().eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        vq(torch.randn(10, 4))
    for k, v in vq.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_unused_codes_stay_finite_and_bounded():
    vq = make(num_codes=16, decay=0.99).train()
    z = torch.randn(1, 4) * 0.1 + 3.0  # every point goes to the same code
    init = vq.codebook.clone()
    for _ in range(2000):
        vq(z.repeat(8, 1))
    cb = vq.codebook
    assert torch.isfinite(cb).all()
    used = vq(z).codes.item()
    unused = [j for j in range(16) if j != used]
    # an unused code is never pushed away: m_j and c_j decay together, and once c_j < epsilon the Laplace
    # smoothing only shrinks it towards the origin (tensor2tensor's zero-initialised counts blow it up instead)
    assert (cb[unused].norm(dim=-1) <= init[unused].norm(dim=-1) + 1e-4).all()


def test_repeated_updates_converge_to_kmeans_m_step_eq9():
    torch.manual_seed(1)
    vq = VectorQuantizer(num_codes=4, dim=2, decay=0.8, epsilon=1e-5).train()
    centers = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    pts = (centers[:, None, :] + 0.3 * torch.randn(4, 25, 2)).reshape(-1, 2)
    vq.embed.data[0] = centers + 0.5 * torch.randn(4, 2)
    vq.ema_sum.data[0] = vq.embed.data[0].clone()
    for _ in range(300):
        vq(pts)
    x = pts.numpy()
    e = vq.codebook.numpy()
    assign = np_dist(x, e).argmin(-1)
    for j in range(4):
        if (assign == j).any():  # eq.9: e_j = mean of the points assigned to j
            np.testing.assert_allclose(e[j], x[assign == j].mean(0), atol=1e-3)


# ----------------------------------------------------------------------------- soft EM


def test_soft_em_samples_targets_and_eq12_mean():
    vq = make(assignment="soft", num_samples=10).eval()
    z = torch.randn(2, 7, 4)
    out = vq(z)
    assert out.codes.shape == (2, 7, 10) and out.codes.dtype == torch.long
    counts = torch.nn.functional.one_hot(out.codes, 8).float().mean(-2)
    torch.testing.assert_close(out.targets, counts)
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(2, 7))
    # eq.12: the decoder gets the mean of the m sampled embeddings
    torch.testing.assert_close(out.quantized, vq.codebook[out.codes].mean(-2), rtol=1e-5, atol=1e-6)


def test_soft_em_samples_follow_multinomial_of_negative_distances():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=4, dim=2, assignment="soft", num_samples=4000, temperature=2.0).eval()
    vq.embed.data[0] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5], [-1.0, -1.0]])
    z = torch.tensor([[0.3, 0.2]])
    out = vq(z)
    logits = -np_dist(z.numpy(), vq.codebook.numpy())[0] / 2.0
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(out.targets[0].numpy(), p, atol=0.03)


def test_soft_em_tiny_temperature_equals_hard():
    z = torch.randn(30, 4)
    hard = make().eval()(z)
    soft = make(assignment="soft", num_samples=3, temperature=1e-4).eval()(z)
    torch.testing.assert_close(soft.codes, hard.codes[:, None].expand(-1, 3))


def test_a_temperature_below_the_float32_safe_floor_is_refused():
    # at T ~ 1e-37 the scaled scores overflowed and hard codes were no longer the nearest ones
    for t in (1e-5, 1e-37, 0.0):
        with pytest.raises(ValueError, match=r"temperature must be a finite number in \[0.0001, inf\)"):
            make(assignment="hard", temperature=t)


def test_soft_em_ema_uses_averaged_sample_counts():
    vq = make(assignment="soft", num_samples=5, decay=0.5, epsilon=1e-5).train()
    c0 = vq.ema_count[0].clone().numpy()
    m0 = vq.ema_sum[0].clone().numpy()
    z = torch.randn(12, 4)
    out = vq(z)
    w = out.targets.numpy()  # averaged one-hot of the 5 draws
    c = 0.5 * c0 + 0.5 * w.sum(0)
    m = 0.5 * m0 + 0.5 * w.T @ z.numpy()
    n = c.sum()
    cs = (c + 1e-5) / (n + 8e-5) * n
    np.testing.assert_allclose(vq.ema_count[0].numpy(), c, rtol=1e-5)
    np.testing.assert_allclose(vq.codebook.numpy(), m / cs[:, None], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- gradient codebook (eq.3)


def test_grad_update_codebook_is_parameter_trained_by_eq3():
    vq = make(update="grad", beta=0.25).train()
    assert isinstance(vq.embed, torch.nn.Parameter)
    assert not any(k.startswith("ema_") for k in vq.state_dict())
    z = torch.randn(10, 4, requires_grad=True)
    before = vq.codebook.detach().clone()
    out = vq(z)
    torch.testing.assert_close(vq.codebook.detach(), before)  # forward never changes it
    zq = before[out.codes].numpy()
    zn = z.detach().numpy()
    want = 1.25 * ((zn - zq) ** 2).mean()  # beta*eq.2 + eq.3 (same value forward)
    np.testing.assert_allclose(out.loss.item(), want, rtol=1e-5)
    out.loss.backward()
    grad = np.zeros((8, 4))
    for i, j in enumerate(out.codes.numpy()):
        grad[j] += 2 * (zq[i] - zn[i]) / z.numel()
    np.testing.assert_allclose(vq.embed.grad[0].numpy(), grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- padding, precision, state


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_padding_changes_nothing(assignment):
    z = torch.randn(2, 6, 4)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 5:] = True
    z2 = z.clone()
    z2[pad] = 100.0 * torch.randn(int(pad.sum()), 4)
    results = []
    for zz in (z, z2):
        vq = make(assignment=assignment).train()
        torch.manual_seed(5)
        out = vq(zz, padding_mask=pad)
        results.append((out, vq.state_dict()))
    (o1, s1), (o2, s2) = results
    torch.testing.assert_close(o1.loss, o2.loss)
    torch.testing.assert_close(o1.perplexity, o2.perplexity)
    torch.testing.assert_close(o1.codes_used, o2.codes_used)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k])
    # and it equals running on the valid positions alone
    vq = make(assignment=assignment).train()
    torch.manual_seed(5)
    o3 = vq(z[~pad])
    if assignment == "hard":
        torch.testing.assert_close(o3.loss, o1.loss)
        torch.testing.assert_close(vq.state_dict()["embed"], s1["embed"])


def test_nan_inputs_never_reach_the_codebook():
    vq = make().train()
    z = torch.randn(10, 4)
    z[3, 1] = float("nan")
    z[7] = float("inf")
    vq(z)
    for v in vq.state_dict().values():
        assert torch.isfinite(v.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distances_in_fp32_under_low_precision(dtype):
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=512, dim=64).eval()
    z = torch.randn(256, 64)
    ref = vq(z).codes
    zl = z.to(dtype)
    # the assignment of the low-precision input equals the fp32 assignment of the same (rounded) values
    ref_rounded = vq(zl.float()).codes
    out = vq(zl)
    assert out.quantized.dtype == dtype
    torch.testing.assert_close(out.codes, ref_rounded)
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = vq(z)
        torch.testing.assert_close(auto.codes, ref)


def test_half_cast_keeps_ema_statistics_fp32():
    vq = make().train()
    vq.half()
    for name in ("embed", "ema_count", "ema_sum"):
        assert getattr(vq, name).dtype == torch.float32
    before = vq.ema_count.clone()
    vq(torch.randn(16, 4).half())
    assert not torch.equal(before, vq.ema_count)  # 0.001 * count still moves the statistics
    assert vq.ema_count.dtype == torch.float32


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_state_dict_round_trip_continues_exactly(assignment):
    vq = make(assignment=assignment).train()
    for _ in range(3):
        vq(torch.randn(16, 4))
    with tempfile.TemporaryDirectory() as d:
        torch.save(vq.state_dict(), os.path.join(d, "vq.pt"))
        clone = make(assignment=assignment).train()
        clone.load_state_dict(torch.load(os.path.join(d, "vq.pt")))
    z = torch.randn(16, 4)
    torch.manual_seed(3)
    a = vq(z)
    torch.manual_seed(3)
    b = clone(z)
    torch.testing.assert_close(a.codes, b.codes)
    for k, v in vq.state_dict().items():
        torch.testing.assert_close(v, clone.state_dict()[k])


# ----------------------------------------------------------------------------- beyond the paper


def test_product_quantization_quantizes_each_slice_with_its_own_codebook():
    vq = make(num_codes=5, dim=6, num_blocks=3).eval()
    z = torch.randn(4, 6)
    out = vq(z)
    assert vq.codebook.shape == (3, 5, 2)
    assert out.codes.shape == (4, 3) and out.targets.shape == (4, 3, 5)
    for b in range(3):
        want = np_dist(z[:, 2 * b : 2 * b + 2].numpy(), vq.codebook[b].numpy()).argmin(-1)
        np.testing.assert_array_equal(out.codes[:, b].numpy(), want)
        np.testing.assert_allclose(out.quantized[:, 2 * b : 2 * b + 2].numpy(), vq.codebook[b].numpy()[want], rtol=1e-6)
    torch.testing.assert_close(vq.embed_codes(out.codes), out.quantized)


def test_kmeans_init_from_first_batch():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    pts = (centers[:, None] + 0.1 * torch.randn(3, 20, 2)).reshape(-1, 2)
    vq = VectorQuantizer(num_codes=3, dim=2, kmeans_init=True, decay=0.99).train()
    assert not bool(vq.initialized)
    vq(pts)
    assert bool(vq.initialized)
    got = sorted(map(tuple, vq.codebook.round().tolist()))
    assert got == sorted(map(tuple, centers.tolist()))
    assert "initialized" in vq.state_dict()


def test_kmeans_init_does_not_depend_on_other_draws_from_the_global_rng():
    """Same seed, same first batch -> same k-means codebook, even when something else (a DataLoader worker, a
    dropout mask) drew from the global RNG in between; a different seed gives other k-means++ seeds."""
    pts = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    books = []
    for seed, extra_draws in ((7, 0), (7, 5), (8, 0)):
        torch.manual_seed(seed)
        vq = VectorQuantizer(num_codes=16, dim=4, kmeans_init=True, kmeans_iters=0).train()
        torch.rand(extra_draws)
        vq(pts)
        books.append(vq.codebook.clone())
    torch.testing.assert_close(books[0], books[1], rtol=0, atol=0)
    assert not torch.equal(books[0], books[2])


def test_dead_codes_are_reseeded_with_encoder_outputs():
    vq = make(num_codes=8, decay=0.5, dead_code_threshold=0.1).train()
    z = torch.randn(1, 4) + 10.0
    for _ in range(10):
        vq(z.repeat(4, 1) + 0.01 * torch.randn(4, 4))
    # every code that died was re-seeded next to the data, with its EMA state reset
    assert (vq.codebook - z).norm(dim=-1).max() < 1.0
    assert (vq.ema_count >= 0.1 - 1e-6).all()


def test_posterior_entropy_is_that_of_softmax_of_minus_squared_distances():
    """post_ent = mean_i H(softmax_j(-||z_e_i - e_j||^2 / T)) (numpy reference), at T = 1 and at a hotter T."""
    torch.manual_seed(0)
    z = torch.randn(50, 8)
    for t in (1.0, 10.0):
        torch.manual_seed(0)
        vq = VectorQuantizer(num_codes=64, dim=8, assignment="soft", temperature=t).eval()
        logits = -np_dist(z.numpy(), vq.codebook.numpy()) / t
        q = np.exp(logits - logits.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        want = float((-(q * np.log(np.maximum(q, 1e-30))).sum(-1)).mean())
        assert float(vq(z).posterior_entropy) == pytest.approx(want, abs=1e-4)


def test_default_is_the_paper():
    vq = VectorQuantizer(num_codes=16, dim=4)
    assert (vq.assignment, vq.update, vq.decay, vq.epsilon, vq.beta) == ("hard", "ema", 0.999, 1e-5, 0.25)
    assert bool(vq.initialized) and vq.dead_code_threshold == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        VectorQuantizer(8, 5, num_blocks=2)
    with pytest.raises(ValueError):
        VectorQuantizer(8, 4, assignment="fuzzy")
    with pytest.raises(ValueError):
        make()(torch.randn(3, 5))
    # a temperature <= 0 would assign every latent to its farthest code; 0 would divide by zero
    for t in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number in \[0.0001, inf\)"):
            VectorQuantizer(8, 4, assignment="soft", temperature=t)
    with pytest.raises(ValueError, match=r"dead_code_threshold must be a finite number in \[0.0, inf\)"):
        VectorQuantizer(8, 4, dead_code_threshold=-0.1)


# ----------------------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, assignment, batches, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, dim=4, decay=0.9, assignment=assignment).train()
    for step, batch in enumerate(batches):
        torch.manual_seed(100 * step + rank)
        vq(batch[rank::world])
    torch.save(vq.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_two_ranks_hold_one_codebook_equal_to_union_batch(assignment):
    torch.manual_seed(1)
    batches = [torch.randn(16, 4) for _ in range(4)]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, _free_port(), assignment, batches, d), nprocs=2, join=True)
        s0 = torch.load(os.path.join(d, "rank0.pt"))
        s1 = torch.load(os.path.join(d, "rank1.pt"))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    if assignment == "hard":
        torch.manual_seed(0)
        single = VectorQuantizer(num_codes=8, dim=4, decay=0.9).train()
        for batch in batches:
            single(torch.cat([batch[0::2], batch[1::2]]))
        for k in s0:
            torch.testing.assert_close(s0[k], single.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_the_quantizer_anneals_its_own_temperature_and_saves_it():
    """anneal_updates: T(step) = start ** (1 - min(step / N, 1)), set by set_num_updates (as fairseq calls every
    module's), kept in fp32 under .half() and restored from a state dict; 0 = constant and nothing saved."""
    q = VectorQuantizer(8, 4, assignment="soft", temperature=16.0, anneal_updates=100)
    assert q.temperature == 16.0
    q.set_num_updates(50)
    assert q.temperature == pytest.approx(4.0) and float(q.current_temperature) == pytest.approx(4.0)
    fresh = VectorQuantizer(8, 4, assignment="soft", temperature=16.0, anneal_updates=100)
    fresh.load_state_dict(q.state_dict())
    assert fresh.temperature == pytest.approx(4.0)
    q.set_num_updates(1000)
    assert q.temperature == pytest.approx(1.0)
    assert q.half().current_temperature.dtype == torch.float32
    constant = VectorQuantizer(8, 4, assignment="soft", temperature=16.0)
    constant.set_num_updates(50)
    assert constant.temperature == 16.0 and "current_temperature" not in constant.state_dict()
    with pytest.raises(ValueError, match="anneal_updates must be"):
        VectorQuantizer(8, 4, assignment="soft", anneal_updates=-1)


def test_huge_finite_inputs_are_treated_as_non_finite(caplog):
    """|z_e| ~ 1e30 overflows the squared distances in fp32 (soft EM would sample from NaN probabilities): such
    rows are left out of the EM step like NaN rows, with the warning, and the codebook stays finite."""
    import logging

    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, assignment="soft", num_samples=3).train()
    z = torch.randn(10, 4)
    z[2] *= 1e30
    with caplog.at_level(logging.WARNING):
        out = vq(z)
    assert "1 non-finite encoder outputs (NaN, inf or so large" in caplog.text
    assert not torch.isfinite(out.loss)  # fairseq sees the diverged step
    for v in vq.state_dict().values():
        assert torch.isfinite(v.float()).all()
