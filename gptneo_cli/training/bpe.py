"""Tokenizer training, for models trained from scratch (such as the bundled demo model)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def train_bpe_tokenizer(
    texts: Sequence[str] | Iterator[str], vocab_size: int, min_frequency: int = 2
) -> Any:
    """A GPT-2-style byte-level BPE trained on `texts`, with `<|endoftext|>` as id 0 and as
    bos, eos, unk and pad. Returns our Tokenizer (save it with `.save(folder)`)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ..tokenizer import ENDOFTEXT, Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
