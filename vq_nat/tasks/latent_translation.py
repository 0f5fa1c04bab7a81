"""Task ``latent_translation``: fairseq's ``translation`` plus the autoencoder's denoising noise and the
non-autoregressive latent generator (so ``fairseq-generate`` / ``fairseq-interactive`` decode through it).

Unlike fairseq's ``translation_lev`` it keeps ``FairseqTask.train_step``, which calls
``model.set_num_updates(update_num)``: the warm-up schedules see the absolute update number (also after a
resume, since fairseq seeds every update with seed + num_updates, the noise and soft-EM samples replay too).
"""
from dataclasses import dataclass, field

import torch
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..latent_generator import LatentGenerator
from ..modules.denoising import word_dropout, word_shuffle


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


@register_task("latent_translation", dataclass=LatentTranslationConfig)
class LatentTranslationTask(TranslationTask):
    cfg: LatentTranslationConfig

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
        return LatentGenerator(
            self.target_dictionary,
            max_len_a=getattr(args, "max_len_a", 0.0),
            max_len_b=getattr(args, "max_len_b", 200),
        )

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        with torch.no_grad():
            return generator.generate(models, sample, prefix_tokens=prefix_tokens, constraints=constraints)
