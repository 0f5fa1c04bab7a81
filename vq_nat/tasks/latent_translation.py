"""Task ``latent_translation``: fairseq's ``translation`` plus the autoencoder's denoising noise and the
non-autoregressive latent generator (so ``fairseq-generate`` / ``fairseq-interactive`` decode through it).

Unlike fairseq's ``translation_lev`` it keeps ``FairseqTask.train_step``, which calls
``model.set_num_updates(update_num)``: the warm-up schedules see the absolute update number (also after a
resume, since fairseq seeds every update with seed + num_updates, the noise and soft-EM samples replay too).
"""
import logging
import os
from dataclasses import dataclass, field

from fairseq.data import Dictionary
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..checkpoint_compat import get, trained_dictionary
from ..latent_generator import LatentGenerator
from ..modules.denoising import word_dropout, word_shuffle


logger = logging.getLogger(__name__)


@dataclass
class LatentTranslationConfig(TranslationConfig):
    word_dropout: float = field(
        default=0.0, metadata={"help": "denoising: replace target tokens fed to the autoencoder by <unk> with "
                                       "this probability (paper App. C: 0.3)"}
    )
    word_shuffle: float = field(
        default=0.0, metadata={"help": "denoising: locally permute (max distance --word-shuffle-distance) the "
                                       "autoencoder input of this fraction of sentences (paper: 0.5)"}
    )
    word_shuffle_distance: int = field(default=3, metadata={"help": "max displacement of the local shuffle"})
    npd_candidates: int = field(
        default=1, metadata={"help": "noisy parallel decoding: decode k latent sequences per sentence (greedy + "
                                     "k-1 sampled) in one parallel pass and keep the one --npd-teacher scores best "
                                     "(without a teacher: the LT's own mean token log-probability)"}
    )
    latent_beam: int = field(
        default=1, metadata={"help": "beam search over latent sequences: decode the best of the k best by latent "
                                     "score, or with --npd-teacher all k in one parallel pass, the teacher picking"}
    )
    latent_length_beam: int = field(
        default=1, metadata={"help": "length beam (models with a length classifier: --latent-predictor "
                                     "parallel): decode the l most probable latent lengths of each sentence in one "
                                     "batch and keep the hypothesis with the best mean token log-probability"}
    )
    oracle_latents: bool = field(
        default=False, metadata={"help": "teacher-forced decoding: decode the autoencoder's own latents of the "
                                         "reference instead of the predicted ones (an upper bound on what a "
                                         "perfect latent predictor would give; needs targets)"}
    )
    npd_teacher: str = field(
        default="", metadata={"help": "autoregressive fairseq checkpoint (same dictionaries) that rescores the "
                                      "--npd-candidates candidates in one teacher-forced pass"}
    )


def check_task_options(cfg) -> None:
    """The task's own options, once when it is set up: ranges (the decoding options are the generator's, checked
    when it is built)."""
    for name in ("word_dropout", "word_shuffle"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be a probability in [0, 1], got {value}")
    if cfg.word_shuffle_distance < 0:
        raise ValueError(f"--word-shuffle-distance must be an integer >= 0, got {cfg.word_shuffle_distance}")
    if cfg.word_shuffle > 0 and cfg.word_shuffle_distance == 0:
        logger.warning("--word-shuffle %s has no effect: --word-shuffle-distance 0 moves no token", cfg.word_shuffle)
    if cfg.eval_bleu and cfg.oracle_latents:
        raise ValueError("--oracle-latents with --eval-bleu would report the oracle's BLEU as bleu (and choose "
                         "checkpoints by it); validation already logs it as bleu_oracle: drop --oracle-latents")


@register_task("latent_translation", dataclass=LatentTranslationConfig)
class LatentTranslationTask(TranslationTask):
    cfg: LatentTranslationConfig

    def __init__(self, cfg: LatentTranslationConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        check_task_options(cfg)

    def add_noise(self, sample):
        """Noised copy of the target as the autoencoder input (training only; the target itself is kept)."""
        if self.cfg.word_dropout <= 0 and self.cfg.word_shuffle <= 0:
            return sample
        target = sample["target"]
        d = self.target_dictionary
        real = target.ne(d.pad()) & target.ne(d.eos())
        noisy = word_shuffle(target, real, self.cfg.word_shuffle, self.cfg.word_shuffle_distance)
        noisy = word_dropout(noisy, real, self.cfg.word_dropout, d.unk())
        return {**sample, "ae_input": noisy}

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        return super().train_step(self.add_noise(sample), model, criterion, optimizer, update_num, ignore_grad)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        for model in models:
            if not hasattr(model, "encode_source"):
                arch = getattr(getattr(model, "args", None), "arch", None) or type(model).__name__
                raise ValueError(f"--task latent_translation needs a latent_transformer checkpoint; this one is "
                                 f"{arch} (decode it with its own task, e.g. --task translation)")
        if getattr(args, "sampling", False):
            raise ValueError("--sampling: the latent generator does not sample tokens (the decoder emits every token "
                             "at once); --npd-candidates k decodes k sampled latent sequences instead")
        beam, nbest = getattr(args, "beam", 1) or 1, getattr(args, "nbest", 1) or 1
        # fairseq's own default is --beam 5: warn only about a beam the user chose (or any --nbest)
        if beam not in (1, 5) or nbest > 1:
            logger.warning("the latent transformer decodes one hypothesis per sentence: --beam %d / --nbest %d are "
                           "ignored (--latent-beam K searches over latent sequences)", beam, nbest)
        if beam > 1 or nbest > 1:
            try:  # so that fairseq-generate's summary line does not claim a beam
                from omegaconf import open_dict

                with open_dict(args):
                    args.beam, args.nbest = 1, 1
            except Exception:  # an argparse Namespace or a read-only config
                pass
        teacher = None
        if self.cfg.npd_teacher:
            if self.cfg.npd_candidates == 1 and self.cfg.latent_beam == 1:
                logger.warning("--npd-teacher has no effect: it rescores the candidates of --npd-candidates K > 1 "
                               "or --latent-beam K > 1, and neither is given")
            teacher = self.load_npd_teacher(self.cfg.npd_teacher, models)
        generator = LatentGenerator(
            self.target_dictionary,
            max_len_a=getattr(args, "max_len_a", 0.0),
            max_len_b=getattr(args, "max_len_b", 200),
            npd_candidates=self.cfg.npd_candidates,
            npd_teacher=teacher,
            oracle_latents=self.cfg.oracle_latents,
            latent_beam=self.cfg.latent_beam,
            length_beam=self.cfg.latent_length_beam,
        )
        for model in models[:1]:
            generator.check_model(model)
        return generator

    def load_npd_teacher(self, path, models):
        from fairseq import checkpoint_utils

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--npd-teacher: no such checkpoint: {path}")
        state = checkpoint_utils.load_checkpoint_to_cpu(path)  # read once: the model and its training data
        (teacher,), _ = checkpoint_utils.load_model_ensemble([path], task=self, state=state)
        if hasattr(teacher, "encode_source"):
            raise ValueError(f"--npd-teacher {path} is a latent_transformer checkpoint; the teacher must be an "
                             "autoregressive translation model (e.g. --arch transformer, scripts/train-teacher.sh) "
                             "with the same dictionaries")
        if len(teacher.decoder.dictionary) != len(self.target_dictionary):
            raise ValueError(f"--npd-teacher {path}: its target dictionary has {len(teacher.decoder.dictionary)} "
                             f"entries, this task's {len(self.target_dictionary)}; it must be trained on the same "
                             "binarized data (scripts/train-teacher.sh)")
        trained = trained_dictionary(state, get(get(state.get("cfg"), "task"), "target_lang") or self.cfg.target_lang)
        if trained is None:
            logger.warning("--npd-teacher %s: its training data directory is not found from here, so its vocabulary "
                           "cannot be compared with this task's (same size: %d entries); make sure it was trained "
                           "on the same binarized data", path, len(self.target_dictionary))
        elif Dictionary.load(trained).symbols != self.target_dictionary.symbols:
            raise ValueError(f"--npd-teacher {path} was trained with another target vocabulary (the same size, other "
                             f"symbols); it must be trained on the same binarized data (scripts/train-teacher.sh)")
        if models:
            p = next(models[0].parameters())
            teacher.to(device=p.device, dtype=p.dtype)
        return teacher.eval()

    def valid_step(self, sample, model, criterion):
        """fairseq's validation (``--eval-bleu``: BLEU of ordinary decoding as ``bleu``), plus, for a latent
        transformer, the BLEU of teacher-forced decoding with the autoencoder's own latents as ``bleu_oracle``."""
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.eval_bleu and hasattr(getattr(model, "decoder", None), "reference_codes"):
            oracle = LatentGenerator(self.target_dictionary, max_len_a=self.sequence_generator.max_len_a,
                                     max_len_b=self.sequence_generator.max_len_b, oracle_latents=True)
            bleu = self._inference_with_bleu(oracle, sample, model)
            logging_output["_oracle_bleu_sys_len"] = bleu.sys_len
            logging_output["_oracle_bleu_ref_len"] = bleu.ref_len
            for i, (c, t) in enumerate(zip(bleu.counts, bleu.totals)):
                logging_output[f"_oracle_bleu_counts_{i}"] = c
                logging_output[f"_oracle_bleu_totals_{i}"] = t
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not any("_oracle_bleu_sys_len" in log for log in logging_outputs):
            return
        import numpy as np
        from fairseq import metrics
        from sacrebleu.metrics import BLEU

        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        order = sum(1 for k in logging_outputs[0] if k.startswith("_oracle_bleu_counts_"))
        counts = np.array([total(f"_oracle_bleu_counts_{i}") for i in range(order)])
        totals = np.array([total(f"_oracle_bleu_totals_{i}") for i in range(order)])
        if totals.max() <= 0:
            return
        metrics.log_scalar("_oracle_bleu_counts", counts)
        metrics.log_scalar("_oracle_bleu_totals", totals)
        metrics.log_scalar("_oracle_bleu_sys_len", total("_oracle_bleu_sys_len"))
        metrics.log_scalar("_oracle_bleu_ref_len", total("_oracle_bleu_ref_len"))

        def compute(meters):
            return round(BLEU.compute_bleu(
                correct=meters["_oracle_bleu_counts"].sum, total=meters["_oracle_bleu_totals"].sum,
                sys_len=int(meters["_oracle_bleu_sys_len"].sum), ref_len=int(meters["_oracle_bleu_ref_len"].sum),
                smooth_method="exp").score, 2)

        metrics.log_derived("bleu_oracle", compute)
