"""The fused inference path (vq_nat/models/fused_inference.py) computes what fairseq's own layer code computes."""
import pytest
import torch

from fairseq_helpers import build_task_and_model, make_sample
from vq_nat.models import fused_inference
from vq_nat.modules.weight_state import derived

CONFIGS = {
    "post-norm": [],
    "pre-norm": ["--encoder-normalize-before", "--decoder-normalize-before"],
    "gelu, 2 layers, 4 heads": ["--activation-fn", "gelu", "--encoder-layers", "2", "--decoder-layers", "2",
                                "--latent-layers", "2", "--encoder-attention-heads", "4",
                                "--decoder-attention-heads", "4"],
    "product quantization": ["--num-blocks", "2"],
}


def _model(tmp_path, flags, seed=0):
    task, model, _ = build_task_and_model(str(tmp_path / "d"), ["--bottleneck", "em", "--num-samples", "3"] + flags,
                                          vocab=20, seed=seed)
    for p in model.parameters():  # larger weights than the init: differences would show, not vanish
        p.data.add_(0.05 * torch.randn_like(p))
    return task, model.eval()


def _sample(task):
    # different lengths: padded source positions and padded latents in the same batch
    return make_sample(task.target_dictionary, [3, 11, 6, 17, 1], seed=3)


@pytest.fixture(params=["small-batch kernels", "large-batch kernels"])
def kernels(request, monkeypatch):
    """The fused path picks its kernels by size: SDPA and plain GEMMs for one sentence, bmm attention and
    oneDNN's prepacked GEMMs (CPU, fp32) for many rows. The test batches are tiny: force the large-batch ones."""
    if request.param == "large-batch kernels":
        monkeypatch.setattr(fused_inference, "_PACKED_MIN", 0)
        monkeypatch.setattr(fused_inference, "_BMM_ATTENTION_MIN", 0)
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_decoding_equals_fairseq_layers(tmp_path, name, kernels):
    task, model = _model(tmp_path, CONFIGS[name])
    sample = _sample(task)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    with torch.no_grad():
        assert fused_inference.usable(model.encoder, model.encoder.layers, cross=False)
        assert fused_inference.usable(model.decoder, model.decoder.layers, cross=True)
        ref = model.encode_source(src, lengths, fused=False)
        out = model.encode_source(src, lengths, fused=True)
        assert set(out) == set(ref)
        real = ~ref["encoder_padding_mask"][0].t().unsqueeze(-1)  # (T, B, 1)
        assert torch.equal(out["encoder_padding_mask"][0], ref["encoder_padding_mask"][0])
        assert torch.equal(out["src_lengths"][0], ref["src_lengths"][0])
        diff = (out["encoder_out"][0] - ref["encoder_out"][0]).abs().masked_fill(~real, 0).max()
        assert diff < 1e-5

        budget = torch.tensor([1, 5, 2, 4, 1])  # latents per sentence: padded latents in the decoder pass
        results = [model.decoder.generate(ref, 40, latent_budget=budget, fused=f) for f in (False, True)]
        (tok0, sc0, pad0, codes0, lsc0), (tok1, sc1, pad1, codes1, lsc1) = results
        assert torch.equal(codes0, codes1) and torch.equal(pad0, pad1)
        assert pad0.any(), "the batch must hold padded latents"
        torch.testing.assert_close(lsc1, lsc0, atol=1e-4, rtol=1e-5)
        assert torch.equal(tok0, tok1)
        torch.testing.assert_close(sc1, sc0, atol=1e-4, rtol=1e-5)

        # the parallel decoder pass on its own: the same features at every real position
        latents = model.decoder.bottleneck.embed_codes(codes0)
        f0 = model.decoder.decode(latents, pad0, ref, features_only=True, fused=False)
        f1 = model.decoder.decode(latents, pad0, ref, features_only=True, fused=True)
        real_t = ~pad0.repeat_interleave(model.decoder.factor, dim=1)
        assert (f1 - f0).abs()[real_t].max() < 1e-4
    if kernels == "large-batch kernels" and fused_inference._MKLDNN_LINEAR is not None:
        assert "_fused_mkldnn" in derived(model.decoder.layers[0].fc1), "the oneDNN path must have run"


def test_latent_predictor_sampling_rows_match(tmp_path):
    """Noisy parallel decoding's sampled rows draw the same codes on both paths (same RNG stream)."""
    task, model = _model(tmp_path, [])
    sample = _sample(task)
    with torch.no_grad():
        enc = model.encode_source(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
        rows = torch.tensor([False, True, True, False, True])
        outs = []
        for fused in (False, True):
            torch.manual_seed(7)
            outs.append(model.decoder.latent_predictor.generate(
                enc, model.decoder.bottleneck.embed_codes, 6, 5, sample=rows, fused=fused))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][2], outs[1][2], atol=1e-4, rtol=1e-5)


def test_packed_weights_follow_parameter_updates(tmp_path, kernels):
    task, model = _model(tmp_path, [])
    sample = _sample(task)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    with torch.no_grad():
        before = model.encode_source(src, lengths)["encoder_out"][0].clone()
        model.encoder.layers[0].self_attn.k_proj.weight.mul_(3.0)  # in place, as an optimizer step
        model.encoder.layers[0].self_attn.v_proj.bias.add_(1.0)
        ref = model.encode_source(src, lengths, fused=False)["encoder_out"][0]
        out = model.encode_source(src, lengths)["encoder_out"][0]
    real = ~src.eq(task.source_dictionary.pad()).t().unsqueeze(-1)
    assert (out - ref).abs().masked_fill(~real, 0).max() < 1e-5
    assert (out - before).abs().max() > 1e-2, "the change must matter"

    # the source keys/values of the decoder and the latent predictor (stacked over their layers)
    with torch.no_grad():
        enc = model.encode_source(src, lengths, fused=False)
        first = model.decoder.generate(enc, 40, fused=True)
        model.decoder.layers[0].encoder_attn.v_proj.weight.mul_(-2.0)
        model.decoder.latent_predictor.layers[0].encoder_attn.k_proj.bias.add_(0.5)
        want = model.decoder.generate(enc, 40, fused=False)
        got = model.decoder.generate(enc, 40, fused=True)
    assert torch.equal(got[3], want[3]) and torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[4], want[4], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(got[1], first[1]), "the change must matter"


def test_used_only_in_eval_without_autograd_and_for_supported_layers(tmp_path):
    task, model = _model(tmp_path, [])
    layers = model.decoder.layers
    assert not fused_inference.usable(model.decoder, layers, cross=True), "autograd is on here"
    with torch.no_grad():
        assert fused_inference.usable(model.decoder, layers, cross=True)
        model.decoder.train()
        assert not fused_inference.usable(model.decoder, layers, cross=True)
    # a layer with NormFormer's LayerNorm after attention (not implemented here) keeps fairseq's own code
    _, other = _model(tmp_path, [])
    layer = other.decoder.layers[0]
    layer.attn_ln = torch.nn.LayerNorm(layer.embed_dim)
    torch.nn.init.normal_(layer.attn_ln.weight)
    with torch.no_grad():
        assert not fused_inference.usable(other.decoder, other.decoder.layers, cross=True)
        sample = _sample(task)
        enc = other.encode_source(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
        a = other.decoder.generate(enc, 40, fused=True)
        b = other.decoder.generate(enc, 40, fused=False)
        layer.attn_ln = None
        c = other.decoder.generate(enc, 40, fused=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(c[1], a[1]), "attn_ln must have mattered"


def test_best_tokens_in_chunks_equal_one_log_softmax(tmp_path, monkeypatch):
    import vq_nat.models.latent_transformer as lt

    task, model = _model(tmp_path, [])
    dec = model.decoder
    features = torch.randn(37, dec.embed_tokens.embedding_dim)
    with torch.no_grad():
        logits = dec.output_layer(features)
        logits[:, [dec.padding_idx, dec.dictionary.bos()]] = float("-inf")
        want_scores, want_tokens = torch.log_softmax(logits, -1).max(-1)
        monkeypatch.setattr(lt, "_CHUNK_LOGITS", 1)  # chunks of 16 rows: 16 + 16 + 5
        scores, tokens = dec.best_tokens(features)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(scores, want_scores)
    assert not (tokens == dec.padding_idx).any() and not (tokens == dec.dictionary.bos()).any()


@pytest.mark.parametrize("fused", [False, True])
def test_latent_generate_matches_a_per_sentence_greedy_loop(tmp_path, fused):
    """Batched generation with early stop equals a plain greedy loop per sentence: codes up to the first END,
    score = sum of the chosen log-probabilities including END (END forced and scored at the budget)."""
    task, model = _model(tmp_path, [])
    lp = model.decoder.latent_predictor
    with torch.no_grad():
        lp.output.bias[lp.end] += 1.0  # some sentences stop early, others run into the budget
        sample = _sample(task)
        enc = model.encode_source(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
        budget = 4
        codes, pad, scores = lp.generate(enc, model.decoder.bottleneck.embed_codes, budget, 5, fused=fused)
        lengths = (~pad).sum(1).tolist()
        assert len(set(lengths)) > 1, "the batch must mix lengths"
        for i in range(5):
            one = model.encoder.reorder_encoder_out(enc, torch.tensor([i]))
            state, prev, want, total = {}, lp.start.expand(1, -1), [], 0.0
            for t in range(budget + 1):
                lprobs = torch.log_softmax(lp.step(prev, t, one, state).float(), -1)[0, 0]
                if t == 0:
                    lprobs[lp.end] = float("-inf")
                k = lp.end if t == budget else int(lprobs.argmax())
                total += float(lprobs[k])
                if k == lp.end:
                    break
                want.append(k)
                prev = model.decoder.bottleneck.embed_codes(torch.tensor([k]))
            assert codes[i, : lengths[i]].tolist() == want
            assert scores[i].item() == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 4), (1, 2, 1, 6, 8), (3, 1, 4, 4, 2)])
def test_attend_equals_sdpa(shape, monkeypatch):
    """bmm attention (many query rows on CPU) against torch's SDPA: plain, causal, and a padding mask."""
    b, h, tq, tk, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for t in (tq, tk, tk))
    pad = torch.zeros(b, tk, dtype=torch.bool)
    pad[0, tk // 2 + 1:] = True
    mask = ~pad[:, None, None, :]
    monkeypatch.setattr(fused_inference, "_BMM_ATTENTION_MIN", 0)
    F = torch.nn.functional
    torch.testing.assert_close(fused_inference.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(fused_inference.attend(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))
    if tq == tk:
        torch.testing.assert_close(fused_inference.attend(q, k, v, causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.skipif(fused_inference._MKLDNN_LINEAR is None, reason="no oneDNN in this torch build")
def test_prepacked_linear_equals_f_linear_and_follows_updates(monkeypatch):
    monkeypatch.setattr(fused_inference, "_PACKED_MIN", 0)
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(3, 4, 8)
    F = torch.nn.functional
    with torch.no_grad():
        torch.testing.assert_close(fused_inference.linear(lin, "w", x, lin.weight, lin.bias),
                                   F.linear(x, lin.weight, lin.bias))
        torch.testing.assert_close(fused_inference.linear(lin, "w", x, lin.weight, lin.bias, relu=True),
                                   F.relu(F.linear(x, lin.weight, lin.bias)))
        lin.weight.mul_(-2.0)  # in place: the cached blocked weight must be rebuilt
        torch.testing.assert_close(fused_inference.linear(lin, "w", x, lin.weight, None), F.linear(x, lin.weight))
        # another dtype, or below the size threshold: plain F.linear
        xd, wd = x.double(), lin.weight.double()
        out = fused_inference.linear(lin, "wd", xd, wd, None)
        assert out.dtype == torch.float64 and "wd" not in derived(lin)["_fused_mkldnn"]
        torch.testing.assert_close(out, F.linear(xd, wd))
        monkeypatch.setattr(fused_inference, "_PACKED_MIN", 10**9)
        lin.weight.add_(1.0)
        torch.testing.assert_close(fused_inference.linear(lin, "w", x, lin.weight, None), F.linear(x, lin.weight))


@pytest.mark.parametrize("n", [6040, 120, 37])
def test_row_max_equals_torch_max_first_index_on_ties(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(fused_inference._ROW_MAX_MIN_ROWS + 8, n, generator=g)  # enough rows for the two levels
    x[0, 3] = x[0, n - 1] = 50.0  # tie across blocks: the first index wins
    x[1, 0] = x[1, 1] = 50.0  # tie inside a block
    x[2] = -7.0  # a whole row tied
    x[3, n // 2] = float("-inf")
    values, indices = fused_inference.row_max(x)
    want_values, want_indices = torch.max(x, dim=-1)
    assert torch.equal(values, want_values) and torch.equal(indices, want_indices)
    assert indices[:3].tolist() == [3, 0, 0]
    for few in (1, 9):  # below the row threshold: torch.max itself
        part = fused_inference.row_max(x[:few])
        assert torch.equal(part[0], want_values[:few]) and torch.equal(part[1], want_indices[:few])


def test_resolved_layers_follow_module_and_parameter_reassignment(tmp_path):
    """Resolved layers are cached between batches: replacing a submodule or a Parameter object must show."""
    task, model = _model(tmp_path, [])
    sample = _sample(task)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    real = ~src.eq(task.source_dictionary.pad()).t().unsqueeze(-1)

    def check():
        ref = model.encode_source(src, lengths, fused=False)["encoder_out"][0]
        out = model.encode_source(src, lengths)["encoder_out"][0]
        assert (out - ref).abs().masked_fill(~real, 0).max() < 1e-5
        return out

    with torch.no_grad():
        first = check()
        layer = model.encoder.layers[-1]
        fc1 = torch.nn.Linear(layer.fc1.in_features, layer.fc1.out_features)
        layer.fc1 = fc1  # a new module
        second = check()
        layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.randn_like(layer.self_attn.q_proj.bias))
        third = check()
    assert (second - first).abs().max() > 1e-3 and (third - second).abs().max() > 1e-3


def test_a_deep_copy_after_fused_decoding_uses_its_own_weights(tmp_path, kernels):
    """``copy.deepcopy`` (fairseq's EMA model, user code) or pickling of a model that has decoded: the caches of
    derived weights are not copied (oneDNN's packed weights cannot be), and the copy decodes with its own
    parameters."""
    import copy
    import pickle

    task, model = _model(tmp_path, [])
    sample = _sample(task)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    real = ~src.eq(task.source_dictionary.pad()).t().unsqueeze(-1)
    with torch.no_grad():
        model.encode_source(src, lengths)
        model.decoder.generate(model.encode_source(src, lengths), 40)  # resolves and caches every layer
        twin = copy.deepcopy(model)
        assert derived(twin.decoder.layers[0]) == {} and derived(model.decoder.layers[0]) != {}
        pickled = pickle.loads(pickle.dumps(model))  # e.g. torch.save(model): the caches are not saved
        assert derived(pickled.decoder.layers[0]) == {}
        for p in twin.parameters():
            p.mul_(1.5)  # in place: the copy's weights only
        for m in (model, twin):
            ref = m.encode_source(src, lengths, fused=False)
            out = m.encode_source(src, lengths)
            assert (out["encoder_out"][0] - ref["encoder_out"][0]).abs().masked_fill(~real, 0).max() < 1e-4
            want, got = m.decoder.generate(ref, 40, fused=False), m.decoder.generate(ref, 40)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


def test_cached_weights_follow_fairseq_optimizer_steps(tmp_path, kernels):
    """fairseq's optimizers update parameters through ``param.data``, which bumps no version counter. Validation
    and decoding after training steps in the same process (fairseq-train's validation, ``--eval-bleu``) must
    still use the current weights in every cache: packed q/k/v, prepacked GEMM weights, tap-major convolutions,
    the lone-latent memo."""
    from fairseq.optim.adam import FairseqAdam

    # no gold-embedding warm-up: the decompressor gets gradients from the first update
    FLAGS = ["--bottleneck", "em", "--dropout", "0", "--mask-startup-steps", "0"]
    task, model, criterion = build_task_and_model(str(tmp_path / "d"), FLAGS, vocab=20)
    sample = _sample(task)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    dec = model.decoder
    code = torch.tensor([[2]])
    one = torch.zeros(1, 1, dtype=torch.bool)

    def decode_everything():
        with torch.no_grad():
            lone = dec.decompress(lat, one, code)[0]  # first: generate() may re-memoise code 2
            enc = model.encode_source(src, lengths)
            out = dec.generate(enc, 40, fused=True)
            short = dec.generate(model.encode_source(src[:1], lengths[:1]), 40, fused=True)  # small convolutions
        return enc["encoder_out"][0], out, short, lone

    model.eval()
    with torch.no_grad():
        lat = dec.bottleneck.embed_codes(code).clone()  # fixed: the EMA codebook moves too, the memo would miss
    dp0 = [p.detach().clone() for p in dec.decompressor.parameters()]
    decode_everything()  # fills the caches
    task.valid_step(sample, model, criterion)  # validation runs the decoder layers through the fused path too
    opt = FairseqAdam(type("C", (), {"lr": [0.05], "adam_betas": "(0.9, 0.999)", "adam_eps": 1e-8,
                                     "weight_decay": 0.0, "use_old_adam": False, "fp16_adam_stats": False,
                                     "tpu": False})(), list(model.parameters()))
    weight = dec.layers[0].self_attn.q_proj.weight
    before, version = weight.detach().clone(), weight._version
    for step in range(2):
        task.train_step(sample, model, criterion, opt, update_num=step)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(weight, before) and weight._version == version, "updated through .data"
    assert any(not torch.equal(a, b) for a, b in zip(dp0, dec.decompressor.parameters())), "the memo must be stale"
    model.eval()
    enc, out, short, lone = decode_everything()
    with torch.no_grad():
        ref = model.encode_source(src, lengths, fused=False)
        want = dec.generate(ref, 40, fused=False)
        want_short = dec.generate(model.encode_source(src[:1], lengths[:1], fused=False), 40, fused=False)
        want_lone = dec.decompressor(lat, None)[0]
    real = ~src.eq(task.source_dictionary.pad()).t().unsqueeze(-1)
    assert (enc - ref["encoder_out"][0]).abs().masked_fill(~real, 0).max() < 1e-5
    for got, exp in ((out, want), (short, want_short)):
        assert torch.equal(got[3], exp[3]) and torch.equal(got[0], exp[0])
        torch.testing.assert_close(got[1], exp[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lone, want_lone, atol=1e-5, rtol=1e-5)
    # the validation loss equals that of a freshly built model holding the same weights (no caches)
    _, fresh, _ = build_task_and_model(str(tmp_path / "d"), FLAGS, vocab=20)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    fresh.set_num_updates(model.decoder.num_updates)
    loss = task.valid_step(sample, model, criterion)[0]
    torch.testing.assert_close(loss, task.valid_step(sample, fresh, criterion)[0], atol=1e-4, rtol=1e-5)
