"""The whole model learns: a seeded run on a small deterministic copy task reaches a high BLEU after a fixed
number of updates (budget in updates, not time), through fairseq-train and fairseq-generate."""
import os
import re

from fairseq_helpers import generate, make_copy_task, preprocess, train

SMALL = [
    "--arch", "latent_transformer_tiny", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128", "--encoder-layers", "2",
    "--decoder-layers", "2", "--latent-layers", "2", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4", "--num-codes", "64", "--num-compress-steps", "3",
    "--share-all-embeddings",
]


def test_copy_task_reaches_high_bleu(tmp_path):
    raw, data_bin, save = str(tmp_path / "raw"), str(tmp_path / "bin"), str(tmp_path / "ckpt")
    make_copy_task(raw, n_train=2000, n_valid=50, n_test=100, vocab=16, max_len=10, seed=0)
    preprocess(raw, data_bin)
    train(data_bin, save, [
        "--bottleneck", "em", "--num-samples", "10", "--max-update", "450", "--max-tokens", "2000",
        "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100",
        "--adam-betas", "(0.9,0.98)", "--mask-startup-steps", "150", "--dropout", "0",
        "--no-epoch-checkpoints", "--no-save-optimizer-state", "--disable-validation", "--log-interval", "50",
    ], arch_flags=SMALL)
    out = generate(data_bin, os.path.join(save, "checkpoint_last.pt"),
                   ["--batch-size", "64", "--scoring", "sacrebleu", "--max-len-b", "30"])
    bleu = float(re.search(r"BLEU = ([\d.]+)", out).group(1))
    assert bleu >= 80.0, out[-2000:]
