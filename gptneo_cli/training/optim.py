"""The optimization pieces every trainer shares: AdamW groups, the warmup + cosine
schedule, mixed precision, the shuffled order of each epoch, one optimizer step, and the
checks of the options they read."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def check_positive_ints(options: Any, names: Iterable[str], optional: bool = False) -> None:
    """Each named attribute must be an int >= 1 (or None when `optional`)."""
    for name in names:
        value = getattr(options, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """A share of the data held out: in [0, 1)."""
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup from
    1/warmup to 1, then a cosine from 1 down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain float32.

    Weights and optimizer state stay float32 (mixed precision). "auto" picks bf16 on CUDA
    GPUs that have it (else fp16 with loss scaling) and float32 on CPU and MPS, where
    autocast measured slower than float32 on this project's machines.
    """
    check_precision(precision)
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "float32":
        return None
    if precision == "float16" and device.type == "cpu":
        raise ValueError(
            "precision: float16 autocast needs a CUDA or MPS device; use bfloat16 or float32 on CPU"
        )
    if precision == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision: this GPU has no bfloat16; use float16 or float32")
    return torch.bfloat16 if precision == "bfloat16" else torch.float16


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(
    params: Sequence[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95, as in GPT-style recipes) with weight decay on matrices,
    embeddings included, and none on biases and LayerNorm parameters."""
    decay = [p for _, p in params if p.dim() >= 2]
    plain = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """named_parameters() already drops the tied lm_head duplicate; keep trainable ones."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_gradients(
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    max_grad_norm: float,
) -> None:
    """Unscale (fp16), clip, step and clear: the end of every optimizer step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def backward(loss: torch.Tensor, scaler: Any) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def grad_scaler(device: torch.device, amp: torch.dtype | None) -> Any:
    """A GradScaler when autocast runs in float16 (bf16 and float32 need none)."""
    return torch.amp.GradScaler(device.type) if amp == torch.float16 else None
