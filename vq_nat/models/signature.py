"""What a Latent Transformer checkpoint was trained with, saved with it as the ``signature`` buffer and checked
when it is loaded: the dictionaries (of the same size, other symbols would load silently) and the latent options."""
import logging
import zlib
from typing import Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SIGNED_OPTIONS = ("bottleneck", "codebook_update", "num_codes", "num_blocks", "num_compress_steps",
                  "latent_predictor")


def signature(args, src_dict, tgt_dict, langs=None):
    """[crc32 of the source language and symbols, of the target language and symbols, of the latent options in
    ``SIGNED_OPTIONS``] (a joined dictionary has the same symbols on both sides: the languages tell the direction;
    ``langs`` None: the symbols only, the format of the first signed checkpoints)."""
    def crc(*parts):
        return zlib.crc32("\n".join(map(str, parts)).encode("utf-8"))

    options = " ".join(f"{k}={getattr(args, k, None)}" for k in SIGNED_OPTIONS)
    if langs is None:
        return [crc(*src_dict.symbols), crc(*tgt_dict.symbols), crc(options)]
    return [crc(langs[0], *src_dict.symbols), crc(langs[1], *tgt_dict.symbols), crc(options)]


def check_signature(state_dict, own: Tensor, args, unsided: Optional[Tensor] = None):
    """A checkpoint trained on other dictionaries (of the same size: the weights would load) is an error; one
    trained with other latent options (``SIGNED_OPTIONS``, e.g. resuming with another ``--bottleneck``) a warning.
    Checkpoints from before the signature get this model's own."""
    theirs = state_dict.get("signature")
    if theirs is None:
        return {**state_dict, "signature": own.clone()}
    theirs = theirs.to(own.device)
    if unsided is not None and torch.equal(theirs[:2], unsided[:2].to(own.device)):
        theirs = torch.cat([own[:2], theirs[2:]])  # a checkpoint signed without the languages: its symbols match
    for i, side in enumerate(("source", "target")):
        if theirs[i] != own[i]:
            raise ValueError(f"this latent_transformer checkpoint was trained with another {side} language or "
                             f"dictionary (the same size, other symbols or the other direction): pass the binarized "
                             f"data directory and the -s / -t it was trained with")
    if theirs[2] != own[2]:
        logger.warning("this latent_transformer checkpoint was trained with other latent options than %s: its "
                       "weights now run under these settings (resuming? pass the options it was trained with)",
                       ", ".join(f"--{k.replace('_', '-')} {getattr(args, k, None)}" for k in SIGNED_OPTIONS))
    return state_dict
