"""Noisy parallel decoding (--npd-candidates k --npd-teacher PATH): candidates, teacher rescoring, CLI."""
import os

import pytest
import torch
from fairseq_helpers import (USER_DIR, build_task_and_model, generate, hypotheses, make_copy_task,
                             make_sample, preprocess, train)

from vq_nat.latent_generator import LatentGenerator

TEACHER = [
    "--arch", "transformer", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "1",
    "--decoder-layers", "1", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def build_teacher(task, seed=0):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [task.cfg.data, "--user-dir", USER_DIR, "--task",
                                                "latent_translation", "--source-lang", "src", "--target-lang",
                                                "tgt", "--cpu"] + TEACHER)
    torch.manual_seed(seed)
    return task.build_model(convert_namespace_to_omegaconf(args).model).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    task, model, _ = build_task_and_model(str(tmp_path_factory.mktemp("dict")))
    return task, model.eval(), build_teacher(task)


def teacher_mean_logprob(teacher, src, tokens):
    """Independent reference: fairseq's SequenceScorer (teacher forcing) on one sentence."""
    from fairseq.sequence_scorer import SequenceScorer

    d = teacher.decoder.dictionary
    prev = torch.cat([tokens.new_tensor([d.eos()]), tokens[:-1]]).unsqueeze(0)
    sample = {"net_input": {"src_tokens": src.unsqueeze(0), "src_lengths": torch.tensor([src.numel()]),
                            "prev_output_tokens": prev}, "target": tokens.unsqueeze(0)}
    hypo = SequenceScorer(d).generate([teacher], sample)[0][0]
    return float(hypo["positional_scores"].mean())


def test_npd_returns_the_candidate_the_teacher_scores_best(built):
    task, model, teacher = built
    d = task.target_dictionary
    sample = make_sample(d, [3, 9, 5, 12], seed=1)
    k = 4
    greedy = LatentGenerator(d, max_len_b=40).generate([model], sample)
    gen = LatentGenerator(d, max_len_b=40, npd_candidates=k, npd_teacher=teacher)
    seen = {}
    rescore, decoder_generate = gen.rescore, model.decoder.generate

    def spy(src_tokens, src_lengths, targets, kk):
        seen["targets"], seen["scores"] = targets, rescore(src_tokens, src_lengths, targets, kk)
        return seen["scores"]

    def latents_spy(*args, **kwargs):
        result = decoder_generate(*args, **kwargs)
        seen["latent_pad"], seen["codes"] = result[2], result[3]
        return result

    gen.rescore = spy
    model.decoder.generate = latents_spy
    try:
        torch.manual_seed(3)
        out = gen.generate([model], sample)
    finally:
        del model.decoder.generate
    targets, scores = seen["targets"], seen["scores"]
    candidates = [row[row.ne(d.pad())] for row in targets]
    assert len(candidates) == 4 * k and len(out) == 4
    src = sample["net_input"]["src_tokens"]
    for i in range(4):
        # candidate 0 of every sentence is the greedy decoding
        assert torch.equal(candidates[i * k], greedy[i][0]["tokens"])
        # the teacher's scores agree with fairseq's SequenceScorer
        s = src[i][src[i].ne(d.pad())]
        for j in range(k):
            assert candidates[i * k + j][-1] == d.eos() and (candidates[i * k + j][:-1] != d.eos()).all()
            ref = teacher_mean_logprob(teacher, s, candidates[i * k + j])
            assert abs(float(scores[i * k + j]) - ref) < 1e-4
        best = int(scores[i * k : (i + 1) * k].argmax())
        assert torch.equal(out[i][0]["tokens"], candidates[i * k + best])
        assert out[i][0]["npd_candidate"] == best
        assert float(out[i][0]["teacher_score"]) == float(scores[i * k + best])
    # the sampled candidates are not all copies of the greedy one (the latents are drawn)
    codes = seen["codes"].masked_fill(seen["latent_pad"], -1)
    assert any(not torch.equal(codes[i * k], codes[i * k + j]) for i in range(4) for j in range(1, k))


def test_npd_scores_each_distinct_candidate_once(built):
    """Candidates that decode to the same tokens for the same sentence go through the teacher once and share its
    score; the same tokens for another sentence are scored against that sentence."""
    task, model, teacher = built
    d = task.target_dictionary
    sample = make_sample(d, [5, 7], seed=4)
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    gen = LatentGenerator(d, npd_candidates=3, npd_teacher=teacher)
    pad, eos = d.pad(), d.eos()
    a, b = [7, 8, 9, eos], [10, 11, eos]
    rows = [a, b, a, a, a, a]  # sentence 0: a, b, a; sentence 1: a, a, a
    targets = torch.full((6, 4), pad)
    for i, r in enumerate(rows):
        targets[i, : len(r)] = torch.tensor(r)
    calls = []
    teacher_scores = gen.teacher_scores

    def spy(src_tokens, src_lengths, sentence, target):
        calls.append((sentence.tolist(), target.tolist()))
        return teacher_scores(src_tokens, src_lengths, sentence, target)

    gen.teacher_scores = spy
    with torch.no_grad():
        scores = gen.rescore(src, lengths, targets, 3)
    assert len(calls) == 1 and sorted(calls[0][0]) == [0, 0, 1]
    for i, r in enumerate(rows):
        s = src[i // 3][src[i // 3].ne(pad)]
        assert abs(float(scores[i]) - teacher_mean_logprob(teacher, s, torch.tensor(r))) < 1e-4
    assert float(scores[0]) == float(scores[2]) and float(scores[3]) == float(scores[4]) == float(scores[5])
    assert float(scores[0]) != float(scores[3])  # same tokens, other source


def test_npd_with_one_candidate_is_greedy_and_bad_settings_are_clear_errors(built):
    task, model, teacher = built
    d = task.target_dictionary
    sample = make_sample(d, [4, 7], seed=2)
    plain = LatentGenerator(d, max_len_b=40).generate([model], sample)
    one = LatentGenerator(d, max_len_b=40, npd_candidates=1, npd_teacher=teacher).generate([model], sample)
    assert [h[0]["tokens"].tolist() for h in plain] == [h[0]["tokens"].tolist() for h in one]
    with pytest.raises(ValueError, match=">= 1"):
        LatentGenerator(d, npd_candidates=0, npd_teacher=teacher)


def test_npd_through_fairseq_generate(tmp_path):
    raw, data_bin = str(tmp_path / "raw"), str(tmp_path / "bin")
    make_copy_task(raw, n_train=120, n_valid=8, n_test=11)
    preprocess(raw, data_bin)
    lt, ar = str(tmp_path / "lt"), str(tmp_path / "ar")
    train(data_bin, lt, ["--bottleneck", "em", "--num-samples", "3"])
    train(data_bin, ar, ["--task", "translation", "--criterion", "cross_entropy"], arch_flags=TEACHER)
    teacher = os.path.join(ar, "checkpoint_last.pt")
    out = generate(data_bin, os.path.join(lt, "checkpoint_last.pt"),
                   ["--npd-candidates", "4", "--npd-teacher", teacher, "--max-len-b", "30"])
    assert sorted(hypotheses(out)) == list(range(11))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        generate(data_bin, os.path.join(lt, "checkpoint_last.pt"),
                 ["--npd-candidates", "4", "--npd-teacher", str(tmp_path / "missing.pt")])
    # without a teacher the LT rescores its own candidates: greedy is candidate 0, so no sentence scores worse
    greedy = generate(data_bin, os.path.join(lt, "checkpoint_last.pt"), ["--max-len-b", "30"])
    own = generate(data_bin, os.path.join(lt, "checkpoint_last.pt"), ["--npd-candidates", "4", "--max-len-b", "30"])
    assert sorted(hypotheses(own)) == list(range(11))

    def own_scores(out):  # the selection score: mean log-probability of the emitted tokens (an appended EOS,
        rows = {}         # printed with score 0, does not count)
        for line in out.splitlines():
            if line.startswith("P-"):
                i, values = line.split("\t", 1)
                p = [float(v) for v in values.split()]
                rows[int(i[2:])] = sum(p) / (len(p) - 1 if p[-1] == 0 and len(p) > 1 else len(p))
        return rows

    g, o = own_scores(greedy), own_scores(own)
    better_or_same = [o[i] >= g[i] - 1e-3 for i in g]
    assert all(better_or_same) and len(g) == 11, (g, o)

    # a teacher trained on another vocabulary of the same size is named, not used
    raw2, bin2 = str(tmp_path / "raw2"), str(tmp_path / "bin2")
    make_copy_task(raw2, n_train=120, n_valid=8, n_test=11)
    for name in os.listdir(raw2):
        path = os.path.join(raw2, name)
        text = open(path).read().replace("w", "v")
        open(path, "w").write(text)
    preprocess(raw2, bin2)
    ar2 = str(tmp_path / "ar2")
    train(bin2, ar2, ["--task", "translation", "--criterion", "cross_entropy"], arch_flags=TEACHER)
    with pytest.raises(ValueError, match="another target vocabulary"):
        generate(data_bin, os.path.join(lt, "checkpoint_last.pt"),
                 ["--npd-candidates", "4", "--npd-teacher", os.path.join(ar2, "checkpoint_last.pt")])
