"""Match checkpoint tensors to a model's parameters: names, shapes, what is missing.

Kept apart from modeling.py so the model reads as a model. Both loaders (the reference one
in modeling.py and the packing one in fast.py) hand every tensor of a checkpoint through
`match_checkpoint`, so both accept and refuse exactly the same files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import WeightsError

#: Top-level modules that are heads (absent from a base-model checkpoint).
HEAD_MODULES = {"lm_head", "score", "classifier", "qa_outputs"}

#: Buffers of old checkpoints that hold no weights.
_IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")


def our_name(raw: str, head_params: tuple[str, ...], is_base: bool) -> str | None:
    """Map a checkpoint tensor name to the model's parameter name; None means "ignore it".

    A base model (no `transformer.` prefix) reads causal-LM checkpoints and the other way
    round; a head this class does not have is ignored.
    """
    if raw.endswith(_IGNORED_SUFFIXES):
        return None
    head = raw.split(".", 1)[0]
    if head in HEAD_MODULES:
        return raw if head in {p.split(".", 1)[0] for p in head_params} else None
    if raw.startswith("transformer."):
        return raw[len("transformer.") :] if is_base else raw
    return raw if is_base else f"transformer.{raw}"


def match_checkpoint(
    model: nn.Module,
    tensors: Iterable[tuple[str, Any]],
    keep: Callable[[str, Any], None],
    *,
    head_params: tuple[str, ...],
    is_base: bool,
    source: str,
) -> list[str]:
    """Hand each checkpoint tensor to `keep(our_name, tensor)` after checking it fits.

    Raises WeightsError listing every missing, unexpected or wrongly shaped tensor.
    Returns the head parameters the checkpoint lacks (the caller initialises them).
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    seen: set[str] = set()
    unexpected: list[str] = []
    wrong: list[str] = []
    wrong_dtype: list[str] = []
    for raw, tensor in tensors:
        name = our_name(raw, head_params, is_base)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(raw)
        elif tuple(tensor.shape) != expected[name]:
            wrong.append(f"{raw} {list(tensor.shape)} (expected {list(expected[name])})")
        elif not tensor.dtype.is_floating_point:  # an edited header: bytes of another kind
            wrong_dtype.append(f"{raw} {str(tensor.dtype).removeprefix('torch.')}")
        else:
            keep(name, tensor)
        seen.add(name)  # present, even when refused: listed once, under its problem
    missing = [n for n in expected if n not in seen]
    new_head = [n for n in missing if n in head_params]
    missing = [n for n in missing if n not in head_params]
    problems = [
        f"{what} {_listing(names)}"
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrongly shaped", wrong),
            ("integer data for floating-point parameters in", wrong_dtype),
        )
        if names
    ]
    if problems:
        raise WeightsError(f"checkpoint {source} does not fit: " + "; ".join(problems))
    return new_head


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor(s): {shown}{more}"


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """An inference-only parameter (int8 and packed tensors cannot require grad anyway); a
    parameter stays itself, so modules sharing one tensor share one parameter."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=False)
