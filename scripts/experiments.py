#!/usr/bin/env python
"""Run the paper's comparisons on a prepared data set (Table 1, the ablations of Tables 2-4, Figure 3).

    python scripts/experiments.py table1 --data BIN --distill DISTILL_BIN --raw RAW --work DIR [--max-update 1000]
    python scripts/experiments.py ablations --data BIN --distill DISTILL_BIN --raw RAW --work DIR [--only K1024 m1 ...]
    python scripts/experiments.py levers --data BIN [--distill DISTILL_BIN] --raw RAW --work DIR --subset valid \
        --only base nc2 lp2+nc2 ...                  # one factor changed from LT em; diagnosed on valid
    python scripts/experiments.py robustness --data BIN --raw RAW --work DIR [--seeds 1 2 3] [--max-update 300] \
        [--reseed] [--codes 16384 --nc 3 --ae-attend-source] [--temperature 30 [--anneal-updates 300]]
    python scripts/experiments.py curve --data BIN --distill DISTILL_BIN --raw RAW --work DIR --subset valid \
        --only nat-distill                           # valid BLEU of each kept checkpoint, for plot_curves.py
    python scripts/experiments.py report --work DIR          # tables (markdown) from what has run so far
    python scripts/experiments.py table1 ... [--cpu] [--generate-args="--fp16"] [--dry-run] -- --fp16 --update-freq 2

``BIN`` comes from ``scripts/prepare-data.sh``/``prepare-multi30k.sh`` (``RAW`` is its raw directory, holding the
untokenized ``test.<tgt>`` references), ``DISTILL_BIN`` from ``scripts/distill.sh``. Every run is a plain
``fairseq-train`` / ``fairseq-generate`` command (printed before it runs) and is resumable: a run whose last
checkpoint has reached ``--max-update`` is not trained again, a decoded output that exists is not decoded again,
so rerunning the same command continues where it stopped (``--max-update`` may grow). Each run directory records
the fairseq-train command that first trained it (``train_command.json``, without the budget and the logging and
saving options); a later command that would train it with other options stops with their names, unless
``--overwrite`` is given, which deletes that run directory and trains it anew. All models get the same size (the
``tiny`` preset of ``vq_nat/models/presets.py``: d=128, ffn 256, 4 heads, 3+3 layers, shared embeddings), optimizer,
batch size (``--max-tokens``) and number of updates.

Devices: fairseq trains and decodes on the GPU(s) it sees and on the CPU otherwise; ``--cpu`` forces the CPU.
Options after ``--`` are appended to every fairseq-train command (so they win: ``-- --fp16 --update-freq 2``,
``--distributed-world-size 4``); ``--generate-args="..."`` is appended to every fairseq-generate command.
``--dry-run`` prints the commands without running anything.

Scores: sacreBLEU on detokenized (sacremoses), cased output against the raw references; latency: fairseq-generate's
own total for the test set (model time, not data loading) divided by the number of sentences, at batch size 1
and 64, one model at a time on the same machine.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "vq_nat")


def _load_presets():
    """vq_nat/models/presets.py read as a plain file: the size presets without importing fairseq."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vq_nat_presets", os.path.join(USER_DIR, "models", "presets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESETS = _load_presets()
SIZE = PRESETS.size_flags("tiny") + ["--share-all-embeddings"]
OPTIM = [
    "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "300", "--dropout", "0.1", "--num-workers", "0", "--no-progress-bar",
    "--no-epoch-checkpoints", "--log-format", "json",
]
LENGTH = ["--max-len-a", "1.2", "--max-len-b", "10"]


@dataclass
class Run:
    """One trained model (``name`` = its directory) and the decodings that are scored from it."""

    name: str
    kind: str  # lt | ar | nat | cmlm
    distilled: bool
    train_args: List[str] = field(default_factory=list)
    # row label -> extra fairseq-generate arguments
    decodes: dict = field(default_factory=dict)


def lt_run(bottleneck="em", distilled=False, codes=512, samples=10, nc=1, seed=1, reseed=True, label=None):
    name = f"lt-{bottleneck}-{'distill' if distilled else 'raw'}-K{codes}-m{samples}-nc{nc}-s{seed}"
    if not reseed:
        name += "-noreseed"
    args = [
        "--task", "latent_translation", "--arch", "latent_transformer_tiny", "--criterion", "latent_vq",
        "--bottleneck", bottleneck, "--num-codes", str(codes), "--num-samples", str(samples),
        "--num-compress-steps", str(nc), "--share-all-embeddings", "--seed", str(seed),
    ] + ([] if reseed else ["--dead-code-threshold", "0"])  # the rest: the preset's own defaults
    label = label or f"LT {bottleneck}{' (m=%d)' % samples if bottleneck == 'em' else ''}, nc={nc}, K={codes}" + (
        " + distillation" if distilled else "")
    return Run(name, "lt", distilled, args, {label: ["--task", "latent_translation"] + LENGTH})


def ar_run(distilled=False, encoder_layers=3, decoder_layers=3):
    """The AR transformer of the same width; 6 encoder + 1 decoder layers is the deep-encoder / shallow-decoder AR
    (Kasai et al. 2021), the fastest AR a user would pick, with the parameter count of the 3+3 model."""
    args = ["--task", "translation", "--arch", "transformer", "--criterion", "label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", *PRESETS.size_flags("tiny", encoder_layers, decoder_layers),
            "--share-all-embeddings"]
    name = "ar" if (encoder_layers, decoder_layers) == (3, 3) else f"ar-e{encoder_layers}d{decoder_layers}"
    what = "AR transformer" if name == "ar" else f"AR transformer {encoder_layers}+{decoder_layers}"
    return Run(name + ("-distill" if distilled else ""), "ar", distilled, args, {
        f"{what}, beam 4": ["--task", "translation", "--beam", "4"] + LENGTH,
        f"{what}, greedy": ["--task", "translation", "--beam", "1"] + LENGTH,
    })


def lev_run(arch, distilled=True):
    """fairseq's own non-autoregressive peers (``fairseq/models/nat``), task ``translation_lev``."""
    noise = {"nonautoregressive_transformer": "full_mask", "cmlm_transformer": "random_mask"}[arch]
    args = ["--task", "translation_lev", "--arch", arch, "--noise", noise, "--criterion", "nat_loss",
            "--label-smoothing", "0.1", "--pred-length-offset", "--length-loss-factor", "0.1",
            "--apply-bert-init"] + SIZE
    suffix = " + distillation" if distilled else ""
    gen = ["--task", "translation_lev", "--beam", "1", "--iter-decode-eos-penalty", "0"]
    if arch == "nonautoregressive_transformer":
        decodes = {"fairseq NAT (1 pass, length prediction)" + suffix: gen + ["--iter-decode-max-iter", "0"]}
    else:
        decodes = {"fairseq CMLM, 1 iteration" + suffix: gen + ["--iter-decode-max-iter", "0"],
                   "fairseq CMLM, 10 iterations" + suffix: gen + ["--iter-decode-max-iter", "9"]}
    name = {"nonautoregressive_transformer": "nat", "cmlm_transformer": "cmlm"}[arch]
    return Run(f"{name}-{'distill' if distilled else 'raw'}", name, distilled, args, decodes)


def table1_runs(work):
    em_distill = lt_run("em", distilled=True)
    teacher = os.path.join(work, ar_run().name, "checkpoint_last.pt")  # the table's AR model rescores NPD
    base = next(iter(em_distill.decodes.values()))
    for k in (4, 8):
        em_distill.decodes[f"LT em (m=10), nc=1, K=512 + distillation, NPD k={k} (AR rescoring)"] = base + [
            "--npd-candidates", str(k), "--npd-teacher", teacher]
    return [
        ar_run(),
        lt_run("vq"), lt_run("em"),
        lt_run("vq", distilled=True), em_distill,
        lt_run("em", distilled=True, nc=3),
        lev_run("nonautoregressive_transformer"), lev_run("cmlm_transformer"),
        ar_run(distilled=True, encoder_layers=6, decoder_layers=1),
    ]


ABLATIONS = {  # Tables 2-4: soft EM + distillation, one factor changed from the base (K=512, m=10, nc=1)
    **{f"K{k}": dict(codes=k) for k in (256, 512, 1024, 4096, 16384)},
    **{f"m{m}": dict(samples=m) for m in (1, 5, 10, 25)},
    **{f"nc{n}": dict(nc=n) for n in (2, 3, 4)},
}


def ablation_runs(only=None):
    keys = only or list(ABLATIONS)
    unknown = [k for k in keys if k not in ABLATIONS]
    if unknown:
        sys.exit(f"experiments.py: unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    return [lt_run("em", distilled=True, **ABLATIONS[k]) for k in keys]


LEVERS = {  # one factor changed from lt_run("em") (the preset: nc=1, K=512, m=10, 1-layer latent predictor, t2t
    # masking over 400)
    "base": [],
    "nc1": ["--num-compress-steps", "1"],
    "nc2": ["--num-compress-steps", "2"],
    "nc3": ["--num-compress-steps", "3"],  # the paper's nc
    "K2048": ["--num-codes", "2048"],
    "blocks2": ["--num-blocks", "2"],
    "ls": ["--label-smoothing", "0.1"],
    "T10": ["--soft-em-temperature", "10"],
    "vq": ["--bottleneck", "vq"],
    # codebook from k-means on the first batch instead of N(0, I), and no dead-code re-seeding
    "kmeans": ["--kmeans-init", "--dead-code-threshold", "0"],
    "lp2": ["--latent-layers", "2"],  # two latent-predictor layers: better, but slower
    "lp3": ["--latent-layers", "3"],  # as deep as the decoder: one pass of it costs little in a parallel predictor
    "lp4": ["--latent-layers", "4"],
    "T03": ["--soft-em-temperature", "0.3"],
    "T01": ["--soft-em-temperature", "0.1"],  # a sharper E-step: the m samples agree on fewer codes
    "T003": ["--soft-em-temperature", "0.03"],
    # the one-pass latent predictor: length classifier, then all codes at once, glancing on the latents (R=0.5)
    "par": ["--latent-predictor", "parallel"],
    "g0": ["--latent-glancing-ratio", "0"],  # with par: no glancing
    "g03": ["--latent-glancing-ratio", "0.3"],
    "K64": ["--num-codes", "64"],
    "K32": ["--num-codes", "32"],
    "e6d1": ["--encoder-layers", "6", "--decoder-layers", "1"],
}
# levers valid only with ``par`` (``--latent-predictor parallel``): checked before anything is trained, as fairseq
# would refuse them only when the run starts
PARALLEL_ONLY = {"g0": "the parallel predictor's glancing", "g03": "the parallel predictor's glancing"}
EVAL_BLEU = ["--eval-bleu", "--eval-bleu-detok", "moses", "--eval-bleu-remove-bpe", "--eval-bleu-args",
             '{"max_len_a": 1.2, "max_len_b": 10}']


def lever_run(combo, distilled=False, seed=1):
    """``combo``: lever keys joined by '+', e.g. 'lp2+nc2' (later flags override earlier ones)."""
    keys = combo.split("+")
    unknown = [k for k in keys if k not in LEVERS]
    if unknown:
        sys.exit(f"experiments.py: unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    parallel_only = [k for k in keys if k in PARALLEL_ONLY]
    if parallel_only and "par" not in keys:
        what = ", ".join(f"{k} ({' '.join(LEVERS[k])}: {PARALLEL_ONLY[k]})" for k in dict.fromkeys(parallel_only))
        sys.exit(f"experiments.py: lever(s) {what} apply to the parallel latent predictor only: combine them with par "
                 f"(e.g. par+{parallel_only[0]}), not {combo!r}")
    base = lt_run("em", distilled=distilled, seed=seed)
    extra = [a for k in keys for a in LEVERS[k]]
    name = f"lever-{combo}-{'distill' if distilled else 'raw'}-s{seed}"
    return Run(name, "lt", distilled, base.train_args + extra + EVAL_BLEU, {})


def execute_levers(combos, args):
    """Train each lever run and diagnose it on ``--subset`` (scripts/diagnose.py: BLEU with predicted and with
    the autoencoder's own latents, predictor accuracy, latent-length error, posterior entropy)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import diagnose

    results_path = os.path.join(args.work, "results.jsonl")
    data = args.distill or args.data
    runs = [lever_run(combo, distilled=args.distill is not None, seed=args.seed) for combo in combos]
    for run in runs:  # every combination and every run directory checked before anything is trained
        check_trained_with(run, args, data)
    for combo, run in zip(combos, runs):
        ckpt = train(run, args, data)
        _, tgt = langs(data)
        diagnose_args = [data, "--path", ckpt, "--subset", args.subset, "--ref",
                         os.path.join(args.raw, f"{args.subset}.{tgt}")] + (["--cpu"] if args.cpu else [])
        if args.dry_run:
            print("+ (in-process) scripts/diagnose.py " + " ".join(shlex.quote(a) for a in diagnose_args), flush=True)
            continue
        report = diagnose.main(diagnose_args)
        row = dict(table="levers", label=combo, run=run.name, updates=num_updates(ckpt),
                   train_seconds=train_seconds(os.path.join(args.work, run.name)), kind="lt", **{
                       k: v for k, v in report.items() if k not in ("label", "path")})
        print("experiments.py: " + json.dumps(row), flush=True)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def robustness_runs(args, reseed=False):
    """Figure 3 analog: hard vs soft EM per seed (``args.seeds``), validated each epoch with greedy BLEU and with
    the BLEU of teacher-forced decoding from the autoencoder's own latents (``bleu_oracle``, the paper's y-axis). The paper's Figure 3 has K=2^14
    (``args.codes``) and the autoencoder's encoder attending to the source (``args.ae_attend_source``);
    ``args.temperature`` is soft EM's E-step temperature (hard EM has none, so its runs are shared across
    temperatures), annealed geometrically to 1 over the first ``args.anneal_updates`` updates when > 0;
    ``args.kmeans_init`` initialises both codebooks by k-means on the first batch; ``args.mask_startup_steps`` is
    the decoder-input warm-up (gold target embeddings at a decaying share of positions)."""
    runs = [lt_run(b, codes=args.codes, nc=args.nc, seed=s, reseed=reseed) for b in ("vq", "em") for s in args.seeds]
    for r in runs:
        r.train_args += EVAL_BLEU
        if args.temperature != 1.0 and "-em-" in r.name:
            r.train_args += ["--soft-em-temperature", f"{args.temperature:g}"]
            r.name += f"-T{args.temperature:g}"
        if args.anneal_updates > 0 and "-em-" in r.name:
            r.train_args += ["--soft-em-anneal-updates", str(args.anneal_updates)]
            r.name += f"-anneal{args.anneal_updates}"
        if args.ae_attend_source:
            r.train_args.append("--ae-attend-source")
            r.name += "-attsrc"
        if args.kmeans_init:
            r.train_args.append("--kmeans-init")
            r.name += "-kmeans"
        if args.mask_startup_steps != 400:  # the preset's 400 otherwise
            r.train_args += ["--mask-startup-steps", str(args.mask_startup_steps)]
            r.name += f"-ms{args.mask_startup_steps}"
        if reseed:  # never the Table-1 runs of the same settings (other budget, log interval)
            r.name += "-fig3"
    return runs


# ----------------------------------------------------------------------------------------------------------------

def sh(cmd, log=None):
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True)
        return
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = open(log).read()[-3000:]
        sys.exit(f"experiments.py: command failed (exit {rc}); end of {log}:\n{tail}")


def num_updates(checkpoint):
    if not os.path.exists(checkpoint):
        return 0
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int(state.get("optimizer_history", [{}])[-1].get("num_updates", 0))


def train_command(run, args, data):
    save = os.path.join(args.work, run.name)
    return ["fairseq-train", data, "--user-dir", USER_DIR, *run.train_args, *OPTIM,
            "--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update), "--save-dir", save,
            "--save-interval-updates", "500", "--keep-interval-updates", "-1" if args.keep_checkpoints else "1",
            "--log-interval", str(args.log_interval), "--log-file", os.path.join(save, "train.log"),
            *(["--cpu"] if args.cpu else []), *args.train_extra]


# fairseq-train options that may change when a run is resumed, left out of its record (TRAIN_RECORD): the budget,
# where and how often it logs and saves, the device and data loading, and where this checkout is (--user-dir)
RESUMABLE_OPTIONS = {
    "--max-update", "--max-epoch", "--save-dir", "--log-file", "--log-interval", "--log-format", "--no-progress-bar",
    "--save-interval-updates", "--keep-interval-updates", "--save-interval", "--keep-last-epochs",
    "--keep-best-checkpoints", "--no-epoch-checkpoints", "--no-last-checkpoints", "--tensorboard-logdir",
    "--wandb-project", "--user-dir", "--cpu", "--num-workers",
}
TRAIN_RECORD = "train_command.json"  # in the run directory: what trained it, written before its first update
_NUMBER = re.compile(r"-\d[\d.]*(e[-+]?\d+)?|-\.\d+|-inf|-nan", re.I)


def option_groups(cmd):
    """[(option, [values])] of a command line after the program, in order; the positionals come as ('', [...])."""
    groups = [("", [])]
    for a in cmd[1:]:
        if a.startswith("-") and not _NUMBER.fullmatch(a):
            name, eq, value = a.partition("=")
            groups.append((name, [value] if eq else []))
        else:
            groups[-1][1].append(a)
    return groups


def options(cmd):
    """{option: values} of a command line, the last occurrence of an option winning as in argparse."""
    return {name: tuple(values) for name, values in option_groups(cmd)}


def train_key(cmd):
    """The part of a fairseq-train command that defines the model it trains: without RESUMABLE_OPTIONS, the data
    directory as a real path. Stored as JSON in the run directory, as generate_once stores its key."""
    (_, positionals), *rest = option_groups(cmd)
    positionals = [os.path.realpath(positionals[0]), *positionals[1:]] if positionals else []
    kept = [cmd[0], *positionals]
    for name, values in rest:
        if name not in RESUMABLE_OPTIONS:
            kept += [name, *values]
    return json.dumps({"cmd": kept})


def read_key(path):
    """The key a command's output was recorded with (write_key), or None when there is none."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_key(path, key):
    with open(path + ".tmp", "w") as f:
        f.write(key)
    os.replace(path + ".tmp", path)


def has_checkpoints(save):
    return os.path.isdir(save) and any(re.fullmatch(r"checkpoint.*\.pt", f) for f in os.listdir(save))


def check_trained_with(run, args, data):
    """Exit when ``run``'s directory holds a model trained by another command than this one gives (other data, model,
    criterion, optimization or passthrough options; RESUMABLE_OPTIONS may differ), naming the options; with
    ``--overwrite`` the directory is deleted instead, so that the run is trained anew. A recorded command that
    trained nothing yet (no checkpoint) is simply replaced. Returns the key of this command."""
    save = os.path.join(args.work, run.name)
    key = train_key(train_command(run, args, data))
    recorded = read_key(os.path.join(save, TRAIN_RECORD))
    if recorded is None or not has_checkpoints(save):
        return key
    try:
        before = options(json.loads(recorded)["cmd"])
    except (ValueError, KeyError, TypeError):
        before = None
    now = options(json.loads(key)["cmd"])
    if before == now:
        return key
    if before is None:
        what = f"its record {os.path.join(save, TRAIN_RECORD)} is unreadable"
    else:
        show = lambda v: "(not given)" if v is None else " ".join(v) or "(set)"  # noqa: E731
        what = "trained with other options: " + ", ".join(
            f"{name or 'data'} {show(before.get(name))} -> {show(now.get(name))}"
            for name in dict.fromkeys([*before, *now]) if before.get(name) != now.get(name))
    if not args.overwrite:
        sys.exit(f"experiments.py: run {run.name} in {args.work} was {what}; pass another --work for these "
                 f"options, or --overwrite to delete {save} and train it anew")
    if args.dry_run:
        print(f"experiments.py: --overwrite: would delete {save} ({what})", flush=True)
        return key
    import shutil

    print(f"experiments.py: --overwrite: deleting {save} ({what})", flush=True)
    shutil.rmtree(save)
    return key


def train(run, args, data):
    save = os.path.join(args.work, run.name)
    key = check_trained_with(run, args, data)
    if not args.dry_run:
        os.makedirs(save, exist_ok=True)
        record = os.path.join(save, TRAIN_RECORD)
        if read_key(record) != key:
            if read_key(record) is None and has_checkpoints(save):
                print(f"experiments.py: INFO: {run.name} has checkpoints but no record of the command that trained "
                      f"them (trained before experiments.py kept one): accepted as trained by this command, "
                      f"recorded in {record}", flush=True)
            write_key(record, key)
    ckpt = os.path.join(save, "checkpoint_last.pt")
    done = num_updates(ckpt)
    if done >= args.max_update:
        print(f"experiments.py: {run.name}: trained ({done} updates)", flush=True)
        return ckpt
    cmd = train_command(run, args, data)
    if args.dry_run:
        print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        return ckpt
    sh(cmd, log=os.path.join(save, "stdout.log"))
    return ckpt


def train_seconds(run_dir):
    """Seconds spent in training steps: the sum of fairseq's per-log-interval ``train_wall`` in train.log, one
    value per logged update number (so a resumed run counts redone updates once and validation and checkpoint
    saving are not counted). For a checkpoint trained elsewhere and copied into the run directory, a
    ``train_seconds.txt`` holding its seconds is read instead."""
    per_update = {}
    log = os.path.join(run_dir, "train.log")
    if os.path.exists(log):
        for line in open(log):
            if line.startswith('{"') and '"train_wall"' in line:
                d = json.loads(line)
                if "num_updates" in d:  # train_inner lines (epoch summaries have prefixed keys)
                    per_update[int(d["num_updates"])] = float(d["train_wall"])
    if per_update:
        return sum(per_update.values())
    path = os.path.join(run_dir, "train_seconds.txt")
    return sum(float(x) for x in open(path).read().split()) if os.path.exists(path) else None


def generate_once(path, data, ckpt, subset, batch_size, gen_args, args=None):
    """fairseq-generate into ``path``, reused only when made by the same command from the same checkpoint file
    (``path``.key holds the command and the checkpoint's size and modification time: a run trained further, or
    other generate options, decode again). Written atomically: resumable. ``args`` (the parsed command line)
    adds ``--cpu`` when asked and the ``--generate-args``; with ``--dry-run`` the command is printed only."""
    cmd = ["fairseq-generate", data, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", subset,
           "--batch-size", str(batch_size), "--remove-bpe", "--num-workers", "0", *gen_args]
    if args is not None:
        cmd += (["--cpu"] if args.cpu else []) + shlex.split(args.generate_args or "")
        if args.dry_run:
            print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            return path
    stat = os.stat(ckpt) if os.path.exists(ckpt) else None
    key = json.dumps({"cmd": cmd, "checkpoint": [stat.st_size, stat.st_mtime_ns] if stat else None})
    if os.path.exists(path) and read_key(path + ".key") == key:
        return path
    sh(cmd, log=path + ".tmp")
    os.replace(path + ".tmp", path)
    write_key(path + ".key", key)
    return path


def decode(run, label, gen_args, ckpt, data, args):
    """fairseq-generate at batch 64 (scored) and batch 1 (latency only)."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return {bs: generate_once(os.path.join(args.work, run.name, f"gen.{slug}.b{bs}.txt"), data, ckpt, args.subset,
                              bs, gen_args, args) for bs in (64, 1)}


def read_generate(path):
    hyps, secs, n = {}, None, None
    for line in open(path, encoding="utf-8"):
        if line.startswith("H-"):
            i, _, text = line.rstrip("\n").split("\t")
            hyps[int(i[2:])] = text
        m = re.search(r"Translated ([\d,]+) sentences .* in ([\d.]+)s \(([\d.]+) sentences/s", line)
        if m:  # the rate has more digits than the rounded seconds
            n, secs, rate = int(m.group(1).replace(",", "")), float(m.group(2)), float(m.group(3))
    if secs is None:
        sys.exit(f"experiments.py: {path} has no 'Translated N sentences' line (decoding failed?)")
    return hyps, (1000.0 / rate if rate > 0 else 1000.0 * secs / n)


def score(path, refs_path, lang):
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesDetokenizer

    hyps, _ = read_generate(path)
    refs = [line.rstrip("\n") for line in open(refs_path, encoding="utf-8")]
    if len(hyps) != len(refs):
        sys.exit(f"experiments.py: {path}: {len(hyps)} hypotheses for {len(refs)} references")
    md = MosesDetokenizer(lang=lang)
    bleu = BLEU()
    s = bleu.corpus_score([md.detokenize(hyps[i].split()) for i in range(len(refs))], [refs])
    return s.score, str(bleu.get_signature())


def langs(data):
    for f in sorted(os.listdir(data)):
        m = re.match(r"train\.([^-.]+)-([^.]+)\.\1\.idx$", f)
        if m:
            return m.group(1), m.group(2)
    sys.exit(f"experiments.py: {data} has no binarized train split")


def execute(runs, args, table):
    for d in (args.data, args.distill, args.raw):
        if d and not os.path.isdir(d):
            sys.exit(f"experiments.py: no such directory: {d}")
    results_path = os.path.join(args.work, "results.jsonl")
    for run in runs:  # every run directory checked before anything is trained
        data = args.distill if run.distilled else args.data
        if data is None:
            sys.exit(f"experiments.py: {run.name} needs --distill (a directory from scripts/distill.sh)")
        check_trained_with(run, args, data)
    for run in runs:
        data = args.distill if run.distilled else args.data
        src, tgt = langs(data)
        ckpt = train(run, args, data)
        secs = train_seconds(os.path.join(args.work, run.name))
        for label, gen_args in run.decodes.items():
            if args.no_decode:
                continue
            if "--npd-teacher" in gen_args and not os.path.exists(gen_args[gen_args.index("--npd-teacher") + 1]):
                print(f"experiments.py: {label}: skipped until the AR model is trained", flush=True)
                continue
            paths = decode(run, label, gen_args, ckpt, data, args)
            if args.dry_run:
                continue
            bleu, sig = score(paths[64], os.path.join(args.raw, f"{args.subset}.{tgt}"), tgt)
            row = dict(table=table, label=label, run=run.name, bleu=round(bleu, 2), signature=sig,
                       ms_b1=round(read_generate(paths[1])[1], 2), ms_b64=round(read_generate(paths[64])[1], 2),
                       updates=num_updates(ckpt), train_seconds=secs, kind=run.kind)
            print("experiments.py: " + json.dumps(row), flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def execute_curve(runs, args):
    """Valid BLEU of every kept 500-update checkpoint (``table1 --keep-checkpoints``) and of the last one, for
    table-1 runs whose task scores no BLEU during validation (fairseq's ``translation_lev`` ignores
    ``--eval-bleu``). Each checkpoint is decoded at batch 64 with the arguments of the run's first row; the
    points are written as fairseq json log lines (``valid_num_updates``, ``valid_bleu``) to ``<run>/valid_bleu.log``, which
    scripts/plot_curves.py reads beside ``train.log``."""
    for run in runs:
        save = os.path.join(args.work, run.name)
        data = args.distill if run.distilled else args.data
        if data is None:
            sys.exit(f"experiments.py: {run.name} needs --distill (a directory from scripts/distill.sh)")
        _, tgt = langs(data)
        ckpts = sorted((int(m[1]), f) for f in (os.listdir(save) if os.path.isdir(save) else [])
                       if (m := re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", f)))
        last = num_updates(os.path.join(save, "checkpoint_last.pt"))  # 0 when there is none
        if last and last not in {u for u, _ in ckpts}:
            ckpts.append((last, "checkpoint_last.pt"))
        if not ckpts:
            sys.exit(f"experiments.py: {save} has no checkpoints (train it with `table1 --keep-checkpoints`)")
        gen_args = next(iter(run.decodes.values()))
        points = []
        for update, f in ckpts:
            path = generate_once(os.path.join(save, f"gen.curve.{args.subset}.u{update}.txt"), data,
                                 os.path.join(save, f), args.subset, 64, gen_args, args)
            if args.dry_run:
                continue
            bleu, _ = score(path, os.path.join(args.raw, f"{args.subset}.{tgt}"), tgt)
            points.append({"valid_num_updates": update, "valid_bleu": round(bleu, 2)})
            print(f"experiments.py: {run.name} update {update}: {args.subset} BLEU {bleu:.2f}", flush=True)
        if args.dry_run:
            continue
        with open(os.path.join(save, "valid_bleu.log"), "w") as out:
            out.writelines(json.dumps(pt) + "\n" for pt in points)


def read_results(work):
    rows = {}
    path = os.path.join(work, "results.jsonl")
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            rows[(r["table"], r["label"])] = r  # the latest measurement of a row wins
    return list(rows.values())


def report(args):
    rows = read_results(args.work)
    out = []
    order = [label for run in table1_runs(args.work) for label in run.decodes]
    t1 = sorted((r for r in rows if r["table"] == "table1"),
                key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
    if t1:
        greedy = next((r for r in t1 if r["label"] == "AR transformer, greedy"), None)
        beam = next((r for r in t1 if r["label"] == "AR transformer, beam 4"), None)
        out += ["| model | updates (train time) | test sacreBLEU | ms/sent. b1 | ms/sent. b64 | "
                "speedup vs greedy b1 / b64 | vs beam 4 b1 / b64 |", "|---|---|---|---|---|---|---|"]
        for r in t1:
            sp = lambda ref: (f"{ref['ms_b1'] / r['ms_b1']:.2f}× / {ref['ms_b64'] / r['ms_b64']:.2f}×"
                              if ref else "n/a")
            secs = train_seconds(os.path.join(args.work, r["run"])) or r.get("train_seconds")
            t = f"{secs / 60:.0f} min" if secs else "?"
            out.append(f"| {r['label']} | {r['updates']} ({t}) | {r['bleu']:.2f} | {r['ms_b1']:.2f} | "
                       f"{r['ms_b64']:.2f} | {sp(greedy)} | {sp(beam)} |")
        out.append(f"\nsacreBLEU signature: {t1[0]['signature']}\n")
    ab = {r["run"]: r for r in rows if r["kind"] == "lt"}
    out += ["| ablation (soft EM + distillation) | run | test sacreBLEU | ms/sent. b1 |", "|---|---|---|---|"]
    for key, kw in ABLATIONS.items():
        run = lt_run("em", distilled=True, **kw)
        r = ab.get(run.name)
        out.append(f"| {key} | {run.name} | {r['bleu']:.2f} | {r['ms_b1']:.2f} |" if r else
                   f"| {key} | {run.name} | not run | not run |")
    print("\n".join(out))


def read_robustness_log(log):
    """(train points [(update, code_ppl, code_info)], valid points [(update, bleu, bleu_oracle)]) of a json log
    (code_info is NaN in logs written before it was logged)."""
    train_pts, valid_pts = [], {}
    for line in open(log):
        if not line.startswith('{"'):  # fairseq's json log lines (the file also holds the config dump)
            continue
        d = json.loads(line)
        if "code_ppl" in d and "num_updates" in d:  # train_inner (epoch/valid stats have prefixed keys)
            train_pts.append((int(d["num_updates"]), float(d["code_ppl"]), float(d.get("code_info", "nan"))))
        if "valid_bleu_oracle" in d and "valid_num_updates" in d:
            valid_pts[int(d["valid_num_updates"])] = (float(d["valid_bleu"]), float(d["valid_bleu_oracle"]))
    return train_pts, [(u, b, o) for u, (b, o) in sorted(valid_pts.items())]


def plot_robustness(args, reseed=False):
    """Figure 3 analog: teacher-forced valid BLEU (decoding from the reference's own latents), greedy valid BLEU,
    code perplexity and the information a latent carries (``code_info``) over updates, hard vs soft EM, each seed."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    temps = f"{args.temperature:g}" + (f" to 1 in {args.anneal_updates}" if args.anneal_updates > 0 else "")
    summary = []
    for run in robustness_runs(args, reseed):
        log = os.path.join(args.work, run.name, "train.log")
        if not os.path.exists(log):
            continue
        train_pts, valid_pts = read_robustness_log(log)
        hard = "-vq-" in run.name
        seed = re.search(r"-s(\d+)", run.name).group(1)
        style = dict(color="tab:red" if hard else "tab:blue", ls="-" if hard else "--", alpha=0.8,
                     label=("hard EM (vq)" if hard else f"soft EM (em, m=10, T={temps})") + f", seed {seed}")
        if valid_pts:
            axes[0].plot([u for u, _, _ in valid_pts], [o for _, _, o in valid_pts], marker="o", **style)
            axes[1].plot([u for u, _, _ in valid_pts], [b for _, b, _ in valid_pts], marker="o", **style)
        if train_pts:
            axes[2].plot([u for u, _, _ in train_pts], [p for _, p, _ in train_pts], **style)
            axes[3].plot([u for u, _, _ in train_pts], [i for _, _, i in train_pts], **style)
            last_valid = valid_pts[-1] if valid_pts else (None, float("nan"), float("nan"))
            summary.append((run.name, train_pts[-1][0], last_valid[2], last_valid[1], train_pts[-1][1],
                            max(p for _, p, _ in train_pts), train_pts[-1][2]))
    if not summary:
        sys.exit("experiments.py: no robustness runs found under " + args.work)
    variant = "dead-code re-seeding 0.1" if reseed else "no re-seeding"
    axes[0].set(xlabel="update", ylabel="valid BLEU, teacher-forced latents",
                title="BLEU from the autoencoder's own latents")
    axes[1].set(xlabel="update", ylabel="valid BLEU, predicted latents", title="greedy BLEU")
    axes[2].set(xlabel="update", ylabel="code perplexity", yscale="log",
                title=f"code perplexity (of K={args.codes})")
    axes[3].set(xlabel="update", ylabel="nats", title="information per latent (code_info)")
    axes[0].legend(fontsize=7)
    attends = ", autoencoder attends the source" if args.ae_attend_source else ""
    init = ", k-means codebook init" if args.kmeans_init else ""
    fig.suptitle(f"K={args.codes}, nc={args.nc}{attends}{init}, decoder warm-up {args.mask_startup_steps} updates, "
                 f"EMA decay 0.99, {variant}")
    fig.tight_layout()
    png = os.path.join(args.work, "robustness-reseed.png" if reseed else "robustness.png")
    setting = (args.codes, args.nc, args.ae_attend_source, args.temperature, args.anneal_updates, args.kmeans_init,
               args.mask_startup_steps)
    if setting != (512, 1, False, 1.0, 0, False, 400):
        png = png.replace(".png", f"-K{args.codes}-nc{args.nc}{'-attsrc' if args.ae_attend_source else ''}"
                                  f"{'-T%g' % args.temperature if args.temperature != 1.0 else ''}"
                                  f"{'-anneal%d' % args.anneal_updates if args.anneal_updates > 0 else ''}"
                                  f"{'-kmeans' if args.kmeans_init else ''}"
                                  f"{'-ms%d' % args.mask_startup_steps if args.mask_startup_steps != 400 else ''}.png")
    fig.savefig(png, dpi=120)
    print(f"experiments.py: wrote {png}")
    print("| run | last update | teacher-forced BLEU (last valid) | BLEU (last valid) | code ppl (last) "
          "| max code ppl | code_info (last, nats) |\n|---|---|---|---|---|---|---|")
    for name, x, o, b, p, mx, info in summary:
        print(f"| {name} | {x} | {o:.2f} | {b:.2f} | {p:.1f} | {mx:.1f} | {info:.3f} |")


def same_dictionaries(data, distill):
    """--distill must be a distillation of --data: the same dictionary files (distill.sh copies them)."""
    for name in sorted(f for f in os.listdir(data) if f.startswith("dict.")) if os.path.isdir(data) else []:
        other = os.path.join(distill, name)
        if os.path.isfile(other) and open(os.path.join(data, name), "rb").read() != open(other, "rb").read():
            sys.exit(f"experiments.py: --distill {distill} has another {name} than --data {data}: it is not a "
                     f"distillation of this data (scripts/distill.sh DATA TEACHER OUT copies the dictionaries)")


def list_names(what):
    """``experiments.py levers --list`` (and ablations, table1): each name with what it changes."""
    if what == "levers":
        for name, flags in LEVERS.items():
            print(f"{name:8s} {' '.join(flags) or '(the preset)'}")
    elif what == "ablations":
        for name, setting in ABLATIONS.items():
            print(f"{name:8s} {', '.join(f'{k}={v}' for k, v in setting.items())}")
    elif what in ("table1", "curve"):
        for run in table1_runs("WORK"):
            print(run.name)
    else:
        sys.exit(f"experiments.py: --list applies to levers, ablations, table1 and curve, not {what}")


def split_passthrough(argv):
    """(this script's arguments, fairseq-train options after ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv=None):
    argv, train_extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s WHAT [options] [-- fairseq-train options]")
    p.add_argument("what", choices=["table1", "ablations", "levers", "robustness", "curve", "report"],
                   help="which experiment to run (see above); report: print the tables of what has run")
    p.add_argument("--data", help="fairseq-preprocess directory (scripts/prepare-data.sh)")
    p.add_argument("--distill", help="distilled directory (scripts/distill.sh)")
    p.add_argument("--raw", help="raw text directory with the untokenized references <subset>.<tgt>")
    p.add_argument("--work", help="directory for checkpoints, outputs and results.jsonl (required)")
    p.add_argument("--list", action="store_true",
                   help="levers / ablations / table1: print the names and their flags, then exit")
    p.add_argument("--max-update", type=int, default=1000, help="training budget of every model (updates)")
    p.add_argument("--max-tokens", type=int, default=4096, help="fairseq-train's batch size in tokens, per GPU")
    p.add_argument("--log-interval", type=int, default=50, help="fairseq-train's --log-interval (updates)")
    p.add_argument("--subset", default="test", help="split to decode and score")
    p.add_argument("--cpu", action="store_true",
                   help="train, decode and diagnose on the CPU even when a GPU is visible (fairseq's --cpu)")
    p.add_argument("--generate-args", default="",
                   help='extra fairseq-generate options for every decoding, one string: --generate-args="--fp16"')
    p.add_argument("--dry-run", action="store_true",
                   help="print the fairseq-train / fairseq-generate commands and run nothing")
    p.add_argument("--only", nargs="*", help="table1, curve: run names; ablations: keys such as K1024 m1 nc4; "
                                             "levers: lever combinations; robustness: the bottlenecks vq and/or em")
    p.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3], help="robustness: the seeds of the runs")
    p.add_argument("--seed", type=int, default=1, help="levers: the seed of the runs")
    p.add_argument("--no-decode", action="store_true", help="train only")
    p.add_argument("--overwrite", action="store_true",
                   help="a run whose directory holds a model trained with other options (its train_command.json) "
                        "is deleted and trained anew; without it experiments.py exits naming the options")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every 500-update checkpoint (for `curve`), not only the latest")
    p.add_argument("--reseed", action="store_true",
                   help="robustness: with dead-code re-seeding (threshold 0.1), as the table's runs; default off")
    p.add_argument("--codes", type=int, default=512, help="robustness: codebook size K (the paper's Figure 3: 16384)")
    p.add_argument("--nc", type=int, default=1, help="robustness: compression steps (latents = tokens / 2^nc)")
    p.add_argument("--ae-attend-source", action="store_true",
                   help="robustness: the autoencoder's encoder attends to the source, as in the paper's Figure 3")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="robustness: soft EM's E-step temperature (--soft-em-temperature; the paper: 1)")
    p.add_argument("--anneal-updates", type=int, default=0,
                   help="robustness: anneal soft EM's temperature to 1 over the first N updates "
                        "(--soft-em-anneal-updates; 0 = constant)")
    p.add_argument("--mask-startup-steps", type=int, default=400,
                   help="robustness: the decoder-input warm-up of both bottlenecks (--mask-startup-steps; 0 = none: "
                        "the decoder reads the latents from the first update)")
    p.add_argument("--kmeans-init", action="store_true",
                   help="robustness: k-means codebook init on the first batch (--kmeans-init), both bottlenecks")
    args = p.parse_args(argv)
    if args.list:
        list_names(args.what)
        return
    if not args.work:
        p.error("--work is required")
    for name, value, low in (("--max-update", args.max_update, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--log-interval", args.log_interval, 1), ("--seed", args.seed, 0),
                             ("--codes", args.codes, 2), ("--nc", args.nc, 0), ("--anneal-updates", args.anneal_updates, 0),
                             ("--mask-startup-steps", args.mask_startup_steps, 0)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if any(s < 0 for s in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    if not (0 < args.temperature < float("inf")):
        p.error(f"--temperature must be a positive finite number, got {args.temperature}")
    args.train_extra = train_extra
    if "--cpu" in train_extra:  # the same as this script's --cpu: decode and diagnose on the CPU too
        args.cpu = True
    if not args.dry_run:
        os.makedirs(args.work, exist_ok=True)
    if args.what == "report":
        report(args)
        for reseed in (False, True):
            if any(os.path.exists(os.path.join(args.work, r.name, "train.log"))
                   for r in robustness_runs(args, reseed)):
                plot_robustness(args, reseed)
        return
    if not args.data or not args.raw:
        sys.exit("experiments.py: --data and --raw are required")
    if args.distill:
        same_dictionaries(args.data, args.distill)
    if args.what in ("table1", "curve"):
        runs = table1_runs(args.work)
        if args.only:  # in the order given
            by_name = {r.name: r for r in runs}
            missing = [n for n in args.only if n not in by_name]
            if missing:
                sys.exit(f"experiments.py: unknown run(s) {missing}; choose from {list(by_name)}")
            runs = [by_name[n] for n in args.only]
        if args.what == "curve":
            if args.subset != "valid":
                sys.exit("experiments.py: curves are drawn on valid (valid_bleu.log); pass --subset valid")
            execute_curve(runs, args)
        else:
            execute(runs, args, "table1")
    elif args.what == "levers":
        if args.subset == "test":
            print("experiments.py: levers are chosen on valid; pass --subset valid", file=sys.stderr)
        execute_levers(args.only or ["base"], args)
    elif args.what == "ablations":
        execute(ablation_runs(args.only), args, "ablations")
    else:
        args.no_decode = True
        if args.only and not set(args.only) <= {"vq", "em"}:
            sys.exit("experiments.py: robustness --only takes the bottlenecks vq and/or em")
        runs = [r for r in robustness_runs(args, args.reseed) if not args.only
                or r.name.split("-")[1] in args.only]  # lt-<bottleneck>-...
        execute(runs, args, "robustness")
        if not args.dry_run:
            plot_robustness(args, args.reseed)


if __name__ == "__main__":
    main()
