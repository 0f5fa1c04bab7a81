"""Every option and tensor that enters ``vq_nat.modules`` is checked where it enters: a wrong dtype, shape, device,
mask or option range is a TypeError / ValueError that names it; an empty batch gives empty outputs."""
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from vq_nat.modules import GumbelSoftmaxQuantizer, SemanticHashingQuantizer, VectorQuantizer
from vq_nat.modules.compression import Compressor, Decompressor, ResidualConvBlock
from vq_nat.modules.denoising import word_dropout, word_shuffle

DIM = 4


def bottlenecks():
    """One of every quantizer class (and configuration with its own output layout), in training mode."""
    torch.manual_seed(0)
    return {
        "vq": VectorQuantizer(8, DIM),
        "em": VectorQuantizer(8, DIM, assignment="soft", num_samples=3),
        "vq-grad": VectorQuantizer(8, DIM, update="grad"),
        "pq": VectorQuantizer(8, DIM, num_blocks=2),
        "pq-em": VectorQuantizer(8, DIM, assignment="soft", num_samples=3, num_blocks=2),
        "gumbel": GumbelSoftmaxQuantizer(8, DIM),
        "semhash": SemanticHashingQuantizer(3, DIM),
    }


ALL = list(bottlenecks())


@pytest.mark.parametrize("name", ALL)
def test_integer_z_e_is_a_type_error_not_truncated_codes(name):
    q = bottlenecks()[name].train()
    with pytest.raises(TypeError, match=r"z_e must be a floating-point tensor, got torch.int64.*z_e.float\(\)"):
        q(torch.randint(0, 3, (2, 5, DIM)))
    with pytest.raises(ValueError, match=r"z_e has last dimension 3 .*expected 4"):
        q(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="z_e must be a torch.Tensor"):
        q([[0.0] * DIM])
    if hasattr(q, "nearest_codes"):
        with pytest.raises(TypeError, match="floating-point"):
            q.nearest_codes(torch.ones(2, DIM, dtype=torch.long))


@pytest.mark.parametrize("name", ALL)
def test_device_mismatch_is_named(name):
    q = bottlenecks()[name]
    with pytest.raises(ValueError, match=r"z_e is on meta but the module is on cpu"):
        q(torch.randn(2, 5, DIM, device="meta"))
    with pytest.raises(ValueError, match=r"padding_mask is on meta but the input is on cpu"):
        q(torch.randn(2, 5, DIM), padding_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_empty_batch_gives_empty_outputs(name, shape):
    q = bottlenecks()[name].train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(torch.randn(*shape, DIM), padding_mask=torch.zeros(shape, dtype=torch.bool))
    assert out.quantized.shape == (*shape, DIM)
    assert out.codes.shape[: len(shape)] == shape and out.codes.numel() == 0
    assert out.targets.shape[: len(shape)] == shape and out.targets.numel() == 0
    assert float(out.loss.detach()) == 0.0 and torch.isfinite(out.perplexity) and float(out.codes_used) == 0.0
    for k, v in q.state_dict().items():
        if k != "num_updates":
            assert torch.equal(v, before[k]), k  # nothing observed, nothing learned
    q.eval()
    assert q(torch.randn(*shape, DIM)).quantized.shape == (*shape, DIM)
    if hasattr(q, "nearest_codes"):
        assert q.nearest_codes(torch.randn(*shape, DIM)).numel() == 0
    assert q.embed_codes(out.codes if out.codes.dim() == len(shape) + (q.num_blocks > 1 if hasattr(q, "num_blocks")
                                                                         else 0) else out.codes[..., 0]).numel() == 0


@pytest.mark.parametrize("name", ALL)
def test_padding_masks_of_any_dtype_mean_the_same(name):
    z = torch.randn(2, 5, DIM)
    mask = torch.tensor([[False, False, False, True, True], [False, True, True, True, True]])
    results = []
    for m in (mask, mask.to(torch.uint8), mask.long(), mask.int(), mask.float(), mask.half()):
        q = bottlenecks()[name].eval()
        torch.manual_seed(1)
        out = q(z, padding_mask=m)
        results.append((out.codes, out.loss, out.perplexity, out.codes_used))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)
    # 0/1 masks are not the same as ~mask: padding really is excluded (here: from the code histogram)
    q = bottlenecks()[name].eval()
    torch.manual_seed(1)
    none = q(z)
    assert not torch.equal(none.codes_used, results[0][3]) or not torch.equal(none.perplexity, results[0][2])
    for bad, what in ((torch.full((2, 5), 0.5), "found 0.5"), (mask.long() * 2, "found 2"),
                      (torch.full((2, 5), -1, dtype=torch.int8), "found -1")):
        with pytest.raises(ValueError, match=rf"padding_mask of dtype {bad.dtype} must hold only 0 and 1, {what}"):
            q(z, padding_mask=bad)
    with pytest.raises(ValueError, match=r"padding_mask has shape \(5, 2\), expected \(2, 5\)"):
        q(z, padding_mask=mask.t())
    with pytest.raises(TypeError, match="padding_mask must be a torch.Tensor or None"):
        q(z, padding_mask=[[0] * 5] * 2)


@pytest.mark.parametrize("name", ALL)
def test_embed_codes_checks_dtype_and_range(name):
    q = bottlenecks()[name]
    blocks = getattr(q, "num_blocks", 1)
    good = torch.zeros(3, blocks, dtype=torch.long) if blocks > 1 else torch.zeros(3, dtype=torch.long)
    assert q.embed_codes(good).shape == (3, DIM)
    with pytest.raises(TypeError, match=r"codes must be an integer tensor of code indices, got torch.float32"):
        q.embed_codes(good.float())
    with pytest.raises(ValueError, match=rf"codes must be in \[0, {q.num_codes}\), got values in \[0, {q.num_codes}\]"):
        q.embed_codes(good + (torch.arange(3).view(3, *[1] * (good.dim() - 1)) == 2) * q.num_codes)
    with pytest.raises(ValueError, match=r"got values in \[-1, 0\]"):
        q.embed_codes(good - (torch.arange(3).view(3, *[1] * (good.dim() - 1)) == 0).long())
    if blocks > 1:
        with pytest.raises(ValueError, match=r"codes must have shape \(\.\.\., 2\)"):
            q.embed_codes(torch.zeros(3, dtype=torch.long))


def test_kmeans_init_waits_for_a_batch_with_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, kmeans_init=True).train()
    random_codes = vq.embed.clone()
    vq(torch.randn(3, 6, 2), padding_mask=torch.ones(3, 6, dtype=torch.bool))  # all padding
    vq(torch.randn(0, 6, 2))  # empty
    assert not bool(vq.initialized) and torch.equal(vq.embed, random_codes)
    data = torch.tensor([[5.0, 5.0], [5.1, 5.0], [-5.0, 5.0], [-5.0, 5.1], [5.0, -5.0], [-5.0, -5.0]])
    vq(data.view(1, 6, 2), padding_mask=torch.tensor([[0, 0, 0, 0, 0, 0]], dtype=torch.uint8))
    assert bool(vq.initialized)
    # every code sits near a cluster of the data now (k-means ran on it)
    assert torch.cdist(vq.codebook, data).min(1).values.max() < 0.2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kmeans_rank(rank, world, port, data, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different random codes on each rank
    vq = VectorQuantizer(num_codes=3, dim=2, kmeans_init=True).train()
    vq(torch.randn(4, 2), padding_mask=torch.ones(4, dtype=torch.bool))  # all padding on every rank
    assert not bool(vq.initialized)
    # rank 0 has only padding, rank 1 has the data: rank 1's k-means codebook is everyone's
    vq(data, padding_mask=torch.full((len(data),), rank == 0))
    torch.save(vq.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_kmeans_init_across_ranks_takes_the_codebook_of_a_rank_with_data():
    data = torch.tensor([[4.0, 4.0], [4.1, 4.0], [-4.0, 4.0], [-4.0, 4.1], [0.0, -4.0], [0.1, -4.0]])
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_kmeans_rank, args=(2, _free_port(), data, d), nprocs=2, join=True)
        s0, s1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert bool(s0["initialized"])
    assert torch.cdist(s0["embed"][0], data).min(1).values.max() < 0.2


CONSTRUCTOR_CASES = [
    (lambda: VectorQuantizer(0, 4), ValueError, r"VectorQuantizer: num_codes must be >= 1, got 0"),
    (lambda: VectorQuantizer(8, 4, num_blocks=0), ValueError, r"num_blocks must be in \[1, 4\], got 0"),
    (lambda: VectorQuantizer(8, 4, num_blocks=3), ValueError, r"dim=4 is not divisible by num_blocks=3"),
    (lambda: VectorQuantizer(8, 4, num_samples=0), ValueError, r"num_samples must be >= 1, got 0"),
    (lambda: VectorQuantizer(8.5, 4), TypeError, r"num_codes must be an integer, got 8.5"),
    (lambda: VectorQuantizer(8, 4, decay=1.0), ValueError, r"decay must be a finite number in \[0.0, 1.0\), got 1.0"),
    (lambda: VectorQuantizer(8, 4, epsilon=-1e-5), ValueError, r"epsilon must be a finite number in \[0.0, inf\)"),
    (lambda: VectorQuantizer(8, 4, beta=float("nan")), ValueError, r"beta must be a finite number in \[0.0, inf\)"),
    (lambda: VectorQuantizer(8, 4, kmeans_iters=-1), ValueError, r"kmeans_iters must be >= 0, got -1"),
    (lambda: VectorQuantizer(8, 4, update="sgd"), ValueError, r"update must be one of 'ema', 'grad', got 'sgd'"),
    (lambda: GumbelSoftmaxQuantizer(1, 4), ValueError, r"GumbelSoftmaxQuantizer: num_codes must be >= 2, got 1"),
    (lambda: GumbelSoftmaxQuantizer(8, 4, temperature_min=0.0), ValueError,
     r"temperature_min must be a finite number in \(0.0, 1.19\], got 0.0"),
    (lambda: GumbelSoftmaxQuantizer(8, 4, random_temperature_prob=1.5), ValueError,
     r"random_temperature_prob must be a finite number in \[0.0, 1.0\], got 1.5"),
    (lambda: GumbelSoftmaxQuantizer(8, 4, anneal_steps=-1), ValueError, r"anneal_steps must be >= 0, got -1"),
    (lambda: SemanticHashingQuantizer(31, 4), ValueError, r"num_bits \(targets are 2\*\*num_bits wide\) must be in "
                                                          r"\[1, 30\], got 31"),
    (lambda: SemanticHashingQuantizer(4, 4, discrete_mix=2.0), ValueError,
     r"discrete_mix must be a finite number in \[0.0, 1.0\], got 2.0"),
    (lambda: SemanticHashingQuantizer(4, 4, noise_std=-0.5), ValueError, r"noise_std must be a finite number"),
    (lambda: Compressor(8, -1), ValueError, r"Compressor: num_compress_steps must be >= 0, got -1"),
    (lambda: Compressor(8, 1, kernel_size=4), ValueError, r"kernel_size must be odd"),
    (lambda: Decompressor(8, 1, dropout=1.0), ValueError, r"dropout must be a finite number in \[0.0, 1.0\), got 1.0"),
    (lambda: ResidualConvBlock(8, layers=0), ValueError, r"ResidualConvBlock: layers must be >= 1, got 0"),
]


@pytest.mark.parametrize("make, error, message", CONSTRUCTOR_CASES)
def test_constructor_options_out_of_range_name_the_argument_and_range(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_dead_code_threshold_without_ema_is_a_warning(caplog):
    VectorQuantizer(8, 4, update="grad", dead_code_threshold=0.1)
    assert "dead_code_threshold=0.1 has no effect with update='grad'" in caplog.text


def test_compression_checks_its_inputs_and_takes_any_mask_dtype():
    torch.manual_seed(0)
    comp, decomp = Compressor(8, 1, dropout=0.0).eval(), Decompressor(8, 1, dropout=0.0).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    ref, ref_mask = comp(x, mask)
    for m in (mask.to(torch.uint8), mask.float(), mask.long()):
        got, got_mask = comp(x, m)
        assert torch.equal(got, ref) and torch.equal(got_mask, ref_mask)
        assert torch.equal(decomp(got, got_mask)[0], decomp(ref, ref_mask)[0])
    with pytest.raises(TypeError, match="Compressor: x must be a floating-point tensor"):
        comp(x.long())
    with pytest.raises(ValueError, match=r"x must be batch-first \(B, T, 8\), got shape \(6, 8\)"):
        comp(x[0])
    with pytest.raises(ValueError, match=r"padding_mask has shape \(2, 5\), expected \(2, 6\)"):
        comp(x, mask[:, :5])
    with pytest.raises(ValueError, match="padding_mask of dtype torch.float32 must hold only 0 and 1"):
        comp(x, mask.float() * 0.5 + 0.25)
    with pytest.raises(ValueError, match="length 5 is not a multiple of 2\\^nc = 2; pad the input"):
        comp(x[:, :5])
    for shape in ((0, 6, 8), (2, 0, 8)):
        y, y_mask = comp(torch.randn(shape))
        assert y.shape == (shape[0], shape[1] // 2, 8)
        assert decomp(y, y_mask)[0].shape == shape


def test_denoising_checks_its_inputs():
    tokens = torch.tensor([[4, 5, 6, 2, 1], [7, 8, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    dropped = word_dropout(tokens, mask, 1.0, unk=3, generator=gen)
    assert dropped.tolist() == [[3, 3, 3, 2, 1], [3, 3, 2, 1, 1]]  # only the masked positions (not ~mask: 254)
    assert torch.equal(word_shuffle(tokens, mask.float(), 1.0, generator=gen)[:, 3:], tokens[:, 3:])
    with pytest.raises(ValueError, match=r"word_dropout: p must be a finite number in \[0.0, 1.0\], got 1.5"):
        word_dropout(tokens, mask, 1.5, unk=3)
    with pytest.raises(TypeError, match="word_shuffle: tokens must be an integer tensor"):
        word_shuffle(tokens.float(), mask, 0.5)
    with pytest.raises(ValueError, match=r"word_shuffle: k must be >= 0, got -1"):
        word_shuffle(tokens, mask, 0.5, k=-1)
    with pytest.raises(ValueError, match=r"mask of dtype torch.int64 must hold only 0 and 1, found 4.*may be noised"):
        word_dropout(tokens, tokens, 0.5, unk=3)


def test_distinct_samples_needs_integer_codes():
    from vq_nat.modules import distinct_samples

    assert distinct_samples(torch.tensor([[1, 1, 2]])).tolist() == [2.0]
    with pytest.raises(TypeError, match=r"codes must be an integer tensor \(\.\.\., m\).*got torch.float32"):
        distinct_samples(torch.tensor([[1.0, 1.0, 2.0]]))


def test_gumbel_annealing_goes_down_and_semhash_bits_need_valid_codes():
    from vq_nat.modules import GumbelSoftmaxQuantizer, SemanticHashingQuantizer

    with pytest.raises(ValueError, match=r"temperature_min must be a finite number in \(0.0, 0.1\]"):
        GumbelSoftmaxQuantizer(8, 4, temperature_start=0.1, temperature_min=5.0)
    q = GumbelSoftmaxQuantizer(8, 4)
    with pytest.raises(ValueError, match="num_updates must be >= 0"):
        q.set_num_updates(-100000)
    s = SemanticHashingQuantizer(3, 4)
    with pytest.raises(ValueError):
        s.codes_to_bits(torch.tensor([9, -1]))
    assert s.codes_to_bits(torch.tensor([5])).tolist() == [[1.0, 0.0, 1.0]]
