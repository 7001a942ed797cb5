"""Packing documents into token blocks for causal-LM training."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Document, split_documents


@dataclass
class LMData:
    """Token blocks ready for training.

    train: [N, block_size + 1]; each row gives inputs row[:-1] and targets row[1:], and rows
    overlap by one token so every token of the stream is a target once.
    val: blocks of up to block_size + 1 tokens (the last one may be shorter).
    """

    train: torch.Tensor
    val: list[torch.Tensor]
    block_size: int
    train_documents: int = 0
    val_documents: int = 0

    @property
    def train_tokens(self) -> int:
        return int(self.train.shape[0] * self.block_size)

    @property
    def val_tokens(self) -> int:
        return sum(int(b.numel()) - 1 for b in self.val)

    def fingerprint(self) -> str:
        """A hash of the exact tokens, so a resume can refuse different data."""
        digest = hashlib.sha256()
        for tensor in (self.train, *self.val):
            _hash_tensor(digest, tensor)
        return digest.hexdigest()[:16]


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed a CPU tensor's bytes to `digest` without numpy (not a runtime dependency)."""
    data = tensor.detach().cpu().contiguous()
    size = data.numel() * data.element_size()
    if size:
        digest.update((ctypes.c_char * size).from_address(data.data_ptr()))


def token_stream(docs: Sequence[Document], tokenizer: Any) -> list[int]:
    """All documents' ids, each followed by eos so the model learns where texts end."""
    eos = tokenizer.eos_id
    ids: list[int] = []
    texts = [d.text for d in docs]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
    for doc_ids in encoded:
        ids.extend(doc_ids)
        if eos is not None:
            ids.append(eos)
    return ids


def pack_blocks(ids: Sequence[int], block_size: int, keep_tail: bool = False) -> list[list[int]]:
    """Cut a stream into rows of block_size + 1 tokens that overlap by one.

    The tail that does not fill a block is dropped for training and kept (if it has at least
    one target) for validation, so every held-out token counts.
    """
    rows = []
    start = 0
    while start + block_size + 1 <= len(ids):
        rows.append(list(ids[start : start + block_size + 1]))
        start += block_size
    if keep_tail and len(ids) - start >= 2:
        rows.append(list(ids[start:]))
    return rows


def prepare_lm_data(
    docs: Sequence[Document],
    tokenizer: Any,
    block_size: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    val_docs: Sequence[Document] | None = None,
) -> LMData:
    """Split (unless `val_docs` are given), tokenize and pack into blocks."""
    if val_docs is None:
        train_docs, val_list = split_documents(docs, val_fraction, seed)
    else:
        train_docs, val_list = list(docs), list(val_docs)
    train_ids = token_stream(train_docs, tokenizer)
    val_ids = token_stream(val_list, tokenizer) if val_list else []
    if not val_list and val_fraction > 0:
        cut = len(train_ids) - max(2, int(len(train_ids) * val_fraction))
        train_ids, val_ids = train_ids[:cut], train_ids[cut:]
    train_rows = pack_blocks(train_ids, block_size)
    if (
        not train_rows
        and val_docs is None
        and val_fraction > 0
        and pack_blocks(train_ids + val_ids, block_size)
    ):
        raise ValueError(
            f"val_fraction: holding out {val_fraction:g} of the data leaves "
            f"{len(train_ids)} training tokens, fewer than one block of {block_size + 1}; "
            "lower val_fraction, give more text, or give held-out text of its own"
        )
    if not train_rows:
        raise ValueError(
            f"block_size: the training text has {len(train_ids)} tokens, fewer than one block "
            f"of {block_size + 1}; give more text or a smaller block_size"
        )
    return LMData(
        train=torch.tensor(train_rows, dtype=torch.long),
        val=[torch.tensor(r, dtype=torch.long) for r in pack_blocks(val_ids, block_size, True)],
        block_size=block_size,
        train_documents=len(train_docs),
        val_documents=len(val_list),
    )
