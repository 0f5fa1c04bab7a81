"""Decoding: chunked token selection, batched latent generation, and decoding after fairseq optimizer steps."""
import pytest
import torch

from fairseq_helpers import build_task_and_model, make_sample


def _model(tmp_path, flags, seed=0):
    task, model, _ = build_task_and_model(str(tmp_path / "d"), ["--bottleneck", "em", "--num-samples", "3"] + flags,
                                          vocab=20, seed=seed)
    for p in model.parameters():  # larger weights than the init: differences would show, not vanish
        p.data.add_(0.05 * torch.randn_like(p))
    return task, model.eval()


def _sample(task):
    # different lengths: padded source positions and padded latents in the same batch
    return make_sample(task.target_dictionary, [3, 11, 6, 17, 1], seed=3)


def test_best_tokens_in_chunks_equal_one_log_softmax(tmp_path, monkeypatch):
    import vq_nat.models.parallel_decoder as lt

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


def test_latent_generate_matches_a_per_sentence_greedy_loop(tmp_path):
    """Batched generation with early stop equals a plain greedy loop per sentence: codes up to the first END,
    score = sum of the chosen log-probabilities including END (END forced and scored at the budget)."""
    task, model = _model(tmp_path, [])
    lp = model.decoder.latent_predictor
    with torch.no_grad():
        lp.output.bias[lp.end] += 1.0  # some sentences stop early, others run into the budget
        sample = _sample(task)
        enc = model.encode_source(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"])
        budget = 4
        codes, pad, scores = lp.generate(enc, model.decoder.bottleneck.embed_codes, budget, 5)
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


def test_decoding_and_validation_after_fairseq_optimizer_steps_use_the_current_weights(tmp_path):
    """fairseq's optimizers update parameters through ``param.data`` (no version counter bump). Validation and
    decoding after training steps in the same process (fairseq-train's validation, ``--eval-bleu``) equal those of a
    freshly built model holding the same weights."""
    from fairseq.optim.adam import FairseqAdam

    # no gold-embedding warm-up: the decompressor gets gradients from the first update
    FLAGS = ["--bottleneck", "em", "--dropout", "0", "--mask-startup-steps", "0"]
    task, model, criterion = build_task_and_model(str(tmp_path / "d"), FLAGS, vocab=20)
    sample = _sample(task)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]

    def decode(m):
        m.eval()
        with torch.no_grad():
            return m.decoder.generate(m.encode_source(src, lengths), 40), \
                m.decoder.generate(m.encode_source(src[:1], lengths[:1]), 40)

    first = decode(model)
    task.valid_step(sample, model, criterion)
    opt = FairseqAdam(type("C", (), {"lr": [0.05], "adam_betas": "(0.9, 0.999)", "adam_eps": 1e-8,
                                     "weight_decay": 0.0, "use_old_adam": False, "fp16_adam_stats": False,
                                     "tpu": False})(), list(model.parameters()))
    weight = model.decoder.layers[0].self_attn.q_proj.weight
    before = weight.detach().clone()
    for step in range(2):
        task.train_step(sample, model, criterion, opt, update_num=step)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(weight, before), "the optimizer must have changed the weights"
    _, fresh, _ = build_task_and_model(str(tmp_path / "d"), FLAGS, vocab=20)
    fresh.load_state_dict(model.state_dict())
    fresh.set_num_updates(model.decoder.num_updates)
    got, want = decode(model), decode(fresh)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, got)), "the scores must have moved"
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0]) and torch.equal(g[3], w[3])
        torch.testing.assert_close(g[1], w[1], atol=1e-5, rtol=1e-5)
    loss = task.valid_step(sample, model, criterion)[0]
    torch.testing.assert_close(loss, task.valid_step(sample, fresh, criterion)[0], atol=1e-5, rtol=1e-5)
