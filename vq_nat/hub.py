"""Translate raw text from Python with a trained Latent Transformer, through fairseq's hub interface.

    from vq_nat.hub import from_pretrained
    lt = from_pretrained("runs/quickstart/checkpoints", "checkpoint_last.pt",
                         data="runs/quickstart/data/bin", bpe_codes="runs/quickstart/data/bpe/codes")
    lt.translate("A man rides a bike.")        # one detokenized sentence
    lt.translate(["A dog runs.", "Two men talk."])   # a list in, a list out

The returned object is fairseq's ``GeneratorHubInterface`` (``translate``, ``encode``, ``decode``, ``generate``),
with the text pipeline of the training data: Moses tokenization and subword-nmt BPE on the way in, BPE removal
and Moses detokenization on the way out. Decoding options of the ``latent_translation`` task are keyword
arguments, e.g. ``from_pretrained(..., latent_length_beam=3)``.
"""
import functools
import os
from typing import List, Optional, Union


def from_pretrained(model_dir: str, checkpoint_file: str = "checkpoint_best.pt", data: Optional[str] = None,
                    bpe_codes: Optional[str] = None, tokenizer: Optional[str] = "moses", **overrides):
    """Load ``model_dir/checkpoint_file`` with the dictionaries in ``data`` (default: ``model_dir``).

    ``bpe_codes``: subword-nmt codes the training data was segmented with (``prepare-data.sh`` writes them to
    ``OUT/bpe/codes``); without them the input must already be BPE-segmented. ``tokenizer``: ``"moses"`` (as
    ``prepare-data.sh``) or ``None`` for pre-tokenized input.
    """
    import fairseq  # noqa: F401  (fairseq first, so that importing the plugin registers it)
    from fairseq import hub_utils

    from . import register
    from .checkpoint_compat import UnreadableCheckpoint

    register()
    path = os.path.join(model_dir, checkpoint_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: no checkpoint {path}")
    data = data or model_dir
    if not os.path.isdir(data) or not any(f.startswith("dict.") for f in os.listdir(data)):
        raise FileNotFoundError(f"from_pretrained: {data} holds no fairseq dictionaries (dict.SRC.txt, "
                                f"dict.TGT.txt); pass data= the fairseq-preprocess directory of the training data")
    if bpe_codes is not None:
        if not os.path.isfile(bpe_codes):
            raise FileNotFoundError(f"from_pretrained: no BPE codes file {bpe_codes}")
        overrides.update(bpe="subword_nmt", bpe_codes=os.path.abspath(bpe_codes))
    if tokenizer is not None:
        from fairseq.data.encoders import TOKENIZER_REGISTRY

        if tokenizer not in TOKENIZER_REGISTRY:
            raise ValueError(f"from_pretrained: unknown tokenizer {tokenizer!r}; choose from "
                             f"{sorted(TOKENIZER_REGISTRY)} or None (input already tokenized)")
        overrides["tokenizer"] = tokenizer
    try:
        loaded = hub_utils.from_pretrained(model_dir, checkpoint_file, os.path.abspath(data), **overrides)
    except UnreadableCheckpoint as e:  # vq_nat.checkpoint_compat names the file and what it is
        raise ValueError(f"from_pretrained: {e}") from None
    if loaded["task"].__class__.__name__ != "LatentTranslationTask":
        raise ValueError(f"from_pretrained: {path} is a {loaded['args'].task._name} checkpoint, not a "
                         f"latent_translation one (load an AR model with fairseq's TransformerModel.from_pretrained)")
    cfg = loaded["args"]
    unknown = [k for k in overrides
               if k not in cfg and not any(hasattr(cfg[section], "keys") and k in cfg[section] for section in cfg)]
    if unknown:  # fairseq would drop them without a word
        raise TypeError(f"from_pretrained: unknown option(s) {unknown}: keyword arguments are fairseq options "
                        f"with '_' for '-' (e.g. latent_length_beam=3); see docs/options.md")
    return hub_interface_class()(loaded["args"], loaded["task"], loaded["models"])


@functools.lru_cache(maxsize=None)
def hub_interface_class():
    """``LatentHubInterface``, built on first use: importing this module does not import fairseq."""
    from fairseq.hub_utils import GeneratorHubInterface

    class LatentHubInterface(GeneratorHubInterface):
        """fairseq's hub interface; the Latent Transformer decodes one hypothesis per sentence, so ``beam`` is 1."""

        def translate(self, sentences: Union[str, List[str]], beam: int = 1, verbose: bool = False,
                      **kwargs) -> Union[str, List[str]]:
            if not (isinstance(sentences, str) or (isinstance(sentences, (list, tuple))
                                                   and all(isinstance(s, str) for s in sentences))):
                hint = " (decode bytes first, e.g. text.decode('utf-8'))" if isinstance(sentences, bytes) else ""
                raise TypeError(f"translate() takes a str or a list of str, got {type(sentences).__name__}{hint}")
            fixed = [k for k in kwargs if k in self.task.cfg]
            if fixed:  # the latent generator reads them from the task, built once
                raise TypeError(f"translate(): {fixed} are the model's decoding options: pass them to "
                                f"from_pretrained(..., {fixed[0]}=...)")
            unknown = [k for k in kwargs if k not in self.cfg.generation]
            if unknown:
                raise TypeError(f"translate(): unknown option(s) {unknown} (fairseq generation options only)")
            return super().translate(list(sentences) if isinstance(sentences, tuple) else sentences, beam,
                                     verbose, **kwargs)

    return LatentHubInterface

