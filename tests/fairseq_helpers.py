"""Drive fairseq's own command-line entry points in-process, as fairseq's tests/test_binaries.py does."""
import contextlib
import io
import os
import random
import sys
from typing import List, Optional

USER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vq_nat")


def write_parallel(dirname: str, split: str, pairs) -> None:
    with open(os.path.join(dirname, f"{split}.src"), "w") as fs, open(os.path.join(dirname, f"{split}.tgt"), "w") as ft:
        for src, tgt in pairs:
            fs.write(src + "\n")
            ft.write(tgt + "\n")


def make_copy_task(dirname: str, n_train=800, n_valid=40, n_test=24, vocab=12, max_len=9, seed=0, reverse=False):
    """A small deterministic translation task: y = x (or reversed x) over a tiny vocabulary."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def pairs(n):
        out = []
        for _ in range(n):
            s = [rng.choice(words) for _ in range(rng.randint(2, max_len))]
            out.append((" ".join(s), " ".join(reversed(s) if reverse else s)))
        return out

    os.makedirs(dirname, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        write_parallel(dirname, split, pairs(n))


def preprocess(raw_dir: str, dest_dir: str, extra: Optional[List[str]] = None) -> None:
    from fairseq_cli import preprocess as preprocess_cli

    parser = preprocess_cli.options.get_preprocessing_parser()
    args = parser.parse_args(
        ["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary", "--workers", "1",
         "--trainpref", os.path.join(raw_dir, "train"), "--validpref", os.path.join(raw_dir, "valid"),
         "--testpref", os.path.join(raw_dir, "test"), "--destdir", dest_dir] + (extra or [])
    )
    preprocess_cli.main(args)


TINY = [
    "--arch", "latent_transformer_tiny", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "1",
    "--decoder-layers", "1", "--latent-layers", "1", "--encoder-attention-heads", "2",
    "--decoder-attention-heads", "2", "--num-codes", "16",
]


def train(data_bin: str, save_dir: str, extra: Optional[List[str]] = None, arch_flags=TINY) -> None:
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as train_cli

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_bin, "--user-dir", USER_DIR, "--task", "latent_translation", "--criterion", "latent_vq",
         "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "500", "--max-update", "3", "--cpu",
         "--save-dir", save_dir, "--no-progress-bar", "--log-interval", "1", "--num-workers", "0",
         "--seed", "1"] + list(arch_flags) + (extra or []),
    )
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train_cli.main)


def generate(data_bin: str, checkpoint: str, extra: Optional[List[str]] = None) -> str:
    from fairseq import options
    from fairseq_cli import generate as generate_cli

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_bin, "--user-dir", USER_DIR, "--task", "latent_translation", "--path", checkpoint, "--cpu",
         "--batch-size", "8", "--num-workers", "0"] + (extra or []),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate_cli.main(args)
    return out.getvalue()


def interactive(data_bin: str, checkpoint: str, lines: List[str], extra: Optional[List[str]] = None) -> str:
    from fairseq import options
    from fairseq_cli import interactive as interactive_cli

    parser = options.get_interactive_generation_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_bin, "--user-dir", USER_DIR, "--task", "latent_translation", "--path", checkpoint, "--cpu",
         "--source-lang", "src", "--target-lang", "tgt"] + (extra or []),
    )
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO("".join(line + "\n" for line in lines))
    try:
        with contextlib.redirect_stdout(out):
            interactive_cli.main(args)
    finally:
        sys.stdin = old_stdin
    return out.getvalue()


def hypotheses(output: str) -> dict:
    """{id: hypothesis string} from fairseq-generate / -interactive output."""
    hyps = {}
    for line in output.splitlines():
        if line.startswith("H-"):
            parts = line.split("\t")
            hyps[int(parts[0][2:])] = parts[2] if len(parts) > 2 else ""
    return hyps
