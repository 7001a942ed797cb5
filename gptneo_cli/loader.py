"""One loader: a model name to (model, tokenizer), the name resolved once.

    model, tokenizer = gptneo_cli.load("125m")             # the fast causal LM
    model, tokenizer = gptneo_cli.load("125m", reference=True)   # nn.Linear, trainable

This is where a name ("125m", "org/name", "tiny", ./dir) becomes a local folder (through
`gptneo_cli.hub`, downloading on first use). Everything below takes that folder: the
model classes, the fast path, the tokenizer and the tasks never import the Hub. Device and
dtype strings are resolved here, once, and handed down as torch objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import threads as cpu_threads
from . import tokenizer as tokenizer_module
from .device import resolve_device, resolve_dtype
from .tokenizer import Tokenizer

#: The classes `head` may name (all in gptneo_cli.modeling).
HEADS = (
    "GPTNeoForCausalLM",
    "GPTNeoModel",
    "GPTNeoForSequenceClassification",
    "GPTNeoForTokenClassification",
    "GPTNeoForQuestionAnswering",
)


def resolve(
    name: str | os.PathLike[str], revision: str | None = None, *, weights: bool = True
) -> Path:
    """The local folder of a model folder, bundled model, alias or Hub id (downloaded into
    the Hugging Face cache when needed). weights=False fetches config and tokenizer only."""
    from .hub import PARTS, fetch

    parts = PARTS if weights else ("config", "tokenizer")
    return fetch(name, revision, parts=parts).folder


def load(
    name: str | os.PathLike[str],
    *,
    head: str = "GPTNeoForCausalLM",
    reference: bool = False,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    attn: str = "auto",
    quantize: str | None = None,
    compile: bool = False,
    revision: str | None = None,
    threads: int | str | None = "auto",
) -> tuple[Any, Tokenizer]:
    """Load a model and its tokenizer, in eval mode.

    The causal LM comes as the fast inference model (gptneo_cli.fast.FastCausalLM: packed
    weights, optional int8 `quantize` and `compile`); `reference=True` gives the plain
    GPTNeoForCausalLM (nn.Linear layers with the Hub's names, trainable, saveable). `head`
    names another class (see HEADS); those are always the reference kind. dtype and device
    "auto" pick the fastest good choice for this machine; None means float32 / CPU.

    `threads`: torch's CPU thread count, set for the whole process (torch.set_num_threads).
    "auto" uses the cores other processes leave free (gptneo_cli.threads explains the
    rule); a number sets it; None leaves torch's setting alone.
    """
    if cpu_threads.check_threads(threads) is None and threads is not None:
        cpu_threads.start_sample()  # measured while the name resolves and the tokenizer loads
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    dt = resolve_dtype(dtype, dev, quantize if not reference else None)
    folder = resolve(name, revision)
    return load_folder(
        folder,
        head=head,
        reference=reference,
        dtype=dt,
        device=dev,
        attn=attn,
        quantize=quantize,
        compile=compile,
        threads=threads,
    )


def load_folder(
    folder: str | os.PathLike[str],
    *,
    head: str = "GPTNeoForCausalLM",
    reference: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn: str = "auto",
    quantize: str | None = None,
    compile: bool = False,
    threads: int | str | None = "auto",
) -> tuple[Any, Tokenizer]:
    """`load` for a folder already on disk (the CLI resolves first, outside its spinner)."""
    if head not in HEADS:
        raise ValueError(f"unknown model class {head!r}: use one of {', '.join(HEADS)}")
    requested = cpu_threads.check_threads(threads)
    if threads is not None and requested is None:
        cpu_threads.start_sample()
    folder = Path(folder)
    tokenizer = tokenizer_module.load_tokenizer(folder)
    if threads is not None:  # before the fast path measures its kernels
        cpu_threads.apply(requested)
    if head == "GPTNeoForCausalLM" and not reference:
        from .fast import FastCausalLM

        model = FastCausalLM.from_pretrained(
            folder, dtype=dtype, device=device, attn=attn, quantize=quantize, compile=compile
        )
        model.source_folder = folder  # speculative decoding's self-int8 draft reloads it
        return model, tokenizer
    from . import modeling

    model = getattr(modeling, head).from_pretrained(
        folder, dtype=dtype, device=device, attn=attn, quantize=quantize, compile=compile
    )
    model.source_folder = folder
    return model, tokenizer


def load_tokenizer(name: str | os.PathLike[str], revision: str | None = None) -> Tokenizer:
    """The tokenizer of a model folder, Hub id or alias (downloads no weights)."""
    return tokenizer_module.load_tokenizer(resolve(name, revision, weights=False))
