#!/usr/bin/env python
"""Write docs/options.md: every option the plugin registers, read from its own argument parsers.

    python scripts/options_reference.py            # rewrite docs/options.md
    python scripts/options_reference.py --check    # exit 1 if docs/options.md is not what the parsers give

For each model, task and criterion option: its default in each registered ``latent_transformer`` arch, its help
text, and where it comes from (ORIGIN below). An option without an ORIGIN entry is an error, so the reference
cannot silently fall behind the code; tests/test_options_reference.py runs ``--check``.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "options.md")

PAPER = "paper (Roy et al. 2018)"
T2T = "tensor2tensor `transformer_nat`"
HERE = "beyond the paper (this project)"
ORIGIN = {
    # model
    "--num-compress-steps": PAPER + ": nc, latents = tokens / 2^nc",
    "--bottleneck": PAPER + ": vq = hard EM, em = soft EM; Kaiser et al. 2018: gumbel, semhash",
    "--num-codes": PAPER + ": K",
    "--num-samples": PAPER + ": m (soft EM)",
    "--codebook-update": PAPER + ": EMA (eq. 4-5) or the gradient codebook loss (eq. 3)",
    "--codebook-decay": PAPER + ": λ",
    "--codebook-epsilon": PAPER + ": Laplace smoothing of the EMA counts",
    "--commitment-beta": PAPER + ": β (eq. 2)",
    "--num-blocks": PAPER + ": product quantization (Kaiser et al. 2018, DVQ)",
    "--soft-em-temperature": HERE + " (the paper: 1)",
    "--soft-em-anneal-updates": HERE,
    "--kmeans-init": HERE,
    "--dead-code-threshold": HERE,
    "--ae-attend-source": PAPER + " (Figure 3's autoencoder attends to the source)",
    "--latent-layers": T2T + " (the latent predictor's depth)",
    "--mask-startup-steps": T2T + " `mask_startup_steps`",
    "--latent-loss-start": T2T,
    "--latent-predictor": HERE + ": parallel after latent-GLAT (Bao et al. 2022)",
    "--latent-glancing-ratio": HERE + " (latent-GLAT)",
    # task
    "--word-dropout": PAPER + ": denoising of the autoencoder input",
    "--word-shuffle": PAPER + ": denoising",
    "--word-shuffle-distance": PAPER + ": denoising",
    "--npd-candidates": "Gu et al. 2018 (noisy parallel decoding), as Kaiser et al. 2018",
    "--npd-teacher": "Gu et al. 2018 (noisy parallel decoding)",
    "--latent-beam": T2T + " (beam search over latents)",
    "--latent-length-beam": HERE + " (fairseq NAT's `--iter-decode-with-beam`)",
    "--oracle-latents": PAPER + " (Figure 3: BLEU from the reference's own latents)",
    # criterion
    "--label-smoothing": "fairseq",
    "--latent-loss-weight": T2T,
    "--length-loss-factor": "fairseq NAT (`--length-loss-factor`)",
}


def _options(parser):
    return {a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]: a
            for a in parser._actions if a.option_strings and "-h" not in a.option_strings}


def collect():
    """[(section, {option: action})] and {arch: Namespace of its defaults}."""
    import fairseq  # noqa: F401

    sys.path.insert(0, ROOT)
    import vq_nat

    vq_nat.register()
    from fairseq.dataclass.utils import gen_parser_from_dataclass
    from fairseq.models import ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY
    from fairseq.models.transformer import TransformerModel
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_DATACLASS_REGISTRY
    from fairseq.tasks.translation import TranslationConfig

    model_cls = ARCH_MODEL_REGISTRY["latent_transformer"]
    p, base = argparse.ArgumentParser(), argparse.ArgumentParser()
    model_cls.add_args(p)
    TransformerModel.add_args(base)
    model = {k: a for k, a in _options(p).items() if k not in _options(base)}

    p, base = argparse.ArgumentParser(), argparse.ArgumentParser()
    gen_parser_from_dataclass(p, TASK_DATACLASS_REGISTRY["latent_translation"]())
    gen_parser_from_dataclass(base, TranslationConfig())
    task = {k: a for k, a in _options(p).items() if k not in _options(base)}

    p = argparse.ArgumentParser()
    gen_parser_from_dataclass(p, REGISTRIES["criterion"]["dataclass_registry"]["latent_vq"]())
    criterion = _options(p)

    archs = {}
    for arch, cls in ARCH_MODEL_REGISTRY.items():
        if cls is model_cls:
            ns = argparse.Namespace(**{a.dest: None for a in model.values()})
            ARCH_CONFIG_REGISTRY[arch](ns)
            archs[arch] = ns
    return [("Model (`--arch latent_transformer*`)", model), ("Task (`--task latent_translation`)", task),
            ("Criterion (`--criterion latent_vq`)", criterion)], archs


def _arch_default(ns, action):
    """What the arch sets, else the parser's default (an option the arch leaves unset)."""
    value = getattr(ns, action.dest, None)
    return action.default if value is None else value


def _fmt(value):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def _cell(text):
    return " ".join(str(text or "").split()).replace("|", "\\|")


def render():
    sections, archs = collect()
    missing = [o for _, opts in sections for o in opts if o not in ORIGIN]
    stale = sorted(set(ORIGIN) - {o for _, opts in sections for o in opts})
    if missing or stale:
        sys.exit(f"options_reference.py: ORIGIN (in scripts/options_reference.py) lacks {missing} and names "
                 f"options that no parser registers: {stale}")
    lines = ["# Options reference", "",
             "Generated by `python scripts/options_reference.py` from the plugin's own argument parsers; "
             "`tests/test_options_reference.py` fails when it is out of date. fairseq's own options "
             "(`--encoder-layers`, `--max-tokens`, ...) keep their meaning; `fairseq-train --user-dir vq_nat "
             "--task latent_translation --arch latent_transformer_tiny --criterion latent_vq --help` lists all. A dash: the option is unset unless given (its help says "
             "what happens then).", ""]
    names = list(archs)
    for title, opts in sections:
        lines += [f"## {title}", ""]
        per_arch = title.startswith("Model")
        head = "| option | " + (" | ".join(f"`{a}`" for a in names) if per_arch else "default") + " | what it does | origin |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for opt, action in sorted(opts.items()):
            if per_arch:
                defaults = " | ".join(_fmt(_arch_default(archs[a], action)) for a in names)
            else:
                defaults = _fmt(action.default)
            choices = f" Choices: {', '.join(map(str, action.choices))}." if action.choices else ""
            lines.append(f"| `{opt}` | {defaults} | {_cell(action.help)}{choices} | {_cell(ORIGIN[opt])} |")
        lines.append("")
    lines += levers()
    return "\n".join(lines).rstrip() + "\n"


def levers():
    """The named settings of scripts/experiments.py (`levers --only A+B`, `ablations --only K`)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import experiments

    out = ["## `scripts/experiments.py` levers and ablations", "",
           "`experiments.py levers --only A+B` trains the preset with the flags of levers A and B (later ones win); "
           "`experiments.py ablations --only KEY` the distilled preset with one setting changed.", "",
           "| lever | flags |", "|---|---|"]
    out += [f"| `{k}` | {_cell(' '.join(v)) or '(the preset)'} |" for k, v in experiments.LEVERS.items()]
    out += ["", "| ablation | settings |", "|---|---|"]
    out += [f"| `{k}` | {_cell(', '.join(f'{a}={b}' for a, b in v.items()))} |"
            for k, v in experiments.ABLATIONS.items()]
    return out + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with docs/options.md instead of writing it")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else ""
        if current != text:
            sys.exit("options_reference.py: docs/options.md is out of date; run python scripts/options_reference.py")
        print("docs/options.md is up to date")
        return
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
